"""FxforgeBackend: a torch.compile backend that runs each subgraph dynamo hands it through
fxforge (capture, the pass pipeline, the program), and keeps what it built.

    fx = FxforgeBackend(quantize="int8")          # any optimize() option
    fast = torch.compile(model, backend=fx)
    fast(ids); fx.compiled[0].model.ir             # the OptimizedModel of the first subgraph

A subgraph fxforge cannot take (an op it cannot capture, autograd, a size it cannot place)
runs as dynamo gave it, and the backend records why in `fx.fallbacks` (and warns once per
subgraph): torch.compile never fails because of fxforge.

Dynamo passes the model's weights as graph inputs and reuses one subgraph for other weights
(two instances of a class, each layer of a loop with a graph break, a replaced or edited
Parameter). Each compiled model is built from, and guarded by, the weights of its first
call (weights.py): a call with other weights, or with the same ones edited in place, gets
the compiled model of those weights, built on a miss. `fx.compiled` holds one
CompiledSubgraph per subgraph and set of weights in use; a subgraph past
`max_weight_sets` models built (rebuilds of weights edited in place count) runs further
sets of weights as dynamo gave it (one entry in `fx.fallbacks`, and a warning).

The outputs alias what eager's alias: an output that is a graph input or a view of one
(`return x.mul_(3)`, `x[:, 1]`, `self.ema`) is made again from the caller's tensors by
dynamo's own view ops, after the model wrote them; every other output is a tensor of its
own (the passes fold `x * 1` to x), one object where the graph returns one node twice.
Inputs that overlap in memory (two views of one tensor), or an expanded input the graph
writes, run as dynamo gave them.

fxforge traces a dynamic dim at sizes >= 2 (a `squeeze(1)` there does nothing). Dynamo
keeps a dim dynamic at 0 or 1 only under mark_unbacked or backed_size_oblivious; a call
with such a dim at 0 or 1 gets a compiled model captured at that size (a CompiledSubgraph
keyed by its weights and those sizes), so it answers as eager does. Likewise a Python
number dynamo leaves unspecialized (dynamic=True passes `self.scale = 0.125` as a 0-dim
tensor read with .item()) is baked into each compiled model, keyed by its exact value
(-0.0 is not 0.0).
"""
from __future__ import annotations

import dataclasses
import operator
import os
import warnings
from dataclasses import dataclass

import torch

from ..api import _model_device, optimize_captured
from ..log import Reporter
from ..passes import quantize
from ..runtime.module import OptimizedModel
from .capture import capture_subgraph
from .subgraph import (InputLayout, SubgraphModule, UnsupportedSubgraph, dynamic_dims, input_layout, replay,
                       writes_self)
from .weights import WeightSet, weight_key


@dataclass
class CompiledSubgraph:
    """One subgraph fxforge compiled for one set of weights: its OptimizedModel, how dynamo's
    inputs map to it, and the weight tensors it was built from. Calling it runs the model
    whatever weights `args` hold: the backend calls it only when `weights.matches(args)`."""

    model: OptimizedModel
    layout: InputLayout
    weights: WeightSet | None = None
    # what it was built for besides its weights (_SubgraphRunner._specialized): the dynamic
    # dims at 0 or 1 it was captured at (a model captured with a dim dynamic serves sizes
    # >= 2 only) and the values of the Python numbers baked in; it serves calls with exactly those
    specialized: tuple = ((), ())
    gm: torch.fx.GraphModule | None = None  # dynamo's graph: views of inputs are replayed from it
    _weight_storages: set | None = dataclasses.field(default=None, repr=False)

    @property
    def key(self) -> tuple:
        return self.weights.key, self.specialized

    def __call__(self, *args):
        out = self.model(*(args[pos] for pos in self.layout.user))
        # dynamo expects a sequence of outputs, as its GraphModule returns
        out = list(out) if isinstance(out, (tuple, list)) else [out]
        if self._weight_storages is None:  # stable: this model is called only with these very weights
            self._weight_storages = {_ptr(args[pos]) for pos in self.layout.weights
                                     if isinstance(args[pos], torch.Tensor)}
        return _as_eager_aliases(out, args, self.layout, self.gm, self._weight_storages)


def _as_eager_aliases(out: list, args, layout: InputLayout, gm, weight_storages: set) -> list:
    """The compiled model's outputs with eager's aliasing: an output that is a graph input or
    a view of one is made again from the caller's tensors (after the model wrote them), the
    same FX node returned twice is one object, and every other output is a tensor of its own
    (the passes may fold `x * 1` to x, or two equal expressions to one value)."""
    cache: dict = {}
    # storage -> output group (None: a graph input's)
    taken = dict.fromkeys(weight_storages)
    taken.update((_ptr(args[pos]), None) for pos in layout.user if isinstance(args[pos], torch.Tensor))
    for i, o in enumerate(out):
        if i in layout.same_outputs:
            out[i] = out[layout.same_outputs[i]]
        elif i in layout.input_views:
            out[i] = replay(gm, layout.input_views[i], args, cache)
        elif isinstance(o, torch.Tensor):
            group = layout.output_groups[i] if i < len(layout.output_groups) else None
            ptr = _ptr(o)
            if ptr in taken and (group is None or taken[ptr] != group):
                out[i] = o = o.clone()
                ptr = _ptr(o)
            taken.setdefault(ptr, group)
    return out


def _check_memory(gm: torch.fx.GraphModule, layout: InputLayout, inputs: list):
    """UnsupportedSubgraph for inputs whose memory the functional IR cannot model: two
    inputs that overlap (views of one tensor: a write to one changes the other), or an
    input whose elements share memory (expanded, stride 0) that the graph writes."""
    tensors = [(pos, inputs[pos]) for pos in [*layout.user, *layout.weights] if isinstance(inputs[pos], torch.Tensor)]
    spans = []
    for pos, t in tensors:
        try:
            if t.numel() == 0:
                continue
            start = t.data_ptr()
            end = start + t.element_size() * (1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())))
            spans.append((t.untyped_storage().data_ptr(), start, end, pos))
        except Exception:  # no storage of its own (a tensor subclass)
            continue
    for i, (storage, start, end, pos) in enumerate(spans):
        for other, start2, end2, pos2 in spans[i + 1:]:
            if storage == other and start < end2 and start2 < end:
                raise UnsupportedSubgraph(f"graph inputs {pos} and {pos2} overlap in memory (views of one tensor); "
                                          "fxforge compiles inputs that are tensors of their own")
    writes = any(n.op in ("call_function", "call_method") and (writes_self(n) or n.target is operator.setitem)
                 for n in gm.graph.nodes)
    for pos, t in tensors:
        if writes and torch._debug_has_internal_overlap(t) == 1:
            raise UnsupportedSubgraph(f"graph input {pos} has elements that share memory (an expanded tensor, stride 0) "
                                      "and the subgraph writes in place; fxforge cannot write it back as eager does")


def _ptr(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except Exception:  # no storage of its own: not known to alias
        return -id(t)


@dataclass
class Fallback:
    """A subgraph run as dynamo gave it, and why."""

    graph_module: torch.fx.GraphModule
    reason: str


class FxforgeBackend:
    """`torch.compile(model, backend=FxforgeBackend(**optimize_options))`. Records every
    subgraph it compiled (`compiled`: one entry per subgraph and set of weights in use, in
    the order they were built; one whose weights were edited in place since is dropped when
    it is rebuilt) and every one it left to plain PyTorch (`fallbacks`: a subgraph fxforge
    could not compile, or one that built more than `max_weight_sets` models,
    whose further sets run as dynamo gave it).

    A subgraph is compiled on its first call, not when dynamo hands it over: torch.export
    run inside dynamo's own compilation corrupts dynamo's guards for the frame (torch 2.13:
    "Guard failed on the same frame it was created"), and at the first call the inputs are
    real tensors and real sizes whatever dynamo's example inputs were."""

    def __init__(self, *, max_weight_sets: int = 64, **optimize_options):
        _check_options(optimize_options)  # a typo fails here, not as a warning per subgraph
        self.options = optimize_options
        # per subgraph: a loop over 64 layers with a graph break in it still compiles every
        # layer; each set holds its own rewritten weights (fused, quantized) in memory
        self.max_weight_sets = max_weight_sets
        self.compiled: list[CompiledSubgraph] = []
        self.fallbacks: list[Fallback] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs, **compile_arguments):
        _refuse_compile_arguments(compile_arguments, "backend=FxforgeBackend(...)")
        try:
            layout = input_layout(gm, list(example_inputs))
        except UnsupportedSubgraph as e:
            return self._fall_back(gm, e)
        return _SubgraphRunner(self, gm, layout)

    def compile(self, gm: torch.fx.GraphModule, layout: InputLayout, inputs: list,
                specialized: tuple = ((), ())) -> CompiledSubgraph:
        """The OptimizedModel of one subgraph, captured on `inputs` (dynamo's graph inputs
        of a real call) and guarded by their weights; raises what the fallback reports."""
        weights = WeightSet(inputs, list(layout.weights))  # before the capture: what it is built from
        if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs):
            raise UnsupportedSubgraph("fxforge compiles inference graphs: the subgraph needs autograd "
                                      "(run the compiled model under torch.no_grad() or torch.inference_mode())")
        _check_memory(gm, layout, inputs)
        module = SubgraphModule(gm, layout, inputs)
        Reporter(self.options.get("verbose")).log(
            "dynamo", f"subgraph with {len(layout.user)} input tensor(s), {len(layout.weights)} weight(s), "
                      f"{len(layout.sizes)} size(s)")
        # the model's weights stay shared (copy_weights=False): torch.compile keeps using the
        # model, and a second copy of each weight would double the memory
        with warnings.catch_warnings():
            # one subgraph holds some of the model's weights: an include or exclude pattern
            # naming a weight of another subgraph matches nothing here, and a subgraph with
            # no linear at all is normal, neither a mistake of the user's
            warnings.filterwarnings("ignore", message=r"quantize: (exclude|include) pattern|quantize=.* found no "
                                                      r"linear weights")
            fast = optimize_captured(lambda: capture_subgraph(module, inputs), module, copy_weights=False,
                                     device=_model_device(module, inputs),
                                     **_options_under_roots(self.options, layout))
        compiled = CompiledSubgraph(fast, layout, weights, specialized, gm)
        self.compiled.append(compiled)
        return compiled

    def _fall_back(self, gm: torch.fx.GraphModule, error: Exception):
        reason = f"{type(error).__name__}: {error}"
        self.fallbacks.append(Fallback(gm, reason))
        warnings.warn(f"fxforge could not compile a torch.compile subgraph; it runs as PyTorch ops "
                      f"({reason.splitlines()[0]})", stacklevel=3)
        return gm.forward

    @property
    def models(self) -> list[OptimizedModel]:
        """The OptimizedModel of each compiled subgraph, in the order they were first called."""
        return [c.model for c in self.compiled]

    def __repr__(self) -> str:
        return (f"FxforgeBackend({', '.join(f'{k}={v!r}' for k, v in self.options.items())}) "
                f"compiled={len(self.compiled)} fallbacks={len(self.fallbacks)}")


class _SubgraphRunner:
    """What dynamo gets for a subgraph: runs the compiled model of the call's weights,
    compiling it on a miss (at the call, not when dynamo hands the graph over: see
    FxforgeBackend), or the GraphModule itself where fxforge could not take it."""

    def __init__(self, owner: FxforgeBackend, gm: torch.fx.GraphModule, layout: InputLayout):
        self.owner, self.gm, self.layout = owner, gm, layout
        self.positions = list(layout.weights)
        # dims dynamo left dynamic: at 0 or 1 (mark_unbacked, backed_size_oblivious) they need
        # a model of their own, as capture traces dynamic sizes as >= 2
        self.dynamic = [(pos, d) for pos, dims in dynamic_dims(gm, layout).items() for d in dims]
        # (weight_key, specialized) -> its compiled model
        self.by_weights: dict[tuple, CompiledSubgraph] = {}
        self.current: CompiledSubgraph | None = None  # the last one run: checked first
        self.closed = False  # no more compiles: weights not in by_weights run the GraphModule
        self.builds = 0  # models built so far, for max_weight_sets

    def __call__(self, *args):
        current = self.current
        specialized = self._specialized(args) if self.dynamic or self.layout.numbers else ((), ())
        if current is not None and current.specialized == specialized and current.weights.matches(args):
            return current(*args)
        return self._dispatch(args, specialized)

    def _specialized(self, args) -> tuple:
        """(dynamic dims at 0 or 1 as (position, dim, size), values of the Python numbers)."""
        return (tuple((pos, d, args[pos].shape[d]) for pos, d in self.dynamic if args[pos].shape[d] <= 1),
                tuple(_number(args[pos]) for pos in self.layout.numbers))

    def _dispatch(self, args, specialized: tuple):
        if self.closed and not self.by_weights:  # fxforge never took this subgraph
            return self.gm.forward(*args)
        key = weight_key(args, self.positions), specialized
        found = self.by_weights.get(key)
        if found is not None:
            if found.weights.matches(args):
                self.current = found
                return found(*args)
            self._forget(found)  # the same tensors edited in place since: never serve it stale
            edited = [pos for pos in found.weights.edited_in_place(args) if not isinstance(args[pos], torch.nn.Parameter)]
            if edited and not self.closed:
                self._read_live(edited)
                key = weight_key(args, self.positions), specialized
        if self.closed:
            return self.gm.forward(*args)
        # every model built counts, the ones dropped as stale too: a Parameter edited before
        # every call would otherwise rebuild at every call, never reaching the limit
        if self.builds >= self.owner.max_weight_sets:
            self._close(UnsupportedSubgraph(
                f"dynamo called one subgraph with more than {self.owner.max_weight_sets} sets of weights "
                "(instances of one class, the layers of a loop with a graph break, replaced weights or weights "
                "edited in place between calls; or values "
                "of a Python number dynamic=True left unspecialized, each baked into a model of its own); "
                "further sets run as PyTorch ops (FxforgeBackend(max_weight_sets=...) sets the limit)"))
            return self.gm.forward(*args)
        self.builds += 1
        try:
            compiled = self.owner.compile(self.gm, self.layout, list(args), specialized)
        except Exception as e:  # any failure: these weights (and any new ones) run as dynamo gave them
            self._close(e)
            return self.gm.forward(*args)
        self.by_weights[key] = self.current = compiled
        out = compiled(*args)
        compiled.weights.forget_written()
        return out

    def _read_live(self, buffers: list[int]):
        """Buffers edited in place between calls by someone else (another subgraph writes a
        step counter or a cache this one reads): from now on the compiled models take them
        as inputs, read at each call, not as weights guarded by their version, which would
        rebuild the model at every call. Their models so far are dropped."""
        self.layout = dataclasses.replace(
            self.layout, user=self.layout.user + buffers,
            weights={pos: path for pos, path in self.layout.weights.items() if pos not in buffers})
        self.positions = list(self.layout.weights)
        for compiled in list(self.by_weights.values()):
            self._forget(compiled)

    def _forget(self, compiled: CompiledSubgraph):
        del self.by_weights[compiled.key]
        if self.current is compiled:
            self.current = None
        self.owner.compiled[:] = [c for c in self.owner.compiled if c is not compiled]

    def _close(self, error: Exception):
        self.closed = True
        self.owner._fall_back(self.gm, error)


def _options_under_roots(options: dict, layout: InputLayout) -> dict:
    """`options` with quantize's include and exclude patterns matching under the objects the
    subgraph's weights were reached through too. A function that calls a global `model` (or
    `holder.model`) reaches its weights as model.lm_head.weight (holder.model.lm_head.weight),
    where the user's patterns (and the default lm_head*) name the model's own lm_head.weight:
    unwidened, an excluded layer was quantized. Not where the compiled module has weights of
    its own: its names are the ones the patterns are written against (a global helper it
    calls is not widened into them)."""
    if not layout.weight_roots or layout.own_weights or options.get("quantize") is None:
        return options
    cfg = quantize.as_config(options["quantize"])
    prefixes = _model_prefixes(list(layout.weights.values()), layout.weight_roots)

    def widened(patterns):
        under = [f"{prefix}.{p}" for prefix in prefixes for p in patterns if p != quantize.OUTPUT_HEAD]
        return tuple(dict.fromkeys([*patterns, *under]))
    return {**options, "quantize": dataclasses.replace(cfg, include=widened(cfg.include),
                                                      exclude=widened(cfg.exclude))}


def _model_prefixes(paths: list[str], roots: set[str]) -> list[str]:
    """Where a model may sit under each root: the root, and each path below it down to the
    module all of that root's weights share (holder, holder.model), stopping at a numbered
    one (a layer of a list is no model the user names patterns from)."""
    prefixes = []
    for root in sorted(roots):
        modules = [p.split(".")[:-1] for p in paths if p.startswith(root + ".")]
        common = os.path.commonprefix(modules) if modules else [root]  # (list items compared one by one)
        depth = next((i for i, part in enumerate(common) if part.isdigit()), len(common))
        prefixes += [".".join(common[:i]) for i in range(1, max(depth, 1) + 1)]
    return list(dict.fromkeys(prefixes))


def _number(x):
    """The key of a Python number dynamo passes as a 0-dim tensor or as an int: its exact
    value (a float by its bits, so -0.0 is not 0.0 and a NaN is its own key)."""
    value = x.item() if isinstance(x, torch.Tensor) else int(x)
    return ("float", value.hex()) if isinstance(value, float) else (type(value).__name__, value)


def _check_options(options: dict):
    """TypeError naming every option optimize() does not take, and the ones it does."""
    import inspect

    from ..passes import registry as default_registry

    registry = options.get("registry") or default_registry
    keywords = [name for name, p in inspect.signature(optimize_captured).parameters.items()
                if p.kind == inspect.Parameter.KEYWORD_ONLY and name not in ("copy_weights", "device")]
    passes = sorted({info.option for info in registry.passes.values() if info.option})
    unknown = sorted(set(options) - set(keywords) - set(passes))
    if unknown:
        raise TypeError(f"fxforge has no option(s) {unknown}; it takes {sorted(keywords)} and the pass options "
                        f"{passes} (as fxforge.optimize() does), e.g. options={{'quantize': 'int8'}}")
    try:
        registry.parse_options({k: v for k, v in options.items() if k in passes})
    except (TypeError, ValueError) as e:  # a bad value: say where it came from
        raise type(e)(f"fxforge option: {e}") from e


def _refuse_compile_arguments(arguments: dict, how: str):
    """torch.compile's mode= (and options= where the backend object holds its own); mode=
    "default" (no mode) is fine."""
    arguments = {k: v for k, v in arguments.items() if not (k == "mode" and v in (None, "default"))}
    if not arguments:
        return
    if "mode" in arguments:
        raise ValueError(f"torch.compile(mode={arguments['mode']!r}) with {how}: fxforge has no modes (they are "
                         "Inductor's: CUDA graphs, autotuning). Leave mode= out; fxforge's pipeline is set by its "
                         "options: torch.compile(model, backend='fxforge', options={'quantize': 'int8'}) or "
                         "backend=fxforge.dynamo.FxforgeBackend(quantize='int8')")
    if "options" in arguments:
        raise TypeError(f"torch.compile(options=...) with {how}: an FxforgeBackend takes its options when it is "
                        "made: backend=fxforge.dynamo.FxforgeBackend(quantize='int8'), not options={...}")
    raise TypeError(f"fxforge's torch.compile backend takes no {sorted(arguments)}")


def backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, **compile_arguments):
    """`torch.compile(model, backend=fxforge.dynamo.backend)` (and backend="fxforge"): the
    default pipeline, nothing recorded; `torch.compile(..., options={...})` passes
    optimize()'s options (quantize=..., backend=...). Use FxforgeBackend() to inspect what
    was built."""
    _refuse_compile_arguments(compile_arguments, "backend='fxforge'")
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"torch.compile(backend='fxforge', options=...) takes a dict of optimize() options, "
                        f"got {type(options).__name__}")
    return FxforgeBackend(**(options or {}))(gm, example_inputs)
