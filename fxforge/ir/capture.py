"""Capture: nn.Module (or torch.fx.GraphModule) -> IR Graph, through torch.export.

torch.export (non-strict) traces the model into ATen ops with symbolic batch and
sequence sizes; `lowering.RULES` maps each ATen op to IR ops, and anything unknown
becomes an opaque `torch_call`, so capture never fails just because an op is new.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import os
import re
import sys
import traceback
import warnings
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.utils._pytree as pytree

from .builder import Builder
from .call_constants import forward_defaults, same_constant
from .dtypes import finfo_name
from .graph import Graph, Value
from .guards import guards_from_export
from .hooks import warn_about_hooks
from .lowering import DROP, FALLBACK, RULES, LowerCtx
from .nested_fastpath import nested_fast_path_as_eager
from .ops import Arg
from . import roles
from .pause_gc import paused_gc
from .training_mode import training_mode_nodes
from .types import TensorType, size_text, symbol


class CaptureError(RuntimeError):
    """torch.export could not capture the model; the message names where and how to fix it."""


# The IR holds no memory layout (contiguous() and clone() lower to nothing), so an ATen op
# kept opaque that needs one runs as its layout-free twin: a view whose shape the IR could
# not prove (nn.MultiheadAttention's memory of batch B1, B only under a guard) would
# otherwise meet the non-contiguous tensor its dropped contiguous() made contiguous.
_LAYOUT_FREE_TWIN = {"aten.view.default": "aten.reshape.default",
                     "aten._unsafe_view.default": "aten.reshape.default"}


@dataclass
class CallSpec:
    """How to call the captured graph from the model's own (args, kwargs) and how to
    rebuild the model's output structure from the graph's outputs."""

    in_spec: Any
    input_leaves: list  # per flat leaf: ("tensor", graph input index) | ("const", value)
    out_spec: Any
    # per flat output leaf: ("value", graph output index) | ("const", value) | ("size", [type, text]),
    # a number computed from sizes at each call (_scalar_output)
    output_leaves: list
    injected_kwargs: dict = field(default_factory=dict)
    kwarg_order: tuple = ()
    # names of forward()'s leading positional parameters, in order (older saves hold
    # only those the captured positional arguments bind), so that a call may
    # pass a captured positional argument by keyword (model(input_ids=ids) after capture with
    # (ids,)) and a captured keyword argument by position (model(ids, attention_mask=m) after
    # capture with example_kwargs={input_ids, attention_mask})
    positional_names: tuple = ()
    # {argument: forward()'s default} (call_constants.forward_defaults): a call may pass an
    # argument the capture left out at exactly this value (attention_mask=None)
    default_kwargs: dict = field(default_factory=dict)
    # flat output positions where the model returns a user input itself or a view of one
    # (its FX output reaches an input placeholder through view ops only), and {position: an
    # earlier position} where it returns one tensor twice: everywhere else eager's output is
    # a tensor of its own, which the graph's may not be (x.clone() and x * 1 are x to the
    # IR): the call copies those (OptimizedModel._fresh_outputs)
    output_views_input: tuple = ()
    output_same_as: dict = field(default_factory=dict)
    # {flat output position: CONTIGUOUS | CONTIGUOUS_BASE}: the layout eager gives it that
    # the graph may not (the IR has no layout: `contiguous()` is x to it). CONTIGUOUS: eager's
    # output is contiguous (`y.transpose(1, 2).contiguous()`, a clone, a linear), so the
    # call makes the graph's contiguous; CONTIGUOUS_BASE: a view of an input taken after a
    # `contiguous()` (`x.contiguous()[:, 1]`), a view of x only where x is contiguous, else of
    # eager's copy (OptimizedModel._eager_layouts)
    output_layouts: dict = field(default_factory=dict)


CONTIGUOUS, CONTIGUOUS_BASE = "contiguous", "contiguous_base"


# Friendly names for the dynamic dims: dim 0 is the batch, dim 1 the sequence.
_DIM_NAMES = {0: "B", 1: "T"}


def capture(model, example_inputs=(), example_kwargs=None, dynamic: bool = True) -> Graph:
    """The IR of `model` before any pass."""
    return capture_with_spec(model, example_inputs, example_kwargs, dynamic)[0]


def capture_with_spec(model, example_inputs=(), example_kwargs=None, dynamic: bool = True):
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fxforge captures a torch.nn.Module (or torch.fx.GraphModule), got {type(model).__name__}")
    args = _as_tuple(example_inputs)
    kwargs = dict(example_kwargs or {})
    _check_example_use_cache(model, kwargs)
    warn_about_hooks(model)  # before the trace runs them
    injected = _inference_kwargs(model, kwargs)
    cache_masks = "use_cache" not in kwargs and _default_call_has_cache(model)
    kwargs = {**injected, **kwargs}
    baked = _constant_var_kwargs(model, args, kwargs)
    traced = {k: v for k, v in kwargs.items() if k not in baked}
    with paused_gc():
        graph, spec = _export_and_lower(model, args, traced, injected, dynamic, cache_masks, baked)
    if cache_masks and spec.out_spec is not None and spec.out_spec.type in (tuple, list):
        raise ValueError(_CACHE_IN_TUPLE.format(model=type(model).__name__))
    # found in the graph, not among the modules: attention layers drop at random through
    # SDPA's dropout_p (no nn.Dropout module), and a dropout module of p=0 drops nothing
    dropping = training_mode_nodes(graph)
    if dropping:
        warnings.warn(f"{type(model).__name__} is in training mode: {len(dropping)} dropout op(s) "
                      f"(first: {dropping[0].attrs['target']}) stay in the graph, so every call is random, "
                      "attention will not fuse, and fast.eval() cannot switch them off. Call model.eval() "
                      "before fxforge.optimize for inference.")
    return graph, _with_constant_kwargs(spec, args, kwargs, baked)


def _export_and_lower(model, args, kwargs, injected, dynamic, cache_masks=False, baked=None):
    ep = _export(model, args, kwargs, dynamic, cache_masks=cache_masks, baked=baked)
    _check_no_write_to_shared_buffer(model, ep)
    ep = _functional(_without_buffer_replacements(ep))
    probed = _widened_by_probes(model, args, kwargs, dynamic, cache_masks, baked, ep) if dynamic else None
    try:
        return _lower_exported(ep, injected, model, probed)
    except CaptureError:
        # The fast trace records no stack traces: trace again with them, so that the
        # error names the model's source line, not only its module path.
        _lower_exported(_functional(_without_buffer_replacements(_export(
            model, args, kwargs, dynamic, stack_traces=True, cache_masks=cache_masks, baked=baked))), injected, model)
        raise


_PROBES = 2  # at most so many traces more per capture (each is an export of the whole model)


def _widened_by_probes(model, args, kwargs, dynamic, cache_masks, baked, ep):
    """(guards, ranges) wider than export's where they only were too strict, or None.

    A slice's clamp and a contiguity test record guards the graph may not need (guards.
    loose_guards: `x[:, :5]` traced at T = 3 refuses T = 5, where eager takes the same 5
    rows). For such a guard, the model is traced again at the nearest sizes it refuses;
    where that trace is the same graph as the first (the same ops on the same arguments, every
    size the same expression: _same_computation), the graph computes the model wherever either
    trace's guards hold, and its guards are their union (guards.union). The model's own code
    recording the same relation (`if T < 5`) traces another graph there, and nothing widens."""
    from .guards import example_sizes, loose_guards, nearest_refused, union

    first = _Lowerer(ep)
    first.name_dims([n for n in ep.graph_module.graph.nodes if n.op == "placeholder"])
    try:
        guards = guards_from_export(ep, first.rename, _clean_expr)
        loose = [g for g in loose_guards(ep, first.rename, _clean_expr) if g in guards]
    except ValueError:
        return None
    dims = _probe_dims(ep, first.rename)
    example = example_sizes(ep, first.rename)
    if not loose or not dims or any(s not in example for g in loose for s in g.free_symbols):
        return None
    ranges = {first.rename[s]: vr for s, vr in ep.range_constraints.items() if s in first.rename}
    probes, widened = 0, False
    for guard in loose:
        at = nearest_refused(guard, example, dims) if guard in guards else None
        if at is None or probes >= _PROBES:
            continue
        probes += 1
        other = _probe_trace(model, args, kwargs, cache_masks, baked, {dims[s]: v for s, v in at.items() if s in dims})
        same = other is not None and _same_computation(ep, first.rename, other)
        if not same:
            continue
        more, other_ranges = same
        wider = union(guards, more)
        if wider is None:
            continue
        guards, widened = wider, True
        for sym, vr in other_ranges.items():
            ranges[sym] = vr if sym not in ranges else ranges[sym] | vr
    return (guards, ranges) if widened else None


def _same_constant(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and bool(torch.equal(a, b)))
    return a is b


def _sym_expr(x) -> sympy.Expr:
    node = getattr(x, "node", None)
    return node.expr if node is not None and hasattr(node, "expr") else sympy.sympify(x)


def _probe_dims(ep, rename) -> dict:
    """{our symbol: its dim (0 or 1) in the first input tensor}: the sizes a probe can set."""
    from torch.export.graph_signature import InputKind

    for spec in ep.graph_signature.input_specs:
        if spec.kind != InputKind.USER_INPUT:
            continue
        node = next((n for n in ep.graph_module.graph.nodes if n.name == getattr(spec.arg, "name", None)), None)
        val = node.meta.get("val") if node is not None else None
        if isinstance(val, torch.Tensor):
            return {rename[d.node.expr]: i for i, d in enumerate(val.shape[:2])
                    if isinstance(d, torch.SymInt) and d.node.expr in rename}
    return {}


def _probe_trace(model, args, kwargs, cache_masks, baked, sizes):
    """The model traced as the first capture, the first input's dims at `sizes`; None where
    that trace fails (the model cannot run there: nothing to widen to)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _functional(_without_buffer_replacements(
                _export(model, args, kwargs, True, cache_masks=cache_masks, baked=baked, sizes=sizes)))
    except Exception:  # noqa: BLE001 (any failure: no probe)
        return None


def _same_computation(ep, rename, other):
    """Whether `other` (a trace at other sizes) is the graph `ep` is: the same nodes, ops and
    arguments, and every tensor's shape and every size value the same expression over the
    sizes where `other`'s guards hold (a size `other` traced as a constant is that number
    there). Returns (other's guards over our symbols, with `Eq(T, 5)` for such a constant;
    other's ranges), or None."""
    from torch.utils._sympy.value_ranges import ValueRanges, bound_sympy

    a_nodes, b_nodes = list(ep.graph_module.graph.nodes), list(other.graph_module.graph.nodes)
    if len(a_nodes) != len(b_nodes) or ep.graph_signature != other.graph_signature:
        return None
    if ep.constants.keys() != other.constants.keys() or not all(
            _same_constant(ep.constants[k], other.constants[k]) for k in ep.constants):
        return None  # (a tensor forward() builds from a size is a constant of each trace)
    # other's symbols -> ours, and our symbols other fixed -> their numbers, by the inputs' dims
    theirs, fixed = {}, {}
    for a, b in zip(a_nodes, b_nodes):
        if a.op != "placeholder":
            break
        sa, sb = (getattr(n.meta.get("val"), "shape", ()) for n in (a, b))
        if len(sa) != len(sb):
            return None
        for x, y in zip(sa, sb):
            ex = x.node.expr if isinstance(x, torch.SymInt) else sympy.Integer(int(x))
            ey = y.node.expr if isinstance(y, torch.SymInt) else sympy.Integer(int(y))
            if ex.is_Symbol and ex in rename and ey.is_Symbol:
                theirs[ey] = rename[ex]
            elif ex.is_Symbol and ex in rename and ey.is_Integer:
                fixed[rename[ex]] = ey
            elif ex != ey:
                return None
    try:
        more = guards_from_export(other, theirs, _clean_expr)
    except ValueError:
        return None
    more = more + [sympy.Eq(s, v) for s, v in fixed.items()]
    ranges = {theirs[s]: ValueRanges(1, vr.upper) for s, vr in other.range_constraints.items() if s in theirs}
    ranges.update({s: ValueRanges(int(v), int(v)) for s, v in fixed.items()})

    # what other's guards say an expression is there (`Eq(floor(B*T/3), 1)`: a size it traced as 1)
    known = {**fixed, **{g.lhs: g.rhs for g in more if isinstance(g, sympy.Eq) and g.rhs.is_Integer},
             **{g.rhs: g.lhs for g in more if isinstance(g, sympy.Eq) and g.lhs.is_Integer}}

    def same_size(x, y) -> bool:
        ex = _clean_expr(_sym_expr(x).xreplace(rename)).xreplace(known)
        ey = _clean_expr(_sym_expr(y).xreplace(theirs)).xreplace(known)
        if ex == ey:
            return True
        try:
            gap = bound_sympy(ex - ey, ranges)
        except Exception:  # noqa: BLE001 (an expression torch's range analysis does not take)
            return False
        return gap.lower == 0 and gap.upper == 0

    def same_value(x, y) -> bool:
        if isinstance(x, torch.fx.Node) or isinstance(y, torch.fx.Node):
            return isinstance(x, torch.fx.Node) and isinstance(y, torch.fx.Node) and index[x] == index[y]
        if isinstance(x, (list, tuple)) or isinstance(y, (list, tuple)):
            return type(x) is type(y) and len(x) == len(y) and all(same_value(p, q) for p, q in zip(x, y))
        if isinstance(x, dict) or isinstance(y, dict):
            return type(x) is type(y) and x.keys() == y.keys() and all(same_value(x[k], y[k]) for k in x)
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            return (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == y.dtype
                    and same_value(tuple(x.shape), tuple(y.shape)))
        if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)) or \
                isinstance(y, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return same_size(x, y)
        try:
            return type(x) is type(y) and bool(x == y)
        except Exception:  # noqa: BLE001 (a value without a plain ==)
            return False

    index = {n: i for i, n in enumerate(a_nodes)}
    index.update({n: i for i, n in enumerate(b_nodes)})
    for a, b in zip(a_nodes, b_nodes):
        if a.op != b.op or a.target != b.target or not same_value(a.args, b.args) \
                or not same_value(a.kwargs, b.kwargs) or not same_value(a.meta.get("val"), b.meta.get("val")):
            return None
        if a.op == "get_attr" and not same_value(getattr(ep.graph_module, a.target, None),
                                                 getattr(other.graph_module, b.target, None)):
            return None
    return more, ranges


def _constant_var_kwargs(model, args, kwargs) -> dict:
    """The example kwargs without tensors that forward() takes only through **kwargs
    (transformers' return_dict=False, output_hidden_states=True): torch.export cannot
    match dynamic shapes to them, so capture bakes them into the trace as constants
    (_bound_forward) and the call spec checks them at each call like any other constant."""
    try:
        sig = inspect.signature(model.forward)
        bound = sig.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return {}
    return {k: v for name, value in bound.arguments.items()
            if sig.parameters[name].kind == inspect.Parameter.VAR_KEYWORD
            for k, v in value.items() if not any(isinstance(x, torch.Tensor) for x in pytree.tree_leaves(v))}


@contextlib.contextmanager
def _bound_forward(model, baked):
    """model.forward with the baked **kwargs constants given, while exporting."""
    if not baked:
        yield
        return
    import functools

    own = model.__dict__.get("forward", None)  # an instance-level forward (hooks), put back after
    model.forward = functools.partial(model.forward, **baked)
    try:
        yield
    finally:
        if own is None:
            del model.forward
        else:
            model.forward = own


def _with_constant_kwargs(spec: CallSpec, args, kwargs, baked) -> CallSpec:
    """The call spec of the trace, with the baked kwargs put back as constant leaves where
    the caller gave them: a call passes them as the example did (checked like any constant),
    and one that leaves them out or changes them is told so."""
    if not baked:
        return spec
    traced = iter(spec.input_leaves)
    leaves = [next(traced) for _ in pytree.tree_leaves(tuple(args))]
    for k, v in kwargs.items():
        n = len(pytree.tree_leaves(v))
        leaves += [("const", x) for x in pytree.tree_leaves(v)] if k in baked else [next(traced) for _ in range(n)]
    in_spec = pytree.tree_flatten((tuple(args), kwargs))[1]
    return dataclasses.replace(spec, in_spec=in_spec, input_leaves=leaves, kwarg_order=tuple(kwargs))


def _check_no_write_to_shared_buffer(model, ep):
    """A buffer registered under two names (one tensor, two modules) is one input of the
    exported graph, and torch.export drops an in-place write to it from the graph's
    buffer mutations (its functionalization then fails on an assertion): the next call
    would not see the write that eager keeps. Refuse, naming the buffer."""
    owners: dict = {}
    for name, buf in model.named_buffers(remove_duplicate=False):
        owners.setdefault(id(buf), []).append(name)
    shared = {n: names for names in owners.values() if len(names) > 1 for n in names}
    if not shared:
        return
    buffer_of = ep.graph_signature.inputs_to_buffers
    aliases = _storage_aliases(ep.graph_module.graph)
    for node in ep.graph_module.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        for arg, value in zip(node.target._schema.arguments, node.args):
            if arg.alias_info is None or not arg.alias_info.is_write or not isinstance(value, torch.fx.Node):
                continue
            for x in aliases.get(value, [value]):
                names = shared.get(buffer_of.get(x.name)) if x.op == "placeholder" else None
                if names:
                    raise CaptureError(
                        f"forward() writes in place ({node.target}) to the buffer {names[0]!r}, which is one tensor "
                        f"registered under {len(names)} names ({', '.join(map(repr, names))}); torch.export cannot "
                        "keep a write to a buffer shared that way, so later calls would not see it. Register the "
                        "buffer in one module and reach it from the others as a plain attribute, or write to a copy "
                        "(buf = buf.clone() before the in-place op).")


def _without_buffer_replacements(ep):
    """A buffer that forward() replaces by a tensor of another shape (a lazily grown rotary
    cache: `if T > self.max_seq_len_cached: self.register_buffer("cos_cached", ...)`, as
    transformers before 4.38 and many remote-code models do) is traced as an in-place
    `copy_` into the old buffer, which functionalization cannot write (a dimension of 4
    cannot take T rows). Where forward never reads the old buffer, every call this graph
    computes (under its guards, the branch that replaces it) makes the buffer anew before
    reading it: no call sees another's value, so the write is dropped (as
    _buffers_written_before_read drops a same-shape overwrite). Where it reads the old one
    too, its value would carry from call to call: refused, naming the buffer."""
    buffer_of = ep.graph_signature.inputs_to_buffers
    graph = ep.graph_module.graph
    replaced = [node for node in graph.nodes if node.op == "call_function"
                and node.target in (torch.ops.aten.copy_.default, torch.ops.aten.copy.default)
                and isinstance(node.args[0], torch.fx.Node) and node.args[0].op == "placeholder"
                and node.args[0].name in buffer_of and _other_shape(*node.args[:2])]
    for node in replaced:
        buffer = node.args[0]
        name = buffer_of[buffer.name]
        if any(user is not node for user in buffer.users):
            old, new = (tuple(n.meta["val"].shape) for n in node.args[:2])
            raise CaptureError(
                f"forward() replaces the buffer {name!r} by a tensor of another shape ({_shape_text(old)} -> "
                f"{_shape_text(new)}: register_buffer or assignment inside forward, as a lazily grown rotary "
                "cache does) and also reads the buffer it replaces, so a call's result can depend on the "
                "calls before it\n"
                "  fix: make the buffer large enough in __init__ so that forward never replaces it (for a "
                "rotary cache, a max_position_embeddings at least as long as the longest input), or give "
                "example inputs no longer than the buffer")
        graph.erase_node(node)
    if replaced:
        ep.graph_module.recompile()
    return ep


def _other_shape(buffer, value) -> bool:
    a, b = (getattr(n.meta.get("val"), "shape", None) if isinstance(n, torch.fx.Node) else None
            for n in (buffer, value))
    if a is None or b is None:
        return False
    return [str(d) for d in a] != [str(d) for d in b]


def _shape_text(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _functional(ep):
    """The IR has no aliasing: a write through a view (or any in-place op the lowerer
    cannot make functional itself) needs torch's functionalization first, which turns
    it into a *_scatter op."""
    if not _needs_functionalization(ep):
        return ep
    try:
        return ep.run_decompositions({})
    except RuntimeError as e:
        # a plain tensor attribute (not a buffer: Meta's llama keeps its KV cache so) written in forward
        m = re.match(r"Constant (\S+) is mutated in the forward method", str(e))
        if m is None:
            raise
        raise CaptureError(f"the model mutates {m.group(1)} inside forward (a plain tensor attribute, written in "
                           "place); fxforge needs a forward pass without side effects: keep such state outside "
                           "the model (for a KV cache, optimize with kv_cache=True and use fast.generate())") from None


# ---------------------------------------------------------------------------------------
def _as_tuple(example_inputs) -> tuple:
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    return (example_inputs,)


def _inference_kwargs(model, kwargs) -> dict:
    """transformers models return a KV cache object by default, which is not a tensor
    and has no place in a pure forward graph: ask for logits only (the kv_cache pass
    builds our own cache)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    if "use_cache" in params and "use_cache" not in kwargs and hasattr(model, "config"):
        return {"use_cache": False}
    return {}


# The model's default call returns (logits, past_key_values, ...) as a plain tuple; the graph
# has no cache to return, so every later position would shift by one without a word.
_CACHE_IN_TUPLE = (
    "{model} returns a plain tuple here (return_dict=False), and its default call (use_cache not given, "
    "config.use_cache=True) puts past_key_values in it at position 1; fxforge's forward returns no "
    "past_key_values, so the tuple's later positions would shift. Pass use_cache=False in example_kwargs "
    "(and in each call) to get the model's own tuple without the cache, or return_dict=True to get a "
    "ModelOutput (without .past_key_values); for cached decoding use fxforge.optimize(..., kv_cache=True) "
    "and fast.generate()")


def _check_example_use_cache(model, kwargs):
    """use_cache=True in the example makes a transformers model return its cache object,
    which no graph can return (torch.export's own message is about pytrees): say so."""
    if kwargs.get("use_cache") is True and hasattr(model, "config"):
        raise ValueError("example_kwargs has use_cache=True: with it the model returns its KV cache "
                         "(past_key_values), which fxforge's forward does not return. Leave use_cache out "
                         "(or pass use_cache=False); for cached decoding use fxforge.optimize(..., kv_cache=True) "
                         "and fast.generate()")


# What dynamic capture guesses beyond the dims that match the first tensor's batch or
# sequence by size (_grown_dims), most first; _export_traced retries with fewer where the
# model fails on the guess
_GUESSES = (frozenset({"broadcast", "beyond", "own length"}), frozenset({"beyond", "own length"}), frozenset())


def _export_example(args, kwargs, dynamic, guesses=_GUESSES[0], sizes=None):
    """The example torch.export traces, and {id of its tensor: dims beyond 0 and 1 to trace as
    symbols} (dims 0 and 1 of every tensor are: _dynamic_shapes).

    torch.export specialises a dim of size 1 to the constant 1, so dynamic capture traces a
    grown copy (cyclically extended: shapes are what matters to the trace): the batch and
    sequence sizes of the first tensor (dims 0 and 1) become >= 2 and differ, and the other
    inputs' dims of the same sizes grow with them (_grown_dims, with the `guesses` named)."""
    leaves = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    if not dynamic or not leaves:
        return args, kwargs, {}
    _check_not_empty(args, kwargs)
    first = leaves[0]
    b0 = first.shape[0] if first.dim() >= 1 else None
    t0 = first.shape[1] if first.dim() >= 2 else None
    bx = max(b0, 2) if b0 is not None else None
    tx = max(t0, 2) if t0 is not None else None
    if tx is not None and tx == bx:
        tx += 1
    if sizes:  # a probe of other sizes (_widened_by_probes): {dim of the first tensor: its size}
        bx, tx = sizes.get(0, bx), sizes.get(1, tx)
    targets = {0: (b0, bx), 1: (t0, tx)}
    beyond: dict = {}

    def grow(x):
        if not isinstance(x, torch.Tensor):
            return x
        dims = _grown_dims(x, x is first, targets, guesses)
        for dim, new in dims.items():
            if x.shape[dim] != new:
                x = x.index_select(dim, torch.arange(new, device=x.device) % x.shape[dim])
        beyond[id(x)] = [d for d in dims if d >= 2]
        return x

    return pytree.tree_map(grow, args), pytree.tree_map(grow, kwargs), beyond


def _grown_dims(x: torch.Tensor, is_first: bool, targets: dict, guesses) -> dict:
    """{dim: its traced size} for the dims of example tensor `x` that dynamic capture grows
    with the first tensor's batch or sequence (`targets`: {0: (B, traced B), 1: (T, traced T)}):
    dims 0 and 1 of the same size, or of the swapped sizes in a (B, T) mask beside a seq-first
    (T, B, D) input. With the `guesses`:
    - "beyond": the last dims of an attention bias or mask (B, 1, T, T) of the sequence's
      size grow with it (else T stayed fixed at the example's);
    - "own length": token ids of length 1 (decoder_input_ids=[[start]]) get a length of their
      own (else they were fixed at 1, and a longer decoder input was refused);
    - "broadcast": a size-1 dim of an input that broadcasts (rank >= 3 with a size-1 dim past
      the first: a (1, 1, T, T) bias) stays 1 beside a batch-1 example (tied to the batch,
      the bias eager broadcasts over any batch was refused at batch 3)."""
    (b0, _), (t0, tx) = targets[0], targets[1]
    if is_first:
        return {d: new for d, (old, new) in targets.items() if x.dim() > d and old is not None}
    swapped = x.dim() >= 2 and b0 != t0 and (x.shape[0], x.shape[1]) == (t0, b0)
    broadcasts = "broadcast" in guesses and x.dim() >= 3 and 1 in x.shape[1:]
    out = {}
    for d in range(min(x.dim(), 2)):
        old, new = targets[1 - d if swapped else d]
        if x.shape[d] == old and not (old == 1 and broadcasts):
            out[d] = new
        elif d == 1 and x.shape[d] == 1 and "own length" in guesses and x.dim() == 2 and not x.is_floating_point():
            out[d] = 1 + max((n for _, n in targets.values() if n is not None), default=1)
    if "beyond" in guesses and t0 is not None and t0 >= 2:
        out.update({d: tx for d in range(2, x.dim()) if x.shape[d] == t0})
    return out


def _check_not_empty(args, kwargs):
    """Dynamic capture reads the batch (dim 0) and sequence (dim 1) sizes off the first
    example tensor and grows every input with those sizes: an empty one gives nothing to
    grow from, and no trace of the real computation."""
    flat = pytree.tree_flatten_with_path((args, kwargs))[0]
    tensors = [(path, x) for path, x in flat if isinstance(x, torch.Tensor)]
    path, first = tensors[0]
    for dim, what in ((0, "one row (batch >= 1)"), (1, "one token (sequence length >= 1)")):
        if first.dim() > dim and first.shape[dim] == 0:
            raise ValueError(f"the example input {_input_name(path)} has shape {list(first.shape)}: example inputs "
                             f"must have at least {what}; fxforge captures the model for any batch and sequence "
                             "length from one real example, so pass e.g. a [1, 8] batch of token ids")


def _input_name(path) -> str:
    """A pytree key path into (args, kwargs) as the caller wrote it: example_inputs[0],
    example_kwargs['input_ids']."""
    if not path:
        return "example_inputs"
    head = "example_inputs" if getattr(path[0], "idx", None) == 0 else "example_kwargs"
    return head + "".join(str(k) for k in path[1:])


def _dynamic_shapes(model, args, kwargs, beyond=None):
    """Dim.AUTO for dims 0 and 1 of every tensor, and for the dims `beyond` names
    (_export_example): torch.export makes a symbol of each, fixes those the model's code
    needs fixed, and ties those its code makes equal."""
    from torch.export import Dim

    def spec(x):
        if isinstance(x, torch.Tensor):
            dims = [*range(min(x.dim(), 2)), *(beyond or {}).get(id(x), ())]
            return {d: Dim.AUTO for d in dims} or None
        return None

    sig = inspect.signature(model.forward)
    bound = sig.bind(*args, **kwargs)
    out = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind == inspect.Parameter.VAR_KEYWORD:
            out[name] = {k: pytree.tree_map(spec, v) for k, v in value.items()}
        elif kind == inspect.Parameter.VAR_POSITIONAL:
            out[name] = tuple(pytree.tree_map(spec, v) for v in value)
        else:
            out[name] = pytree.tree_map(spec, value)
    return out


def _unaliased(args, kwargs):
    """The example with a tensor of its own for each argument. torch.export makes one graph
    input of tensors that share storage (the same tensor passed twice, labels=input_ids, or
    a view of another argument), so a later call with two different tensors would read one
    of them for both: each tensor after the first on a storage is traced as a copy."""
    seen = set()

    def own(x):
        if not isinstance(x, torch.Tensor):
            return x
        try:
            key = (x.device, x.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):  # a tensor without plain storage
            return x
        if key not in seen:
            seen.add(key)
            return x
        return x.detach().clone()

    return pytree.tree_map(own, (args, kwargs))


def _export(model, args, kwargs, dynamic, stack_traces: bool = False, cache_masks: bool = False, baked=None,
            sizes=None):
    args, kwargs = _unaliased(args, kwargs)
    ex_args, ex_kwargs, beyond = _export_example(args, kwargs, dynamic, sizes=sizes)
    dyn = _dynamic_shapes(model, ex_args, ex_kwargs, beyond) if dynamic else None
    try:
        with torch.no_grad(), _trace_settings(stack_traces), _config_without_cache(model, kwargs), \
                _masks_as_with_cache(cache_masks), _bound_forward(model, baked), _without_partial_graph_dump(), \
                _tensor_attributes_kept(model), nested_fast_path_as_eager(model), _MarkNoOpContiguous():
            return _export_traced(model, (args, kwargs), (ex_args, ex_kwargs), dyn, sizes)
    except Exception as e:  # torch.export raises many kinds; all become one clear error
        through = _through_var_keyword(model, ex_args, ex_kwargs) if dynamic else []
        if through and "tree_name" in str(e):  # export's dynamic shapes fail on a **kwargs tensor
            raise CaptureError(
                f"torch.export could not capture {type(model).__name__} with dynamic shapes: "
                f"{', '.join(through)} reach{'es' if len(through) == 1 else ''} forward() only through **kwargs, "
                f"whose tensors torch.export cannot give dynamic sizes ({type(e).__name__}: {str(e).strip()[:120]})\n"
                f"  fix: leave {', '.join(through)} out of example_kwargs if the model does not need "
                f"{'it' if len(through) == 1 else 'them'}, or pass dynamic=False") from e
        try:
            run_as_traced(model, args, kwargs, cache_masks)
        except Exception as eager_error:  # noqa: BLE001 (export failed on what eager fails on: say that)
            raise eager_failure(eager_error, traced=False) from eager_error
        raise _capture_error(model, e) from e


def run_as_traced(model, args, kwargs, cache_masks: bool):
    """The model's outputs on (args, kwargs), run eagerly as capture traced it (a config's
    use_cache off, the masks of a call with a cache as `cache_masks` says), for a check that
    compares or tries: no autograd, and its buffers left as they were (_buffers_kept)."""
    with torch.no_grad(), _config_without_cache(model, kwargs), _masks_as_with_cache(cache_masks), \
            _buffers_kept(model):
        return model(*args, **kwargs)


@contextlib.contextmanager
def _buffers_kept(model):
    """The model's buffers as they were before the block, after it: a forward that fxforge
    runs only to check something (a train-mode BatchNorm's running statistics, a step
    counter) must leave the user's model as it found it."""
    buffers = list(model.buffers()) if isinstance(model, torch.nn.Module) else []
    saved = [b.detach().clone() for b in buffers]
    # a forward that replaces a buffer or sets an attribute (a lazily grown rotary cache's
    # register_buffer and max_seq_len_cached) is undone too: each module's buffer table and
    # plain attributes as they were (shallow: the same objects back in their places)
    modules = list(model.modules()) if isinstance(model, torch.nn.Module) else []
    tables = [(m, dict(m._buffers), dict(m.__dict__)) for m in modules]
    try:
        yield
    finally:
        for m, table, attrs in tables:
            if _replaced(m._buffers, table) or _replaced(m.__dict__, attrs):
                m._buffers.clear()
                m._buffers.update(table)
                for k in [k for k in m.__dict__ if k not in attrs]:
                    del m.__dict__[k]
                m.__dict__.update(attrs)
        with torch.no_grad():
            for b, old in zip(buffers, saved):
                if b.shape == old.shape and b.dtype == old.dtype:
                    b.copy_(old)


def _replaced(now: dict, before: dict) -> bool:
    return now.keys() != before.keys() or any(now[k] is not v for k, v in before.items())


def eager_failure(error: Exception, traced: bool) -> CaptureError:
    """The refusal of a model that fails on its own example inputs in eager PyTorch."""
    first = str(error).splitlines()[0] if str(error) else ""
    how = ("torch.export traced it anyway (it checks shapes, not every dtype or device rule)" if traced else
           "torch.export failed on the same error")
    return CaptureError(
        f"the model itself fails on the example inputs in eager PyTorch ({type(error).__name__}: {first}): "
        f"fxforge optimizes what the model computes, and on these inputs it computes nothing; {how}. Fix the "
        "model or the inputs so that model(*example_inputs) runs (matching dtypes and devices, values the dtype "
        "can hold), then optimize again")


def _export_traced(model, example, traced, dyn, sizes=None):
    """torch.export of the `traced` example (_export_example's growth of `example`). Where
    that fails, a guess may be what the model does not take (a (1, 1, T, T) input it reads
    per row, a dim that only looked like the length): the example is traced again grown
    with fewer guesses (_GUESSES), where that changes the trace; the last trace's error is
    the one raised."""
    traces = [(*traced, dyn)]
    for guesses in (_GUESSES[1:] if dyn is not None else ()):
        args, kwargs, beyond = _export_example(*example, True, guesses, sizes)
        trace = (args, kwargs, _dynamic_shapes(model, args, kwargs, beyond))
        if not any(_same_trace(trace, other) for other in traces):
            traces.append(trace)
    for i, (args, kwargs, shapes) in enumerate(traces):
        try:
            with _tensor_attributes_kept(model):  # nothing a failed trace cached reaches the next
                return torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=False)
        except Exception:  # noqa: BLE001 (whatever export raises: the next trace, or the caller's error)
            if i == len(traces) - 1:
                raise


def _same_trace(a, b) -> bool:
    shapes = [[tuple(x.shape) for x in pytree.tree_leaves(t[:2]) if isinstance(x, torch.Tensor)] for t in (a, b)]
    return shapes[0] == shapes[1] and a[2] == b[2]


def _rope_type(model) -> str | None:
    """A transformers model's rotary scaling type (rope_scaling or rope_parameters), if any."""
    return rope_type_of(getattr(model, "config", None))


def rope_type_of(config) -> str | None:
    """A transformers config's rotary scaling type (rope_scaling or rope_parameters), if any."""
    if callable(getattr(config, "get_text_config", None)):
        config = config.get_text_config()
    for name in ("rope_parameters", "rope_scaling"):
        value = getattr(config, name, None)
        if isinstance(value, dict) and (value.get("rope_type") or value.get("type")):
            return value.get("rope_type") or value.get("type")
    return None


def _rotary_modules(model) -> list[str]:
    """The rotary embedding submodules of a transformers model, as `name (Class)`."""
    return [f"{name or type(model).__name__} ({type(m).__name__})" for name, m in model.named_modules()
            if "rotary" in type(m).__name__.lower()]


def _through_var_keyword(model, args, kwargs) -> list[str]:
    """The tensor example kwargs that forward() takes only through its **kwargs."""
    try:
        sig = inspect.signature(model.forward)
        bound = sig.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return []
    return [k for name, value in bound.arguments.items()
            if sig.parameters[name].kind == inspect.Parameter.VAR_KEYWORD
            for k, v in value.items() if isinstance(v, torch.Tensor)]


def _default_call_has_cache(model) -> bool:
    """Does the model's default call (no use_cache given) build a KV cache? A transformers
    model does when its (text) config says use_cache=True."""
    config = getattr(model, "config", None)
    if config is None:
        return False
    configs = [config]
    if callable(getattr(config, "get_text_config", None)):
        configs.append(config.get_text_config())
    return any(getattr(c, "use_cache", None) is True for c in configs)


@contextlib.contextmanager
def _masks_as_with_cache(on: bool):
    """The attention masks of the model's default call, while tracing with use_cache=False.

    fxforge traces a transformers model with use_cache=False (no cache object in the graph:
    _inference_kwargs, _config_without_cache), but the call it stands for, the model's
    default, runs with use_cache=True: forward() builds an (empty) DynamicCache before the
    masks. Without a cache, masking_utils._preprocess_mask_arguments reads position_ids
    that are not 0, 1, 2, .. per row as packed sequences (find_packed_sequence_indices) and
    builds a block-diagonal mask; with a cache it never looks, and the mask is plainly
    causal. An empty cache changes nothing else in the masks (its sizes and offsets are
    those of the input), so "no packed sequences" (None) is exactly the default call's mask.
    Only for the trace, restored after; not when the caller passed use_cache (use_cache=False
    given by name keeps eager's packed-sequence masks)."""
    masking = sys.modules.get("transformers.masking_utils") if on else None
    real = getattr(masking, "find_packed_sequence_indices", None)
    if real is None:
        yield
        return
    masking.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking.find_packed_sequence_indices = real


@contextlib.contextmanager
def _config_without_cache(model, kwargs):
    """`config.use_cache = False` while tracing, for a transformers model whose forward takes
    `use_cache` only through **kwargs (GraniteMoE): _inference_kwargs cannot pass it by name,
    and the default from the config makes the model return a cache object, which torch.export
    rejects as an output. A composite model's text config (get_text_config()) is turned off
    too: a multimodal model's language model reads its own. Not done when the caller passed
    use_cache: that is their choice."""
    config = getattr(model, "config", None)
    configs = [config]
    if callable(getattr(config, "get_text_config", None)) and config.get_text_config() is not config:
        configs.append(config.get_text_config())
    on = [c for c in configs if getattr(c, "use_cache", None) is True]
    if "use_cache" in kwargs or not on:
        yield
        return
    for c in on:
        c.use_cache = False
    try:
        yield
    finally:
        for c in on:
            c.use_cache = True


@contextlib.contextmanager
def _trace_settings(stack_traces: bool):
    """torch.export settings that make tracing faster without changing the graph.

    - No stack trace per fx node unless asked: torch records one for every node (a
      CapturedTraceback, symbolized and formatted), about a tenth of the export time.
      Node sources then name the module (from nn_module_stack) without the line.
    - Lazy GraphModules: export's own passes recompile the Python code of the graph
      module and its submodules after every change (about 25 times); lazily, the code
      is generated only if someone runs or reads it, and the lowering never does.
    """
    try:
        from torch.fx._lazy_graph_module import _use_lazy_graph_module
    except ImportError:  # pragma: no cover - older torch: eager recompiles, same graph
        _use_lazy_graph_module = contextlib.nullcontext
    config = torch.fx.config
    had_flag = hasattr(config, "do_not_emit_stack_traces")
    before = getattr(config, "do_not_emit_stack_traces", False)
    if had_flag:
        config.do_not_emit_stack_traces = before or not stack_traces
    try:
        with _use_lazy_graph_module(True):
            yield
    finally:
        if had_flag:
            config.do_not_emit_stack_traces = before


@contextlib.contextmanager
def _tensor_attributes_kept(model):
    """The model's plain tensor attributes (not parameters or buffers) as they were before a
    trace. A module that caches a tensor in an attribute on its first call (transformers'
    LongRoPE stores `long_inv_freq`) would otherwise keep the trace's fake tensor, which the
    next trace (capture traces more than once) or an eager call cannot use."""
    before = [(m, {k: v for k, v in vars(m).items() if isinstance(v, torch.Tensor)}) for m in model.modules()]
    try:
        yield
    finally:
        for module, tensors in before:
            for key, value in list(vars(module).items()):
                if isinstance(value, torch.Tensor) and tensors.get(key) is not value:
                    if key in tensors:
                        setattr(module, key, tensors[key])
                    else:
                        delattr(module, key)


@contextlib.contextmanager
def _without_partial_graph_dump():
    """torch.export prints the partial FX graph of a trace that failed (a branch on a
    value: `if x.sum().item() > 0`) to stderr before it raises; fxforge's CaptureError says
    where and what to do instead, so that dump goes. stderr is held while export runs and
    written out after it (warnings included), less the dump."""
    real, held = sys.stderr, io.StringIO()
    dump = None
    sys.stderr = held
    try:
        yield
    except BaseException as e:
        dump = getattr(e, "partial_fx_graph", None)
        raise
    finally:
        sys.stderr = real
        text = held.getvalue()
        if dump is not None:  # (export's nested wrappers print it once each)
            text = text.replace(f"{dump}\n", "")
        if text:
            real.write(text)


def _data_dependent_fix(message: str) -> str:
    """What to do when export met a tensor's value in Python: a bare value (`zuf0`, or an
    integer it had to fix) is a number read with float() / int() / .item(); a condition
    (`Eq(u0, 1)`, `zuf0 > 0`) is a branch on the value."""
    expr = re.search(r"data-dependent expression (.*?) \(unhinted", message)
    if "specialized integer" in message or (expr and re.fullmatch(r"\w+", expr.group(1).strip())):
        return ("the model reads a tensor's value into Python as a number (float(), int() or .item() of a "
                "tensor), which a graph capture cannot follow; keep it a tensor: x / x.abs().max() rather than "
                "x / float(x.abs().max()) (a 0-dim tensor broadcasts like a number); where the number sets a size "
                "(torch.zeros(n), x[:n]), compute with fixed shapes instead (torch.where(cond, a, b) or a mask "
                "rather than slicing)")
    return ("the model branches on tensor *values* (data-dependent control flow); compute both results "
            "and pick with torch.where(cond, a, b) (fxforge does not capture torch.cond), or move the "
            "decision out of forward()")


def _capture_error(model, exc) -> CaptureError:
    frames = traceback.extract_tb(exc.__traceback__)
    torch_dir = os.path.dirname(torch.__file__)
    user = [f for f in frames if not f.filename.startswith(torch_dir) and "fxforge" not in f.filename]
    where = f"{user[-1].filename}:{user[-1].lineno} in {user[-1].name}: {user[-1].line}" if user else "unknown"
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    name = type(exc).__name__
    if "data-dependent" in str(exc) or "GuardOnDataDependent" in name or "DataDependent" in name:
        fix = _data_dependent_fix(str(exc))
    elif "not a known type" in str(exc) or "pytree" in str(exc):
        fix = ("the model returns or takes an object torch.export cannot flatten: use tensors, tuples, lists, "
               "dicts or transformers ModelOutputs, or register your class first (a @dataclass: "
               "torch.utils._pytree.register_dataclass(YourClass); any other: "
               "torch.utils._pytree.register_pytree_node)")
    elif "inference tensor" in str(exc).lower():
        made = next((n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_inference()), None)
        fix = ("the model's tensors were made under torch.inference_mode()" + (f" ({made}, ...)" if made else "")
               + ": torch.export cannot trace them. Build or load the model outside inference_mode (no_grad is "
                 "fine), or give it copies made outside it: model.load_state_dict({k: v.clone() for k, v in "
                 "model.state_dict().items()}, assign=True)")
    elif "Constraints violated" in str(exc) or "specialized" in str(exc):
        fix = ("a dynamic dimension was forced to a constant by the model's code; pass dynamic=False "
               "to capture static shapes, or remove the size-specific code")
    else:
        fix = "simplify the code at the location above, or pass dynamic=False to capture static shapes"
    rope = _rope_type(model)
    if rope == "dynamic":  # the usual cause, whatever export's own message says
        rotary = _rotary_modules(model)
        if where == "unknown" and rotary:  # export's own frames name no line of the model
            where = f"{rotary[0]}.forward, where transformers updates the rotary frequencies (rope_type={rope!r})"
        fix = (f"the model's rotary embedding is rope_type={rope!r}: transformers recomputes its frequencies "
               "inside forward() when max(position_ids) passes the longest length seen so far (a branch on a "
               "tensor's value, and an attribute written while tracing), which torch.export cannot capture; "
               "fxforge captures rope_type 'default', 'linear', 'yarn', 'llama3' and 'longrope'. " + fix)
    return CaptureError(f"torch.export could not capture {type(model).__name__}: {name}: {first}\n"
                        f"  where: {where}\n  fix: {fix}")


# ---------------------------------------------------------------------------------------
class _CaptureBuilder(Builder):
    def const(self, value, dtype=None):
        """A condition on sizes used as a tensor (`x * (x.shape[1] > 7)`) is a bool constant
        whose value is the 0/1 size expression of the condition (_indicator): a const's
        value is a number or a size expression, not a relation."""
        if isinstance(value, sympy.logic.boolalg.Boolean) and not isinstance(value, sympy.logic.boolalg.BooleanAtom):
            number = _indicator(value)
            if number is not value:
                return super().const(number, torch.bool if dtype is None else dtype)
        return super().const(value, dtype)


class _Lowerer:
    def __init__(self, ep):
        self.ep = ep
        self.rename: dict = {}
        self.builder = _CaptureBuilder()
        # torch's size expression -> ours; the same few sizes (T, B*T, ...) recur on
        # thousands of nodes, and each conversion walks the expression several times.
        self.size_exprs: dict = {}
        # our size symbol -> torch's value range for it (lower bound 1: see ir/guards.py)
        self.ranges: dict = {}
        self.same_size: dict = {}  # a size expression -> the symbol a guard says it equals
        self.guards: list = []
        self.aliases = _storage_aliases(ep.graph_module.graph)
        self.order = {n: i for i, n in enumerate(ep.graph_module.graph.nodes)}
        self.current = None  # the fx node being lowered, for errors
        self.fixed_dtypes: dict = {}  # no-op casts to a fixed float dtype (lowering.LowerCtx)

    def size_ranges(self, probed=None):
        """probed: (guards, ranges) widened by a trace at other sizes (_widened_by_probes),
        for export's own."""
        from torch.utils._sympy.value_ranges import ValueRanges

        for sym, vr in self.ep.range_constraints.items():
            if sym in self.rename:
                self.ranges[self.rename[sym]] = ValueRanges(1, vr.upper)
        # export's `Eq(T, 64 - Max(0, 64 - T))`-style guards say an expression is a size:
        # write it as that size (the guard itself is checked on every call, ir/guards.py)
        try:
            self.guards = guards_from_export(self.ep, self.rename, _clean_expr)
        except ValueError as e:  # a condition the IR's text cannot hold, or one misread
            raise CaptureError(f"reading the conditions torch.export recorded on the sizes: {e}") from None
        if probed is not None:
            self.guards = list(probed[0])
            self.ranges.update({s: ValueRanges(1, vr.upper) for s, vr in probed[1].items()})
        self._unify_equal_sizes()
        for rel in self.guards:
            if isinstance(rel, sympy.Eq):
                for a, b in ((rel.lhs, rel.rhs), (rel.rhs, rel.lhs)):
                    if isinstance(a, sympy.Symbol) and b.has(sympy.Max, sympy.Min):
                        self.same_size[b] = a

    def _unify_equal_sizes(self):
        """Two sizes a guard says are equal become one symbol (nn.MultiheadAttention's
        memory of batch B1: export names it apart, the model's reshape only says
        Eq(32*B1*T1, 32*B*T1)). Left apart, k's head dim read floor(8*B1/B), which no pass
        could prove 8 (no attention fused), and the size-one probes refused batch 1. Every
        call must satisfy the guard anyway, so no call changes meaning; the input check
        then says a mismatch as one of sizes that must agree."""
        same = _equal_symbols(self.guards)
        if not same:
            return
        self.rename = {k: same.get(v, v) for k, v in self.rename.items()}
        for gone, kept in same.items():
            if gone in self.ranges:
                lost = self.ranges.pop(gone)
                self.ranges[kept] = self.ranges[kept] & lost if kept in self.ranges else lost
        guards = [g.xreplace(same) for g in self.guards]
        self.guards = [g for g in guards if g is not sympy.true]
    # -- symbolic sizes ------------------------------------------------------------------
    def name_dims(self, placeholders):
        counts: dict[str, int] = {}
        for node in placeholders:
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                continue
            for d, size in enumerate(val.shape):
                if isinstance(size, torch.SymInt):
                    expr = size.node.expr
                    if isinstance(expr, sympy.Symbol) and expr not in self.rename:
                        base = _DIM_NAMES.get(d, f"D{d}")
                        k = counts.get(base, 0)
                        counts[base] = k + 1
                        self.rename[expr] = symbol(base if k == 0 else f"{base}{k}")

    def expr(self, x) -> sympy.Expr:
        if isinstance(x, (int, bool)):
            return sympy.Integer(int(x))
        if isinstance(x, float):
            return sympy.Float(x)
        raw = x.node.expr
        if not isinstance(x, torch.SymInt):
            return self._convert(raw)
        e = self.size_exprs.get(raw)
        if e is None:
            e = self.size_exprs[raw] = self._convert(raw)
        return e

    def _convert(self, expr) -> sympy.Expr:
        e = expr.xreplace(self.rename)
        e = _clean_expr(e)
        if e.has(sympy.Max, sympy.Min):
            e = _settle_min_max(e, self.ranges).xreplace(self.same_size)
        unknown = [s for s in e.free_symbols if s not in self.rename.values()]
        if unknown:
            raise CaptureError(_data_dependent_size(unknown, self.current, self._sets_a_size(self.current)))
        return e

    def _sets_a_size(self, node) -> bool:
        """Whether the data-dependent value `node` gives sets a tensor's size, or it is only
        a number (`x / x.max().item()`): a tensor node whose shape has a symbol no input
        gave, or a scalar node (.item(), and arithmetic on it) that flows into one."""
        if node is None:
            return True  # no node to look at: say what the size case needs

        def is_scalar(n):
            return isinstance(n.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool))

        for n in _fx_reachable(node, lambda n: n.users if is_scalar(n) else ()):
            if is_scalar(n):
                continue
            tensors = [t for t in pytree.tree_leaves(n.meta.get("val")) if isinstance(t, torch.Tensor)]
            if any(not d.node.expr.free_symbols <= self.rename.keys()
                   for t in tensors for d in t.shape if isinstance(d, torch.SymInt)):
                return True
        return False

    def tensor_type(self, val) -> TensorType:
        return TensorType(tuple(self.expr(d) for d in val.shape), val.dtype)

    def types_of(self, val):
        if isinstance(val, torch.Tensor):
            return [self.tensor_type(val)]
        if isinstance(val, (list, tuple)) and all(isinstance(v, torch.Tensor) for v in val):
            return [self.tensor_type(v) for v in val]
        return None

    # -- the walk ------------------------------------------------------------------------
    def run_graph(self, graph, env):
        for node in graph.nodes:
            if node.op in ("placeholder",):
                continue
            if node.op == "output":
                return node.args[0]
            if node.op == "get_attr":
                env[node] = getattr(self.ep.graph_module, node.target)
                continue
            self.current = node
            env[node] = self.lower_node(node, env)
        return None

    def arg(self, a, env):
        return pytree.tree_map(lambda x: env[x] if isinstance(x, torch.fx.Node) else x, a)

    def lower_node(self, node, env):
        val = node.meta.get("val")
        if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return self.expr(val)
        target = node.target
        args = self.arg(node.args, env)
        kwargs = self.arg(node.kwargs, env)
        if target is __import__("operator").getitem:
            return args[0][args[1]]
        self.builder.meta = {"source": _source(node)}
        if isinstance(target, torch._ops.HigherOrderOperator):
            return self.inline_hop(node, target, args)
        if isinstance(target, torch._ops.OpOverload) and self.functionalizable(node):
            # x.op_(...) -> y = op(x, ...); every later reader of x reads y. The IR is SSA:
            # an opaque in-place call would let passes merge or fold the buffer it writes
            # (two equal `full` buffers, each scattered into, became one).
            functional = _functional_variant(target)
            if functional is not None:
                target = functional
        name = str(target)
        rule = RULES.get(name)
        out_types = self.types_of(val)
        result = self.lower_call(node, target, name, rule, args, kwargs, val, out_types)
        if target is not node.target:  # functionalized: the written tensor is now `result`
            env[node.args[0]] = result
        return result

    def lower_call(self, node, target, name, rule, args, kwargs, val, out_types):
        if rule is not None:
            try:
                result = rule(LowerCtx(self.builder, out_types, node, self.fixed_dtypes), *args, **kwargs)
            except TypeError:  # IRTypeError, or broadcast_shapes on sizes it cannot compare
                # Our type rule cannot prove what export knew (e.g. a reshape whose element
                # count matches only under a recorded guard): keep the op as torch ran it,
                # with export's types. Nodes the rule emitted before failing are dead code.
                result = FALLBACK
            if result is DROP:
                return None
            if result is not FALLBACK:
                return result
        if val is None and not isinstance(target, torch._ops.OpOverload):
            return None
        return self.opaque(node, _LAYOUT_FREE_TWIN.get(name, name), args, kwargs, out_types)

    def functionalizable(self, node) -> bool:
        return _functionalizable(node, self.aliases, self.order)

    def opaque(self, node, name, args, kwargs, out_types):
        if out_types is None:
            raise CaptureError(f"cannot keep {name} as an opaque op: its result is not a tensor "
                               f"(at {_source(node) or node.name})")
        tensors: list[Value] = []

        def conv(a):
            if isinstance(a, Value):
                tensors.append(a)
                return Arg(len(tensors) - 1)
            if isinstance(a, list):  # fx's immutable_list prints like a list
                return [conv(x) for x in a]
            if isinstance(a, tuple):
                return tuple(conv(x) for x in a)
            if isinstance(a, sympy.Basic) or a is None or isinstance(
                    a, (bool, int, float, str, torch.dtype, torch.device, torch.layout, torch.memory_format)):
                return a
            raise CaptureError(f"{name} takes an argument of type {type(a).__name__} that fxforge cannot "
                               f"record (at {_source(node) or node.name})")

        attrs = {"target": name, "args": conv(tuple(args)), "kwargs": tuple((k, conv(v)) for k, v in kwargs.items())}
        outs = self.builder.emit_multi("torch_call", tensors, attrs, types=out_types)
        val = node.meta.get("val")
        return outs if isinstance(val, (list, tuple)) else outs[0]

    def inline_hop(self, node, hop, args):
        """Grad-mode and autocast wrappers hold a submodule: lower its body in place."""
        if hop.name() not in ("wrap_with_set_grad_enabled", "wrap_with_autocast"):
            fix = _HOP_FIXES.get(hop.name(), _HOP_FIX)
            raise CaptureError(f"fxforge cannot inline the higher-order op {hop.name()} (at {_source(node)}): "
                               f"it captures straight-line graphs only\n  fix: {fix}")
        if hop.name() == "wrap_with_autocast":
            raise CaptureError("the model uses torch.autocast inside forward; cast the model to the dtype you "
                               "want instead (model.half() / model.to(torch.bfloat16))")
        sub = next(a for a in args if isinstance(a, torch.nn.Module))
        operands = args[list(args).index(sub) + 1:]
        sub_env = {}
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        for ph, value in zip(placeholders, operands):
            sub_env[ph] = value
        result = self.run_graph(sub.graph, sub_env)
        return tuple(self.arg(result, sub_env))


def _storage_aliases(graph) -> dict:
    """fx node -> the nodes whose tensors share its storage (itself included), from the
    fake tensors export recorded: views and in-place results alias their input."""
    from torch.multiprocessing.reductions import StorageWeakRef

    groups: dict = {}
    of: dict = {}
    for n in graph.nodes:
        val = n.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        try:
            key = StorageWeakRef(val.untyped_storage())
        except Exception:  # no storage to compare (a tensor subclass): it aliases anything
            return {}
        groups.setdefault(key, []).append(n)
        of[n] = key
    return {n: groups[k] for n, k in of.items()}


def _functionalizable(node, aliases: dict, order: dict) -> bool:
    """An in-place ATen op that writes only its first argument, a tensor computed in the
    graph (not an input, weight or buffer) that no view taken before a write aliases: its
    functional form computes the same, and later readers of the tensor can read the
    functional result instead (the lowerer does that rewrite)."""
    if not _writes_first_only(node.target) or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return False
    x = node.args[0]
    group = aliases.get(x)
    if x.op != "call_function" or group is None or _functional_variant(node.target) is None:
        return False
    # the writes: this op and any other in-place op on the tensor (each returns an alias of
    # it); the other aliases must be views taken after the last write, so that they see the
    # final value whichever of the (functional) values they read
    writes = [m for m in group if m is not x and isinstance(m.target, torch._ops.OpOverload) and m.args
              and m.args[0] in group and _writes_first_only(m.target)]
    last = max(order[m] for m in writes)
    return all(m is x or m in writes or order[m] > last for m in group)


def _needs_functionalization(ep) -> bool:
    """An in-place op the lowerer cannot turn functional itself (a write through a view,
    say): the IR has no aliasing, so such a graph must be made functional by torch first."""
    return bool(writes_to_functionalize(ep.graph_module.graph)[0])


def writes_to_functionalize(graph) -> tuple[list, dict, dict]:
    """The in-place ops of an FX graph the lowerer cannot turn functional itself, with the
    graph's storage aliases (_storage_aliases) and node order, for a caller's own checks
    (the torch.compile backend keeps some of them: dynamo/writeback.py)."""
    aliases = _storage_aliases(graph)
    order = {n: i for i, n in enumerate(graph.nodes)}
    writes = [n for n in graph.nodes
              if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
              and any(a.alias_info is not None and a.alias_info.is_write for a in n.target._schema.arguments)
              and not _functionalizable(n, aliases, order)]
    return writes, aliases, order


def _writes_first_only(op) -> bool:
    args = op._schema.arguments
    return [i for i, a in enumerate(args) if a.alias_info is not None and a.alias_info.is_write] == [0]


def _functional_variant(op):
    """aten.scatter_.src -> aten.scatter.src (None when ATen has no such overload)."""
    packet = op.overloadpacket.__name__
    if not packet.endswith("_") or packet.startswith("_"):
        return None
    functional = getattr(torch.ops.aten, packet[:-1], None)
    overload = getattr(functional, op._overloadname, None) if functional is not None else None
    if overload is None or len(overload._schema.arguments) != len(op._schema.arguments):
        return None
    return overload


# what to write instead of a higher-order op (control flow held in subgraphs) fxforge does not inline
_HOP_FIX = ("write that code as plain tensor operations (no torch.cond / while_loop / scan / map / "
            "invoke_subgraph), or run that part outside the model you optimize")
_HOP_FIXES = {
    "cond": "compute both branches and pick with torch.where(pred, true_branch(x), false_branch(x)) "
            "(both must return the same shapes), or move the decision out of forward()",
    "while_loop": "use a Python loop with a fixed number of steps (it is unrolled), or run the loop outside "
                  "the model you optimize and optimize its body",
    "scan": "use a Python loop over the sequence's fixed length (it is unrolled), or vectorize the recurrence",
    "map": "apply the function to the whole batch at once (vectorized), or use a Python loop (unrolled)",
}


def _clean_expr(e: sympy.Expr) -> sympy.Expr:
    """torch's own sympy functions (FloorDiv, PythonMod, ...) -> plain sympy, so sizes
    print in a readable form that parses back."""
    try:
        from torch.utils._sympy import functions as tf
    except ImportError:  # pragma: no cover
        return e
    table = {"FloorDiv": lambda a, b: sympy.floor(a / b), "CleanDiv": lambda a, b: a / b,
             "PythonMod": sympy.Mod, "Mod": sympy.Mod, "CeilDiv": lambda a, b: sympy.ceiling(a / b),
             "IntTrueDiv": lambda a, b: a / b, "Max": sympy.Max, "Min": sympy.Min,
             # math.ceil / math.floor / int() of a size's quotient (guards and sizes alike)
             "CeilToInt": sympy.ceiling, "FloorToInt": sympy.floor,
             "TruncToInt": lambda a: sympy.floor(a) if a.is_nonnegative else sympy.ceiling(a) if a.is_nonpositive
             else tf.TruncToInt(a)}
    for name, fn in table.items():
        cls = getattr(tf, name, None)
        if cls is not None and e.has(cls):
            e = e.replace(cls, fn)
    return e


def _settle_min_max(e: sympy.Expr, ranges: dict) -> sympy.Expr:
    """Max/Min whose winner is known over the sizes' ranges -> that argument, e.g.
    `64 - Max(0, 64 - T)` -> `T` when T <= 64 (a slice of a 64-row buffer, as MPT's ALiBi
    table is): otherwise a type rule cannot see that two sizes are one, and the op it
    builds would not broadcast."""
    from torch.utils._sympy.value_ranges import bound_sympy

    def settle(op, *args):
        keep = list(args)
        for a in args:
            for b in args:
                if a is b or a not in keep or b not in keep:
                    continue
                try:
                    gap = bound_sympy(a - b, ranges)
                except Exception:  # an expression torch's range analysis does not take
                    continue
                if (op is sympy.Max and gap.lower >= 0) or (op is sympy.Min and gap.upper <= 0):
                    keep.remove(b)  # a is never below (Max) / above (Min) b
        return keep[0] if len(keep) == 1 else op(*keep)

    return e.replace(sympy.Max, lambda *a: settle(sympy.Max, *a)).replace(sympy.Min, lambda *a: settle(sympy.Min, *a))


def _indicator(cond):
    """A condition on integer sizes (`T > 7`, from `x * (x.shape[1] > 7)`) as the integer
    expression that is 1 where it holds and 0 where not (Min(1, Max(0, T - 7))): the IR's
    attrs and text take size expressions, not relations. Anything else stays as it is."""
    def ind(c):
        if c is sympy.true or c is sympy.false:
            return sympy.Integer(int(bool(c)))
        if isinstance(c, sympy.Not):
            inner = ind(c.args[0])
            return None if inner is None else 1 - inner
        if isinstance(c, (sympy.And, sympy.Or)):
            parts = [ind(a) for a in c.args]
            if any(p is None for p in parts):
                return None
            return (sympy.Min if isinstance(c, sympy.And) else sympy.Max)(*parts)
        if not isinstance(c, sympy.core.relational.Relational):
            return None
        gap = c.lhs - c.rhs
        if not gap.is_integer:
            return None
        step = {sympy.StrictGreaterThan: gap, sympy.GreaterThan: gap + 1,
                sympy.StrictLessThan: -gap, sympy.LessThan: 1 - gap}
        if type(c) in step:
            return sympy.Min(1, sympy.Max(0, step[type(c)]))
        if isinstance(c, (sympy.Eq, sympy.Ne)):
            differs = sympy.Min(1, sympy.Max(gap, -gap))
            return differs if isinstance(c, sympy.Ne) else 1 - differs
        return None

    if not isinstance(cond, sympy.logic.boolalg.Boolean):
        return cond
    out = ind(cond)
    return cond if out is None else out


def _source(node) -> str:
    stack = node.meta.get("nn_module_stack")
    path = ""
    if stack:
        path = list(stack.values())[-1][0]
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File")]
    loc = ""
    if lines:
        parts = lines[-1].split('"')
        if len(parts) >= 3:
            loc = f"{os.path.basename(parts[1])}{parts[2].split(',')[1].replace(' line ', ':')}"
    return f"{path} {loc}".strip()


def _source_line(node) -> str:
    """The model's line of code a node comes from (the last frame of its stack trace), or ""."""
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    for i in range(len(trace) - 1, -1, -1):
        if trace[i].strip().startswith("File") and i + 1 < len(trace) and not trace[i + 1].strip().startswith("File"):
            return trace[i + 1].strip()
    return ""


def _data_dependent_size(unknown, node, sets_a_size: bool = True) -> str:
    """The error for a value that depends on tensor data (a symbol no input size gives):
    a size (boolean-mask indexing, nonzero, a mixture of experts' token selection) or a
    number read into Python with .item() and used in arithmetic."""
    syms = ", ".join(sorted(map(str, unknown)))
    wrapped = _size_made_a_tensor(node) if node is not None else None
    at = ""
    if node is not None:
        origin = wrapped or node  # where the size became a tensor, if it did
        where = _source(origin) or origin.name
        line = _source_line(origin)
        at = f"\n  op: {node.target}\n  at: {where}" + (f"\n  code: {line}" if line else "")
    if wrapped is not None:
        return (f"a size depends on tensor data ({syms}), but that tensor is a size itself: the model makes an "
                "input's size a tensor (torch.tensor(x.size(1)), torch.tensor(min(T, n))) and reads it back as a "
                f"number (.item(), or slicing with it), which torch.export cannot follow back to the size{at}\n"
                "  fix: keep the size a Python int (min(x.size(1), n), not torch.tensor(min(x.size(1), n)); "
                "transformers' DeBERTa (v1) compute_attention_span does this), or pass dynamic=False to capture "
                "this exact shape")
    if not sets_a_size:
        return (f"a tensor's value is read into Python ({syms}): .item(), float() or int() of a tensor makes a "
                f"Python number that depends on the data, which a graph capture cannot follow{at}\n"
                "  fix: keep the value a tensor: write x / x.abs().max() rather than x / x.abs().max().item() "
                "(a 0-dim tensor broadcasts like a number), and torch.where(cond, a, b) rather than a Python "
                "branch on a value")
    return (f"a size depends on tensor data ({syms}); fxforge needs sizes that follow from the input shapes{at}\n"
            "  fix: data-dependent shapes, such as boolean-mask indexing (x[mask]), torch.nonzero, one-argument "
            "torch.where (a mixture of experts' per-expert token selection) or a size read with .item() "
            "(torch.zeros(n), x[:n]), cannot be captured; compute with fixed shapes instead: for a mixture of "
            "experts, either run every expert on every token and weight its output "
            "by the router's gate (zero for the experts not chosen), or gather each token's top-k experts' weights "
            "(W[top_k_index], [tokens, k, ...]) and multiply in one batch, as transformers' batched_mm experts do; "
            "elsewhere, use torch.where(cond, a, b) or multiply by the mask rather than selecting")


def _size_made_a_tensor(node):
    """The fx node that makes a size a tensor (aten.scalar_tensor of a SymInt: torch.tensor(n)
    of an input's size) which the data-dependent value `node` is read back from, through
    arithmetic on 0-dim tensors; or None."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    def zero_dim_inputs(n):
        return [a for a in n.all_input_nodes if isinstance(v := a.meta.get("val"), torch.Tensor) and v.dim() == 0]

    for n in _fx_reachable(node, zero_dim_inputs):
        if n.target is torch.ops.aten.scalar_tensor.default and isinstance(n.args[0], torch.fx.Node) \
                and isinstance(size := n.args[0].meta.get("val"), torch.SymInt) \
                and not free_unbacked_symbols(size):  # of the input sizes, not itself read from data
            return n
    return None


def _fx_reachable(start, step):
    """The fx nodes reachable from `start` (itself first) along `step(node)`, each once."""
    seen, todo = set(), [start]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            yield n
            todo.extend(step(n))


def _equal_symbols(guards) -> dict:
    """{symbol: the symbol it equals} from Eq guards whose two sides differ by a product of
    a difference of two size symbols and factors that cannot be 0 (positive numbers, size
    symbols and their powers: every size is >= 1): Eq(32*B1*T1, 32*B*T1) says B1 == B.
    The later-named symbol maps to the earlier (B1 -> B)."""
    out: dict = {}
    for rel in guards:
        if not isinstance(rel, sympy.Eq) or not (rel.lhs - rel.rhs).is_polynomial():
            continue
        factors = sympy.Mul.make_args(sympy.factor(rel.lhs - rel.rhs))
        pairs = [f for f in factors if _symbol_difference(f) is not None]
        if len(pairs) != 1 or not all(f is pairs[0] or _nonzero_size_factor(f) for f in factors):
            continue
        a, b = sorted((out.get(x, x) for x in _symbol_difference(pairs[0])), key=lambda x: (len(str(x)), str(x)))
        if a != b:
            out[b] = a
            out = {k: (a if v == b else v) for k, v in out.items()}
    return out


def _symbol_difference(e) -> tuple | None:
    """(a, b) where e is a - b (or b - a) of two symbols."""
    terms = sympy.Add.make_args(e)
    if len(terms) != 2:
        return None
    (c1, s1), (c2, s2) = (t.as_coeff_Mul() for t in terms)
    if isinstance(s1, sympy.Symbol) and isinstance(s2, sympy.Symbol) and c1 == -c2 and abs(c1) == 1:
        return s1, s2
    return None


def _nonzero_size_factor(f) -> bool:
    if f.is_Number:
        return f != 0
    base = f.base if isinstance(f, sympy.Pow) and f.exp.is_Integer and f.exp > 0 else f
    return isinstance(base, sympy.Symbol)


def _lower_exported(ep, injected, model, probed=None):
    from torch.export.graph_signature import InputKind, OutputKind

    low = _Lowerer(ep)
    gm = ep.graph_module
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    low.name_dims(placeholders)
    low.size_ranges(probed)
    by_name = {n.name: n for n in placeholders}
    env: dict = {}
    g = Graph()
    input_leaves = []
    constants = {**ep.state_dict, **ep.constants}
    for spec in ep.graph_signature.input_specs:
        node = by_name.get(getattr(spec.arg, "name", None))
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            tensor = constants[spec.target]
            # a buffer is the model's constant, not a weight: quantize leaves it (roles.BUFFER)
            marks = None if spec.kind == InputKind.PARAMETER else {roles.BUFFER: True}
            v = Value(TensorType(tuple(tensor.shape), tensor.dtype), param=spec.target, attrs=marks)
            g.param_values.append(v)
            g.params[spec.target] = tensor.detach()
            env[node] = v
            if spec.kind == InputKind.CONSTANT_TENSOR:
                _note_constant_tensor(low.fixed_dtypes, spec.target, tensor, node, model)
        elif spec.kind == InputKind.USER_INPUT:
            val = node.meta.get("val") if node is not None else None
            if isinstance(val, torch.Tensor):
                v = Value(low.tensor_type(val), hint=spec.arg.name)
                input_leaves.append(("tensor", len(g.inputs)))
                g.inputs.append(v)
                g.input_names.append(spec.arg.name)
                env[node] = v
            elif isinstance(val, torch.SymInt):
                raise CaptureError(f"input {spec.arg.name} is a symbolic int; pass a tensor or a constant")
            else:
                value = getattr(spec.arg, "value", val)
                input_leaves.append(("const", value))
                if node is not None:
                    env[node] = value
        else:
            raise CaptureError(f"unsupported graph input kind {spec.kind} ({spec.arg})")

    outputs = low.run_graph(gm.graph, env)
    output_leaves = []
    user_placeholders = {by_name.get(getattr(s.arg, "name", None)) for s in ep.graph_signature.input_specs
                         if s.kind == InputKind.USER_INPUT}
    overwritten = _buffers_written_before_read(ep, by_name)
    # the FX node of each flat output leaf (None for a number): the positions that
    # output_views_input, output_same_as and output_layouts name
    nodes = []
    for spec, out in zip(ep.graph_signature.output_specs, outputs):
        if spec.kind == OutputKind.BUFFER_MUTATION and spec.target in overwritten:
            continue  # every call writes it before reading it: no call sees another's value
        if spec.kind != OutputKind.USER_OUTPUT:
            raise CaptureError(f"the model mutates {spec.target or spec.arg} inside forward ({spec.kind.name}); "
                               "fxforge needs a forward pass without side effects" + _mutation_hint(spec, model))
        nodes.append(out if isinstance(out, torch.fx.Node) else None)
        value = env[out] if isinstance(out, torch.fx.Node) else out
        if isinstance(value, Value):
            output_leaves.append(("value", len(g.outputs)))
            g.outputs.append(value)
        else:
            output_leaves.append(_scalar_output(value, out.meta.get("val") if isinstance(out, torch.fx.Node) else out))
    views_input = tuple(i for i, out in enumerate(nodes) if out is not None and _views_of(out) in user_placeholders)
    same_as = {i: nodes.index(out) for i, out in enumerate(nodes) if out is not None and nodes.index(out) != i}
    layouts = _output_layouts(nodes, views_input)
    g.nodes = low.builder.nodes
    g.guards = low.guards
    if low.fixed_dtypes:
        g.signature = {**g.signature, "fixed_dtypes": tuple(low.fixed_dtypes.values())}
    in_spec = ep.call_spec.in_spec
    kwarg_order = tuple(in_spec.child(1).context) if in_spec is not None else ()
    return g, CallSpec(in_spec, input_leaves, ep.call_spec.out_spec, output_leaves, injected, kwarg_order,
                       _positional_names(model), forward_defaults(model), views_input, same_as, layouts)


def _buffers_written_before_read(ep, by_name) -> set[str]:
    """The buffers forward() overwrites whole before it reads them (transformers' LongRoPE
    copies the short or long frequencies into `inv_freq` on every call, then reads that; an
    accumulator zeroed, then added to):
    their value before the call is never read, only the shape the copy takes from it, so
    dropping the write changes nothing that any call computes."""
    from torch.export.graph_signature import InputKind

    found = set()
    for spec in ep.graph_signature.input_specs:
        node = by_name.get(getattr(spec.arg, "name", None))
        if spec.kind != InputKind.BUFFER or node is None:
            continue
        if all(user.target in _OVERWRITES and user.args[0] is node and node not in user.args[1:]
               for user in node.users):
            found.add(spec.target)
    return found


# functional forms of whole overwrites of their first argument: they read its shape, dtype
# and device, never its values (a buffer's copy_(x), zero_(), fill_(c) in forward)
_OVERWRITES = (torch.ops.aten.copy.default, torch.ops.aten.zero.default, torch.ops.aten.fill.Scalar)


def _views_of(node):
    """The FX node `node` is a view of, through ops whose result aliases their first input
    (view, slice, transpose, ... by their schema), or `node` itself."""
    return _view_chain(node)[-1]


def _view_chain(node) -> list:
    """`node`, then each node it is a view of, down to the first that is no view. A
    `contiguous` in the graph copied at the example (a no-op one is traced as
    _MarkNoOpContiguous's `alias`): its result is a tensor of its own, not a view."""
    chain = [node]
    while node.op == "call_function" and node.args and isinstance(node.args[0], torch.fx.Node):
        schema = getattr(node.target, "_schema", None)
        alias = schema.returns[0].alias_info if schema is not None and schema.returns else None
        if alias is None or alias.is_write or node.target is torch.ops.aten.contiguous.default:
            break
        node = node.args[0]
        chain.append(node)
    return chain


def _output_layouts(nodes: list, views_input: tuple) -> dict:
    """CallSpec.output_layouts from the output leaves' FX nodes: a view of an input that a
    no-op `contiguous()` made (CONTIGUOUS where it is the last op: eager copies an input
    that is not contiguous; CONTIGUOUS_BASE where views follow it), and any other output
    whose example value eager made contiguous."""
    layouts = {}
    for i, node in enumerate(nodes):
        if node is None:
            continue
        if i in views_input:
            chain = _view_chain(node)
            marks = [n for n in chain[:-1] if n.target is torch.ops.aten.alias.default]
            if marks:
                layouts[i] = CONTIGUOUS if marks[0] is node else CONTIGUOUS_BASE
        elif _example_contiguous(node):
            layouts[i] = CONTIGUOUS
    return layouts


def _example_contiguous(node) -> bool:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return False
    try:  # symbolic strides: their values at the example (export's guards are done by now)
        return bool(val.is_contiguous())
    except Exception:  # noqa: BLE001 (a size export could not hint: layout unknown)
        return False


class _MarkNoOpContiguous(torch.overrides.TorchFunctionMode):
    """`x.contiguous()` on a contiguous x returns x itself before any op is dispatched, so
    the trace would not show it, and `return x.contiguous()` would read as `return x`
    (a view of the caller's input, where eager copies an input that is not contiguous).
    Under this mode such a call is traced as `aten.alias(x)`, which the lowering drops
    and _output_layouts reads as the mark of eager's contiguous(). Only the traced (fake)
    tensors are marked: export's own work on real tensors keeps `contiguous() is x`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        from torch._subclasses.fake_tensor import FakeTensor

        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if (func is torch.Tensor.contiguous and args and out is args[0] and isinstance(out, FakeTensor)
                and kwargs.get("memory_format", torch.contiguous_format) is torch.contiguous_format):
            return torch.ops.aten.alias.default(out)
        return out


def _note_constant_tensor(fixed_dtypes: dict, target: str, tensor: torch.Tensor, node, model):
    """Record a float constant tensor the graph reads that is not a parameter or buffer: a
    plain tensor attribute, or a tensor made in forward (`torch.tensor([...])`), which
    torch.export lifts to a constant input. model.to(dtype) converts parameters and buffers
    only: such a tensor keeps its dtype (or, made with `dtype=x.dtype`, follows x; the
    capture cannot tell the two apart), so `to(dtype)` refuses another dtype where one of
    more than 0 dims is read (its dtype promotes the result) or a 0-dim one holds a
    torch.finfo value of its dtype (an fp16 model would compute another). A 0-dim one is
    otherwise retyped: torch's promotion lets the tensor operands' dtype win over it."""
    if not tensor.is_floating_point():
        return
    finfo = finfo_name(float(tensor.item()), tensor.dtype) if tensor.dim() == 0 else None
    if tensor.dim() == 0 and finfo is None:
        return
    from .capture_cache import _lookup  # (capture_cache imports this module)

    made = "a plain tensor attribute (not a parameter or buffer)" if _lookup(model, target) is not None \
        else "a tensor made in forward, e.g. torch.tensor(...)"
    users = [u for u in (node.users if node is not None else ()) if u.op == "call_function"]
    where = _source(users[0]) if users else ""
    what = f"{tuple(tensor.shape)}" if tensor.dim() else f"= {tensor.item():.6g}, {finfo}"
    fixed_dtypes[("constant", target)] = (
        tensor.dtype, roles.FIXED_CONSTANT, f"the constant tensor {target!r} {tensor.dtype} {what}: {made}"
                                            f"{f' read in {where}' if where else ''}")


_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _mutation_hint(spec, model) -> str:
    """What to do about a buffer forward() writes, where the usual cause is known."""
    target = str(spec.target or "")
    if target.rsplit(".", 1)[-1] in _RUNNING_STATS:
        return (": call model.eval() before optimize() (BatchNorm in training mode updates its running "
                "statistics)")
    rope = _rope_type(model)
    if target.rsplit(".", 1)[-1] in ("inv_freq", "original_inv_freq") and rope == "dynamic":
        return (f": the rotary embedding is rope_type={rope!r}, whose frequencies transformers recomputes inside "
                "forward() by the sequence length; fxforge captures rope_type 'default', 'linear', 'yarn', 'llama3' "
                "and 'longrope'")
    if getattr(model, "training", False):
        return ": call model.eval() before optimize() if the write is a training-mode update"
    return ""


def _scalar_output(value, val) -> tuple:
    """The output leaf of a model's output that is not a tensor. A size or a number computed
    from sizes (`x.shape[1]`, `x.numel()`, `x.shape[1] ** 0.5`) is ("size", [its Python type,
    size_text]): the module computes it at each call's sizes, as eager returns it; a number
    (the same at every size) is ("const", the Python int, float or bool); anything else
    ("const", value)."""
    if not isinstance(value, sympy.Basic):
        return ("const", value)
    kind = next((name for name, types in (("bool", (bool, torch.SymBool)), ("int", (int, torch.SymInt)),
                                          ("float", (float, torch.SymFloat))) if isinstance(val, types)), None)
    if kind is None:
        kind = "bool" if isinstance(value, sympy.logic.boolalg.Boolean) else "int" if value.is_integer else "float"
    if not value.free_symbols:
        return ("const", {"bool": bool, "int": int, "float": float}[kind](value))
    return ("size", [kind, size_text(value)])


def _positional_names(model) -> tuple:
    """The names of forward()'s leading positional parameters, in order."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return ()
    names = []
    for p in params:
        if p.kind not in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            break
        names.append(p.name)
    return tuple(names)


def positional_call_spec(graph: Graph) -> CallSpec:
    """The call spec of a graph with no model behind it (a parsed .ir): its user inputs,
    positionally, in order; its outputs as one tensor or a tuple."""
    from .roles import user_inputs

    users = user_inputs(graph)
    _, in_spec = pytree.tree_flatten((tuple(range(len(users))), {}))
    outs = tuple(range(len(graph.outputs)))
    _, out_spec = pytree.tree_flatten(outs[0] if len(outs) == 1 else outs)
    return CallSpec(in_spec, [("tensor", graph.inputs.index(v)) for v in users], out_spec,
                    [("value", i) for i in outs], {}, (), tuple(v.hint or f"in{i}" for i, v in enumerate(users)))


def _signature(spec: CallSpec) -> str:
    """The call the graph was captured with, as forward(a, b, c=..., d=...)."""
    n_args = spec.in_spec.child(0).num_children if spec.in_spec is not None else 0
    names = [_position_name(spec, i) for i in range(n_args)]
    names += [f"{k}=..." for k in spec.kwarg_order if k not in spec.injected_kwargs]
    return f"forward({', '.join(names)})"


def _describe_call(spec: CallSpec) -> str:
    n_args = spec.in_spec.child(0).num_children if spec.in_spec is not None else 0
    names = [_position_name(spec, i) for i in range(n_args)]
    user_kwargs = [k for k in spec.kwarg_order if k not in spec.injected_kwargs]
    parts = []
    if n_args:
        parts.append(f"{n_args} positional argument(s) ({', '.join(names)})")
    if user_kwargs:
        parts.append(f"keyword argument(s) {user_kwargs}")
    return " and ".join(parts) or "no arguments"


def _position_name(spec: CallSpec, i: int) -> str:
    return spec.positional_names[i] if i < len(spec.positional_names) else f"arg{i}"


def _differs(name: str, want, got) -> str:
    """How the call's argument `name` differs from the capture's, in words: at the first
    place inside it where they differ (batch['others'], a list of 2 that is now 3)."""
    name, want, got = _first_difference(name, want, got)
    text = f"{name} was captured as {_shape_of(want)}, but is {_shape_of(got)}"
    if (want.type is dict and got.type is dict and sorted(want.context) == sorted(got.context)
            and list(want.context) != list(got.context)):
        # not reordered for the caller: model code that iterates over the dict (a cat of its
        # values, a sum) computes in the order it was given, and the graph holds the capture's
        text += (" (the same keys in another order: pass them in the captured order, since the model's code may "
                 "iterate over the dict and the graph computes in the captured order)")
    return text


def _first_difference(name: str, want, got) -> tuple:
    """(path, want, got) at the outermost place where two TreeSpecs differ: the node itself
    where its kind, keys or length differ, else the first child that differs."""
    same_node = (want.is_leaf() == got.is_leaf() and want.type is got.type and want.context == got.context
                 and want.num_children == got.num_children)
    if not same_node:
        return name, want, got
    for i in range(want.num_children):
        a, b = want.child(i), got.child(i)
        if a != b:
            key = want.context[i] if want.type is dict else i
            return _first_difference(f"{name}[{key!r}]", a, b)
    return name, want, got


def _shape_of(tree) -> str:
    """A TreeSpec in words: what one argument was (or is)."""
    if tree.is_leaf():
        return "a tensor or value"
    if tree.type is None or tree.type is type(None):
        return "None"
    if tree.type is dict:
        return f"a dict with keys {list(tree.context)}"
    return f"a {tree.type.__name__} of {tree.num_children}"


def _bind_call(spec: CallSpec, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call's arguments bound to the captured call's structure: an argument captured by
    position may be passed by keyword, and one captured by keyword may be passed by position
    (forward()'s parameter names say which position is which); anything else that does not
    match is a TypeError naming the argument and the captured signature."""
    n_args = spec.in_spec.child(0).num_children if spec.in_spec is not None else 0
    names = spec.positional_names
    captured_kw = [k for k in spec.kwarg_order if k not in spec.injected_kwargs]
    sig = _signature(spec)
    args, kwargs = list(args), dict(kwargs)
    for i in range(min(len(args), n_args)):
        if _position_name(spec, i) in kwargs:
            raise TypeError(f"the optimized model got multiple values for argument {_position_name(spec, i)!r} "
                            f"(positionally and by keyword); it was captured as {sig}")
    # extra positional arguments: keyword arguments of the capture, passed by position
    for i in range(n_args, len(args)):
        name = names[i] if i < len(names) else None
        if _at_its_default(spec, name, args[i]) and name not in captured_kw:
            continue  # forward()'s own default: the call without it
        if name is None or name not in captured_kw:
            what = f" (forward()'s {name}, which the capture did not include)" if name else ""
            raise TypeError(f"the optimized model was captured as {sig}; got an extra positional argument "
                            f"{_brief(args[i])} at position {i}{what}: call it with the arguments of the capture, "
                            "or optimize again with example inputs that include this argument")
        if name in kwargs:
            raise TypeError(f"the optimized model got multiple values for argument {name!r} (positionally and by "
                            f"keyword); it was captured as {sig}")
        kwargs[name] = args[i]
    del args[n_args:]
    # missing positional arguments: passed by keyword
    for i in range(len(args), n_args):
        name = _position_name(spec, i)
        if name not in kwargs:
            raise TypeError(f"the optimized model was captured as {sig}; the call is missing {name} "
                            f"(positional argument {i})")
        args.append(kwargs.pop(name))
    kwargs = {k: v for k, v in kwargs.items() if k in spec.kwarg_order or not _at_its_default(spec, k, v)}
    unknown = sorted(k for k in kwargs if k not in spec.kwarg_order)
    if unknown:
        raise TypeError(f"keyword argument(s) {unknown} were not given at optimize() time; the optimized model was "
                        f"captured with {_describe_call(spec)}, as {sig}: call it the same way, or optimize again "
                        "with example_kwargs naming these arguments")
    missing = [k for k in captured_kw if k not in kwargs]
    if missing:
        raise TypeError(f"the optimized model was captured as {sig}; the call is missing {', '.join(missing)}: "
                        "pass every argument the example inputs had (an argument left out would need a graph of "
                        "its own: optimize again without it)")
    return tuple(args), kwargs


def _at_its_default(spec: CallSpec, name, value) -> bool:
    """Whether `value` is forward()'s default for `name`: passing it is the call without it."""
    return name in spec.default_kwargs and same_constant(value, spec.default_kwargs[name])


def _brief(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"(a {x.dtype} tensor of shape {list(x.shape)})"
    text = repr(x)
    return text if len(text) <= 60 else text[:57] + "..."


def _structure_problem(spec: CallSpec, args: tuple, kwargs: dict) -> str:
    """Which argument's structure (nesting, None vs a tensor, a tuple's length) differs."""
    if spec.in_spec is None or spec.in_spec.num_children != 2:
        return "the arguments' structure differs"
    for i, a in enumerate(args):
        want, got = spec.in_spec.child(0).child(i), pytree.tree_flatten(a)[1]
        if want != got:
            return _differs(_position_name(spec, i), want, got)
    kw = spec.in_spec.child(1)
    for j, k in enumerate(kw.context):
        want, got = kw.child(j), pytree.tree_flatten(kwargs.get(k))[1]
        if want != got:
            return _differs(k, want, got)
    return "the arguments' structure differs"


def _checked_use_cache(kwargs: dict) -> dict:
    """The call's use_cache where fxforge chose it (use_cache=False injected): None is the
    model's default call, which the graph computes; True asks for a cache the graph does not
    return."""
    value = kwargs["use_cache"]
    if value is None:
        return {k: v for k, v in kwargs.items() if k != "use_cache"}
    if value is not False:
        raise ValueError(f"use_cache={value!r}: fxforge's forward returns no KV cache (past_key_values); a call "
                         "without use_cache returns the model's other outputs. For cached decoding optimize with "
                         "fxforge.optimize(model, example_inputs, kv_cache=True) and call fast.generate()")
    return kwargs


def flatten_call(spec: CallSpec, args, kwargs) -> list:
    """The model's call arguments -> flat leaves, in the order the graph was captured with."""
    args, kwargs = _bind_call(spec, tuple(args), dict(kwargs))
    if "use_cache" in spec.injected_kwargs and "use_cache" in kwargs:
        kwargs = _checked_use_cache(kwargs)
    if kwargs.get("use_cache", True) is False and "use_cache" in spec.injected_kwargs and "position_ids" in (
            set(spec.kwarg_order) | set(spec.positional_names[:len(args)])):
        # the graph computes the model's default call, whose masks ignore packed sequences
        # (_masks_as_with_cache); eager's use_cache=False reads position_ids as packed sequences
        raise TypeError(f"the optimized model was captured as {_signature(spec)}, the model's default call "
                        "(use_cache not given), whose attention masks treat position_ids as one sequence per "
                        "row; with use_cache=False the model reads position_ids that restart as packed "
                        "sequences and masks otherwise: call it without use_cache, or optimize again with "
                        "use_cache=False in example_kwargs")
    merged = {**spec.injected_kwargs, **kwargs}
    ordered = {k: merged[k] for k in spec.kwarg_order if k in merged}
    leaves, tree = pytree.tree_flatten((tuple(args), ordered))
    if tree != spec.in_spec:
        raise TypeError(f"the optimized model was captured as {_signature(spec)}, and "
                        f"{_structure_problem(spec, args, ordered)}; call it as the example inputs were given, or "
                        "optimize again with example inputs of the new structure (the graph takes one input per "
                        "tensor the capture saw)")
    return leaves
