"""generate(): prefill the prompt into the KV cache, then decode one token per step.

Semantics follow transformers' `generate` (4.x/5.x, decoder-only):
- settings come, highest first, from the call's keyword arguments, a `generation_config`
  (a transformers GenerationConfig or a dict), the model's defaults
  (`fast.generation_defaults`), then transformers' global defaults (max_length=20 new
  tokens, top_k=50 when sampling, ...); an unsupported setting raises ValueError naming it;
- the result is the prompt followed by the new tokens; `max_new_tokens` wins over
  `max_length` (which counts the prompt); `max_new_tokens=0` raises, as in transformers;
- the logits processors (logits.py) apply in transformers' order: repetition penalty,
  no-repeat n-gram, min length / min new tokens, forced BOS / EOS (a model's own
  generation_config may set them: BART-family decoders force EOS last), then the
  sampling warpers;
- greedy picks the argmax, sampling draws from the softmax; a row that produced EOS (or
  hit a stopping criterion / stop string) continues with the pad token while others finish;
- `num_beams > 1` runs beam search (beam.py) with beams as batch rows of the cache;
- `return_dict_in_generate=True` returns transformers' output classes with `scores` (the
  processed logits of each step) and `logits` (the raw ones) when asked for;
- left-padded batches come with an attention_mask.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from . import logits as lp
from .frames import frame_of_its_own
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


def resolve_settings(defaults: dict | None, generation_config, options: dict) -> tuple[dict, set]:
    """The settings of one call, and the names set anywhere (not from the global defaults)."""
    given = {k: v for k, v in (defaults or {}).items() if k in DEFAULTS and v is not None}
    if generation_config is not None:
        config = generation_config if isinstance(generation_config, dict) else \
            generation_config.to_dict() if hasattr(generation_config, "to_dict") else None
        if config is None:
            raise ValueError(f"generation_config must be a transformers GenerationConfig or a dict, got "
                             f"{type(generation_config).__name__}")
        bad = sorted(k for k, v in config.items() if k in UNSUPPORTED and v is not None and v != UNSUPPORTED[k]
                     and k not in IGNORED)
        if bad:
            raise ValueError(f"generate() does not support these generation_config settings: {', '.join(bad)}")
        given.update({k: v for k, v in config.items() if k in DEFAULTS and v is not None})
    overridden = set(options) | (set(config) if generation_config is not None else set())
    bad = sorted(k for k, v in (defaults or {}).items() if k in UNSUPPORTED and v is not None and v != UNSUPPORTED[k]
                 and k not in overridden)
    if bad:
        raise ValueError(f"the model's generation_config sets {', '.join(bad)}, which generate() does not support; "
                         f"pass {bad[0]}={UNSUPPORTED[bad[0]]!r} (its neutral value) to generate without it")
    bad = sorted(k for k, v in options.items() if k not in DEFAULTS and k not in IGNORED
                 and not (k in UNSUPPORTED and (v is None or v == UNSUPPORTED[k])))
    if bad:
        raise ValueError(f"generate() does not support these arguments: {', '.join(bad)}")
    given.update({k: v for k, v in options.items() if k in DEFAULTS})  # an explicit None turns a default off
    return {**DEFAULTS, **given}, set(given)


def defaults_from_generation_config(config) -> dict:
    """The settings of a transformers generation_config that generate() uses (the model's
    defaults): those it sets (not None, as transformers 5 marks unset fields). Settings
    generate() does not implement are kept too when they are on, so that generate() refuses
    them rather than silently produce other tokens than transformers would."""
    out = {key: getattr(config, key) for key in DEFAULTS if getattr(config, key, None) is not None}
    out.update({key: getattr(config, key) for key, off in UNSUPPORTED.items() if key not in IGNORED
                and getattr(config, key, None) is not None and getattr(config, key) != off})
    return out


def check_generate_args(layout, batch: int, prompt_len: int, max_new_tokens: int, padded: bool,
                        cache_bytes=None, memory_bytes: int | None = None, shifted_positions_ok: bool = False):
    """Every limit is checked before any work, not discovered mid-generation.
    cache_bytes(batch, positions): the KV cache's size; memory_bytes: what the device has.
    shifted_positions_ok: the source model itself gives left-padded rows shifted positions
    (it takes no position_ids), so positions shared by the batch are what it computes."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    total = prompt_len + max_new_tokens
    if layout.max_seq_len is not None and total > layout.max_seq_len:
        raise ValueError(f"the prompt ({prompt_len} tokens) plus max_new_tokens ({max_new_tokens}) is {total} "
                         f"positions, more than max_seq_len={layout.max_seq_len}; shorten the prompt or ask for "
                         "fewer tokens")
    if layout.max_batch is not None and batch > layout.max_batch:
        raise ValueError(f"batch {batch} is larger than the KV cache's max_batch={layout.max_batch}; "
                         "optimize with KVCacheConfig(max_batch=...) or split the batch")
    if cache_bytes is not None and memory_bytes is not None:
        need = cache_bytes(batch, total)
        if need > memory_bytes:
            raise ValueError(f"the prompt ({prompt_len} tokens) plus max_new_tokens ({max_new_tokens}) needs a KV cache "
                             f"of {need / 2**30:.3g} GiB for batch {batch}, more than this device's memory "
                             f"({memory_bytes / 2**30:.3g} GiB); ask for fewer tokens or a smaller batch")
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


def _check_settings(s: dict):
    if s["do_sample"]:
        if not s["temperature"] > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {s['temperature']!r}")
        top_k = s["top_k"]
        if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
            raise ValueError(f"top_k must be an int >= 0 or None, got {top_k!r}")
        if s["top_p"] is not None and not 0.0 < s["top_p"] <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {s['top_p']!r}")
    penalty = s["repetition_penalty"]
    if penalty is not None and (isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not penalty > 0):
        raise ValueError(f"repetition_penalty must be a number > 0, got {penalty!r}")
    for key in ("no_repeat_ngram_size", "min_new_tokens", "min_length"):
        value = s[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{key} must be an int >= 0, got {value!r}")
    beams, returns = s["num_beams"], s["num_return_sequences"]
    for key, value in (("num_beams", beams), ("num_return_sequences", returns)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be an int >= 1, got {value!r}")
    if beams > 1:
        if s["do_sample"]:
            raise ValueError("beam sampling (num_beams > 1 with do_sample=True) is not supported: use "
                             "num_beams=1 to sample or do_sample=False for beam search")
        if returns > beams:
            raise ValueError(f"num_return_sequences ({returns}) must be <= num_beams ({beams})")
        if s["early_stopping"] not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {s['early_stopping']!r}")
    elif returns > 1 and not s["do_sample"]:
        raise ValueError("greedy search returns one sequence per prompt: num_return_sequences > 1 needs "
                         "do_sample=True or num_beams >= num_return_sequences")


def new_token_count(s: dict, given: set, prompt_len: int, max_seq_len: int | None) -> int:
    """max_new_tokens, else max_length (prompt included), else 20 new tokens (at most
    max_seq_len in all), as transformers counts them."""
    count = s["max_new_tokens"]
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {count!r}")
        if count == 0:
            raise ValueError("max_new_tokens=0 asks for no new token: transformers' generate refuses it "
                             "(`max_new_tokens` must be greater than 0), and so does this one")
        return count
    if "max_length" in given and s["max_length"] is not None:
        max_length = s["max_length"]
    else:
        max_length = prompt_len + DEFAULTS["max_length"]
        if max_seq_len is not None:
            max_length = min(max_length, max_seq_len)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or prompt_len >= max_length:
        raise ValueError(f"the prompt has {prompt_len} tokens but max_length is {max_length!r}: max_length counts "
                         "the prompt; increase it or set max_new_tokens")
    return max_length - prompt_len


def _stopping(stop_strings, tokenizer, stopping_criteria) -> list:
    """Stop strings and the caller's criteria, as transformers' StoppingCriteria: each
    `(input_ids [N, L], scores) -> bool [N]`."""
    out = []
    if stop_strings is not None:
        if tokenizer is None:
            raise ValueError("stop_strings needs the model's tokenizer: generate(..., stop_strings=..., "
                             "tokenizer=tokenizer)")
        from transformers.generation.stopping_criteria import StopStringCriteria

        out.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings))
    out += list(stopping_criteria or ())
    return out


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


@frame_of_its_own  # the per-token Python calls stay off data-stack chunk boundaries (frames.py)
def generate(model, input_ids: torch.Tensor, max_new_tokens: int | None = None, *, defaults: dict | None = None,
             generation_config=None, attention_mask=None, streamer=None, generator: torch.Generator | None = None,
             stopping_criteria=None, logits_processor=None, tokenizer=None, draft=None,
             num_draft_tokens: int | None = None, draft_stats=None, **options):
    """`model` is an OptimizedModel whose graph went through the kv_cache pass; `defaults`
    its generation_defaults; `options` the transformers settings (DEFAULTS). `draft`: an
    OptimizedModel or "ngram" for speculative decoding (speculative.py)."""
    if max_new_tokens is not None:
        options["max_new_tokens"] = max_new_tokens
    s, given = resolve_settings(defaults, generation_config, options)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        got = f"a {input_ids.dtype} tensor of shape {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) \
            else type(input_ids).__name__
        raise ValueError(f"input_ids must be an int64 tensor [batch, length], got {got}")
    batch, prompt_len = input_ids.shape
    if prompt_len == 0:
        raise ValueError("input_ids is empty: generation needs at least one prompt token")
    device = model.device
    input_ids = input_ids.to(device)
    check_token_ids(input_ids, vocab_size(model), "input_ids")
    pad = None if attention_mask is not None else \
        padding_from_pad_tokens(input_ids, s["pad_token_id"], _as_list(s["eos_token_id"]), device)
    if pad is None:
        pad = left_padding(attention_mask, batch, prompt_len, device)
    new_tokens = new_token_count(s, given, prompt_len, model.kv_layout.max_seq_len)
    _check_settings(s)
    check_generator(generator, device)
    beams = s["num_beams"]
    if beams > 1 and streamer is not None:
        raise ValueError("streamer cannot be used with beam search (as in transformers)")
    # beams, or sampled sequences, are rows of their own (transformers' input expansion)
    expand = max(beams, s["num_return_sequences"])
    prompt = input_ids  # before the expansion: encoder_no_repeat_ngram_size reads it per prompt
    if expand > 1:
        input_ids, pad = input_ids.repeat_interleave(expand, dim=0), pad.repeat_interleave(expand, dim=0)
    rows = input_ids.shape[0]
    check_generate_args(model.kv_layout, rows, prompt_len, new_tokens, bool((pad > 0).any()),
                        model.kv_cache_bytes, device_memory_bytes(device),
                        getattr(model, "left_padding_shifts_positions", False))
    # the prefill, then one-token steps after prompt_len .. prompt_len + new_tokens - 2 cached tokens
    model.check_step_sizes(rows, [prompt_len])
    if new_tokens > 1:
        model.check_step_sizes(rows, [1], range(prompt_len, prompt_len + new_tokens - 1))

    eos = _as_list(s["eos_token_id"])
    eos_t = torch.tensor(eos, device=device) if eos else None
    pad_token_id = s["pad_token_id"]
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    min_length = prompt_len + s["min_new_tokens"] if s["min_new_tokens"] is not None else s["min_length"]
    processors = lp.processors(
        repetition_penalty=s["repetition_penalty"], pad=pad, no_repeat_ngram_size=s["no_repeat_ngram_size"],
        min_length=min_length, eos=eos_t, do_sample=s["do_sample"], temperature=s["temperature"],
        top_k=s["top_k"], top_p=s["top_p"], custom=logits_processor, forced_bos=s["forced_bos_token_id"],
        forced_eos=_as_list(s["forced_eos_token_id"]), max_length=prompt_len + new_tokens,
        suppress_tokens=s["suppress_tokens"], begin_suppress_tokens=s["begin_suppress_tokens"], prompt_len=prompt_len,
        prompt_no_repeat_ngram_size=s["encoder_no_repeat_ngram_size"], prompt=prompt)
    criteria = _stopping(s["stop_strings"], tokenizer, stopping_criteria)
    want_scores = s["return_dict_in_generate"] and s["output_scores"]
    want_logits = s["return_dict_in_generate"] and s["output_logits"]

    if draft is not None:
        return _speculative(model, input_ids, pad, new_tokens, draft, num_draft_tokens, draft_stats, processors,
                            criteria, eos_t, s, streamer, generator)
    if num_draft_tokens is not None or draft_stats is not None:
        raise ValueError("num_draft_tokens and draft_stats go with draft= (an OptimizedModel or 'ngram')")

    if beams > 1:
        from .beam import beam_search
        return beam_search(model, input_ids, pad, new_tokens, beams, processors, criteria, eos_t, pad_token_id, s)

    emit = _stream_fn(streamer)
    if streamer is not None and hasattr(streamer, "put"):
        streamer.put(input_ids.cpu())
    scores, raw = ([] if want_scores else None), ([] if want_logits else None)
    # this call's own cache: concurrent and re-entrant calls never share buffers (state.py)
    with model.kv_cache_lease(rows, prompt_len + new_tokens) as cache:
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
            if eos_t is not None:  # transformers pads finished rows only when EOS is a stopping criterion
                nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad_token_id))
            seq[:, length] = nxt
            length += 1
            emit(nxt)
            done = stop_mask(criteria, seq[:, :length], tuple(scores) if scores is not None else None)
            if eos_t is not None:
                done = torch.isin(nxt, eos_t) if done is None else done | torch.isin(nxt, eos_t)
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
    k = 4 if k is None else k
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"num_draft_tokens must be an int >= 1, got {k!r}")
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


def device_memory_bytes(device) -> int | None:
    """The memory a KV cache can take at most: the GPU's, or the machine's RAM on CPU."""
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError, RuntimeError):
        return None


def _as_list(eos) -> list[int]:
    if eos is None:
        return []
    if isinstance(eos, torch.Tensor):
        return [int(x) for x in eos.flatten().tolist()]
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

