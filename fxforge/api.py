"""optimize(): capture -> pass pipeline -> program -> OptimizedModel."""
from __future__ import annotations

import copy
import os
import re
import time
import warnings
from typing import Callable, Sequence

import sympy
import torch
import torch.utils._pytree as pytree

from .ir.capture import CallSpec, _as_tuple as _as_args, capture_with_spec
from .ir.capture_cache import CaptureCache
from .ir import roles
from .ir.graph import Graph
from .ir.size_one import check_sizes_of_one
from .log import Reporter
from .ir.printer import print_graph
from .ir.typecheck import IRCheckError
from .passes import PassError, PassInfo, PassRegistry, registry as _default_registry
from .passes.manager import run_pipeline
from .runtime.backends import Backend, resolve_backend
from .runtime.model_kind import not_a_causal_lm
from .runtime.module import OptimizedModel
from .runtime.frames import frame_of_its_own
from .runtime.build import assemble, model_from_ir, own_weights


@frame_of_its_own  # same speed at any caller depth: see runtime/frames.py
def optimize(model: torch.nn.Module, example_inputs=None, *, example_kwargs: dict | None = None,
             passes: Sequence[str] | None = None, disable: Sequence[str] = (), backend: str | Backend = "auto",
             dump_dir: str | None = None, dynamic: bool = True, registry: PassRegistry | None = None,
             cpu_linear: bool | str = True, verbose: bool | None = None, capture_cache: CaptureCache | None = None,
             **options) -> OptimizedModel:
    """Capture `model` on the example inputs, run the pass pipeline, and return a model that
    runs the optimized graph.

    passes:   None for the default pipeline, or the exact list of pass names to run.
    disable:  pass names to leave out of the default pipeline.
    backend:  "auto" (triton on CUDA, else torch), "torch", "triton", "interpret", a name
              given to fxforge.register_backend, or a Backend object.
    dump_dir: write the IR after every pass, the program and the report there
              (the environment variable FXFORGE_DUMP does the same).
    cpu_linear: on the CPU (torch backend), run each float32 linear with the library kernel
              and weight layout that is fastest at one token (and one for each bucket of
              2-8, 9-15 and 16-32 rows: speculative verification, an engine's decoding
              steps), timed per shape (runtime/cpu_linear.py;
              column-major copies cost memory while the model keeps its own weights). True or "cached": time each shape once per machine
              and reuse the choice from then on (a JSON file under $FXFORGE_CACHE, default
              ~/.cache/fxforge, in cpu_linear/), so every run builds the same program;
              "measure": time again and overwrite the cached choices; False: F.linear on
              the model's weights, nothing timed or cached.
    verbose:  progress on stderr (capture, a bar over the passes): None shows it only when
              stderr is a terminal, False never, True always. FXFORGE_LOG=passes (or
              capture, dynamo, all) prints debug lines whatever `verbose` says.
    capture_cache: a fxforge.CaptureCache: optimizing the same model on the same example
              inputs again reuses its capture (torch.export: most of optimize()'s time on a
              real model) instead of capturing again. See fxforge/ir/capture_cache.py.
    options:  per-pass options (e.g. quantize="int8", kv_cache=True, tensor_parallel=2);
              an option no pass knows is an error.
    """
    _check_arguments(model, example_inputs, example_kwargs, passes, disable, dynamic)
    if options.get("kv_cache") and (why := not_a_causal_lm(model)) is not None:
        from .passes.kv_cache import KVCacheError

        raise KVCacheError(f"kv_cache: {why}")

    def capture():
        graph, spec = capture_with_spec(model, example_inputs, example_kwargs, dynamic=dynamic)
        if dynamic:  # a model that computes otherwise at batch 1 or one token: guard or refuse
            _warn_fixed_sizes(graph)
            check_sizes_of_one(model, graph, spec, _as_args(example_inputs), example_kwargs)
        return graph, spec

    if capture_cache is not None:
        if not isinstance(capture_cache, CaptureCache):
            raise TypeError(f"capture_cache should be a fxforge.CaptureCache, got {type(capture_cache).__name__}")
        uncached = capture

        def capture():
            return capture_cache.capture(model, example_inputs, example_kwargs, dynamic, uncached)

    fast = optimize_captured(capture, model, passes=passes, disable=disable, backend=backend, dump_dir=dump_dir,
                             registry=registry, cpu_linear=cpu_linear, verbose=verbose,
                             device=_model_device(model, (example_inputs, example_kwargs)), **options)
    _warn_nothing_quantized(fast)
    _measure_approximation_error(fast, model, example_inputs, example_kwargs,
                                 _default_registry if registry is None else registry)
    return fast


# passes that change the answer (only when asked), whose report states the error they make
# (and any pass registered with approximate=True)
_APPROXIMATIONS = ("quantize", "gqa")


def _approximate(stat, registry: PassRegistry) -> bool:
    """Did this pass run as an approximation? quantize and gqa when they changed something;
    a pass registered with approximate=True whenever it ran (what it changed is its own)."""
    if stat.name in _APPROXIMATIONS:
        return bool(stat.rules or stat.details.get(stat.name))
    info = registry.passes.get(stat.name)
    return info is not None and info.approximate


def _measure_approximation_error(fast, model, example_inputs, example_kwargs, registry: PassRegistry):
    """quantize= and gqa= change the model's answer: the report states by how much, the
    optimized model against the source model on the example inputs (the whole pipeline's
    error, which the exact passes leave at rounding level). A model in training mode
    (random dropout) or a call that fails gets a note saying the error was not measured."""
    from .evaluate import describe_error, output_error

    stats = [s for s in fast.stats if _approximate(s, registry)]
    if not stats:
        return
    stat = stats[-1]
    args, kwargs = _as_args(example_inputs), dict(example_kwargs or {})
    sizes = ", ".join("x".join(map(str, t.shape)) for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))
    where = f"on the example inputs ({sizes})"
    try:
        if model.training:
            raise ValueError("the model is in training mode (random dropout)")
        with torch.no_grad():
            error = output_error(model(*args, **kwargs), fast(*args, **kwargs))
    except Exception as e:  # the measurement is a report line: it never fails optimize()
        stat.notes.append(f"error vs the source model not measured: {str(e).splitlines()[0][:200]}")
        return
    error["measured_on"] = where
    stat.details.setdefault("error", error)
    stat.notes.append(describe_error(error, where))


def _warn_nothing_quantized(fast):
    """quantize= asked for smaller weights; where the model has linear layers but every one
    was skipped (its include/exclude patterns, a group size no layer fits), the model runs
    at full size and report() alone would say why: warn, with the reasons. (Not from
    torch.compile's backend: there a subgraph without the model's linears is normal.)"""
    details = next((s.details.get("quantize") for s in fast.stats if s.name == "quantize"), None)
    if not details or details["layers"] or not details["skipped"]:
        return
    skipped = details["skipped"]
    shown = "; ".join(f"{name}: {reason}" for name, reason in skipped[:3])
    more = f"; and {len(skipped) - 3} more (report())" if len(skipped) > 3 else ""
    warnings.warn(f"quantize={details['scheme']!r} quantized none of the model's {len(skipped)} linear "
                  f"weight(s), so its weights keep their size: {shown}{more}. Check QuantConfig's include / "
                  "exclude patterns against the names in fast.report()", stacklevel=3)


def _check_arguments(model, example_inputs, example_kwargs, passes, disable, dynamic):
    """optimize()'s own arguments, each checked before the slow capture with an error that
    says what was given and what to write instead."""
    from collections.abc import Mapping

    if not isinstance(model, torch.nn.Module):
        what = "a function" if callable(model) else f"a {type(model).__name__}"
        raise TypeError(f"fxforge.optimize() takes a torch.nn.Module (or torch.fx.GraphModule), got {what}"
                        + (f" ({getattr(model, '__name__', model)!r})" if callable(model) else "")
                        + ": wrap a function in a module whose forward calls it, e.g. "
                          "class Wrapped(torch.nn.Module): def forward(self, x): return fn(x); "
                          "then fxforge.optimize(Wrapped(), example_inputs)")
    if isinstance(example_inputs, Mapping) and set(example_inputs) & _parameter_names(model):
        # (a dict whose keys are not forward()'s parameters is one positional argument: a batch dict)
        raise TypeError(f"example_inputs is a {type(example_inputs).__name__} (keys {list(example_inputs)}): "
                        "example_inputs holds the positional arguments (a tensor, or a tuple of them); pass "
                        "keyword arguments as example_kwargs=dict(...), e.g. "
                        "fxforge.optimize(model, example_kwargs={'input_ids': ids})")
    if example_kwargs is not None:
        if not isinstance(example_kwargs, Mapping):
            raise TypeError(f"example_kwargs is a {type(example_kwargs).__name__}, not a dict of keyword arguments "
                            "by name: write example_kwargs={'input_ids': ids} (positional arguments go in "
                            "example_inputs)")
        bad = [k for k in example_kwargs if not isinstance(k, str)]
        if bad:
            raise TypeError(f"example_kwargs' keys are forward()'s argument names (strings), got {bad[0]!r}")
    for name, value in (("passes", passes), ("disable", disable)):
        if isinstance(value, str):
            raise TypeError(f"{name} is a list of pass names, got the string {value!r}: write {name}=[{value!r}]")
    if not isinstance(dynamic, bool):
        raise TypeError(f"dynamic is True (symbolic batch and sequence sizes) or False (the example's sizes "
                        f"only), got {dynamic!r}")
    meta = next((name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta), None)
    if meta is not None:
        raise ValueError(f"the model's parameters are on the meta device ({meta}, ...): they hold no values to "
                         "compute with. Materialise them first: load the model with its weights (from_pretrained "
                         "without device_map='meta'), or model.to_empty(device='cpu') then "
                         "model.load_state_dict(weights)")
    leaves = pytree.tree_leaves((example_inputs, example_kwargs))
    if any(isinstance(x, torch.Tensor) and x.is_meta for x in leaves):
        raise ValueError("an example input is on the meta device: it holds no values, and fxforge checks the "
                         "captured graph against the model on the example's values (a model that computes "
                         "otherwise at some size gets a guard there). Give real tensors on the model's device, "
                         "e.g. torch.randint(0, vocab_size, (2, 8)) for token ids")


def _parameter_names(model) -> set:
    import inspect

    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _warn_fixed_sizes(graph: Graph):
    """dynamic=True asks for a symbolic batch and length (dims 0 and 1 of the first input);
    torch.export fixes one silently where the example's size equals a fixed size of the
    model (nanoGPT's 128 x 128 mask buffer sliced by the length, at a 128-token example):
    the graph then serves that size only. Say so, with the remedy."""
    first = next((v for v in graph.inputs if getattr(v.type, "shape", None)), None)
    # token ids [B, T], or a sequence of vectors [B, T, ...]: dim 1 is a length there; in
    # [B, features] it is a size the weights fix
    if first is None or not (first.rank >= 3 or (first.rank == 2 and not first.dtype.is_floating_point)):
        return
    fixed = [f"{name} = {int(size)}" for name, size in zip(("the batch", "the length"), first.shape[:2])
             if getattr(size, "is_number", False) and not (name == "the length" and int(size) in _conv_channels(graph))]
    _warn_pinning_guards(graph, first)
    if not fixed:
        return
    ops = _length_fixing_ops(graph)
    if ops:
        why = (f"{'; '.join(ops)} ran at the example's size, and torch.export traces "
               f"{'it' if len(ops) == 1 else 'them'} at a fixed size (a recurrent layer, nn.GRU / nn.LSTM / "
               "nn.RNN, is run whole; torch.linspace / logspace take their number of steps as a plain int). "
               "The optimized model serves that size only, and kv_cache cannot cache it: where the size should "
               "vary, optimize once per size (or write linspace as torch.arange(n) / (n - 1))")
    else:
        why = ("most often because the example's size equals a fixed size in the model (a mask buffer or position "
               "table of that many rows, sliced by it), or the model runs a recurrent layer (nn.GRU, nn.LSTM, "
               "nn.RNN) or torch.linspace / logspace with that many steps, which torch.export traces at one size, "
               "or makes a Python float of the size (float(x.shape[1]), torch.tensor(float(n))), or loops over "
               "the sequence in Python (`for t in range(seq_len)`, as transformers' Mamba / state-space layers do "
               "without their CUDA kernels), which torch.export unrolls into that many steps, or splits it into "
               "its tokens (x.unbind(1), x.split(1, dim=1): for the last token write x[:, -1] or x[:, [-1]]). "
               "The optimized model serves that size only, and kv_cache cannot cache it: where the size should "
               "vary, optimize with an example of another size (e.g. one token shorter; a loop over the "
               "sequence fixes any size: optimize once per length)")
    warnings.warn(f"torch.export fixed {' and '.join(fixed)} (dims of input {first.hint!r}): the model's "
                  f"code needs that exact size: {why}", stacklevel=4)


def _conv_channels(graph: Graph) -> set[int]:
    """The channel counts the graph's convolutions take (dim 1 of their input): an image's
    or a spectrogram's dim 1 (ViT's pixel_values [B, 3, H, W], Whisper's mel bins) is a size
    the weights fix, not a length the example fixed."""
    out = set()
    for node in graph.nodes:
        if node.op == "torch_call" and str(node.attrs.get("target", "")).startswith(("aten.conv", "aten._conv")):
            shape = getattr(node.inputs[0].type, "shape", ()) if node.inputs else ()
            if len(shape) >= 2 and getattr(shape[1], "is_number", False):
                out.add(int(shape[1]))
    return out


def _warn_pinning_guards(graph: Graph, first):
    """A guard that one size alone satisfies fixes that size as surely as export's own
    specialization: `Eq(1/T, 0.16666666666666666)`, where an op takes a float computed from
    the length as a plain float (an attention `scale=1 / x.shape[1]`). Say so at optimize()
    rather than at the first call of another size."""
    from .ir.guards import GuardChecker, format_guard

    names = dict(zip(first.shape[:2], ("the batch", "the length")))
    for g in graph.guards:
        if not isinstance(g, sympy.Eq) or len(g.free_symbols) != 1 or next(iter(g.free_symbols)) not in names:
            continue
        (sym,) = g.free_symbols
        test = GuardChecker([g])._tests[0]
        held = []
        for n in range(1, _PINNING_SCAN + 1):
            if test([n], {sym: n}):
                held.append(n)
                if len(held) > 1:
                    break  # most guards (Eq(Mod(T, 2), 0)): at once
        if len(held) == 1:
            warnings.warn(f"the guard {format_guard(g)} holds at {sym} = {held[0]} only: the optimized model serves "
                          f"{names[sym]} {held[0]} only (most often an op takes a float computed from that size as "
                          "a plain float, such as an attention scale=1 / x.shape[1], which torch.export fixes); "
                          "compute it from a tensor instead, or optimize once per size", stacklevel=5)


_PINNING_SCAN = 4096  # sizes scanned for a guard that holds at one of them only


# ATen ops that torch.export runs at a size fixed by the example (op name prefixes)
_LENGTH_FIXING = ("aten.gru.", "aten.lstm.", "aten.rnn_tanh.", "aten.rnn_relu.", "aten.linspace.", "aten.logspace.")


def _length_fixing_ops(graph: Graph) -> list[str]:
    """The graph's ops that fix a size whatever the example (`aten.gru.input (at g)`)."""
    out = []
    for node in graph.nodes:
        target = str(node.attrs.get("target", "")) if node.op == "torch_call" else ""
        if target.startswith(_LENGTH_FIXING):
            where = (node.meta or {}).get("source")
            out.append(target + (f" (at {where})" if where else ""))
    return list(dict.fromkeys(out))


def optimize_captured(capture: Callable[[], tuple[Graph, CallSpec]], model: torch.nn.Module, *,
                      passes: Sequence[str] | None = None, disable: Sequence[str] = (),
                      backend: str | Backend = "auto", dump_dir: str | None = None,
                      registry: PassRegistry | None = None, cpu_linear: bool | str = True,
                      verbose: bool | None = None, copy_weights: bool = True, device: torch.device | None = None,
                      **options) -> OptimizedModel:
    """optimize() with the capture step given: `capture()` returns the IR graph and its call
    spec (fxforge.dynamo captures a torch.compile subgraph its own way). `model` gives the
    device (`device` where it has no parameters or buffers), the name and the generation
    defaults. copy_weights=False keeps the model's own
    weight tensors where no pass rewrote them (torch.compile: the model stays in use, and two
    copies of every weight would double the memory)."""
    registry = _default_registry if registry is None else registry
    options = registry.parse_options(options)  # a bad value fails here, before the slow capture
    pipeline = registry.pipeline(options, list(passes) if passes is not None else None, disable)
    reporter = Reporter(verbose)
    device = _model_device(model) if device is None else device
    # tensor_parallel's process group (None: torch.distributed's default) goes to the backend,
    # whose op table runs the graph's collectives on it
    group = getattr(options.get("tensor_parallel"), "process_group", None)
    backend = resolve_backend(backend, device, cpu_linear=cpu_linear,  # a bad cpu_linear fails here, before capture
                              process_group=group)

    name = type(model).__name__
    reporter.status(f"capturing {name}")
    start = time.perf_counter()
    graph, spec = capture()
    capture_seconds = time.perf_counter() - start
    reporter.log("capture", f"{name}: {len(graph.nodes)} nodes in {capture_seconds:.2f} s")

    dumps: list[tuple[str, str]] = []
    dump_dir = dump_dir or os.environ.get("FXFORGE_DUMP") or None
    caching = any(info.name == "kv_cache" for info in pipeline)  # (the hints below are kv_cache's)
    logits = _named_logits(spec) if caching else None
    if logits is not None and not graph.signature.get("outputs"):
        # the model's output structure names its logits (a transformers ModelOutput's field, a
        # dict key): kv_cache marks that output for generate(), whatever its place
        graph.signature = {**graph.signature, "outputs": tuple(roles.LOGITS if i == logits else roles.OUTPUT
                                                               for i in range(len(graph.outputs)))}
    shifts = _left_padding_shifts_positions(model)
    if shifts and caching:
        # transformers' generate gives this model's left-padded rows the batch's positions:
        # kv_cache keeps them shared, as they are there (generate() then matches transformers)
        graph.signature = {**graph.signature, roles.SOURCE_POSITIONS: "shared"}
    try:
        # a user's pass gets copies of the weights still shared with the model (made just
        # before it runs: see _private_weights), so an in-place edit cannot reach the model
        graph, stats = run_pipeline(graph, pipeline, options, reporter=reporter,
                                    dump=lambda i, name, g: dumps.append((f"{i:02d}_{name}.ir", print_graph(g))),
                                    own_weights=lambda g: own_weights(g, model))
    except Exception as e:
        if dump_dir:
            _dump_failure(dump_dir, dumps, e)
        raise
    finally:
        reporter.close()
    if copy_weights:
        graph = own_weights(graph, model)  # an in-place edit of the model later does not reach `fast`
    fast = assemble(graph, spec, backend, device, name, stats, dumps, capture_seconds)
    _copy_generation_config(model, fast)
    fast.left_padding_shifts_positions = shifts
    fast.config = getattr(model, "config", None)
    fast.not_a_causal_lm = not_a_causal_lm(model)
    if dump_dir:
        fast.dump(dump_dir)
    return fast


# fxforge's own files in a dump directory (as OptimizedModel.dump removes them before writing)
_DUMP_FILES = re.compile(r"\d{2,}_.+\.ir|kernel_.+\.py|program\.py|report\.txt")


def _dump_failure(directory: str, dumps: list[tuple[str, str]], error: Exception):
    """A pass failed: write the IR of the passes that ran before it (and the graph it
    returned, NN_<pass>.failed.ir, where it returned one that fails a check) to the dump
    directory, which is when a pass's author needs them most, and say so in the error."""
    try:
        os.makedirs(directory, exist_ok=True)
        for entry in os.scandir(directory):  # an earlier run's later-numbered files would mislead
            if _DUMP_FILES.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                os.remove(entry.path)
        for fname, text in dumps:
            with open(os.path.join(directory, fname), "w") as f:
                f.write(text)
    except OSError as e:  # the dump is a help: it never replaces the pass's own error
        where = f"(the IR dumps could not be written to {directory}: {e})"
    else:
        done = [fname for fname, _ in dumps if not fname.endswith(".failed.ir")]
        failed = [fname for fname, _ in dumps if fname.endswith(".failed.ir")]
        if not done:  # (the captured graph itself failed its check)
            where = f"(nothing dumped to {directory}: the captured graph failed before any pass)"
        else:
            where = f"(the IR after each pass that ran is in {directory}, {done[0]} to {done[-1]}"
            where += f"; the graph the failing pass returned is {failed[0]})" if failed else ")"
    if isinstance(error, (PassError, IRCheckError)) and len(error.args) == 1 and isinstance(error.args[0], str):
        error.args = (f"{error.args[0]}\n{where}",)  # fxforge's own message: say it there
    else:
        error.add_note(where)


def load_ir(text: str, weights: dict[str, torch.Tensor], *, backend: str | Backend = "auto",
            cpu_linear: bool | str = True) -> OptimizedModel:
    """A runnable model from IR text (`fast.ir`, a dumped or hand-edited `.ir` file) and
    its parameters by name (`fast.graph.params`, or a state dict): no model class, no
    capture. Everything the runtime needs is in the text: input roles, KV cache specs,
    output roles and limits (ir/roles.py), and the shape guards. The model is called with
    the graph's user inputs, positionally, and returns its outputs (one tensor, or a tuple).
    """
    return model_from_ir(text, weights, backend=backend, cpu_linear=cpu_linear)


def register_pass(name: str, *, before: str | None = None, after: str | None = None,
                  option: str | None = None, registry: PassRegistry | None = None,
                  replace: bool = False, approximate: bool = False) -> Callable:
    """Decorator: add `fn(graph) -> graph` (or `fn(graph, ctx) -> graph`) to the pipeline.

        @fxforge.register_pass("fold_my_gelu", before="fuse_elementwise")
        def fold_my_gelu(graph, ctx):
            return apply_rules(graph, MY_RULES, ctx.rules)

    A name already registered is an error, unless replace=True: then the new function
    takes the old one's place (e.g. a notebook cell that registers a pass, run again).
    approximate=True: the pass changes the answer on purpose; optimize() then measures the
    error against the source model on the example inputs and report() states it, as for
    quantize= and gqa=.
    """
    if not isinstance(approximate, bool):
        raise TypeError(f"approximate is True or False, got {approximate!r}")
    registry = _default_registry if registry is None else registry
    if not isinstance(name, str) or not name:
        hint = " (write @fxforge.register_pass(\"name\"), with a name)" if callable(name) else ""
        raise TypeError(f"a pass name is a non-empty str, got {name!r}{hint}")

    def decorate(fn):
        registry.add(PassInfo(name, fn, option=option, doc=(fn.__doc__ or "").strip(), approximate=approximate),
                     before=before, after=after, replace=replace)
        return fn

    return decorate


def unregister_pass(name: str, registry: PassRegistry | None = None):
    """Remove a pass from the pipeline; a name not registered is a ValueError."""
    (_default_registry if registry is None else registry).remove(name)


def _named_logits(spec: CallSpec) -> int | None:
    """The graph output that the model's output structure calls `logits` (a transformers
    ModelOutput's field, a dict key, a NamedTuple or registered dataclass field), if any;
    the shallowest where several are (an auxiliary head's nested logits), none on a tie."""
    leaves = spec.output_leaves
    try:
        tree = pytree.tree_unflatten(list(range(len(leaves))), spec.out_spec)
        paths = pytree.tree_flatten_with_path(tree)[0]
    except Exception:  # an output structure pytree cannot rebuild from indices: no name to read
        return None
    named = []  # (depth, graph output): a top-level `logits` over one inside a nested output
    for path, leaf in paths:
        key = path[-1] if path else None
        name = getattr(key, "key", getattr(key, "name", None))
        if name == "logits" and isinstance(leaf, int) and leaves[leaf][0] == "value":
            named.append((len(path), leaves[leaf][1]))
    shallowest = [out for depth, out in named if depth == min(named)[0]] if named else []
    return shallowest[0] if len(set(shallowest)) == 1 else None


def _left_padding_shifts_positions(model) -> bool:
    """Does the model itself give a left-padded row shifted positions under transformers'
    generate? It does when it cannot be told per-row positions: transformers' generate
    passes `position_ids` computed from the attention mask only to a decoder-only model
    whose forward takes `position_ids` (Marian, Pegasus, BlenderbotSmall decoders do not).
    Then positions shared by the batch are exactly what transformers computes, and
    generate() serves left-padded batches with them. Not a transformers model: False
    (left padding with shared positions stays refused). A model that derives positions from
    the attention mask itself (OPT) is captured with an all-ones mask built from the shape:
    kv_cache either recognises those positions (per row) or refuses the cumulative sum, so
    it never reaches shared positions this way."""
    import inspect

    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    config = getattr(model, "config", None)
    # (nanoGPT has a config and a generate() of its own, but is not transformers')
    if not isinstance(model, PreTrainedModel) or config is None or not hasattr(model, "forward"):
        return False
    if getattr(config, "is_encoder_decoder", False):
        return False  # generate() serves decoder-only models; do not guess for these
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "position_ids" not in params


def _copy_generation_config(model, fast) -> None:
    """`fast` takes a copy of a transformers model's generation_config (EOS, pad, and any
    sampling or penalty defaults the checkpoint sets), so that generate() behaves as
    transformers' generate does for that model; a later edit of either does not reach the other."""
    config = getattr(model, "generation_config", None)
    if config is not None:
        fast.generation_config = copy.deepcopy(config)


def _model_device(model: torch.nn.Module, examples=()) -> torch.device:
    """Where the model runs: its parameters' device, else its buffers', else (a model with
    neither) its example inputs', else the CPU."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    for leaf in pytree.tree_leaves(examples):
        if isinstance(leaf, torch.Tensor):
            return leaf.device
    return torch.device("cpu")
