"""OptimizedModel: what `fxforge.optimize` returns. Call it like the model."""
from __future__ import annotations

import os
import warnings

import sympy
import torch
import torch.utils._pytree as pytree

from ..ir.call_constants import numpy_hint, same_constant as _same_constant
from ..ir.capture import CONTIGUOUS, CONTIGUOUS_BASE, CallSpec, flatten_call, rope_type_of
from ..ir.graph import Graph
from ..ir.guards import GuardChecker
from ..ir.ops import OPS
from ..ir.printer import Namer, format_node, print_graph
from ..ir.evaluate import input_sizes
from ..ir.types import SymType, dtype_name, parse_size_text, symbol
from ..ir import roles
from ..ir.roles import roles_problem
from ..ir.training_mode import training_mode_nodes
from ..passes.manager import PassStats, format_report
from .frames import frame_of_its_own
from .generate import DEFAULT  # a max_new_tokens not given (None is one given: it turns the model's off)
from .index_inputs import only_indexes, widens_losslessly
from .last_token import last_token_graph
from .program import Program, size_function
from .block_allocator import blocks_for
from .paged_cache import PagedKVCache, block_size_of
from .state import CachePool, KVCache, cache_layout, cache_nbytes
from .static_decode import static_decode_problem, static_step_for
from .static_paged import paged_static_problem, static_paged_step_for


# run_cached's steps of at most this many tokens (all rows) run under inference_mode on the
# torch backend's CPU path: decoding, verification and engine steps (see run_cached).
INFERENCE_MODE_MAX_TOKENS = 64


# transformers models whose prepare_inputs_for_generation drops the cache and runs the whole
# sequence again once it grows past config.original_max_position_embeddings (LongRoPE)
_REPREFILLS = ("phi3", "phimoe", "phi4_multimodal")


def _check_no_reprefill_step(config, lengths, starts):
    """A cached step that would cross a Phi-3 LongRoPE model's original_max_position_embeddings
    N (after 1..N cached tokens, past N with the new ones): transformers' generate recomputes
    the whole sequence there with the long rotary factors, where the KV cache holds keys
    rotated with the short ones, so the tokens would differ: refused before any work."""
    if getattr(config, "model_type", None) not in _REPREFILLS:
        return
    limit = getattr(config, "original_max_position_embeddings", None)
    if not isinstance(limit, int) or rope_type_of(config) != "longrope":
        return
    for length in lengths:
        if any(0 < start <= limit < start + length for start in starts):
            raise ValueError(
                f"this request's cached steps would pass original_max_position_embeddings={limit} of this "
                f"{config.model_type} model (LongRoPE): there transformers' generate drops its cache and runs the "
                "whole sequence again with the long rotary factors, and a KV cache's keys were rotated with the "
                f"short ones, so fxforge's tokens would differ. Keep prompt + new tokens - 1 <= {limit}, or give a "
                f"prompt longer than {limit} tokens (prefilled at once with the long factors)")


class OptimizedModel:
    """The optimized model. Module-like where code around a model expects it: `to()`,
    `eval()`, `device`, `dtype`, `config`, `state_dict()`, `parameters()`. Its weights are
    its own, copied at optimize() time (an in-place edit of the source model does not reach
    it), and calls run under torch.no_grad(). `save(path)` / `fxforge.load(path)` store it."""

    def __init__(self, graph: Graph, spec: CallSpec, program: Program, backend, stats: list[PassStats],
                 dumps: list[tuple[str, str]], capture_seconds: float, model_name: str = "model"):
        self.graph = graph
        self.spec = spec
        self.program = program
        self.backend = backend  # the runtime.backends.Backend that runs the program
        self.stats = stats
        # Choices made after the passes, for this backend (e.g. cpu_linear), in the report too.
        self.runtime_stats: list[PassStats] = []
        # the backend's planning (linear_fused written as its steps) as a report row, or None
        # where it left the graph as it was (runtime/build.py)
        self.prepare_stats: PassStats | None = None
        self._dumps = dumps  # (file name, IR text) after each pass
        self.capture_seconds = capture_seconds
        self.model_name = model_name
        self.device = _graph_device(graph)
        # everything the runtime needs is in the graph (ir/roles.py), so a parsed .ir runs too
        problem = roles_problem(graph)
        if problem:
            raise ValueError(f"the graph's signature is malformed: {problem}")
        self.kv_layout = cache_layout(graph)  # None: no KV cache; else the limits generate() checks
        self._input_roles = [roles.role_of(v) for v in graph.inputs]
        self._paged = roles.is_paged(graph)
        self._guards = GuardChecker(graph.guards)
        # the symbol of the cache-length input (kv_cache's L; None without a cache): the
        # guards on the sequence's length are on L + T
        index = roles.input_index(graph, roles.CACHE_LEN)
        self._cache_len = None if index is None else symbol(graph.inputs[index].hint)
        self._caches = CachePool(self._allocate_cache)
        # the settings generate() uses when not given (from a transformers generation_config):
        # a dict, or the GenerationConfig object `generation_config` hands out, read at each
        # call so that editing it in place works as on a transformers model
        self._generation_defaults: dict = {}
        self._generation_config = None
        # the source model gives left-padded rows shifted positions itself (api.py): shared
        # positions then serve left-padded batches exactly
        self.left_padding_shifts_positions = False
        self.config = None  # the source model's config (a transformers PretrainedConfig), if any
        self.not_a_causal_lm = None  # why kv_cache cannot serve the source model, if known (model_kind.py)
        # decode steps on static buffers, captured as CUDA graphs on a GPU (static_decode.py):
        # None = where it pays (CUDA), True = also elsewhere (no capture), False = never
        self.static_decode: bool | None = None
        self.static_decode_problem = None if self.kv_layout is None else (
            paged_static_problem(graph) if roles.is_paged(graph) else static_decode_problem(graph))
        self.op_implementations: dict = {}  # set by build.assemble
        # the graph as the passes left it, before the backend's planning: save() writes it,
        # to() rebuilds from it (build.assemble sets it)
        self.pipeline_graph = graph
        self._last_token = None  # (program, graph) of prefills that want the last logits only
        self._size_outputs = _size_outputs(spec)
        self._out_sizes = _sizes_as_leaves(spec.out_spec) if _has_size(spec.out_spec) else None
        self._warned_no_grad = False  # the warning of a call with inputs that require grad, given once
        self._fresh_outputs = _fresh_outputs(graph, spec)

    # -- calling ----------------------------------------------------------------------------
    @frame_of_its_own  # its Python calls stay off data-stack chunk boundaries (runtime/frames.py)
    def __call__(self, *args, **kwargs):
        leaves = flatten_call(self.spec, args, kwargs)
        inputs = []
        for leaf, (kind, payload) in zip(leaves, self.spec.input_leaves):
            if kind == "tensor":
                inputs.append(leaf)
            elif not _same_constant(leaf, payload):
                raise ValueError(f"an argument was captured as the constant {payload!r} ({type(payload).__name__}) "
                                 f"but is now {leaf!r} ({type(leaf).__name__}); "
                                 f"call fxforge.optimize again with the new value{numpy_hint(leaf, payload)}")
        inputs = self._check_inputs(inputs)
        self._check_autocast()
        if not self._warned_no_grad and torch.is_grad_enabled() and \
                any(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs):
            self._warn_no_grad()
        with torch.no_grad():
            if self.kv_layout is not None:
                # a plain call is a prefill into an empty cache: the model's outputs, same as eager
                batch, length = self._batch_and_length(inputs)  # (each >= 1: _check_inputs)
                pad = torch.zeros(batch, dtype=torch.long, device=self.device)
                with self._caches.lease(batch, length) as cache:
                    outs = self.program(*self._cached_inputs(inputs, 0, pad, length, cache), *cache.buffers)
            else:
                outs = self.program(*inputs)
        flat = [outs[i] if kind == "value" else i for kind, i in self.spec.output_leaves]
        if self._fresh_outputs or self.spec.output_layouts:
            flat = _eager_layouts(flat, inputs, self._fresh_outputs, self.spec)
        if self._size_outputs:
            sizes = input_sizes(self.graph, inputs)
            for i, fn in self._size_outputs.items():
                flat[i] = fn(sizes)
        if self._out_sizes is not None:  # x.size() returned: a torch.Size, as eager's
            spec, groups = self._out_sizes
            return pytree.tree_unflatten(_group_sizes(flat, groups), spec)
        return pytree.tree_unflatten(flat, self.spec.out_spec)

    forward = __call__

    def _warn_no_grad(self):
        # once per model: an attribution loop would repeat it every call
        self._warned_no_grad = True
        warnings.warn("an input of the optimized model requires grad, but fxforge runs under torch.no_grad(): its "
                      "outputs have no grad_fn and gradients do not flow back to the inputs (backward() will fail). "
                      "For training, saliency or attribution, call the original model.", stacklevel=3)

    # -- cached decoding (graphs that went through the kv_cache pass) ---------------------------
    def generate(self, input_ids=None, max_new_tokens=DEFAULT, **kwargs):
        """Token ids like transformers' generate (the prompt as input_ids, or inputs= as transformers
        names it): the prompt then the new tokens (or, with
        return_dict_in_generate=True, transformers' output object). Keyword arguments:
        attention_mask, generation_config, max_length, min_new_tokens, min_length, do_sample,
        temperature, top_k, top_p, repetition_penalty, no_repeat_ngram_size, eos_token_id,
        pad_token_id, stopping_criteria, stop_strings (with tokenizer), logits_processor,
        num_beams, length_penalty, early_stopping, num_return_sequences,
        return_dict_in_generate, output_scores, output_logits, streamer, generator; others
        raise ValueError. Needs optimize(..., kv_cache=True). Settings not given default to
        `generation_defaults` (the model's generation_config), then to transformers' defaults;
        an explicit None turns the model's default off (max_new_tokens=None: max_length counts)."""
        from .generate import generate, missing_input_ids

        if input_ids is None and kwargs.get("inputs") is not None:
            input_ids = kwargs.pop("inputs")  # transformers' name for the prompt
        if input_ids is None:
            raise missing_input_ids(kwargs)
        self._require_cache("generate()")
        with torch.no_grad():
            return generate(self, input_ids, max_new_tokens, defaults=self.generation_defaults, **kwargs)

    @property
    def generation_defaults(self) -> dict:
        """The settings generate() and the Engine use when a call does not give them (those
        of `generation_config` that they read), as a plain dict."""
        if self._generation_config is not None:
            from .generate import defaults_from_generation_config

            return defaults_from_generation_config(self._generation_config)
        return dict(self._generation_defaults)

    @generation_defaults.setter
    def generation_defaults(self, defaults: dict):
        from .generate import check_setting_names

        defaults = dict(defaults)
        check_setting_names(defaults, "generation_defaults")  # a misspelled key is refused, as generate() refuses it
        self._generation_defaults, self._generation_config = defaults, None

    @property
    def generation_config(self):
        """The generation defaults as transformers' GenerationConfig (a dict without
        transformers), held: edit it in place (`fast.generation_config.max_new_tokens = 50`)
        or assign a GenerationConfig or dict, and later generate() calls read it, as on a
        transformers model. It starts as a copy of the source model's own."""
        if self._generation_config is None:
            try:
                from transformers import GenerationConfig
            except ImportError:
                return dict(self._generation_defaults)
            self._generation_config = GenerationConfig(**self._generation_defaults)
        return self._generation_config

    @generation_config.setter
    def generation_config(self, config):
        from .generate import check_setting_names, defaults_from_generation_config

        if isinstance(config, dict):
            check_setting_names(config, "generation_config")  # (named as the caller assigned it)
            self.generation_defaults = config
            return
        if not hasattr(config, "to_dict"):
            raise ValueError(f"generation_config must be a transformers GenerationConfig or a dict, got "
                             f"{type(config).__name__}")
        defaults_from_generation_config(config)  # (reads every field it uses: fails here, not at generate)
        self._generation_config = config

    def kv_cache_for(self, batch: int, capacity: int) -> KVCache:
        """A KV cache of the caller's own for stepping with run_cached() (an idle one is
        reused); give it back with `release_kv_cache` to let later calls reuse it."""
        self._require_cache("the KV cache")
        return self._caches.take(batch, capacity)

    def release_kv_cache(self, cache: KVCache):
        self._caches.give_back(cache)

    def kv_cache_lease(self, batch: int, capacity: int):
        """`with fast.kv_cache_lease(b, n) as cache:` a cache used by this call alone."""
        self._require_cache("the KV cache")
        return self._caches.lease(batch, capacity)

    def kv_cache_bytes(self, batch: int, positions: int) -> int:
        return cache_nbytes(self.graph, batch, positions)

    def check_step_sizes(self, batch: int, lengths, starts=(0,), caller: str = "generate()"):
        """The graph's guards for calls of `batch` rows and each of `lengths` new tokens
        (a generate() call's prefill and decode steps), checked before any work. With a KV
        cache a guard on the sequence's length is one on the cached and the new tokens
        together (kv_cache rewrote T as L + T): such guards are checked for each length
        after each of `starts` cached tokens (a range: cheap, the checker remembers sizes
        that passed)."""
        shape = self.graph.inputs[0].shape if self.graph.inputs else ()
        cache_len = self._cache_len
        if cache_len is not None:
            _check_no_reprefill_step(self.config, lengths, starts)
        for length in lengths:
            sizes = {d: n for d, n in zip(shape, (batch, length)) if isinstance(d, sympy.Symbol)}
            if cache_len is None:
                self._guards.check(sizes, f"{caller} with {length} new token(s) per step")
                continue
            for start in (starts if self._guards.mentions(cache_len) else (0,)):
                self._guards.check({**sizes, cache_len: start},
                                   f"{caller} steps of {length} new token(s) after {start} cached ones")

    def _allocate_cache(self, batch: int, capacity: int):
        capacity = -(-capacity // 256) * 256  # grown in steps, so that similar requests reuse it
        if self.kv_layout.max_seq_len is not None:
            capacity = min(capacity, self.kv_layout.max_seq_len)
        if self._paged:
            return self.paged_cache(batch * blocks_for(capacity, block_size_of(self.graph)))
        return KVCache(self.graph, batch, capacity, self.backend.new_buffer)

    def paged_cache(self, num_blocks: int) -> "PagedKVCache":
        """A paged KV cache of `num_blocks` blocks of the caller's own (fxforge.Engine's pool)."""
        self._require_cache("the KV cache")
        if not self._paged:
            raise ValueError("paged_cache() needs a model optimized with KVCacheConfig(layout='paged')")
        return PagedKVCache(self.graph, num_blocks, self.backend.new_buffer)

    def run_cached(self, input_ids: torch.Tensor, start: int, pad: torch.Tensor, cache: KVCache,
                   last_only: bool = False) -> torch.Tensor:
        """One prefill or decode step: the new tokens go at positions start.., the cache
        holds the earlier ones. Returns the logits of the new tokens [B, T, vocab], or with
        `last_only` those of the last one [B, 1, vocab] (a prefill's: the output projection
        then runs on one token, runtime/last_token.py)."""
        self._check_autocast()
        inputs = self._cached_inputs([input_ids], start, pad, input_ids.shape[1], cache)
        program = self.program
        if last_only and input_ids.shape[1] > 1:
            program = self._last_token_program()
        if not (self.backend.name == "torch" and self.device.type == "cpu"
                and input_ids.numel() <= INFERENCE_MODE_MAX_TOKENS):
            return self.logits_of(program(*inputs, *cache.buffers))
        # A few tokens on the torch backend's CPU path run under inference_mode, not just
        # no_grad: such a step is a thousand small ops, and skipping their view and version
        # bookkeeping made SmolLM2's float32 decoding 2-4% faster and its int4 draft's 7-8%
        # (docs/benchmarks.md). The cache and every input are the caller's ordinary tensors
        # (updated in place, as inference_mode allows); the logits come back as an ordinary
        # tensor (a copy of the step's rows), which the caller may edit in place or use with
        # autograd. (Longer steps are bound by their products, and the copy of a long
        # prompt's logits would double them; on a GPU it would be one more launch per step.)
        with torch.inference_mode():
            logits = self.logits_of(program(*inputs, *cache.buffers))
        return logits.clone() if logits.is_inference() else logits

    def run_step(self, input_ids: torch.Tensor, start: int, pad: torch.Tensor, cache: KVCache,
                 host_pad: list[int] | None = None) -> torch.Tensor:
        """The last token's logits [B, 1, vocab] of one step: a one-token step after the
        prefill (start > 0) runs on the cache's static step where static decode is on (a
        CUDA graph replay on a GPU), a prefill projects only its last token: what
        generate(), beam search and the engines call per step. `host_pad`: `pad` as Python
        ints, with which a paged step checks each row's blocks on the host."""
        if input_ids.shape[1] == 1 and start > 0 and self.uses_static_decode():
            return self.static_step(cache, input_ids.shape[0])(input_ids, start, pad, host_pad=host_pad)
        return self.run_cached(input_ids, start, pad, cache, last_only=True)

    def _last_token_program(self) -> Program:
        """The program whose logits are the last token's (made at first use); the full one
        where last_token_graph cannot show the cut exact."""
        if self._last_token is None:
            graph = last_token_graph(self.pipeline_graph)
            program = self.program
            if graph is not None:
                program = self.backend.build(graph, self.device,
                                             f"<fxforge last-token program for {self.model_name}>")[0]
            self._last_token = (program, graph)
        return self._last_token[0]

    def uses_static_decode(self) -> bool:
        """Whether generate() decodes on static buffers (CUDA graphs on a GPU): see
        `static_decode` and `static_decode_problem`."""
        if self.static_decode is False or self.static_decode_problem is not None or self.kv_layout is None:
            return False
        return bool(self.static_decode) or self.device.type == "cuda"

    def static_step(self, cache: KVCache, batch: int):
        """The static decode step for `batch` rows of `cache` (made at its first use)."""
        if self._paged:
            return static_paged_step_for(self, cache, batch)
        return static_step_for(self, cache, batch)

    def decode_mode(self) -> str:
        """One line for report(): how decode steps run."""
        if self.kv_layout is None:
            return "decode: no KV cache"
        if self.uses_static_decode():
            how = "replayed as CUDA graphs" if self.device.type == "cuda" else "run without capture"
            return f"decode: static buffers, one step per cache and batch size, {how}"
        if self.static_decode_problem is not None:
            return f"decode: eager steps (static buffers not possible: {self.static_decode_problem})"
        return f"decode: eager steps (static buffers off{' on ' + self.device.type if self.static_decode is None else ''})"

    def bias_dtype(self) -> torch.dtype:
        return self._key_bias().type.dtype

    def _cached_inputs(self, user_inputs, start: int, pad: torch.Tensor, new: int, cache: KVCache) -> list:
        positions, bias = cache.inputs_at(pad, start, new, self.bias_dtype(), make=self.backend.step_inputs)
        extra = {roles.CACHE_LEN: start, roles.POSITIONS: positions, roles.KEY_BIAS: bias}
        if self._paged:
            extra.update(cache.paged_inputs(pad, start, new))
        given = iter(user_inputs)
        return [next(given) if role == roles.INPUT else extra[role] for role in self._input_roles]

    def _batch_and_length(self, inputs) -> tuple[int, int]:
        bias = self._key_bias().type
        batch_sym, seq_sym = bias.shape[0], bias.shape[-1].free_symbols
        for x, v in zip(inputs, self.graph.inputs):
            if isinstance(v.type, SymType):
                continue
            sizes = {d: x.shape[i] for i, d in enumerate(v.shape) if isinstance(d, sympy.Symbol)}
            if batch_sym in sizes:
                length = next((sizes[s] for s in seq_sym if s in sizes), None)
                if length is not None:
                    return sizes[batch_sym], length
        raise ValueError("cannot tell the batch and sequence length from the inputs")

    def _key_bias(self):
        return self.graph.inputs[self._input_roles.index(roles.KEY_BIAS)]

    def _logits_index(self) -> int:
        index = roles.output_index(self.graph, roles.LOGITS)
        if index is None:
            raise ValueError("generate() and the engines need an output with role logits [batch, length, vocab] in "
                             "the graph's signature; the kv_cache pass marks the output the model names 'logits' (a "
                             "dict key or ModelOutput field), else its one float [B, T, vocab] output, and found "
                             "none or several here (its note in fast.report() says which): return the logits "
                             "under the name 'logits', or as the only output of that shape")
        return index

    def logits_of(self, outs) -> torch.Tensor:
        """The logits among a cached program's outputs as [B, tokens, vocab]: a model that
        returns only the last token's as [B, vocab] (x[:, -1] before its head) gets them as
        [B, 1, vocab], the shape every other model's last token has."""
        logits = outs[self._logits_index()]
        return logits.unsqueeze(1) if logits.dim() == 2 else logits

    @property
    def logits_per_token(self) -> bool:
        """Whether a cached step returns logits for each of its new tokens ([B, T, vocab]):
        False for a model whose head reads only the last token (nanoGPT's inference path,
        lm_head(x[:, [-1], :])), which generate() and the engines serve, and speculative
        decoding, which verifies several tokens in one step, cannot."""
        logits = self.graph.outputs[self._logits_index()]
        return logits.rank == 3 and not logits.shape[1].is_number

    def _require_cache(self, what: str):
        if self.kv_layout is None and self.not_a_causal_lm:
            raise RuntimeError(f"{what} needs a KV cache, which this model cannot have: {self.not_a_causal_lm}")
        if self.kv_layout is None:
            raise RuntimeError(f"{what} needs a KV cache: optimize the model with "
                               "fxforge.optimize(model, example_inputs, kv_cache=True)")
        self._check_token_ids_input(what)

    def _check_token_ids_input(self, what: str):
        """generate() and the engines feed one input, the token ids as [batch, length]; the
        positions and the padding mask are the cache's to give (kv_cache's inputs)."""
        given = roles.user_inputs(self.graph)
        names = [self.graph.input_names[self.graph.inputs.index(v)] for v in given]
        if len(given) != 1:
            raise ValueError(f"{what} feeds the model its token ids alone, but it was captured with {len(given)} "
                             f"inputs ({', '.join(names)}): optimize it with the token ids as the only example "
                             "input (positions and the attention mask come from the KV cache; a model that "
                             "takes positions as an argument must compute them itself when not given, as "
                             "transformers models do with position_ids=None)")
        batch = self._key_bias().type.shape[0]
        ids = given[0]
        if ids.rank != 2 or ids.shape[0] != batch:
            where = next((f"dim {i}" for i, d in enumerate(ids.shape) if d == batch), "another dim")
            raise ValueError(f"{what} feeds token ids as [batch, length], but this model's input {names[0]} has "
                             f"its batch (the batch its attention runs over) in {where}, not dim 0: sequence-first "
                             "ids, [length, batch]. Wrap the model in a module whose forward takes [batch, length] "
                             "ids and passes them on transposed, and optimize that")

    @property
    def token_vocabulary(self) -> int | None:
        """The rows of the embedding the token ids index (None where not one table): a
        prompt's ids must be below it. Found once per graph (generate() and every engine
        submission ask; the walk over the graph is not free)."""
        found = getattr(self, "_token_vocabulary_of", None)
        if found is None or found[0] is not self.graph:
            found = self._token_vocabulary_of = (self.graph, roles.token_vocabulary(self.graph))
        return found[1]

    def _check_autocast(self):
        """Refuse a call under torch.autocast where the graph runs Triton kernels: they
        compute in the dtypes the model was optimized in, where eager would compute in
        autocast's (a bfloat16 result against a float32 one). The torch backend runs PyTorch
        ops, which follow autocast as eager's do."""
        if self.backend.name == "torch":
            return
        device = self.device.type
        try:
            enabled = torch.is_autocast_enabled(device)
        except TypeError:  # (a torch whose is_autocast_enabled takes no device: CUDA's)
            enabled = device == "cuda" and torch.is_autocast_enabled()
        if enabled:
            dtype = torch.get_autocast_dtype(device) if hasattr(torch, "get_autocast_dtype") else "its dtype"
            raise RuntimeError(f"this model is optimized for backend={self.backend.name!r}, whose kernels compute in "
                               f"the dtypes of optimize() time ({self.dtype}); under torch.autocast({device!r}, "
                               f"dtype={dtype}) eager would compute in {dtype}, so the answers would differ. Call it "
                               f"outside autocast, optimize a copy of the model in {dtype} (model.to({dtype})) or "
                               f"convert this one (fast.to({dtype})), or use backend='torch', which follows autocast")

    def _check_inputs(self, inputs) -> list:
        """The inputs, checked against the graph's types (an integer tensor the graph only
        indexes with widened losslessly: int32 token ids run as the captured int64)."""
        sizes: dict = {}
        inputs = list(inputs)
        for i, (x, v) in enumerate(zip(inputs, roles.user_inputs(self.graph))):
            label = f"input {i} ({self.graph.input_names[i] if i < len(self.graph.input_names) else v.hint})"
            if isinstance(v.type, SymType):
                continue
            if not isinstance(x, torch.Tensor):
                raise ValueError(f"{label} must be a tensor of type {v.type}, got {type(x).__name__}")
            if isinstance(x, torch.Tensor) and x.dtype != v.dtype and widens_losslessly(x.dtype, v.dtype) \
                    and only_indexes(self.graph, v):
                if x.dtype not in EAGER_INDEX_DTYPES:
                    raise ValueError(f"{label} is a {x.dtype} tensor, but the model reads it as indices (an "
                                     f"embedding's), which eager PyTorch takes as int32 or int64 only (it raises "
                                     f"on {x.dtype}): convert it (.to(torch.long))")
                x = inputs[i] = x.to(v.dtype)
            # (a graph without weights runs where its inputs are; a 0-d CPU tensor goes with any)
            if self.graph.params and x.dim() > 0 and x.device.type != self.device.type:
                raise ValueError(f"{label} is on {x.device}, the model on {self.device}: move it there "
                                 f"(x.to(fast.device)); fxforge runs the graph on the device of its weights")
            if x.dim() != v.rank or x.dtype != v.dtype:
                # a graph holds one dtype per input: say how to meet it
                fix = (f"; convert it (.to({v.dtype})) or optimize with an example of the dtype you call with"
                       if x.dim() == v.rank else "")
                raise ValueError(f"{label} must be {v.type} (rank {v.rank}, {dtype_name(v.dtype)}), got a "
                                 f"{x.dtype} tensor of shape {tuple(x.shape)}{fix}")
            for d, size in enumerate(v.shape):
                actual = x.shape[d]
                if isinstance(size, sympy.Symbol):
                    if actual == 0:
                        # capture proved the graph for sizes >= 1 (torch.export assumes >= 2 and
                        # size_one checks 1); a model may branch on an empty input, unseen
                        raise ValueError(f"{label} has size 0 in dim {d} ({size} in {v.type}): the optimized graph "
                                         "serves sizes of at least 1, as captured; call the source model for an "
                                         "empty input")
                    if sizes.setdefault(size, actual) != actual:
                        raise ValueError(f"{label} has {size}={actual} in dim {d}, but another input has "
                                         f"{size}={sizes[size]}; the graph needs them equal ({v.type})")
                elif size.is_number and int(size) != actual:
                    # torch.export fixes an example's size 1 (it may broadcast): the way out
                    hint = ("; the example had size 1 there, which capture keeps fixed (a size-1 dim may "
                            "broadcast): optimize with an example whose size there is more than 1 (e.g. 2) for "
                            "a graph that takes any") \
                        if int(size) == 1 and any(isinstance(dim, sympy.Symbol) for dim in v.shape) else ""
                    raise ValueError(f"{label} must have size {size} in dim {d} ({v.type}), got {actual}{hint}")
        _check_mask_batch(inputs, roles.user_inputs(self.graph))
        if self._cache_len is not None:
            sizes[self._cache_len] = 0  # a plain call is a prefill into an empty cache
        self._guards.check(sizes)
        return inputs

    # -- inspection ---------------------------------------------------------------------------
    @property
    def kernels(self) -> dict[str, str]:
        """Generated kernel sources by name, filled as kernels are made (first call per shape class)."""
        return self.backend.kernel_sources()

    @property
    def ir(self) -> str:
        return print_graph(self.graph)

    @property
    def code(self) -> str:
        return self.program.source

    def report(self) -> str:
        head = (f"fxforge report for {self.model_name}: backend={self.backend.name}, "
                f"{len(self.graph.nodes)} nodes, {len(self.graph.params)} parameters")
        ops = ", ".join(f"{k}={v}" for k, v in sorted(self.graph.op_counts().items(), key=lambda kv: -kv[1]))
        steps = self.stats + ([self.prepare_stats] if self.prepare_stats is not None else []) + self.runtime_stats
        text = f"{head}\n{format_report(steps, self.capture_seconds)}\nfinal ops: {ops}\n{self.decode_mode()}"
        profile = getattr(self, "last_decode_profile", None)
        return text if profile is None else f"{text}\n{profile}"

    def decode_profile(self, steps: int = 2, prompt_len: int = 4, batch: int = 1):
        """Launches, host syncs and host microseconds of one decode step (runtime/launch_count.py),
        measured now on a cache of its own; report() prints the last one."""
        from .launch_count import decode_profile

        self._require_cache("decode_profile()")
        self.last_decode_profile = decode_profile(self, steps, prompt_len, batch)
        return self.last_decode_profile

    def dump(self, directory: str) -> list[str]:
        """Write the IR after every pass (NN_<pass>.ir), the program, kernels and the report.
        An earlier dump in `directory` (a re-run cell, FXFORGE_DUMP shared by two models) is
        removed first, fxforge's own files only: left there, its later-numbered .ir files
        would pass for this model's last IR."""
        import re

        os.makedirs(directory, exist_ok=True)
        ours = re.compile(r"\d{2,}_.+\.ir|kernel_.+\.py|program\.py|report\.txt")
        for entry in os.scandir(directory):
            if ours.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                os.remove(entry.path)
        written = []
        for fname, text in self._dumps:
            written.append(_write(directory, fname, text))
        written.append(_write(directory, "program.py", self.code))
        for name, src in self.kernels.items():
            written.append(_write(directory, f"kernel_{name}.py", src))
        written.append(_write(directory, "report.txt", self.report() + "\n"))
        return written

    # -- saving -------------------------------------------------------------------------------
    def save(self, path: str) -> str:
        """Write this model to the directory `path` (model.ir, weights.safetensors, meta.json);
        `fxforge.load(path)` runs it in another process, without the model class or capture."""
        from .saving import save_model

        return save_model(self, path)

    def __reduce__(self):
        # the program is generated code and the backend holds compiled kernels: neither
        # pickles, so say what does work instead of failing deep inside pickle
        raise TypeError("an OptimizedModel cannot be pickled (pickle.dumps, torch.save): save it with "
                        "fast.save(path) and load it with fxforge.load(path)")

    def __copy__(self):
        raise TypeError("an OptimizedModel cannot be copied (copy.copy, copy.deepcopy): its program and the "
                        "backend's compiled kernels are not copyable; for a second model, fxforge.optimize the "
                        "source model again, or fast.save(path) and fxforge.load(path)")

    def __deepcopy__(self, memo):
        self.__copy__()

    # -- module-like --------------------------------------------------------------------------
    def to(self, *args, **kwargs) -> "OptimizedModel":
        """Like nn.Module.to(device | dtype): changes this model in place and returns it.
        The weights move (or are cast) and the backend's planning and the program are rebuilt
        for the new device (its default backend) or dtype. A dtype change is refused with the
        IR lines at fault when the graph's own types fix a dtype (runtime/retarget.py)."""
        from .backends import resolve_backend
        from .build import assemble
        from .retarget import graph_on

        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        device = None if device is None or _same_device(device, self.device) else device
        dtype = None if dtype is None or dtype == self.dtype else dtype
        if device is None and dtype is None:
            return self
        graph = graph_on(self.pipeline_graph, device, dtype)
        # the same backend for a dtype change; the new device's default backend for a move
        backend = self.backend if device is None else \
            resolve_backend("auto", device, process_group=getattr(self.backend, "process_group", None))
        rebuilt = assemble(graph, self.spec, backend, device or self.device, self.model_name, self.stats,
                           self._dumps, self.capture_seconds)
        rebuilt._generation_defaults, rebuilt._generation_config = self._generation_defaults, self._generation_config
        rebuilt.config = self.config
        rebuilt.left_padding_shifts_positions = self.left_padding_shifts_positions
        rebuilt.not_a_causal_lm = self.not_a_causal_lm
        rebuilt.static_decode = self.static_decode
        self.__dict__.update(rebuilt.__dict__)
        return self

    def cpu(self) -> "OptimizedModel":
        return self.to("cpu")

    def cuda(self, device=None) -> "OptimizedModel":
        return self.to(torch.device("cuda") if device is None else torch.device("cuda", device)
                       if isinstance(device, int) else device)

    # nn.Module's dtype shorthands: to(dtype), with its refusals
    def half(self) -> "OptimizedModel":
        return self.to(torch.float16)

    def bfloat16(self) -> "OptimizedModel":
        return self.to(torch.bfloat16)

    def float(self) -> "OptimizedModel":
        return self.to(torch.float32)

    def double(self) -> "OptimizedModel":
        return self.to(torch.float64)

    @property
    def training(self) -> bool:
        """Whether the graph computes as the model did in training mode: the model was
        optimized while model.training was True and its dropout stays in the graph, active
        (outputs differ from call to call). False for a model optimized in eval mode."""
        return bool(training_mode_nodes(self.graph))

    def eval(self) -> "OptimizedModel":
        """Returns self where the graph is already an inference graph: the model was in eval
        mode at optimize(), so its dropout (eval-mode: the identity) was removed from the
        graph. A model optimized in training mode keeps active dropout in its graph, which
        eval() cannot take out: that raises RuntimeError (call model.eval() before
        fxforge.optimize)."""
        return self.train(False)

    def train(self, mode: bool = True) -> "OptimizedModel":
        """train(False) is eval(). train(True) raises: an OptimizedModel does not train."""
        if not mode:
            nodes = training_mode_nodes(self.graph)
            if nodes:
                names = Namer(self.graph)
                lines = "\n".join(f"  {format_node(n, names)}{n.where()}" for n in nodes[:3])
                raise RuntimeError(
                    f"this model was optimized in training mode: its graph keeps {len(nodes)} active dropout "
                    f"op(s), which eval() cannot take out (the graph and its fusions were built with them), so "
                    f"its outputs would stay random. Call model.eval() before fxforge.optimize(model, ...) to get "
                    f"an inference model.\n{lines}")
            return self
        raise RuntimeError("an OptimizedModel is for inference only (calls run under torch.no_grad()); "
                           "train the source model and optimize it again")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of its floating weights (the first one's, as transformers' model.dtype)."""
        for t in self.pipeline_graph.params.values():
            if t.is_floating_point():
                return t.dtype
        return torch.get_default_dtype()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Its weights by the names the IR gives them (fused and quantized ones included:
        not the source model's state dict). As nn.Module's, the tensors are the model's own
        (detached): an in-place edit (`with torch.no_grad(): sd[k].mul_(0.5)`, a LoRA merge)
        changes what the model computes, on every path: the backend's derived copies of a
        weight (column-major, packed int4, prepacked int8) are made again at their next use
        (runtime/derived.py). `fast.save()` saves the edited weights."""
        return {name: t.detach() for name, t in self.pipeline_graph.params.items()}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Like nn.Module.load_state_dict, for the names state_dict() gives: checks every
        name (strict: missing and unexpected keys are an error), shape and dtype (floating
        values cast to the weight's dtype; quantized and integer weights take their own
        dtype only) before writing anything, then copies the values into the model's
        weights in place and returns (missing_keys, unexpected_keys). Derived copies follow
        (runtime/derived.py)."""
        from .state_dict import load_state_dict

        if assign:
            raise NotImplementedError("load_state_dict(assign=True) is not supported: the program and the "
                                      "backend's planning hold the model's weight tensors, so values are copied "
                                      "into them; call it with assign=False")
        return load_state_dict(self.pipeline_graph.params, state_dict, strict, self.model_name)

    def named_parameters(self):
        seen = set()
        for name, t in self.pipeline_graph.params.items():
            if id(t) not in seen:  # tied weights once, as nn.Module does
                seen.add(id(t))
                yield name, t

    def parameters(self):
        for _, t in self.named_parameters():
            yield t

    def __repr__(self) -> str:
        return f"OptimizedModel({self.model_name}, backend={self.backend.name}, nodes={len(self.graph.nodes)})"


def _check_mask_batch(inputs, values):
    """An attention_mask of another batch than the other inputs (one row for every sequence:
    eager broadcasts it) would fail deep in the graph, which indexes the mask per row."""
    named = [(v.hint, x) for x, v in zip(inputs, values) if isinstance(x, torch.Tensor) and x.dim() >= 1]
    masks = [x for name, x in named if name == "attention_mask"]
    others = [(name, x) for name, x in named if name != "attention_mask"]
    if not masks or not others:
        return
    (mask,), (name, first) = masks, others[0]
    if mask.shape[0] != first.shape[0]:
        raise ValueError(f"attention_mask has batch {mask.shape[0]} but {name} has batch {first.shape[0]}: pass one "
                         f"mask row per sequence (attention_mask.expand({first.shape[0]}, -1) for one mask shared "
                         "by every row)")


def _fresh_outputs(graph: Graph, spec: CallSpec) -> tuple:
    """The flat output positions where the graph's output is (a view of) a graph input, a
    weight or state, or the same value as an earlier output, but eager's is a tensor of its
    own: `x.clone()`, `x * 1` and `x + 0` are x to the IR, and CSE makes `(x * 2, x * 2)` one
    value. Returned as they are, a write into the output would change the caller's input,
    the model's weights or the other output; so the call copies them. Where the model
    itself returns its input (or a view of it), or one tensor twice, they stay shared as in
    eager (capture records which: CallSpec.output_views_input / output_same_as)."""
    producers = {v: n for n in graph.nodes for v in n.outputs}
    held = set(graph.inputs) | set(graph.param_values) | set(graph.state_values)

    def base(v):
        while v in producers and OPS[producers[v].op].kind == "view" and producers[v].inputs:
            v = producers[v].inputs[0]
        return v

    fresh, first = [], {}
    for i, (kind, index) in enumerate(spec.output_leaves):
        if kind != "value":
            continue
        v = graph.outputs[index]
        if base(v) in held:
            if i not in spec.output_views_input:
                fresh.append(i)
        elif v in first and spec.output_same_as.get(i) != first[v]:
            fresh.append(i)
        first.setdefault(v, i)
    return tuple(fresh)


# the index dtypes eager's embedding (index_select) takes: a narrower integer tensor widens
# losslessly too, but eager raises on it, and fxforge must not answer where eager refuses
EAGER_INDEX_DTYPES = (torch.int32, torch.int64)


def _eager_layouts(flat: list, inputs: list, fresh: tuple, spec: CallSpec) -> list:
    """The outputs with eager's aliasing and layout: a copy of its own at the `fresh`
    positions, and contiguous where eager makes them so (CallSpec.output_layouts: the IR
    has no layout, `y.transpose(1, 2).contiguous()` is a transposed view to it). An output
    eager returns twice stays one object."""
    old = list(flat)
    layouts = spec.output_layouts
    for i in fresh:  # eager's output is a tensor of its own there
        contiguous = layouts.get(i) in (CONTIGUOUS, CONTIGUOUS_BASE)
        flat[i] = flat[i].clone(memory_format=torch.contiguous_format if contiguous else torch.preserve_format)
    for i, layout in layouts.items():
        t = flat[i]
        if i in fresh or not isinstance(t, torch.Tensor):
            continue
        if layout == CONTIGUOUS and not t.is_contiguous():
            flat[i] = t.contiguous()  # a copy, as eager's contiguous() makes
        elif layout == CONTIGUOUS_BASE and _views_strided_input(t, inputs):
            flat[i] = t.clone(memory_format=torch.contiguous_format)
    for i, j in spec.output_same_as.items():
        if i not in fresh and old[i] is old[j]:
            flat[i] = flat[j]
    return flat


def _views_strided_input(t: torch.Tensor, inputs: list) -> bool:
    """Whether `t` shares memory with a call input that is not contiguous: eager's
    `x.contiguous()` copied that input before the views that follow it."""
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return False
    return any(isinstance(x, torch.Tensor) and not x.is_contiguous() and x.untyped_storage().data_ptr() == ptr
               for x in inputs)


def _size_outputs(spec: CallSpec) -> dict:
    """{flat output position: function of the call's sizes ({symbol: int})} for the outputs
    that are numbers computed from sizes (capture._scalar_output): `x.shape[1]` is the
    call's length, an int, as eager returns it, not the symbol T."""
    out = {}
    for i, (kind, payload) in enumerate(spec.output_leaves):
        if kind != "size":
            continue
        type_name, text = payload
        expr = parse_size_text(text)
        symbols = sorted(expr.free_symbols, key=str)
        fn = size_function(expr, symbols)
        cast = {"int": int, "float": float, "bool": bool}[type_name]
        out[i] = lambda sizes, fn=fn, symbols=symbols, cast=cast: cast(fn(*(sizes[s] for s in symbols)))
    return out


def _has_size(spec) -> bool:
    return not spec.is_leaf() and (spec.type is torch.Size or any(_has_size(spec.child(i))
                                                                   for i in range(spec.num_children)))


def _sizes_as_leaves(spec):
    """(spec with each torch.Size node made one leaf, the flat leaves each of its leaves
    takes: None for one plain leaf, n for a torch.Size of n). pytree's own unflatten of a
    torch.Size gives a tuple (torch.export's module returns one too); eager gives a Size."""
    if spec.is_leaf():
        return spec, [None]
    if spec.type is torch.Size:
        leaf = pytree.treespec_leaf() if hasattr(pytree, "treespec_leaf") else pytree.LeafSpec()
        return leaf, [spec.num_leaves]
    children, groups = [], []
    for i in range(spec.num_children):
        child, child_groups = _sizes_as_leaves(spec.child(i))
        children.append(child)
        groups += child_groups
    return pytree.TreeSpec(spec.type, spec.context, children), groups


def _group_sizes(flat: list, groups: list) -> list:
    out, i = [], 0
    for n in groups:
        out.append(flat[i] if n is None else torch.Size(flat[i:i + n]))
        i += 1 if n is None else n
    return out


def _graph_device(graph: Graph) -> torch.device:
    for t in graph.params.values():
        return t.device
    return torch.device("cpu")


def _same_device(a, b) -> bool:
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _write(directory, name, text) -> str:
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(text)
    return path
