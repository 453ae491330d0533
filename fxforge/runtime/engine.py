"""A continuous-batching engine: many requests, one batched decode step for all of them.

    engine = fxforge.Engine(fast, max_batch=8, max_seq_len=1024)
    request = engine.submit(prompt_ids, max_new_tokens=64, callback=print_token)
    engine.run()                       # or engine.start() ... engine.stop(): a thread of its own
    tokens = request.result()          # 1-D tensor of the new tokens
    outs = engine.generate_many(prompts, max_new_tokens=32)

Scheduling is per step (iteration-level, as Orca and vLLM): every step first puts up
to `prefill_chunk` prompt tokens of waiting requests into a scratch cache (a long prompt
goes in over several steps, so it does not stall the running requests), moves each
request whose prompt is in into the batch, and then runs one decode step over every
running request at once. A request leaves the batch the step it finishes, and its row is
free for the next one. Joining waits (no error, no lost request) while the cache has no
room.

The KV cache is dense, one row per running request, up to `max_seq_len` positions: it is
allocated for what the requests need (FIRST_POSITIONS at first) and grows, doubling, when a
joining request needs more, so an engine on a model of 8192 positions holds memory for the
tokens it serves, not max_batch x 8192 (a growth copies only the positions rows hold). Rows
are right-aligned: every row's last token sits at the same position, so one cache length and
one set of kernel arguments serve the batch, and a row's left padding is masked by the
key bias, as in a left-padded generate(). When a request joins, the rows are shifted
together so that the longest one starts at position 0 (one copy of the positions holding
tokens: joins, leaves and steps cost what the rows hold, not max_seq_len); a row's
rotary positions are its own (position - padding), so the shift changes no answer. Each
request's greedy tokens are the ones generate() gives it alone (tested), except where its
two best logits are within the last-bit rounding by which a batched step's products may
differ from a one-row step's (2e-5 to 6e-5 on SmolLM2's float32 logits; docs/serving.md).

Settings: a request's sampling settings and EOS default as generate()'s do (the model's
generation_config, then transformers' defaults: top_k=50 when sampling, the model's
eos_token_id; an explicit eos_token_id=None means no EOS, max_new_tokens=None that
max_length counts), and are checked at submit() by
generate()'s own rules, as are the prompt's token ids (1-D, integer, in the vocabulary).
A model whose generation_config asks for what a request does not run (num_beams,
num_return_sequences, stop_strings) is refused by name at submit(), unless the call
passes their neutral values. A prompt's leading pad tokens are left padding, as in
generate(): the model does not see them, the logits processors do (min_length counts them).

Failures: an error in a step fails the request it concerns (its prefill, its token choice,
its callback) and the engine goes on serving the others; an error of a batched decode step
fails the running requests. A failed request's result() raises a RuntimeError naming the
request and the original error (chained). The engine's thread never dies silently.
A callback runs inside the step: step(), run(), generate_many() and an unfinished request's
result() called from one raise a RuntimeError (they would wait for that step forever), which
fails the callback's request; submit(), stop() and close() work there. start() and stop()
may be called from any threads at once.

Memory: max_batch x max_seq_len positions are allocated; `engine.stats()` reports how
many hold tokens. For a model optimized with KVCacheConfig(layout="paged"),
`Engine(...)` returns the paged engine (runtime/engine_paged.py, same API plus
`num_blocks`): blocks handed out per request as it grows and freed when it ends, no copy
when a request joins.
"""
from __future__ import annotations

import atexit
import threading
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import logits as lp
from .generate import (DEFAULT, IGNORED, UNSUPPORTED, _as_list, _check_settings, _known_settings, _plain_int, _whole,
                       check_cache_memory, check_forced_tokens, check_generator, check_token_ids,
                       device_memory_bytes, fed_positions, longer_cache_hint, looks_like_model_input,
                       max_position_embeddings, misspelling_of, new_token_count, position_table_rows,
                       resolve_settings, vocab_size)
from .state import padding_from_pad_tokens

_RUNNING: "weakref.WeakSet[Engine]" = weakref.WeakSet()  # engines that started a thread


def _watch_at_exit(engine: "Engine"):
    """Hold `engine` weakly for _halt_engines; the hook is registered at a start(), not at
    import (importing fxforge changes nothing in the process). Unregistering first keeps
    it registered once, with no flag to remember that it is."""
    atexit.unregister(_halt_engines)
    atexit.register(_halt_engines)
    _RUNNING.add(engine)


def _halt_engines():
    """Interpreter exit: each engine's thread ends after its current step (daemon threads
    still inside torch when the interpreter finalizes abort the process)."""
    for engine in list(_RUNNING):
        engine._halt(timeout=30.0)


def _leading_padding(prompt: torch.Tensor, pad_token_id, eos: list) -> int:
    """How many leading pad tokens the prompt has, which generate() alone (as transformers)
    takes for left padding when no mask is given (state.padding_from_pad_tokens). The model
    never sees them (the request's row starts after them), but the logits processors do, as
    in generate(): min_length and the n-gram bans count them. A pad token after the first
    real one would need a mask with a hole: a ValueError, as in generate(), with advice the
    Engine can follow (it takes no attention_mask)."""
    pad = padding_from_pad_tokens(prompt[None], pad_token_id, eos, prompt.device, name="prompt_ids",
                                  fix=_PAD_INSIDE_FIX.format(pad=pad_token_id))
    return 0 if pad is None else int(pad[0])


# generate()'s settings a request takes besides submit()'s own: those its logits processors
# read (beams, several sequences, scores and stop strings are generate()'s alone)
REQUEST_OPTIONS = frozenset({"repetition_penalty", "no_repeat_ngram_size", "min_new_tokens", "min_length", "max_length",
                             "forced_bos_token_id", "forced_eos_token_id", "suppress_tokens",
                             "begin_suppress_tokens", "encoder_no_repeat_ngram_size", "pad_token_id"})
# generate()'s settings a request cannot run, with the value that turns each off: one the
# model's generation_config turns on is refused by name at submit() (not silently dropped),
# and submit() takes the neutral value to serve such a model one sequence per request
GENERATE_ONLY = {"num_beams": 1, "num_return_sequences": 1, "stop_strings": None}
# submit()'s own keywords (a misspelling of one gets its hint)
SUBMIT_KEYWORDS = frozenset({"max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "eos_token_id",
                             "generator", "callback"})

# generate()'s arguments a request does not take, and why (with what serves instead, if anything)
_ONE_SEQUENCE = "one greedy or sampled sequence per request (generate() runs beam search and several sequences)"
_NO_STOPPING = ("a request stops at EOS or max_new_tokens only (generate() takes stop strings and stopping "
                "criteria)")
_TOKENS_ONLY = "a request's result() is its new tokens (generate() returns scores and logits)"
_NO_DRAFT = "speculative decoding is generate()'s (one sequence at a time)"
NOT_FOR_REQUESTS = {
    "num_beams": _ONE_SEQUENCE, "num_return_sequences": _ONE_SEQUENCE, "length_penalty": _ONE_SEQUENCE,
    "early_stopping": _ONE_SEQUENCE,
    "stop_strings": _NO_STOPPING, "stopping_criteria": _NO_STOPPING, "tokenizer": _NO_STOPPING,
    "return_dict_in_generate": _TOKENS_ONLY, "output_scores": _TOKENS_ONLY, "output_logits": _TOKENS_ONLY,
    "draft": _NO_DRAFT, "num_draft_tokens": _NO_DRAFT, "draft_stats": _NO_DRAFT, "assistant_model": _NO_DRAFT,
    "attention_mask": "a request takes no mask; leave the prompt's padding out, or put it first: a prompt's "
                      "leading pad tokens are taken for left padding",
    "streamer": "pass callback=fn(request, token), which the engine calls with each new token",
    "logits_processor": "a request runs generate()'s own logits processors only (generate() takes custom ones)",
    "generation_config": "pass its settings as keywords, or set the model's generation_config (its defaults)",
}
# generate()'s arguments of NOT_FOR_REQUESTS at the value that asks for nothing (as generate()
# defaults them): submit() takes them so, as generate() does
OFF_VALUES = {"streamer": None, "output_scores": False, "output_logits": False, "return_dict_in_generate": False,
              "stopping_criteria": None, "logits_processor": None, "draft": None, "assistant_model": None,
              "attention_mask": None, "generation_config": None, "tokenizer": None, "draft_stats": None}


def _is_off(name: str, value) -> bool:
    """`value` is OFF_VALUES' for `name` (None itself; False, not 0)."""
    if name not in OFF_VALUES:
        return False
    off = OFF_VALUES[name]
    return value is None if off is None else (type(value) is type(off) and value == off)


# the fix for a pad token after a prompt's first other token (state.padding_from_pad_tokens)
_PAD_INSIDE_FIX = ("The Engine takes no attention_mask: leave the pad token out of the prompt, or, where {pad} is a "
                   "token of the text, pass pad_token_id=None (or an id the prompt does not hold) so that every "
                   "token is attended")

_ids = iter(range(1 << 62))


def _refusal(names: list) -> str:
    """submit()'s error for keywords a request does not take: per name, why (NOT_FOR_REQUESTS),
    the keyword a misspelling is close to, or that fxforge does not implement the setting
    (generate() refuses it too)."""
    known = _known_settings() | SUBMIT_KEYWORDS
    reasons, unknown = [], False
    for name in names:
        close = None if name in known else misspelling_of(name, known)
        if name in NOT_FOR_REQUESTS:
            reasons.append(f"{name}: {NOT_FOR_REQUESTS[name]}")
        elif close is not None:
            reasons.append(f"{name}: did you mean {close}?")
        elif name in known:
            reasons.append(f"{name}: a transformers setting fxforge does not implement; generate() refuses it too")
        elif looks_like_model_input(name, known):
            reasons.append(f"{name}: it looks like a model input; a request takes its prompt's token ids only")
        else:
            reasons.append(f"{name}: not a generation setting")
        unknown = unknown or name not in NOT_FOR_REQUESTS
    text = f"Engine.submit() does not take {'; '.join(reasons)}"
    if not unknown:
        return text
    return f"{text}{' ' if text.endswith('?') else '. '}Besides its own arguments " \
        f"({', '.join(sorted(SUBMIT_KEYWORDS))}), a request takes {', '.join(sorted(REQUEST_OPTIONS))}"


def _failure(request: "Request", stage: str, error: BaseException) -> RuntimeError:
    """The error a request's result() raises when the engine failed it; the original is its cause."""
    failed = RuntimeError(f"request {request.id} failed {stage}: {type(error).__name__}: {error}")
    failed.__cause__ = error
    return failed


@dataclass
class Request:
    """One submitted prompt. `result()` waits for the new tokens (prompt excluded)."""
    prompt: torch.Tensor
    max_new_tokens: int
    processors: list
    eos: torch.Tensor | None
    sample: bool
    generator: torch.Generator | None
    callback: Callable | None
    # the prompt's leading pad tokens [1, p] (the model never sees them; the processors do) or None
    padding: torch.Tensor | None = None
    id: int = field(default_factory=lambda: next(_ids))
    tokens: list = field(default_factory=list)
    error: BaseException | None = None
    _done: threading.Event = field(default_factory=threading.Event)
    # the engine that runs it, weakly (a kept result does not keep the engine's caches alive)
    _engine: "weakref.ref | None" = field(default=None, repr=False, compare=False)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> torch.Tensor:
        engine = self._engine() if self._engine is not None and not self.done else None
        if engine is not None:
            engine._refuse_in_step(f"request.result() of request {self.id}, which is not finished,")
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} is not finished after {timeout} s (is the engine running?)")
        if self.error is not None:
            raise self.error
        return torch.tensor(self.tokens, dtype=torch.long)


class _Row:
    """A running request: its sequence so far and how many of its tokens the cache holds."""

    def __init__(self, request: Request, seq: torch.Tensor):
        self.request, self.seq = request, seq  # seq: [1, prompt + max_new_tokens]
        self.length = request.prompt.numel()  # tokens in seq
        self.cached = 0  # tokens in the cache


class _Prefill:
    """A request whose prompt is going into the scratch cache, `done` tokens so far."""

    def __init__(self, request: Request):
        self.request, n = request, request.prompt.numel()
        self.seq = torch.empty(1, n + request.max_new_tokens, dtype=torch.long, device=request.prompt.device)
        self.seq[0, :n] = request.prompt
        self.pad = torch.zeros(1, dtype=torch.long, device=self.seq.device)
        self.done = 0
        self.logits = None


# Positions per row a dense engine allocates at first; it doubles them when a request needs more.
FIRST_POSITIONS = 256


class Engine:
    def __new__(cls, model=None, *args, **kwargs):
        # a model optimized with KVCacheConfig(layout="paged") gets the paged engine (same API)
        if cls is Engine and getattr(model, "_paged", False):
            from .engine_paged import PagedEngine

            return super().__new__(PagedEngine)
        return super().__new__(cls)

    def __init__(self, model, max_batch: int = 8, max_seq_len: int | None = None, prefill_chunk: int = 512,
                 num_blocks: int | None = None, block_size: int | None = None):
        """`max_seq_len`: positions per row (prompt + new tokens of one request); by default
        the model's own limit, or 1024 where it has none. `num_blocks` and `block_size` are
        for a paged cache (runtime/engine_paged.py)."""
        if num_blocks is not None or block_size is not None:
            raise ValueError("num_blocks and block_size are for a paged KV cache: optimize the model with "
                             "kv_cache=KVCacheConfig(layout='paged', block_size=16); this one's cache is dense")
        self._setup(model, max_batch, max_seq_len, prefill_chunk)
        first = min(self.capacity, FIRST_POSITIONS)
        # refused up front, as generate() refuses a cache larger than the device's memory
        check_cache_memory(model.kv_cache_bytes(max_batch + 1, first), device_memory_bytes(model.device),
                           f"fxforge.Engine(max_batch={max_batch})", f"for its first {first} positions of "
                           f"{max_batch} rows (and one to prefill in)", "use a smaller max_batch")
        self._cache = model.kv_cache_for(max_batch, first)
        self._scratch = model.kv_cache_for(1, first)
        self._start = 0  # the cache position every row's next token goes to

    def _setup(self, model, max_batch, max_seq_len, prefill_chunk, default_len: int | None = 1024):
        """The checks and the state every engine has (dense and paged)."""
        model._require_cache("the engine")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        limit = model.kv_layout.max_seq_len
        if max_seq_len is None:
            max_seq_len = limit if limit is not None else default_len
        if max_seq_len is not None:
            if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
                raise ValueError(f"max_seq_len must be an int >= 2, got {max_seq_len!r}")
            if limit is not None and max_seq_len > limit:
                raise ValueError(f"max_seq_len={max_seq_len} is more than the model's {limit} positions")
        if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be an int >= 1 (prompt tokens per step), got {prefill_chunk!r}")
        if max_batch > 1 and not model.kv_layout.per_row_positions:
            # rows of different lengths share a step, each left-padded to the longest: positions
            # shared by the batch would shift a shorter row's (other tokens than alone)
            raise ValueError(f"max_batch={max_batch}: the engine batches requests of different lengths, which needs "
                             "positions per row, and the kv_cache pass could not give this model those (its "
                             "positions are shared by the batch, e.g. a table sliced by the length, table[:T]: see "
                             "the pass's report note). Use max_batch=1 (one request at a time)")
        self.model, self.max_batch, self.capacity = model, max_batch, max_seq_len
        self.prefill_chunk = prefill_chunk
        self._prefilling = None
        model.check_step_sizes(max_batch, [1])
        self.vocab_size = vocab_size(model)
        self._broken: BaseException | None = None  # what ended the engine's thread, if anything did
        self._closed = False  # close() ran: no more work (its caches are the model's again)
        self._closing = False  # close() was called: no new requests (from a callback: it closes after the work)
        self._stepping = None  # the thread inside step(), if any
        self._waiting: deque[Request] = deque()
        self._rows: list = []
        self._lock = threading.Lock()  # guards _waiting
        self._step_lock = threading.Lock()  # one step at a time
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        # start() and stop() one at a time (from any threads); never held while waiting for
        # the engine's thread, which takes it as it ends (and a callback may call them)
        self._run_lock = threading.Lock()
        self._stopping = self._halting = False
        self.steps = 0
        self.peak_cached_tokens = 0
        # summed over steps, for the run's average KV waste: slots allocated, slots holding tokens
        self._slot_steps = self._token_steps = 0

    # -- submitting --------------------------------------------------------------------
    def submit(self, prompt_ids, max_new_tokens=DEFAULT, *, do_sample=DEFAULT, temperature=DEFAULT,
               top_k=DEFAULT, top_p=DEFAULT, eos_token_id=DEFAULT,
               generator: torch.Generator | None = None, callback: Callable | None = None, **options) -> Request:
        """Queue a prompt (a 1-D list or integer tensor of token ids); thread-safe.
        `callback(request, token)` runs on the engine's thread for every new token (if it
        raises, that request fails and the others go on). Settings not given default as in
        generate(): the model's generation_config, then transformers' defaults (top_k=50 when
        sampling; without max_new_tokens or max_length, 20 new tokens capped at the model's
        max_position_embeddings); an explicit None turns the model's default off
        (eos_token_id=None: no EOS; max_new_tokens=None: max_length counts). `options`: generate()'s logits settings
        (REQUEST_OPTIONS: repetition_penalty, no_repeat_ngram_size, min_new_tokens, ...).
        Bad arguments raise ValueError here, and nothing is queued."""
        request = self._request(prompt_ids, max_new_tokens, do_sample=do_sample, temperature=temperature,
                                top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, generator=generator,
                                callback=callback, **options)
        self._enqueue([request])
        return request

    def _enqueue(self, requests: list):
        with self._lock:
            self._waiting.extend(requests)
            self._wake.notify()

    def _request(self, prompt_ids, max_new_tokens, *, do_sample, temperature, top_k, top_p, eos_token_id,
                 generator, callback, **options) -> Request:
        """submit()'s checks and its Request, not queued."""
        self._check_open(closing=True)
        if self._broken is not None:
            raise RuntimeError(f"the engine's thread ended after {type(self._broken).__name__}: {self._broken}; "
                               "call start() again (or run()) before submitting")
        prompt = self._prompt(prompt_ids)
        if callback is not None and not callable(callback):
            raise ValueError(f"callback must be a function callback(request, token) or None, got "
                             f"{type(callback).__name__} {callback!r}")
        check_generator(generator, self.model.device)
        if max_new_tokens is not DEFAULT and max_new_tokens is not None:
            max_new_tokens = _whole(_plain_int(max_new_tokens))  # (5.0: 5, as generate() and transformers take it)
            if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
                raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        # as generate(): settings that change no token are ignored, unimplemented ones taken at their off value
        options = {k: v for k, v in options.items() if not _is_off(k, v)}  # (asking for nothing)
        others = sorted(k for k, v in options.items() if k not in REQUEST_OPTIONS and k not in IGNORED
                        and not (k in GENERATE_ONLY and v == GENERATE_ONLY[k])
                        and not (k in UNSUPPORTED and (v is None or v == UNSUPPORTED[k])))
        if others:
            raise ValueError(_refusal(others))
        given = {"do_sample": do_sample, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                 "eos_token_id": eos_token_id, "max_new_tokens": max_new_tokens, **options}
        # generate()'s settings and checks: the model's defaults, then transformers'
        settings, named = resolve_settings(getattr(self.model, "generation_defaults", None), None,
                                           {k: v for k, v in given.items() if v is not DEFAULT},
                                           caller="Engine.submit() (and generate_many())")
        # one sequence per request: a model whose generation_config asks for beams, several
        # sequences or stop strings is refused by name (generate() runs them), not served otherwise
        on = [k for k, off in GENERATE_ONLY.items() if settings[k] != off]
        if on:
            raise ValueError(f"the model's generation_config sets {', '.join(f'{k}={settings[k]!r}' for k in on)}, "
                             "which Engine requests do not run (one greedy or sampled sequence per request, no stop "
                             f"strings; generate() runs it); pass {', '.join(f'{k}={GENERATE_ONLY[k]!r}' for k in on)} "
                             "to submit() or generate_many() to serve the requests without it")
        _check_settings(settings)
        # generate()'s count: max_new_tokens, else max_length (prompt included), else 20 capped
        max_new_tokens, _ = new_token_count(settings, named, prompt.numel(), max_position_embeddings(self.model))
        self._check_request(prompt.numel(), max_new_tokens)
        device = self.model.device
        eos = _as_list(settings["eos_token_id"])
        lead = _leading_padding(prompt, settings["pad_token_id"], eos)
        check_forced_tokens(settings, self.vocab_size)
        eos_t = torch.tensor(eos, device=device) if eos else None
        n = prompt.numel()  # the prompt as generate() counts it: its leading pad tokens included
        min_length = n + settings["min_new_tokens"] if settings["min_new_tokens"] is not None \
            else settings["min_length"]
        s = settings
        processors = lp.processors(
            repetition_penalty=s["repetition_penalty"], pad=torch.tensor([lead], device=device) if lead else None,
            no_repeat_ngram_size=s["no_repeat_ngram_size"],
            min_length=min_length, eos=eos_t, do_sample=s["do_sample"], temperature=s["temperature"],
            top_k=s["top_k"], top_p=s["top_p"], forced_bos=s["forced_bos_token_id"],
            forced_eos=_as_list(s["forced_eos_token_id"]), max_length=n + max_new_tokens,
            suppress_tokens=s["suppress_tokens"], begin_suppress_tokens=s["begin_suppress_tokens"], prompt_len=n,
            prompt_no_repeat_ngram_size=s["encoder_no_repeat_ngram_size"], prompt=prompt[None])
        prompt = prompt.to(device)
        return Request(prompt[lead:], max_new_tokens, processors, eos_t, bool(s["do_sample"]), generator,
                       callback, padding=prompt[None, :lead] if lead else None, _engine=weakref.ref(self))

    def _prompt(self, prompt_ids) -> torch.Tensor:
        """The prompt as a 1-D int64 tensor, checked: integer token ids in [0, vocab), at least one."""
        try:
            prompt = torch.as_tensor(prompt_ids)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"prompt_ids must be a 1-D list or tensor of integer token ids, got "
                             f"{type(prompt_ids).__name__} ({error})") from None
        if prompt.dim() != 1:
            raise ValueError(f"prompt_ids must be 1-D (one prompt of token ids), got shape {tuple(prompt.shape)}; "
                             "submit each prompt of a batch on its own")
        if prompt.numel() == 0:
            raise ValueError("an empty prompt: every request needs at least one token")
        if prompt.dtype == torch.bool or prompt.dtype.is_floating_point or prompt.dtype.is_complex:
            raise ValueError(f"prompt_ids must be integer token ids, got {prompt.dtype} values")
        prompt = prompt.to(torch.long)
        check_token_ids(prompt, self.model.token_vocabulary or self.vocab_size, "prompt_ids")
        return prompt

    def _check_request(self, prompt_len: int, max_new_tokens: int):
        # the last new token is returned, never fed: a request takes prompt + new - 1 positions
        fed = fed_positions(prompt_len, max_new_tokens)
        if fed > self.capacity:
            raise ValueError(f"a prompt of {prompt_len} tokens plus {max_new_tokens} new ones needs {fed} positions "
                             f"(every token but the last new one is fed to the model); the engine has "
                             f"max_seq_len={self.capacity}{self._longer_hint()}")
        # the graph's guards on the sequence's length (L + T once cached) at every length
        # the request reaches: its prefill chunks end anywhere in the prompt
        self.model.check_step_sizes(1, [1], range(prompt_len + max_new_tokens - 1), caller="the engine's")

    def _longer_hint(self) -> str:
        """How to serve longer requests: a larger engine where the model has room; else
        generate()'s advice (a larger KV cache, unless the limit is the model's position
        table, which no cache can exceed)."""
        limit = self.model.kv_layout.max_seq_len
        if limit is None or self.capacity < limit:
            return f"; make the engine with a larger max_seq_len{'' if limit is None else f' (up to {limit})'}"
        return longer_cache_hint(limit, lambda: position_table_rows(self.model))

    def generate_many(self, prompts, max_new_tokens=DEFAULT, **options) -> list[torch.Tensor]:
        """The new tokens of each prompt (prompt excluded), in order. Every prompt is
        checked before any is queued: a bad one raises ValueError and none is queued."""
        self._refuse_in_step("Engine.generate_many()")  # before queuing: it would wait for itself
        given = {"do_sample": DEFAULT, "temperature": DEFAULT, "top_k": DEFAULT, "top_p": DEFAULT,
                 "eos_token_id": DEFAULT, "generator": None, "callback": None, **options}
        requests = [self._request(p, max_new_tokens, **given) for p in prompts]
        self._enqueue(requests)
        if self._thread is None:
            self.run()
        return [r.result() for r in requests]

    # -- running -----------------------------------------------------------------------
    def run(self):
        """Step until no request is waiting or running."""
        self._refuse_in_step("Engine.run()")
        while self.step():
            pass

    def _refuse_in_step(self, what: str):
        """A request's callback runs inside the engine's step, holding it: from there, what
        waits for a step (step, run, generate_many, an unfinished request's result) would
        wait for itself forever. A RuntimeError instead (it fails the callback's request)."""
        if self._stepping is threading.current_thread():
            raise RuntimeError(f"{what} was called from a request's callback, inside the engine's step, which "
                               "it would wait for forever. A callback may submit() requests (the next steps run "
                               "them) or call stop() or close(); step, run or wait for results outside callbacks "
                               "(after run(), or on another thread while start() serves)")

    def start(self):
        """Run steps on a thread of the engine's own while there is work (daemon).
        Safe with stop() from other threads: a start() while a stop() ends the thread waits
        for it to end and starts a new one (the last call wins)."""
        while True:
            with self._run_lock:
                self._check_open()
                thread = self._thread
                if thread is None or not thread.is_alive():
                    self._launch()
                    return
                if thread is threading.current_thread():
                    return  # from a callback: serving (after a stop() there, it serves again once ended)
                with self._lock:
                    if not self._stopping and self._broken is None:
                        return  # serving already
            thread.join()  # a stop() is ending it (outside the lock: the thread takes it as it ends)

    def _launch(self):
        """A new thread for the engine (under _run_lock): published once it runs, so that a
        stop() from another thread never sees a thread it cannot join."""
        with self._lock:
            self._stopping = self._halting = False
        self._broken = None
        thread = threading.Thread(target=self._loop, name="fxforge-engine", daemon=True)
        _watch_at_exit(self)  # weakly: stopped at interpreter exit (_halt_engines), never kept alive
        thread.start()
        self._thread = thread

    def stop(self):
        """Finish the queued and running requests, then end the engine's thread.
        Called on the engine's own thread (from a request's callback) it does not wait for
        itself: the thread finishes the requests it has, then ends, and stop() returns at
        once. Safe with start() and stop() from other threads."""
        with self._run_lock:
            with self._lock:
                self._stopping = True
                self._wake.notify()
            thread = self._thread
        if thread is None or thread is threading.current_thread():
            return
        thread.join()  # outside the lock: the thread takes it as it ends
        with self._run_lock:
            if self._thread is thread:
                self._thread = None

    def _halt(self, timeout: float):
        """At interpreter exit: end the engine's thread after its current step (what is
        left stays unfinished) and wait up to `timeout` seconds for it, so that no thread
        is inside torch while the interpreter shuts down (that aborts the process)."""
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return
        with self._lock:
            self._halting = self._stopping = True
            self._wake.notify()
        thread.join(timeout)

    def _loop(self):
        try:
            while True:
                with self._lock:
                    while not self._busy() and not self._stopping:
                        self._wake.wait()
                    if self._halting or (self._stopping and not self._busy()):
                        return
                try:
                    self.step()
                except Exception:  # noqa: S112 - step() failed the requests it concerned; serve the rest
                    continue
        except BaseException as error:  # never silently: every request fails, later submits raise
            self._broken = error
            self._fail_all(error)
            raise
        finally:
            with self._run_lock:
                if self._thread is threading.current_thread():  # ended on its own (stop() from a callback)
                    self._thread = None

    def step(self) -> bool:
        """Admit what fits, prefill it, then one decode step for every running request.
        Returns whether any request is still waiting or running. An error of one request
        (its prefill, its token choice, its callback) fails that request alone; an error of
        the batched decode step fails the running requests and is raised (the waiting ones
        stay queued)."""
        self._refuse_in_step("Engine.step()")
        with self._step_lock:
            self._check_open()
            self._stepping = threading.current_thread()  # (a callback's close() waits for the step's end)
            try:
                self._admit()
                if self._rows:
                    self._decode()
            except Exception as error:  # not one request's: the running ones fail with it
                self._fail_rows(error, "in the engine's batched decode step")
                raise
            except BaseException as error:
                self._fail_all(error)
                raise
            finally:
                self._stepping = None
            self.steps += 1
            with self._lock:
                busy = self._busy()
        if self._closing and not busy:
            self._close_now()  # close() came from a callback: the work is done, so now
        return busy

    def _busy(self) -> bool:
        return bool(self._rows or self._waiting or self._prefilling is not None)

    def stats(self) -> dict:
        """Cache use now: positions allocated, holding tokens, and the peak so far;
        kv_waste: the share of allocated positions that held no token, averaged over the
        decode steps so far (a dense cache allocates max_batch rows of the longest length the
        requests have needed so far, doubling, up to max_seq_len)."""
        held = sum(r.cached for r in self._rows)
        return {"allocated_positions": self._allocated(), "cached_tokens": held,
                "peak_cached_tokens": self.peak_cached_tokens, "running": len(self._rows),
                "waiting": len(self._waiting) + (self._prefilling is not None), "steps": self.steps,
                "kv_waste": self._waste()}

    def _allocated(self) -> int:
        """Positions the batch cache holds: its rows (the model's pool may hand over one with
        more than max_batch) times its length (whole 256s, at most the model's limit)."""
        return self._cache.batch * self._cache.capacity

    def _waste(self) -> float:
        return 1.0 - self._token_steps / self._slot_steps if self._slot_steps else 0.0

    def _account(self, allocated: int, held: int):
        """One decode step's KV use, for the run's average waste."""
        self._slot_steps += allocated
        self._token_steps += held

    def close(self):
        """End the engine: the running requests, and those queued on a started engine,
        finish (stop()); requests queued on an engine that never ran fail (their result()
        raises, none waits forever); the KV caches go back to the model. A closed engine
        takes no more work (submit, step, run and start raise): it would write to caches
        that generate() may be using by then. Idempotent; `with Engine(...) as engine:`
        closes on leaving."""
        if self._closed:
            return
        self._closing = True  # no new requests from here on
        self.stop()
        if self._stepping is threading.current_thread():
            # called from a request's callback, inside a step: as stop() there, the engine
            # finishes its requests, and the step that ends them closes it
            return
        self._close_now()

    def _close_now(self):
        with self._step_lock:
            if self._closed:
                return
            self._closed = True
            self._fail_all(RuntimeError("the engine was closed before this request finished (call run() or "
                                        "start() before close())"))
            self._give_back_caches()

    def _give_back_caches(self):
        self.model.release_kv_cache(self._cache)
        self.model.release_kv_cache(self._scratch)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_open(self, closing: bool = False):
        """Work is refused once the engine is closed; new requests once close() was called."""
        if self._closed or (closing and self._closing):
            raise RuntimeError("the engine is closed: its KV caches went back to the model; make a new "
                               "fxforge.Engine(...) to serve more requests")

    # -- the step's parts ----------------------------------------------------------------
    def _admit(self):
        """Prefill waiting requests, at most `prefill_chunk` prompt tokens this step (a
        long prompt is spread over several steps while the running rows keep decoding);
        a request joins the batch when its prompt is in and the cache has room."""
        budget = self.prefill_chunk
        while budget > 0 and len(self._rows) < self.max_batch:
            if self._prefilling is None:
                self._prefilling = self._next_prefill()
                if self._prefilling is None:
                    return
            job = self._prefilling
            n = job.request.prompt.numel()
            try:
                if job.done < n:
                    take = min(budget, n - job.done)
                    budget -= take
                    cache = self._prefill_cache(job, job.done + take)
                    job.logits = self.model.run_cached(job.seq[:, job.done:job.done + take], job.done, job.pad,
                                                       cache, last_only=True)[:, -1, :].float()
                    job.done += take
                if job.done < n or not self._join(job):
                    return  # the rest of the prompt next step, or no room yet: it waits
            except Exception as error:  # this request's prefill failed: it alone fails
                if self._prefilling is job:
                    self._prefilling = None
                    self._release_job(job)
                    self._finish(job.request, _failure(job.request, "while its prompt was prefilled", error))
                else:
                    raise  # it had joined: not the prefill's

    def _release_job(self, job: "_Prefill"):
        """What a failed prefill holds goes back (the dense scratch cache holds nothing of its own)."""

    def _next_prefill(self) -> "_Prefill | None":
        """The oldest waiting request, to prefill (None: nothing can start now)."""
        with self._lock:
            return _Prefill(self._waiting.popleft()) if self._waiting else None

    def _prefill_cache(self, job: "_Prefill", tokens: int):
        """The cache a request's prompt goes into, with room for its first `tokens`: the
        scratch cache, copied into the batch's rows when the request joins."""
        self._scratch = self._grown(self._scratch, tokens, 1, slice(0, job.done))
        return self._scratch

    def _grown(self, cache, positions: int, rows: int, held: slice):
        """`cache` if it has `positions` positions, else a larger one (twice as long at
        least, at most max_seq_len) holding the `held` positions of its first `rows` rows;
        the smaller one goes back to the model's pool."""
        if cache.capacity >= positions:
            return cache
        larger = self.model.kv_cache_for(cache.batch, min(self.capacity, max(positions, 2 * cache.capacity)))
        if rows and held.stop > held.start:
            for new, old in zip(larger.buffers, cache.buffers):
                new[:rows, :, held].copy_(old[:rows, :, held])
        self.model.release_kv_cache(cache)
        return larger

    def _join(self, job: "_Prefill") -> bool:
        """Move a prefilled request into the batch if the cache has room for every row's
        remaining tokens, right-aligned at the longest row."""
        request, n = job.request, job.request.prompt.numel()
        lengths = [r.cached for r in self._rows] + [n]
        # decode steps each row has left, one position each: the joining row takes its first
        # token from its prompt's logits, and no row feeds its last token
        remaining = [r.request.max_new_tokens - len(r.request.tokens) for r in self._rows] + \
            [request.max_new_tokens - 1]
        start = max(lengths)
        if start + max(remaining) > self.capacity:
            return False
        held = self._held(max((r.cached for r in self._rows), default=0))
        self._cache = self._grown(self._cache, start + max(remaining), len(self._rows), held)
        self._shift(start - self._start)
        self._start = start
        row = _Row(request, job.seq)
        slot = len(self._rows)
        for big, small in zip(self._cache.buffers, self._scratch.buffers):
            big[slot, :, start - n:start] = small[0, :, :n]
        return self._enter(row, n, job.logits)

    def _enter(self, row: _Row, cached: int, logits: torch.Tensor) -> bool:
        """A prefilled row (its first `cached` positions in the cache) joins the batch and
        takes its first new token from the prompt's last logits."""
        row.cached = cached
        self._rows.append(row)
        self._prefilling = None
        self._take_token(row, logits)
        return True

    def _decode(self):
        rows = self._rows
        ids = torch.stack([r.seq[0, r.length - 1] for r in rows])[:, None]
        pad = torch.tensor([self._start - r.cached for r in rows], dtype=torch.long, device=ids.device)
        # static steps where they run: one CUDA graph per batch size on a GPU (static_decode.py)
        logits = self.model.run_step(ids, self._start, pad, self._cache)[:, -1, :].float()
        self._start += 1
        for r in rows:
            r.cached += 1
        self.peak_cached_tokens = max(self.peak_cached_tokens, sum(r.cached for r in rows))
        self._account(self._allocated(), sum(r.cached for r in rows))
        self._hand_out(logits)

    def _hand_out(self, logits: torch.Tensor):
        """Each running row takes its token from its row of a decode step's logits."""
        for i, r in enumerate(list(self._rows)):
            self._take_token(r, logits[i:i + 1])

    def _take_token(self, row: _Row, logits: torch.Tensor):
        """Pick the row's next token; finish the row on EOS or its token budget. An error
        here (a logits processor, the callback) fails this request alone."""
        request = row.request
        stage = "while its next token was picked"
        try:
            seen = row.seq[:, :row.length]
            if request.padding is not None:  # the processors see the row as generate() has it
                seen = torch.cat((request.padding, seen), dim=1)
            processed = lp.apply(request.processors, seen, logits)
            if request.sample:
                token = torch.multinomial(processed.softmax(dim=-1), 1, generator=request.generator)[0, 0]
            else:
                token = processed.argmax(dim=-1)[0]
            row.seq[0, row.length] = token
            row.length += 1
            request.tokens.append(int(token))
            if request.callback is not None:
                stage = "in its callback"
                request.callback(request, int(token))
        except Exception as error:
            request.error = _failure(request, stage, error)
            self._retire(row)
            return
        finished = len(request.tokens) >= request.max_new_tokens or (
            request.eos is not None and bool(torch.isin(token, request.eos)))
        if finished:
            self._retire(row)

    def _retire(self, row: _Row):
        """The row leaves; the last row moves into its slot so running rows stay 0..n-1.
        Only the moved row's tokens are copied (cost follows its length, not max_seq_len):
        what the slot keeps elsewhere is stale, finite and seen by no query: its older
        positions are the row's left padding and its later ones are past the current
        position, both masked by the key bias (an eager step writes them before reading)."""
        slot, last = self._rows.index(row), len(self._rows) - 1
        if slot != last:
            moved = self._rows[last]
            held = self._held(moved.cached)
            for buffer in self._cache.buffers:
                buffer[slot, :, held].copy_(buffer[last, :, held])
            self._rows[slot] = moved
        self._rows.pop()
        row.request._done.set()
        if not self._rows:
            self._start = 0

    def _shift(self, delta: int):
        """Move every running row's cached tokens `delta` positions along the sequence.
        Only the positions some row holds a token in move (cost follows the tokens in use,
        not max_seq_len); the others keep stale, finite values in the rows' left padding or
        past the new start, which the key bias masks, as in _retire."""
        n = len(self._rows)
        if delta == 0 or n == 0:
            return
        held = self._held(max(r.cached for r in self._rows))
        moved = slice(held.start + delta, held.stop + delta)
        for buffer in self._cache.buffers:
            # a copy first: the two ranges overlap when delta is less than the tokens moved
            buffer[:n, :, moved].copy_(buffer[:n, :, held].clone())

    def _held(self, tokens: int) -> slice:
        """The cache positions of a row's `tokens` cached tokens: rows are right-aligned,
        their last token just before the engine's current position."""
        return slice(self._start - tokens, self._start)

    def _fail_rows(self, error: BaseException, stage: str):
        """Every running request fails with `error` (a step of the whole batch failed)."""
        failed = [r.request for r in self._rows]
        self._rows.clear()
        self._start = 0
        for request in failed:
            self._finish(request, _failure(request, stage, error))

    def _fail_all(self, error: BaseException):
        """Every request, running, prefilling or waiting, fails with `error`."""
        self._fail_rows(error, "when the engine was interrupted")
        with self._lock:
            failed = list(self._waiting)
            if self._prefilling is not None:
                self._release_job(self._prefilling)
                failed.append(self._prefilling.request)
                self._prefilling = None
            self._waiting.clear()
        for request in failed:
            self._finish(request, _failure(request, "when the engine was interrupted", error))

    @staticmethod
    def _finish(request: Request, error: BaseException):
        request.error = error
        request._done.set()


