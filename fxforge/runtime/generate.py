"""generate(): prefill the prompt into the KV cache, then decode one token per step.

Semantics follow transformers' `generate` (4.x/5.x, decoder-only):
- settings come, highest first, from the call's keyword arguments, a `generation_config`
  (a transformers GenerationConfig, whose unset (None) fields take the model's values as
  in transformers, or a dict of settings), the model's defaults
  (`fast.generation_defaults`), then transformers' global defaults (max_length=20 new
  tokens, top_k=50 when sampling, ...); an unsupported setting raises ValueError naming it,
  as does an unknown keyword or dict key; numpy integers count as ints;
- the result is the prompt followed by the new tokens; `max_new_tokens` wins over
  `max_length` (which counts the prompt), and an explicit max_new_tokens=None turns the
  model's own off (DEFAULT marks a keyword not given); with neither, 20 new tokens capped at the
  model's config.max_position_embeddings, as in transformers; `max_new_tokens=0` raises,
  as in transformers; a request that feeds more positions than the KV cache's
  max_seq_len raises (it feeds prompt + new tokens - 1: the last new token is never fed
  back, so GPT-2's 16 positions give a 10-token prompt 7 new tokens, as transformers);
- the logits processors (logits.py) apply in transformers' order: repetition penalty,
  no-repeat n-gram, min length / min new tokens, forced BOS / EOS (a model's own
  generation_config may set them: BART-family decoders force EOS last), then the
  sampling warpers; a caller's logits processor or stopping criterion of the type of one
  built from the settings takes its place, as transformers merges them (logits.merge:
  a MaxLengthCriteria sets the length, an EosTokenCriteria replaces eos_token_id's stop),
  with transformers' warning;
- greedy picks the argmax, sampling draws from the softmax; a row that hit a stopping
  criterion (EOS, a stop string, the caller's) continues with the pad token while others
  finish where some criterion has an eos_token_id (eos_token_id set, or an
  EosTokenCriteria), as in transformers, and unpadded otherwise;
- `num_beams > 1` runs beam search (beam.py) with beams as batch rows of the cache;
- `return_dict_in_generate=True` returns transformers' output classes with `scores` (the
  processed logits of each step) and `logits` (the raw ones) when asked for;
- left-padded batches come with an attention_mask.
"""
from __future__ import annotations

import numbers
import os
from typing import Callable, NamedTuple

import torch

from . import logits as lp
from .frames import frame_of_its_own
from .index_inputs import only_indexes
from .state import left_padding, padding_from_pad_tokens

# transformers' global defaults (GenerationConfig._get_default_generation_params) of the
# settings generate() supports; None: not set.
DEFAULTS = {
    "max_new_tokens": None, "max_length": 20, "min_new_tokens": None, "min_length": 0,
    "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
    "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "suppress_tokens": None, "begin_suppress_tokens": None, "encoder_no_repeat_ngram_size": 0,
    "eos_token_id": None, "pad_token_id": None, "stop_strings": None,
    "num_beams": 1, "length_penalty": 1.0, "early_stopping": False, "num_return_sequences": 1,
    "return_dict_in_generate": False, "output_scores": False, "output_logits": False,
}
# settings that do not change the tokens here (the cache is always used)
IGNORED = {"use_cache", "cache_implementation", "bos_token_id", "decoder_start_token_id", "transformers_version", "_from_model_config", "return_legacy_cache",
           "compile_config", "disable_compile", "is_assistant"}
# transformers settings generate() does not implement, with the value that turns each off:
# a GenerationConfig holding another value is refused
UNSUPPORTED = {
    "num_beam_groups": 1, "diversity_penalty": 0.0, "penalty_alpha": None, "top_h": None, "min_p": None,
    "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "bad_words_ids": None, "force_words_ids": None,
    "constraints": None, "sequence_bias": None,
    "exponential_decay_length_penalty": None,
    "guidance_scale": None, "renormalize_logits": False, "remove_invalid_values": False,
    "encoder_repetition_penalty": 1.0, "max_time": None,
    "low_memory": None, "prompt_lookup_num_tokens": None, "assistant_early_exit": None, "dola_layers": None,
    "watermarking_config": None, "token_healing": False, "output_attentions": False,
    "output_hidden_states": False, "min_tokens_to_keep": None, "custom_generate": None,
}


class _ModelDefault:
    """A setting a call did not give: the model's generation default applies. An explicit
    None is a value (it turns the model's default off, as in transformers), so a parameter
    that defaults to the model's cannot default to None."""

    def __repr__(self):
        return "<the model's default>"


DEFAULT = _ModelDefault()


def resolve_settings(defaults: dict | None, generation_config, options: dict,
                     caller: str = "generate()") -> tuple[dict, set]:
    """The settings of one call, and the names set anywhere (not from the global defaults).
    As transformers merges them: a `generation_config` overrides the model's defaults only
    with the values it sets (config_settings); a keyword argument always wins, an explicit
    None included (it turns a default off). `caller`: what the errors name (the Engine
    shares these rules, and its user calls submit(), not generate())."""
    given = {k: v for k, v in (defaults or {}).items() if k in DEFAULTS and v is not None}
    config = config_settings(generation_config) if generation_config is not None else {}
    bad = sorted(k for k, v in config.items() if k in UNSUPPORTED and v != UNSUPPORTED[k] and k not in IGNORED)
    if bad:
        raise ValueError(f"{caller} does not support these generation_config settings: {', '.join(bad)}")
    given.update({k: v for k, v in config.items() if k in DEFAULTS})
    overridden = set(options) | set(config)
    bad = sorted(k for k, v in (defaults or {}).items() if k in UNSUPPORTED and v is not None and v != UNSUPPORTED[k]
                 and k not in overridden)
    if bad:
        raise ValueError(f"the model's generation_config sets {', '.join(bad)}, which {caller} does not support; "
                         f"pass {bad[0]}={UNSUPPORTED[bad[0]]!r} (its neutral value) to {caller} to run without it")
    bad = sorted(k for k, v in options.items() if k not in DEFAULTS and k not in IGNORED
                 and not (k in UNSUPPORTED and (v is None or v == UNSUPPORTED[k])))
    if bad:
        raise ValueError(f"{caller} does not support these arguments: {', '.join(bad)}{_did_you_mean(bad)}")
    given.update({k: v for k, v in options.items() if k in DEFAULTS})  # an explicit None turns a default off
    return _plain_numbers({**DEFAULTS, **given}), set(given)


def config_settings(generation_config) -> dict:
    """The settings a call's `generation_config` sets, which override the model's own.
    A GenerationConfig (or an object with to_dict()): its fields that are not None and
    differ from a fresh GenerationConfig()'s; transformers takes the others from the
    model's generation_config (5.x: every field of GenerationConfig() is None; 4.x: fields
    at their global default take the model's value). Attributes transformers does not know
    are ignored, as transformers ignores them. A dict: its keys that are not None, each of
    which must be a generation setting (a misspelled key is refused, as a misspelled
    keyword argument is)."""
    if isinstance(generation_config, dict):
        check_setting_names(generation_config, "generation_config")
        return {k: v for k, v in generation_config.items() if v is not None}
    if not hasattr(generation_config, "to_dict"):
        raise ValueError(f"generation_config must be a transformers GenerationConfig or a dict, got "
                         f"{type(generation_config).__name__}")
    fresh = _fresh_generation_config()
    return {k: v for k, v in generation_config.to_dict().items()
            if v is not None and (k not in fresh or v != fresh[k]) and k not in IGNORED}


def check_setting_names(settings: dict, what: str):
    """Every key of a dict of settings (a call's generation_config, or one assigned to
    fast.generation_config / generation_defaults) is a generation setting: a misspelled one
    is refused by name, with the setting it is close to, rather than silently dropped."""
    unknown = sorted(str(k) for k in settings if k not in _known_settings())
    if unknown:
        raise ValueError(f"{what} has keys that are not generation settings: {', '.join(unknown)}"
                         f"{_did_you_mean(unknown)}")


def _fresh_generation_config() -> dict:
    try:
        from transformers import GenerationConfig
    except ImportError:
        return {}
    return GenerationConfig().to_dict()


def _known_settings() -> set:
    """Every generation setting's name: generate()'s and transformers' GenerationConfig's."""
    return set(DEFAULTS) | IGNORED | set(UNSUPPORTED) | set(_fresh_generation_config())


# transformers' arguments for what fxforge spells otherwise
_FXFORGE_SPELLING = {"assistant_model": "draft=<an OptimizedModel> (speculative decoding)",
                     "prompt_lookup_num_tokens": "draft=\"ngram\" with num_draft_tokens=k",
                     "num_assistant_tokens": "num_draft_tokens=k with draft="}


# model inputs transformers' generate passes on to forward(), and what fxforge's does instead
_MODEL_INPUTS = {
    "inputs": "transformers' name for the prompt; fxforge's generate() takes it as input_ids",
    "inputs_embeds": "fxforge's generate() starts from token ids: pass the prompt as input_ids (fast(inputs_embeds=...) "
                     "runs one forward pass, for a model optimized with inputs_embeds in example_kwargs)",
    "position_ids": "generate() computes the positions itself (left padding comes from attention_mask)",
    "cache_position": "generate() computes the positions itself",
    "past_key_values": "generate() keeps its own KV cache (optimize(..., kv_cache=True))",
    "token_type_ids": "generate() passes the model input_ids only (and attention_mask for padding)",
}
# a name this close to a known setting is taken for a misspelling of it (difflib's ratio;
# its default 0.6 took token_type_ids for pad_token_id)
_TYPO_SIMILARITY = 0.8


def _did_you_mean(names: list) -> str:
    """A hint per name, "name: hint", all in one parenthesis: fxforge's own spelling of a
    transformers argument, what generate() does instead for a model input (token_type_ids,
    position_ids: no setting is meant), else the known setting a misspelling is close to;
    a setting transformers knows that fxforge does not implement gets none (it is no
    misspelling)."""
    known = _known_settings()
    hints = []
    for name in names:
        if name in _FXFORGE_SPELLING:
            hints.append(f"{name}: fxforge spells it {_FXFORGE_SPELLING[name]}")
        elif name in _MODEL_INPUTS:
            hints.append(f"{name}: {_MODEL_INPUTS[name]}")
        elif looks_like_model_input(name, known):
            hints.append(f"{name} looks like a model input: generate() passes the model input_ids only "
                         "(and attention_mask for padding)")
        elif name not in known:
            close = misspelling_of(name, known)
            hints += [f"{name}: did you mean {close}?"] if close else []
    return f" ({'; '.join(hints)})" if hints else ""


def looks_like_model_input(name: str, known) -> bool:
    """A keyword no setting is named like, spelled as a model input (token_type_ids, pixel_values)."""
    return name.endswith(("_ids", "_mask", "_embeds", "_values")) and name not in known


def misspelling_of(name: str, known) -> str | None:
    """The name in `known` that `name` is a misspelling of (close enough), or None."""
    import difflib

    close = difflib.get_close_matches(name, sorted(known), 1, cutoff=_TYPO_SIMILARITY)
    return close[0] if close else None


# the settings that hold an int, a number, or token ids (an int or a list of ints)
INT_SETTINGS = ("max_new_tokens", "max_length", "min_new_tokens", "min_length", "top_k", "no_repeat_ngram_size",
                "encoder_no_repeat_ngram_size", "num_beams", "num_return_sequences", "pad_token_id",
                "forced_bos_token_id")
FLOAT_SETTINGS = ("temperature", "top_p", "repetition_penalty", "length_penalty")
TOKEN_LIST_SETTINGS = ("eos_token_id", "forced_eos_token_id", "suppress_tokens", "begin_suppress_tokens")


def _plain_int(value):
    """A numpy or 0-d tensor integer as a Python int (transformers takes np.int64 token ids
    and counts); anything else as it is, for the checks to name."""
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point() \
            and not value.is_complex() and value.dtype != torch.bool:
        return int(value)
    return value


def _plain_numbers(s: dict) -> dict:
    for key in INT_SETTINGS:
        s[key] = _plain_int(s[key])
    for key in FLOAT_SETTINGS:
        value = s[key]
        if isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)):
            s[key] = float(value)
        else:
            s[key] = _plain_int(value)
    for key in TOKEN_LIST_SETTINGS:
        value = s[key]
        s[key] = [_plain_int(v) for v in value] if isinstance(value, (list, tuple)) else _plain_int(value)
    return s


def defaults_from_generation_config(config) -> dict:
    """The settings of a transformers generation_config that generate() uses (the model's
    defaults): those it sets (not None, as transformers 5 marks unset fields). Settings
    generate() does not implement are kept too when they are on, so that generate() refuses
    them rather than silently produce other tokens than transformers would."""
    out = {key: getattr(config, key) for key in DEFAULTS if getattr(config, key, None) is not None}
    out.update({key: getattr(config, key) for key, off in UNSUPPORTED.items() if key not in IGNORED
                and getattr(config, key, None) is not None and getattr(config, key) != off})
    return out


def fed_positions(prompt_len: int, new_tokens: int) -> int:
    """The positions a request puts through the model: the prompt and every new token but
    the last, which is returned, never fed back (transformers' generate reaches a position
    table's last row this way: n_positions=16 generates 10 + 7 tokens)."""
    return prompt_len + new_tokens - 1


def position_table_rows(model) -> int | None:
    """The rows of the model's learned position table (GPT-2's wpe, OPT's table less its
    offset of 2) that its positions index, read from the graph; None where there is none
    (rotary or ALiBi models) or it cannot be told. A KV cache can never hold more."""
    try:
        from ..ir import roles
        from ..passes.kv_cache import position_table_limit

        graph = model.graph
        index = roles.input_index(graph, roles.POSITIONS)
        cache_len = getattr(model, "_cache_len", None)
        seq = graph.inputs[0].shape[1]
        if cache_len is None:
            return None
        positions = graph.inputs[index] if index is not None else None
        return position_table_limit(graph, None, positions, seq, cache_len)
    except Exception:  # noqa: BLE001 (a hint for an error message only: none rather than a wrong one)
        return None


def longer_cache_hint(max_seq_len: int, table_rows) -> str:
    """The end of an error past max_seq_len, after its advice to ask for fewer tokens: a
    larger KVCacheConfig only where the model's position table (table_rows: its rows, or
    a function giving them) has room for one."""
    rows = table_rows() if callable(table_rows) else table_rows
    if rows is None:
        return ", or optimize with a larger KVCacheConfig(max_seq_len=...)"
    if rows > max_seq_len:
        return (f", or optimize with a larger KVCacheConfig(max_seq_len=...) (at most {rows}, the rows of the "
                "model's position table)")
    return (f" (the model's position table has {rows} rows: no KV cache can hold more positions, and transformers "
            "cannot feed more either)")


def check_generate_args(layout, batch: int, prompt_len: int, max_new_tokens: int, padded: bool,
                        cache_bytes=None, memory_bytes: int | None = None, shifted_positions_ok: bool = False,
                        length_from: str | None = None, rows_from: str | None = None, table_rows=None):
    """Every limit is checked before any work, not discovered mid-generation.
    cache_bytes(batch, positions): the KV cache's size; memory_bytes: what the device has.
    shifted_positions_ok: the source model itself gives left-padded rows shifted positions
    (it takes no position_ids), so positions shared by the batch are what it computes.
    length_from: the setting the new tokens come from (new_token_count), rows_from: how the
    prompts became `batch` rows (beams, sequences), both for the errors. table_rows: the
    rows of the model's position table (or a function giving them, called only for an
    error), so that an error suggests a larger KV cache only where one can work.

    A request feeds prompt_len + max_new_tokens - 1 positions (fed_positions): the last
    new token is returned, never fed, so it needs no cache position."""
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    length_from = length_from or f"max_new_tokens ({max_new_tokens})"
    total = prompt_len + max_new_tokens
    fed = fed_positions(prompt_len, max_new_tokens)
    limit = layout.max_seq_len
    if limit is not None and fed > limit:
        hint = longer_cache_hint(limit, table_rows)
        feeds = (f"the model is fed {fed} positions (every token but the last new one), more than max_seq_len="
                 f"{limit} (the KV cache's positions)")
        if length_from.startswith("max_length="):
            fewer = f"use at most max_length={limit + 1}" if prompt_len <= limit else \
                f"shorten the prompt to at most {limit} tokens"
            raise ValueError(f"{length_from} (the prompt's {prompt_len} tokens included): {feeds}; {fewer}{hint}")
        what = length_from if length_from.startswith("max_new_tokens") else \
            f"{max_new_tokens} new tokens ({length_from})"
        room = limit - prompt_len + 1
        fewer = f"ask for at most max_new_tokens={room}" if room > 0 else \
            f"shorten the prompt to at most {limit} tokens"
        raise ValueError(f"the prompt ({prompt_len} tokens) plus {what} is {total} tokens: {feeds}; {fewer}{hint}")
    rows = f"{rows_from} = {batch} rows" if rows_from else f"batch {batch}"
    if layout.max_batch is not None and batch > layout.max_batch:
        raise ValueError(f"{rows} is larger than the KV cache's max_batch={layout.max_batch}; "
                         "optimize with KVCacheConfig(max_batch=...) or split the batch")
    if cache_bytes is not None:
        check_cache_memory(cache_bytes(batch, fed), memory_bytes,
                           f"the prompt ({prompt_len} tokens) plus {max_new_tokens} new tokens", f"for {rows}",
                           "ask for fewer tokens or a smaller batch")
    if padded and not layout.per_row_positions and not shifted_positions_ok:
        raise ValueError("this model's positions could not be made per row by the kv_cache pass (see its report "
                         "note), so left-padded batches would get shifted positions; generate prompts of equal "
                         "length, or one at a time")


def process_logits(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus), as transformers' warpers do."""
    return lp.apply(lp.warpers(temperature, top_k, top_p), None, logits)


def check_generator(generator, device: torch.device) -> None:
    """A sampling generator is a torch.Generator on the model's device type, or None (checked
    up front: torch.multinomial would fail only at the first sampled token)."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__} "
                         f"{generator!r}; e.g. torch.Generator(device).manual_seed(0)")
    if generator.device.type != torch.device(device).type:
        raise ValueError(f"the generator is on {generator.device} and the model on {device}; "
                         f"make it with torch.Generator({str(device)!r})")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_token_ids(key: str, value):
    """A token-id setting: None, an int, a list of ints (or an integer tensor for the lists)."""
    if value is None or _is_int(value):
        return
    if key in TOKEN_LIST_SETTINGS:
        if isinstance(value, torch.Tensor) and not value.is_floating_point() and not value.is_complex() \
                and value.dtype != torch.bool:
            return
        if isinstance(value, (list, tuple)) and all(_is_int(v) for v in value):
            return
        raise ValueError(f"{key} must be a token id (an int), a list of token ids, or None, got "
                         f"{type(value).__name__} {value!r}")
    raise ValueError(f"{key} must be a token id (an int) or None, got {type(value).__name__} {value!r}")


def _check_settings(s: dict):
    if s["do_sample"]:
        temperature = s["temperature"]  # None: no temperature warper, as in transformers
        if temperature is not None and (not _is_number(temperature) or not temperature > 0):
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r} (a number, or None "
                             "for no temperature warper)")
        top_k = s["top_k"]
        if top_k is not None and (not _is_int(top_k) or top_k < 0):
            raise ValueError(f"top_k must be an int >= 0 or None, got {top_k!r}")
        top_p = s["top_p"]
        # 0 is allowed, as in transformers: only the most likely token is kept
        if top_p is not None and (not _is_number(top_p) or not 0.0 <= top_p <= 1.0):
            raise ValueError(f"top_p must be in [0, 1], got {top_p!r} (a number, or None for no top-p warper)")
    penalty = s["repetition_penalty"]
    if penalty is not None and (not _is_number(penalty) or not penalty > 0):
        raise ValueError(f"repetition_penalty must be a number > 0, got {penalty!r}")
    for key in ("no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "min_new_tokens", "min_length"):
        value = s[key]
        if value is not None and (not _is_int(value) or value < 0):
            raise ValueError(f"{key} must be an int >= 0, got {value!r}")
    for key in ("pad_token_id", "forced_bos_token_id") + TOKEN_LIST_SETTINGS:
        _check_token_ids(key, s[key])
    beams, returns = s["num_beams"], s["num_return_sequences"]
    for key, value in (("num_beams", beams), ("num_return_sequences", returns)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{key} must be an int >= 1, got {value!r}")
    if beams > 1:
        if s["do_sample"]:
            raise ValueError("beam sampling (num_beams > 1 with do_sample=True) is not supported: use "
                             "num_beams=1 to sample or do_sample=False for beam search")
        if returns > beams:
            raise ValueError(f"num_return_sequences ({returns}) must be <= num_beams ({beams})")
        # None: neither True nor "never", so transformers' beam search runs its early_stopping=False heuristic
        if s["early_stopping"] not in (True, False, "never", None):
            raise ValueError(f"early_stopping must be True, False, 'never' or None, got {s['early_stopping']!r}")
        if not _is_number(s["length_penalty"]):
            raise ValueError(f"length_penalty must be a number (the exponent of the length that divides a beam's "
                             f"score), got {s['length_penalty']!r}")
    elif returns > 1 and not s["do_sample"]:
        raise ValueError("greedy search returns one sequence per prompt: num_return_sequences > 1 needs "
                         "do_sample=True or num_beams >= num_return_sequences")


def new_token_count(s: dict, given: set, prompt_len: int, max_positions: int | None = None) -> tuple[int, str]:
    """The number of new tokens, as transformers counts them (_prepare_generated_length),
    and how it was set, for the errors of check_generate_args: max_new_tokens, else
    max_length (prompt included), else transformers' default max_length of 20 new tokens,
    capped at the model's `max_positions` (config.max_position_embeddings) in all."""
    count = _whole(s["max_new_tokens"])
    if count is not None:
        if not _is_int(count):
            raise ValueError(f"max_new_tokens must be an int, got {type(count).__name__} {count!r}")
        if count < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {count!r}: transformers' generate refuses 0 "
                             "too (`max_new_tokens` must be greater than 0)")
        return count, f"max_new_tokens ({count})"
    if "max_length" in given and s["max_length"] is not None:
        max_length = _whole(s["max_length"])
        how = f"max_length={max_length!r}"
    else:
        max_length = prompt_len + DEFAULTS["max_length"]
        how = "transformers' default length: max_length=20 new tokens"
        if max_positions is not None and max_length > max_positions:
            max_length = max_positions
            how += f", capped at the model's max_position_embeddings={max_positions}"
    if not _is_int(max_length) or prompt_len >= max_length:
        raise ValueError(f"the prompt has {prompt_len} tokens but max_length is {max_length!r} (from {how}): "
                         "max_length counts the prompt; increase it or set max_new_tokens")
    return max_length - prompt_len, how


class _Builtin:
    """A stopping criterion the decoding loops run themselves (the length, EOS), standing
    for transformers' class of that name where the caller's criteria are merged in."""

    def __init__(self, stands_for: str):
        self.stands_for = stands_for


class Stopping(NamedTuple):
    criteria: list  # the callables checked after each step: stop strings, the caller's
    eos: torch.Tensor | None  # the EOS ids that end a row; None where none, or a caller's EosTokenCriteria replaced it
    max_length: int | None  # a caller's MaxLengthCriteria's max_length, where it replaced generate()'s own length
    pads: bool  # rows that stopped continue with the pad token (some criterion has an eos_token_id)


def _whole(value):
    """A float that is a whole number (5.0) as the int: transformers' generate takes it for
    a length (max_new_tokens=5.0 makes 5 tokens). Another float stays, for the check to
    refuse (transformers would run to the next whole length past it)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _stopping(stop_strings, tokenizer, stopping_criteria, eos: torch.Tensor | None) -> Stopping:
    """transformers' stopping criteria (_get_stopping_criteria): the length, stop strings,
    EOS, merged with the caller's `(input_ids [N, L], scores) -> bool [N]` callables as
    transformers merges them (logits.merge): a caller's criterion of a built-in one's type
    replaces it (a MaxLengthCriteria the length, an EosTokenCriteria eos_token_id's).
    Rows that stop are padded where any criterion has an eos_token_id, as in transformers."""
    length, eos_stop = _Builtin("MaxLengthCriteria"), _Builtin("EosTokenCriteria")
    defaults = [length]
    if stop_strings is not None:
        if tokenizer is None:
            raise ValueError("stop_strings needs the model's tokenizer: generate(..., stop_strings=..., "
                             "tokenizer=tokenizer)")
        from transformers.generation.stopping_criteria import StopStringCriteria

        defaults.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings))
    if eos is not None:
        defaults.append(eos_stop)
    custom = callables(stopping_criteria, "stopping_criteria", "(input_ids, scores) -> a bool tensor [batch]",
                       "StoppingCriteriaList")
    merged = lp.merge(defaults, custom, "stopping criteria")
    criteria = [c for c in merged if not isinstance(c, _Builtin)]
    eos_kept = any(c is eos_stop for c in merged)
    max_length = None if merged[0] is length else merged[0].max_length
    return Stopping(criteria, eos if eos_kept else None, max_length,
                    eos_kept or any(hasattr(c, "eos_token_id") for c in criteria))


def length_of_criterion(max_length, prompt_len: int, new_tokens: int, beams: bool) -> tuple[int, str]:
    """The new tokens when a caller's MaxLengthCriteria(max_length) takes the place of
    generate()'s own length (`new_tokens`), as in transformers: sampling and greedy run
    until it stops them (one token at least: it is checked after each), beam search stops
    at it too but cannot run past its own length (transformers fails with an IndexError),
    so that is refused."""
    how = f"max_length={max_length!r} (the MaxLengthCriteria in stopping_criteria, which takes the place of " \
          "generate()'s own length, as in transformers)"
    if not _is_int(max_length):
        raise ValueError(f"{how}: its max_length must be an int")
    if beams and max_length > prompt_len + new_tokens:
        raise ValueError(f"{how} is longer than the beam search's own length, the prompt ({prompt_len} tokens) "
                         f"plus {new_tokens} new tokens: transformers' beam search fails with an IndexError there; "
                         f"pass max_new_tokens={max_length - prompt_len} instead")
    return (new_tokens if beams else max(1, max_length - prompt_len)), how


def callables(items, name: str, signature: str, transformers_list: str) -> list:
    """The caller's logits processors or stopping criteria: a list of callables, checked
    up front (a bad item would fail only at the first step, with a bare TypeError)."""
    if items is None:
        return []
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"{name} must be a list of callables {signature} (e.g. transformers' {transformers_list}), "
                        f"got {type(items).__name__} {items!r}")
    for i, item in enumerate(items):
        if not callable(item):
            raise TypeError(f"{name} must be a list of callables {signature}; item {i} is "
                            f"{type(item).__name__} {item!r}")
    return list(items)


def stop_mask(criteria: list, seq: torch.Tensor, scores) -> torch.Tensor | None:
    done = None
    for criterion in criteria:
        hit = criterion(seq, scores)
        hit = torch.as_tensor(hit, device=seq.device).bool().expand(seq.shape[0])
        done = hit if done is None else done | hit
    return done


def output(kind: str, **fields):
    """transformers' GenerateDecoderOnlyOutput / GenerateBeamDecoderOnlyOutput, or a plain
    object with the same fields where transformers is not installed."""
    try:
        from transformers.generation import utils
        return getattr(utils, kind)(**fields)
    except ImportError:
        import types
        return types.SimpleNamespace(**fields)


def vocab_size(model) -> int | None:
    """The vocabulary size: the last dim of the graph's logits output (None where unknown)."""
    try:
        from .launch_count import _vocab_size

        return _vocab_size(model)
    except Exception:
        return None


def check_token_ids(ids: torch.Tensor, vocab: int | None, name: str):
    """Token ids must lie in [0, vocab): name the first one that does not (the embedding's
    own error is a bare IndexError)."""
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (vocab is not None and high >= vocab):
        bad = low if low < 0 else high
        where = tuple(int(i) for i in (ids == bad).nonzero()[0])
        at = f"position {where[0]}" if len(where) == 1 else str(where)
        raise ValueError(f"{name} has token id {bad} at {at}, outside the model's vocabulary "
                         f"[0, {vocab if vocab is not None else 'vocab'})")


def check_forced_tokens(s: dict, vocab: int | None):
    """forced_bos_token_id and forced_eos_token_id must be tokens of the vocabulary (they
    index the scores: transformers fails with an IndexError at the step that forces them)."""
    for key in ("forced_bos_token_id", "forced_eos_token_id"):
        for token in _as_list(s[key]):
            if token < 0 or (vocab is not None and token >= vocab):
                raise ValueError(f"{key}={s[key]!r} is outside the model's vocabulary "
                                 f"[0, {vocab if vocab is not None else 'vocab'})")


def missing_input_ids(kwargs: dict) -> Exception:
    """The error of a generate() call without input_ids (inputs_embeds instead: unsupported;
    transformers' `inputs=`: named)."""
    if kwargs.get("inputs_embeds") is not None:
        return ValueError(f"generate() does not take inputs_embeds: {_MODEL_INPUTS['inputs_embeds']}")
    if "inputs" in kwargs:
        return TypeError(f"generate() does not take inputs=: {_MODEL_INPUTS['inputs']} (generate(input_ids=ids) "
                         "or generate(ids))")
    return TypeError("generate() needs input_ids, the prompt's token ids [batch, length]")


def check_input_ids(input_ids):
    """The prompt: an int64 tensor [batch, length] (int32 already widened). The error names
    what is wrong: the type, the shape (one prompt of shape [length] wants ids[None]), or
    the dtype."""
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be an int64 tensor [batch, length], got {type(input_ids).__name__}")
    got = f"a {input_ids.dtype} tensor of shape {tuple(input_ids.shape)}"
    if input_ids.dim() != 2:
        fix = "one prompt of shape [length] is input_ids[None]" if input_ids.dim() == 1 else \
            "pass the prompts as rows of one [batch, length] tensor"
        raise ValueError(f"input_ids must be a tensor [batch, length] (2-D), got {got}; {fix}")
    if input_ids.dtype != torch.long:
        raise ValueError(f"input_ids must be an int64 (or int32) tensor [batch, length], got {got}; token ids of "
                         "another dtype: pass input_ids.long()")


def _ids_only_index(model) -> bool:
    from ..ir import roles

    users = roles.user_inputs(model.graph)
    return bool(users) and only_indexes(model.graph, users[0])


@frame_of_its_own  # the per-token Python calls stay off data-stack chunk boundaries (frames.py)
def generate(model, input_ids: torch.Tensor, max_new_tokens=DEFAULT, *, defaults: dict | None = None,
             generation_config=None, attention_mask=None, streamer=None, generator: torch.Generator | None = None,
             stopping_criteria=None, logits_processor=None, tokenizer=None, draft=None,
             num_draft_tokens: int | None = None, draft_stats=None, **options):
    """`model` is an OptimizedModel whose graph went through the kv_cache pass; `defaults`
    its generation_defaults; `options` the transformers settings (DEFAULTS). `draft`: an
    OptimizedModel or "ngram" for speculative decoding (speculative.py). `max_new_tokens`
    not given: the model's; an explicit None turns the model's off (max_length counts)."""
    if max_new_tokens is not DEFAULT:
        options["max_new_tokens"] = max_new_tokens
    s, given = resolve_settings(defaults, generation_config, options)
    _check_settings(s)  # before the settings are used (a pad_token_id of the wrong type, ...)
    # int32 ids pick the same rows (the result is int64, as eager's); narrower ones (int16,
    # uint8) eager's embedding refuses, so they are refused here too, not widened
    if isinstance(input_ids, torch.Tensor) and input_ids.dtype == torch.int32 and _ids_only_index(model):
        input_ids = input_ids.long()
    check_input_ids(input_ids)
    batch, prompt_len = input_ids.shape
    if prompt_len == 0:
        raise ValueError("input_ids is empty: generation needs at least one prompt token")
    if batch == 0:
        raise ValueError(f"input_ids has no rows (shape {tuple(input_ids.shape)}): generation needs at least one "
                         "prompt")
    device = model.device
    input_ids = input_ids.to(device)
    vocab = vocab_size(model)
    # a prompt's ids index the embedding, whose rows may be fewer than the logits' width
    check_token_ids(input_ids, getattr(model, "token_vocabulary", None) or vocab, "input_ids")
    check_forced_tokens(s, vocab)
    pad = None if attention_mask is not None else \
        padding_from_pad_tokens(input_ids, s["pad_token_id"], _as_list(s["eos_token_id"]), device)
    if pad is None:
        pad = left_padding(attention_mask, batch, prompt_len, device)
    new_tokens, length_from = new_token_count(s, given, prompt_len, max_position_embeddings(model))
    check_generator(generator, device)
    beams = s["num_beams"]
    eos = _as_list(s["eos_token_id"])
    eos_t = torch.tensor(eos, device=device) if eos else None
    stop = _stopping(s["stop_strings"], tokenizer, stopping_criteria, eos_t)
    # generate()'s own length as set (a caller's MaxLengthCriteria changes how many tokens
    # run, not what forced_eos_token_id counts from, as in transformers)
    max_length = prompt_len + new_tokens
    if stop.max_length is not None:
        new_tokens, length_from = length_of_criterion(stop.max_length, prompt_len, new_tokens, beams > 1)
    if stop.pads and s["pad_token_id"] is None and not eos and beams == 1 and draft is None:
        raise ValueError("a stopping criterion with an eos_token_id (transformers' EosTokenCriteria) is given, so rows "
                         "that stop continue with the pad token, but neither pad_token_id nor eos_token_id is set: "
                         "pass pad_token_id=... (transformers' generate fails here with a TypeError)")
    if beams > 1 and streamer is not None:
        raise ValueError("streamer cannot be used with beam search (as in transformers)")
    # beams, or sampled sequences, are rows of their own (transformers' input expansion)
    expand = max(beams, s["num_return_sequences"])
    prompt = input_ids  # before the expansion: encoder_no_repeat_ngram_size reads it per prompt
    if expand > 1:
        input_ids, pad = input_ids.repeat_interleave(expand, dim=0), pad.repeat_interleave(expand, dim=0)
    rows = input_ids.shape[0]
    rows_from = None if expand == 1 else \
        f"{batch} prompt{'s' if batch > 1 else ''} x {expand} " + \
        ("beams" if beams > 1 else "sequences (num_return_sequences)")
    check_generate_args(model.kv_layout, rows, prompt_len, new_tokens, bool((pad > 0).any()),
                        model.kv_cache_bytes, device_memory_bytes(device),
                        getattr(model, "left_padding_shifts_positions", False), length_from, rows_from,
                        lambda: position_table_rows(model))
    # the prefill, then one-token steps after prompt_len .. prompt_len + new_tokens - 2 cached tokens
    model.check_step_sizes(rows, [prompt_len])
    if new_tokens > 1:
        model.check_step_sizes(rows, [1], range(prompt_len, prompt_len + new_tokens - 1))

    pad_token_id = s["pad_token_id"]
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    min_length = prompt_len + s["min_new_tokens"] if s["min_new_tokens"] is not None else s["min_length"]
    processors = lp.processors(
        repetition_penalty=s["repetition_penalty"], pad=pad, no_repeat_ngram_size=s["no_repeat_ngram_size"],
        min_length=min_length, eos=eos_t, do_sample=s["do_sample"], temperature=s["temperature"],
        top_k=s["top_k"], top_p=s["top_p"], forced_bos=s["forced_bos_token_id"], min_new_tokens=s["min_new_tokens"],
        custom=callables(logits_processor, "logits_processor", "(input_ids, scores) -> scores", "LogitsProcessorList"),
        forced_eos=_as_list(s["forced_eos_token_id"]), max_length=max_length,
        suppress_tokens=s["suppress_tokens"], begin_suppress_tokens=s["begin_suppress_tokens"], prompt_len=prompt_len,
        prompt_no_repeat_ngram_size=s["encoder_no_repeat_ngram_size"], prompt=prompt)
    criteria = stop.criteria
    want_scores = s["return_dict_in_generate"] and s["output_scores"]
    want_logits = s["return_dict_in_generate"] and s["output_logits"]

    if draft is not None:
        return _speculative(model, input_ids, pad, new_tokens, draft, num_draft_tokens, draft_stats, processors,
                            criteria, stop.eos, s, streamer, generator)
    if num_draft_tokens is not None or draft_stats is not None:
        raise ValueError("num_draft_tokens and draft_stats go with draft= (an OptimizedModel or 'ngram')")

    if beams > 1:
        from .beam import beam_search
        return beam_search(model, input_ids, pad, new_tokens, beams, processors, criteria, eos_t, pad_token_id, s,
                           stop_eos=stop.eos)

    emit = _stream_fn(streamer)
    if streamer is not None and hasattr(streamer, "put"):
        streamer.put(input_ids.cpu())
    scores, raw = ([] if want_scores else None), ([] if want_logits else None)
    # this call's own cache: concurrent and re-entrant calls never share buffers (state.py);
    # the last new token is never fed, so it takes no position
    with model.kv_cache_lease(rows, fed_positions(prompt_len, new_tokens)) as cache:
        cache.prepare(pad, model.bias_dtype())
        seq = torch.empty(rows, prompt_len + new_tokens, dtype=torch.long, device=device)
        seq[:, :prompt_len] = input_ids
        unfinished = torch.ones(rows, dtype=torch.bool, device=device)
        length, step_ids, start = prompt_len, input_ids, 0
        for _ in range(new_tokens):
            # one-token steps on static buffers (CUDA graphs on a GPU), prefill eager
            logits = model.run_step(step_ids, start, pad, cache)[:, -1, :].float()
            start += step_ids.shape[1]
            processed = lp.apply(processors, seq[:, :length], logits)
            if raw is not None:
                raw.append(logits.clone())
            if scores is not None:
                scores.append(processed)
            if s["do_sample"]:
                nxt = torch.multinomial(processed.softmax(dim=-1), 1, generator=generator).squeeze(1)
            else:
                nxt = processed.argmax(dim=-1)
            if stop.pads:  # transformers pads finished rows only when a stopping criterion has an eos_token_id
                nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad_token_id))
            seq[:, length] = nxt
            length += 1
            emit(nxt)
            done = stop_mask(criteria, seq[:, :length], tuple(scores) if scores is not None else None)
            if stop.eos is not None:
                done = torch.isin(nxt, stop.eos) if done is None else done | torch.isin(nxt, stop.eos)
            if done is not None:
                unfinished &= ~done
                if not unfinished.any():
                    break
            step_ids = nxt[:, None]
    _end(streamer)
    seq = seq[:, :length]
    if not s["return_dict_in_generate"]:
        return seq
    return output("GenerateDecoderOnlyOutput", sequences=seq, scores=tuple(scores) if scores is not None else None,
                  logits=tuple(raw) if raw is not None else None)


def _speculative(model, input_ids, pad, new_tokens, draft, k, stats, processors, criteria, eos_t, s, streamer,
                 generator):
    from .speculative import make_draft, speculative_loop

    rows, prompt_len = input_ids.shape
    if s["num_beams"] > 1 or s["num_return_sequences"] > 1 or s["return_dict_in_generate"]:
        raise ValueError("speculative decoding (draft=) returns the token ids of one sequence: it does not combine "
                         "with num_beams, num_return_sequences or return_dict_in_generate")
    if rows != 1 or bool((pad > 0).any()):
        raise ValueError(f"speculative decoding (draft=) runs one unpadded sequence at a time, got {rows} row(s)"
                         f"{' with left padding' if bool((pad > 0).any()) else ''}: call generate() per prompt, "
                         "or leave out draft= for batched generation")
    k = 4 if k is None else _plain_int(k)  # (numpy integers count as ints, as for the other settings)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"num_draft_tokens must be an int >= 1, got {k!r}")
    if not model.logits_per_token:
        raise ValueError("speculative decoding (draft=) checks the draft's tokens in one step from the logits of "
                         "every new token, but this model returns only the last token's (its head reads x[:, -1] "
                         "or x[:, [-1]], as nanoGPT's forward does without targets): make its forward return the "
                         "logits of every position (nanoGPT: self.lm_head(x)) to speculate, or leave out draft=")
    drafter = make_draft(draft, model)
    emit = _stream_fn(streamer)
    if streamer is not None and hasattr(streamer, "put"):
        streamer.put(input_ids.cpu())
    seq = torch.empty(1, prompt_len + new_tokens + k, dtype=torch.long, device=input_ids.device)
    seq[:, :prompt_len] = input_ids
    length = speculative_loop(model, drafter, seq, prompt_len, new_tokens, k, processors, s["do_sample"], eos_t,
                              criteria, emit, generator, stats)
    _end(streamer)
    return seq[:, :length]


def max_position_embeddings(model) -> int | None:
    """The source model's config.max_position_embeddings, which caps transformers' default
    length (None where the model has no config or the config no such field)."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if _is_int(value) else None


def device_memory_bytes(device) -> int | None:
    """The memory a KV cache can take at most: the GPU's, or the machine's RAM on CPU."""
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError, RuntimeError):
        return None


def check_cache_memory(need: int, memory_bytes: int | None, what: str, detail: str, fix: str):
    """A KV cache of `need` bytes is refused up front when the device has less memory in all
    (generate() and the Engine alike): allocating it would fail deep in the allocator, or
    take the machine's memory, instead of saying what to change."""
    if memory_bytes is not None and need > memory_bytes:
        raise ValueError(f"{what} needs a KV cache of {need / 2**30:.3g} GiB {detail}, more than this device's "
                         f"memory ({memory_bytes / 2**30:.3g} GiB); {fix}")


def _as_list(eos) -> list[int]:
    if eos is None:
        return []
    if isinstance(eos, torch.Tensor):
        return [int(x) for x in eos.flatten().tolist()]
    eos = _plain_int(eos)
    if isinstance(eos, int):
        return [eos]
    return [int(x) for x in eos]


def _stream_fn(streamer) -> Callable:
    if streamer is None:
        return lambda tokens: None
    if hasattr(streamer, "put"):
        return lambda tokens: streamer.put(tokens.cpu())
    if callable(streamer):
        return streamer
    raise TypeError("streamer must be a callable taking each step's tokens [batch], or an object with "
                    "put()/end() such as transformers' TextStreamer")


def _end(streamer):
    if streamer is not None and hasattr(streamer, "end"):
        streamer.end()

