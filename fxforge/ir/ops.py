"""The op registry: the single source of truth for every IR op.

Adding an op touches this one list (see `OPS` at the bottom) and, if the op is lowered
from ATen, one rule in `lowering.py`:
  - its entry: name and kind;
  - `infer`: its type rule, (input types, attrs) -> output types;
  - `reference`: a plain-torch implementation, `fn(*tensors, **attrs)`;
  - for pointwise ops, `triton`: the expression template codegen composes
    (`{0}`, `{1}` are the operands);
  - `origin`: "aten" when `lowering.py` produces it, else the pass that creates it;
  - its signature: `arity` (min, max number of tensor inputs; max None: any number) and
    `attrs`, the attribute names and types (`"dim: int, dtype?: dtype|none"`, see
    `signature.py`), which typecheck enforces before it runs the type rule.
`tests/test_registry.py` checks that every op has every entry it needs.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import sympy
import torch
import torch.nn.functional as F

from .signature import AttrSpec, check_arity, parse_attr_specs, signature_problem
from .linear_fused import ATTRS as LINEAR_FUSED_ATTRS, infer_linear_fused, linear_fused_reference
from .rope_attention import ATTRS as ROPE_ATTENTION_ATTRS, infer_rope_attention, rope_attention_reference
from .types import TensorType, Type, as_dim, broadcast_shapes, dims_equal, promote

KINDS = ("pointwise", "reduction", "view", "matmul", "creation", "constant", "fused", "opaque", "other")
# What passes ask of an op, said once on its entry instead of in a tuple inside each pass:
#   stateful       writes a state buffer: never merged, folded or dropped (kv_append, paged_kv_write)
#   needs_device   makes a tensor from nothing: its reference takes device= (const, arange, full)
#   row_safe       a new leading (batch) dim flows through it row by row; every pointwise op
#                  is (kv_cache substitutes per-row positions only through these)
#   row_reduction  reduces over explicit dims: a row kernel can take it over the last dim
#   row_op         whole row in, whole row out (softmax, norms): a row kernel can take it
#   collective     communicates with the other ranks of a process group (all_reduce): never
#                  merged, folded, dropped or evaluated at compile time, since every rank must
#                  run the same collectives in the same order
TRAITS = ("stateful", "needs_device", "row_safe", "row_reduction", "row_op", "collective")


# Attributes that take one of a few strings, as torch spells them: (op, attribute) -> the
# values allowed. A misspelt value ("Tanh") has the right type, so only this table stops it
# before the first call (torch raises there) or codegen (which would pick another formula).
ATTR_CHOICES: dict[tuple[str, str], tuple] = {
    ("gelu", "approximate"): ("none", "tanh"),
}

# The same for the string arguments of an opaque call (torch_call), by ATen op (without its
# overload; an in-place op `div_` reads as `div`) and argument name as in the op's schema.
# None is allowed where the schema's argument is optional.
TORCH_CALL_CHOICES: dict[tuple[str, str], tuple] = {
    ("gelu", "approximate"): ("none", "tanh"),
    ("div", "rounding_mode"): ("trunc", "floor"),
    ("pad", "mode"): ("constant", "reflect", "replicate", "circular"),
    ("scatter_reduce", "reduce"): ("sum", "prod", "mean", "amax", "amin"),
    ("index_reduce", "reduce"): ("prod", "mean", "amax", "amin"),
    ("scatter", "reduce"): ("add", "multiply"),
    ("segment_reduce", "reduce"): ("max", "mean", "min", "sum", "prod"),
    ("searchsorted", "side"): ("left", "right"),
    **{(fft, "norm"): ("backward", "ortho", "forward")
       for fft in ("fft_fft", "fft_ifft", "fft_rfft", "fft_irfft", "fft_fftn", "fft_ifftn", "fft_rfftn",
                   "fft_irfftn", "fft_fft2", "fft_ifft2", "fft_rfft2", "fft_irfft2", "fft_hfft", "fft_ihfft")},
}


def choice_problem(what: str, value, allowed: tuple) -> str | None:
    """The one check of an enumerated string: `what` names the attribute or argument."""
    if value in allowed and (value is None or isinstance(value, str)):
        return None
    shown = ", ".join("none" if a is None else repr(a) for a in allowed)
    near = [a for a in allowed if isinstance(a, str) and isinstance(value, str) and a.lower() == value.lower()]
    hint = f" (did you mean {near[0]!r}? the values are case-sensitive)" if near else ""
    return f"{what} must be one of {shown}, got {value!r}{hint}"


def _checking_choices(infer, op: str, choices: dict[str, tuple]):
    """`infer` that first checks the op's enumerated attributes (ATTR_CHOICES): every
    typecheck, builder and edit runs the type rule, so the check reaches them all."""
    def infer_checked(types, attrs):
        for name, allowed in choices.items():
            if name in attrs and (why := choice_problem(f"attribute {name!r} of {op}", attrs[name], allowed)):
                raise IRTypeError(why)
        return infer(types, attrs)

    infer_checked.__wrapped__ = infer
    return infer_checked


@dataclass(frozen=True)
class OpDef:
    name: str
    kind: str
    infer: Callable[[list[Type], dict], list[Type] | None]
    reference: Callable[..., Any]
    triton: str | None = None
    origin: str = "aten"
    doc: str = ""
    arity: tuple[int, int | None] = (1, 1)
    attrs: str = ""
    traits: frozenset = frozenset()  # names from TRAITS
    # `attrs` parsed once, when the entry is built (so a typo in a declaration fails early)
    attr_specs: dict[str, AttrSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "arity", check_arity(self.arity))
        object.__setattr__(self, "attr_specs", parse_attr_specs(self.attrs))
        traits = frozenset(self.traits) | ({"row_safe"} if self.kind == "pointwise" else set())
        unknown = traits - set(TRAITS)
        if unknown:
            raise ValueError(f"op {self.name}: unknown trait(s) {sorted(unknown)}; traits are {TRAITS}")
        object.__setattr__(self, "traits", traits)
        choices = {attr: allowed for (op, attr), allowed in ATTR_CHOICES.items() if op == self.name}
        if choices and not hasattr(self.infer, "__wrapped__"):
            object.__setattr__(self, "infer", _checking_choices(self.infer, self.name, choices))

    def has(self, trait: str) -> bool:
        return trait in self.traits


class IRTypeError(TypeError):
    pass


# --------------------------------------------------------------------------------------
# type rules
def _t(types, i=0) -> TensorType:
    t = types[i]
    if not isinstance(t, TensorType):
        raise IRTypeError(f"operand {i} must be a tensor, got {t}")
    return t


def _norm_dim(d: int, rank: int) -> int:
    if not -max(rank, 1) <= d < max(rank, 1):
        raise IRTypeError(f"dim {d} out of range for rank {rank}")
    return d % max(rank, 1)


def infer_pointwise(types, attrs):
    shapes = [_t(types, i).shape for i in range(len(types))]
    return [TensorType(broadcast_shapes(*shapes), promote(*types))]


def infer_float_unary(types, attrs):
    # exp/log/... of an integer tensor gives the default float dtype, as in torch.
    t = _t(types)
    dtype = t.dtype if t.dtype.is_floating_point else torch.get_default_dtype()
    return [TensorType(t.shape, dtype)]


def infer_compare(types, attrs):
    out = infer_pointwise(types, attrs)[0]
    return [TensorType(out.shape, torch.bool)]


def infer_true_div(types, attrs):
    out = infer_pointwise(types, attrs)[0]
    dtype = out.dtype if out.dtype.is_floating_point else torch.get_default_dtype()
    return [TensorType(out.shape, dtype)]


def infer_where(types, attrs):
    cond, a, b = (_t(types, i) for i in range(3))
    shape = broadcast_shapes(cond.shape, a.shape, b.shape)
    return [TensorType(shape, promote(a, b))]


def infer_cast(types, attrs):
    return [TensorType(_t(types).shape, attrs["dtype"])]


def infer_const(types, attrs):
    return [TensorType((), attrs["dtype"])]


def infer_same(types, attrs):
    return [_t(types)]


def _reduced_shape(shape, dims, keepdim):
    rank = len(shape)
    dims = {_norm_dim(d, rank) for d in dims} if dims else set(range(rank))
    if keepdim:
        return tuple(sympy.Integer(1) if i in dims else s for i, s in enumerate(shape))
    return tuple(s for i, s in enumerate(shape) if i not in dims)


def infer_sum(types, attrs):
    t = _t(types)
    dtype = attrs.get("dtype")
    if dtype is None:
        # torch.sum promotes bool and integers to int64
        dtype = t.dtype if t.dtype.is_floating_point or t.dtype.is_complex else torch.int64
    return [TensorType(_reduced_shape(t.shape, attrs["dims"], attrs["keepdim"]), dtype)]


def infer_mean(types, attrs):
    t = _t(types)
    dtype = attrs.get("dtype") or t.dtype
    if not dtype.is_floating_point:
        raise IRTypeError(f"mean of {t} needs a float dtype")
    return [TensorType(_reduced_shape(t.shape, attrs["dims"], attrs["keepdim"]), dtype)]


def infer_minmax_reduce(types, attrs):
    t = _t(types)
    return [TensorType(_reduced_shape(t.shape, attrs["dims"], attrs["keepdim"]), t.dtype)]


def infer_softmax(types, attrs):
    t = _t(types)
    _norm_dim(attrs["dim"], t.rank)
    return [TensorType(t.shape, attrs.get("dtype") or t.dtype)]


def infer_norm(types, attrs):
    # the optional weight and bias are operands, and the flags say which are present
    want = 1 + bool(attrs["weight"]) + bool(attrs.get("bias"))
    if len(types) != want:
        raise IRTypeError(f"{_flags(attrs)} means {want} inputs, got {len(types)}")
    for i in range(len(types)):
        _t(types, i)
    return [_t(types)]


def _flags(attrs) -> str:
    return ", ".join(f"{k}={str(attrs[k]).lower()}" for k in ("weight", "bias") if k in attrs)


def infer_view(types, attrs):
    t = _t(types)
    shape = tuple(as_dim(d) for d in attrs["shape"])
    if not dims_equal(TensorType(shape, t.dtype).numel(), t.numel()):
        raise IRTypeError(f"cannot view {t} as [{', '.join(map(str, shape))}]: element counts differ")
    return [TensorType(shape, t.dtype)]


def infer_permute(types, attrs):
    t = _t(types)
    dims = [_norm_dim(d, t.rank) for d in attrs["dims"]]
    if sorted(dims) != list(range(t.rank)):
        raise IRTypeError(f"permute dims {attrs['dims']} are not a permutation of rank {t.rank}")
    return [TensorType(tuple(t.shape[d] for d in dims), t.dtype)]


def infer_expand(types, attrs):
    t = _t(types)
    shape = tuple(as_dim(d) for d in attrs["shape"])
    lead = len(shape) - t.rank
    if lead < 0:
        raise IRTypeError(f"cannot expand {t} to fewer dims {shape}")
    for i, d in enumerate(t.shape):
        if d != 1 and not dims_equal(d, shape[lead + i]):
            raise IRTypeError(f"cannot expand {t} to [{', '.join(map(str, shape))}]")
    return [TensorType(shape, t.dtype)]


def slice_length(size, start, end, step):
    """Length of x[start:end:step] along a dim of `size`, symbolically. `end` is already
    clamped to the size by the lowering (None means the whole dim)."""
    size = as_dim(size)
    end = size if end is None else as_dim(end)
    start = as_dim(start)
    n = end - start
    if step != 1:
        n = sympy.floor((n + step - 1) / step)
    return sympy.simplify(n)


def infer_slice(types, attrs):
    t = _t(types)
    dim = _norm_dim(attrs["dim"], t.rank)
    shape = list(t.shape)
    # start and end are the indices torch settles on (0 <= start <= end <= size): a
    # negative one would count from the end at run time and mean another slice
    for key in ("start", "end"):
        if attrs[key] is not None and as_dim(attrs[key]).is_negative:
            raise IRTypeError(f"slice {key}={attrs[key]} is negative: write the index it stands for "
                              f"(size + {key}), 0 <= start <= end <= size")
    shape[dim] = slice_length(shape[dim], attrs["start"], attrs["end"], attrs["step"])
    return [TensorType(tuple(shape), t.dtype)]


def infer_select(types, attrs):
    t = _t(types)
    dim = _norm_dim(attrs["dim"], t.rank)
    return [TensorType(t.shape[:dim] + t.shape[dim + 1:], t.dtype)]


def infer_unsqueeze(types, attrs):
    t = _t(types)
    dim = attrs["dim"] % (t.rank + 1)
    return [TensorType(t.shape[:dim] + (sympy.Integer(1),) + t.shape[dim:], t.dtype)]


def infer_squeeze(types, attrs):
    t = _t(types)
    dims = {_norm_dim(d, t.rank) for d in attrs["dims"]}
    return [TensorType(tuple(s for i, s in enumerate(t.shape) if not (i in dims and s == 1)), t.dtype)]


def _times_along(t: TensorType, dim: int, factor) -> TensorType:
    """`t` with dimension `dim` `factor` times as long (a repeat, a gather across ranks)."""
    d = _norm_dim(dim, t.rank)
    shape = list(t.shape)
    shape[d] = shape[d] * factor
    return TensorType(tuple(shape), t.dtype)


def infer_repeat_interleave(types, attrs):
    return [_times_along(_t(types), attrs["dim"], attrs["repeats"])]


def infer_cat(types, attrs):
    ts = [_t(types, i) for i in range(len(types))]
    ts = [t for t in ts if not (t.rank == 1 and t.shape[0] == 0)]  # torch skips empty 1-D
    dim = _norm_dim(attrs["dim"], ts[0].rank)
    shape = list(ts[0].shape)
    shape[dim] = sympy.Add(*[t.shape[dim] for t in ts])
    dtype = promote(*ts)
    for t in ts[1:]:
        for i, (a, b) in enumerate(zip(t.shape, ts[0].shape)):
            if i != dim and not dims_equal(a, b):
                raise IRTypeError(f"cat along {dim}: shapes {ts[0]} and {t} differ in dim {i}")
    return [TensorType(tuple(shape), dtype)]


def infer_matmul(types, attrs):
    a, b = _t(types, 0), _t(types, 1)
    if a.rank == 0 or b.rank == 0:
        raise IRTypeError("matmul operands must have rank >= 1")
    a_shape = a.shape if a.rank > 1 else (sympy.Integer(1),) + a.shape
    b_shape = b.shape if b.rank > 1 else b.shape + (sympy.Integer(1),)
    if not dims_equal(a_shape[-1], b_shape[-2]):
        raise IRTypeError(f"matmul {a} @ {b}: inner sizes {a_shape[-1]} and {b_shape[-2]} differ")
    batch = broadcast_shapes(a_shape[:-2], b_shape[:-2])
    shape = batch + ((a_shape[-2],) if a.rank > 1 else ()) + ((b_shape[-1],) if b.rank > 1 else ())
    return [TensorType(shape, promote(a, b))]


def infer_linear(types, attrs):
    x, w = _t(types, 0), _t(types, 1)
    if w.rank != 2 or not dims_equal(x.shape[-1], w.shape[1]):
        raise IRTypeError(f"linear: input {x} does not fit weight {w} ([out, in])")
    if len(types) > 2 and not dims_equal(_t(types, 2).shape[-1], w.shape[0]):
        raise IRTypeError(f"linear: bias {types[2]} does not fit weight {w}")
    return [TensorType(x.shape[:-1] + (w.shape[0],), promote(x, w))]


def infer_embedding(types, attrs):
    w, ids = _t(types, 0), _t(types, 1)
    if ids.dtype.is_floating_point:
        raise IRTypeError(f"embedding indices must be integers, got {ids}")
    return [TensorType(ids.shape + (w.shape[1],), w.dtype)]


def infer_arange(types, attrs):
    n = sympy.ceiling((as_dim(attrs["end"]) - as_dim(attrs["start"])) / attrs["step"])
    return [TensorType((sympy.simplify(n),), attrs["dtype"])]


def infer_full(types, attrs):
    return [TensorType(tuple(attrs["shape"]), attrs["dtype"])]


def infer_sdpa(types, attrs):
    q, k, v = (_t(types, i) for i in range(3))
    return [TensorType(q.shape[:-1] + (v.shape[-1],), q.dtype)]


def infer_recorded(types, attrs):
    """Opaque ops keep the types recorded at capture; nothing to re-derive."""
    return None


# `namespace.op.overload`: the program writes the target into its source, so it must be a
# plain dotted name and nothing else.
_TARGET = re.compile(r"[A-Za-z_]\w*\.[A-Za-z_]\w*\.[A-Za-z_]\w*")


def infer_torch_call(types, attrs):
    """What can be checked of an opaque call: its target's form and that every `$i` in
    its arguments names one of its inputs. The result types are the ones recorded."""
    if not _TARGET.fullmatch(attrs["target"]):
        raise IRTypeError(f"torch_call target {attrs['target']!r} is not an `aten.op.overload` name")
    for arg in _args_in(attrs["args"]) + _args_in(tuple(v for _, v in attrs["kwargs"])):
        if arg.index >= len(types):
            raise IRTypeError(f"${arg.index} names an input the call does not have ({len(types)} given)")
    why = _torch_call_choice_problem(attrs["target"], attrs["args"], attrs["kwargs"])
    if why:
        raise IRTypeError(why)
    return None


def _torch_call_choice_problem(target: str, args: tuple, kwargs) -> str | None:
    """An enumerated string argument of the call (TORCH_CALL_CHOICES) that holds a value
    its ATen op does not take, found by the argument's name in the op's schema."""
    given = dict(kwargs)
    for position, (name, allowed) in _enumerated_arguments(target).items():
        value = given[name] if name in given else args[position] if position < len(args) else _ABSENT
        if value is not _ABSENT and (why := choice_problem(f"{target}'s argument {name!r}", value, allowed)):
            return why
    return None


_ABSENT = object()


@functools.lru_cache(maxsize=None)
def _enumerated_arguments(target: str) -> dict[int, tuple[str, tuple]]:
    """{position in the schema: (argument name, values allowed)} for the target's
    enumerated string arguments; empty for an op not in the table or not loaded here."""
    namespace, name, overload = target.split(".")
    base = name[:-1] if name.endswith("_") else name
    wanted = {arg: allowed for (op, arg), allowed in TORCH_CALL_CHOICES.items() if op == base}
    if namespace != "aten" or not wanted:
        return {}
    try:
        schema = getattr(getattr(torch.ops.aten, name), overload)._schema
    except (AttributeError, RuntimeError):
        return {}
    return {i: (a.name, wanted[a.name] + ((None,) if str(a.type).startswith("Optional") else ()))
            for i, a in enumerate(schema.arguments) if a.name in wanted}


def _args_in(structure) -> list:
    if isinstance(structure, Arg):
        return [structure]
    if isinstance(structure, (tuple, list)):
        return [a for s in structure for a in _args_in(s)]
    return []


# --------------------------------------------------------------------------------------
# reference implementations (plain torch)
def _const(*, value, dtype, device=None, fill=False):
    return torch.tensor(value, dtype=dtype, device=device)


def _amax(x, *, dims, keepdim):
    return torch.amax(x, dim=tuple(dims), keepdim=keepdim)


def _amin(x, *, dims, keepdim):
    return torch.amin(x, dim=tuple(dims), keepdim=keepdim)


def _sum(x, *, dims, keepdim, dtype=None):
    return torch.sum(x, dim=tuple(dims) if dims else None, keepdim=keepdim, dtype=dtype)


def _mean(x, *, dims, keepdim, dtype=None):
    return torch.mean(x, dim=tuple(dims) if dims else None, keepdim=keepdim, dtype=dtype)


def _softmax(x, *, dim, dtype=None):
    return torch.softmax(x, dim, dtype=dtype)


def _log_softmax(x, *, dim, dtype=None):
    return torch.log_softmax(x, dim, dtype=dtype)


def _layer_norm(x, *params, eps, shape, weight, bias):
    w = params[0] if weight else None
    b = params[-1] if bias else None
    return F.layer_norm(x, tuple(shape), w, b, eps)


def _rms_norm(x, *params, eps, shape, weight):
    w = params[0] if weight else None
    if hasattr(F, "rms_norm"):
        return F.rms_norm(x, tuple(shape), w, eps)
    dims = tuple(range(-len(shape), 0))
    y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + (eps or torch.finfo(x.dtype).eps))
    return y * w if w is not None else y


def _slice(x, *, dim, start, end, step):
    return torch.ops.aten.slice.Tensor(x, dim, start, end, step)


def _linear(x, w, b=None):
    return F.linear(x, w, b)


def _embedding(w, ids):
    return F.embedding(ids, w)


def _arange(*, start, end, step, dtype, device=None):
    return torch.arange(start, end, step, dtype=dtype, device=device)


def _full(*, shape, value, dtype, device=None):
    return torch.full(tuple(shape), value, dtype=dtype, device=device)


def _sdpa(q, k, v, mask=None, *, causal, scale, enable_gqa=False):
    kwargs = {"enable_gqa": True} if enable_gqa else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, **kwargs)


def _gelu(x, *, approximate="none"):
    return F.gelu(x, approximate=approximate)


def _clamp(x, *, min=None, max=None):
    return torch.clamp(x, min, max)


def _cast(x, *, dtype):
    return x.to(dtype)


def _torch_call(*tensors, target, args, kwargs):
    fn = resolve_target(target)
    a = fill_args(args, tensors)
    k = fill_args(kwargs, tensors)
    return fn(*a, **dict(k))


def resolve_target(target: str):
    """'aten.index.Tensor' -> torch.ops.aten.index.Tensor; an operator not registered in
    this process (a library's custom op whose module was not imported) is an error that
    says so (ir/custom_ops.py)."""
    obj = torch.ops
    try:
        for part in target.split("."):
            obj = getattr(obj, part)
    except AttributeError as e:
        from .custom_ops import missing_op_error

        raise missing_op_error(target) from e
    return obj


class Arg:
    """A placeholder for the i-th tensor operand inside a torch_call's argument structure."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index

    def __eq__(self, other):
        return isinstance(other, Arg) and other.index == self.index

    def __hash__(self):
        return hash(("Arg", self.index))

    def __repr__(self):
        return f"${self.index}"


def fill_args(structure, tensors):
    if isinstance(structure, Arg):
        return tensors[structure.index]
    if isinstance(structure, tuple):
        return tuple(fill_args(s, tensors) for s in structure)
    if isinstance(structure, list):
        return [fill_args(s, tensors) for s in structure]
    return structure


def causal_keep(tq: int, tk: int, device=None) -> torch.Tensor:
    """[tq, tk] bool: query i sees key j iff j <= i + (tk - tq) (bottom-right aligned: the
    queries are the last tq of tk positions). Built with a comparison, not tril, which
    goes through the intra-op thread pool even for small masks and costs milliseconds a
    call when the cores are busy."""
    return torch.arange(tk, device=device)[None, :] <= torch.arange(tq, device=device)[:, None] + (tk - tq)


def window_keep(tq: int, tk: int, window: int, device=None) -> torch.Tensor:
    """[tq, tk] bool: query i (at position i + tk - tq) sees key j iff it is fewer than
    `window` positions back: (i + tk - tq) - j < window (bottom-right aligned, as causal).
    Keys after the query are not dropped here; causal drops those."""
    return torch.arange(tk, device=device)[None, :] > torch.arange(tq, device=device)[:, None] + (tk - tq - window)


def alibi_bias(slopes, tq: int, tk: int) -> torch.Tensor:
    """[1, H, tq, tk] float32: slopes[h] * (j - (i + tk - tq)), the ALiBi bias of query i
    and key j at their relative distance (bottom-right aligned: query i is at position
    i + tk - tq). A per-row constant added to it changes nothing after softmax, which is
    why models that add slopes * key_position (bloom) compute the same attention."""
    dev = slopes.device
    rel = torch.arange(tk, device=dev)[None, :] - (torch.arange(tq, device=dev)[:, None] + (tk - tq))
    return slopes.float().reshape(1, -1, 1, 1) * rel.float()


def attention_has_bias(node) -> bool:
    """Whether an attention node has a bias (mask) input: its inputs are q, k, v, [bias],
    then the slopes where alibi=True, then the sinks where sinks=True."""
    return len(node.inputs) > 3 + bool(node.attrs.get("alibi")) + bool(node.attrs.get("sinks"))


def attention_inputs(bias=None, slopes=None, sink=None, *, alibi: bool = False, sinks: bool = False):
    """(bias, slopes, sink) from the optional inputs after q, k, v, given positionally in
    the op's order (attention(q, k, v, [bias], [slopes], [sinks])): with sinks=True the last
    one given is the sinks, with alibi=True the one before it the slopes. An input in its
    own slot stays there (a caller may pass slopes positionally without alibi=True)."""
    if sinks and sink is None:  # fewer inputs than slots: the last one given is the sinks
        if slopes is not None:
            sink, slopes = slopes, None
        elif bias is not None:
            sink, bias = bias, None
    if alibi and slopes is None and bias is not None:
        slopes, bias = bias, None
    return bias, slopes, sink


def attention_reference(q, k, v, bias=None, slopes=None, sink=None, *, causal, scale, softcap=None, window=None,
                        alibi=False, sinks=False):
    """softmax(S + bias [+ alibi], causal / window bottom-right aligned) v with
    S = q k^T * scale, or tanh(S / softcap) * softcap with a soft-cap; K/V heads shared by
    groups of query heads. alibi=True: the slopes input f32[H] is read, and
    slopes[h] * (k_pos - q_pos) is added. window=W: keys W or more positions before the
    query are dropped. sinks=True: the last input f32[H] is a logit per query head that
    joins each row's softmax as one more key whose value is zero (attention sinks,
    gpt-oss): out = sum_j e^(s_j) v_j / (sum_j e^(s_j) + e^(sink)). Computed in float32
    (float64 for float64 operands)."""
    bias, slopes, sink = attention_inputs(bias, slopes, sink, alibi=alibi, sinks=sinks)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    tq, tk = q.shape[-2], k.shape[-2]
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if slopes is not None:
        s = s + alibi_bias(slopes, tq, tk).to(s.device)
    if bias is not None:
        s = s + bias.to(acc)
    if causal:
        s = s.masked_fill(~causal_keep(tq, tk, q.device), float("-inf"))
    if window is not None:
        s = s.masked_fill(~window_keep(tq, tk, int(window), q.device), float("-inf"))
    if sink is not None:
        column = sink.to(device=s.device, dtype=acc).reshape(1, -1, 1, 1).expand(*s.shape[:-1], 1)
        p = safe_softmax(torch.cat([s, column], dim=-1))[..., :-1]
    else:
        p = safe_softmax(s)
    return torch.matmul(p, v.to(acc)).to(q.dtype)


def safe_softmax(s):
    """softmax over the last dim, where a row whose every score is -inf (masked out
    entirely: no key to see) gives zeros, not NaN: SDPA's rule (aten._safe_softmax). Only
    such rows: a NaN score (NaN in q or k, q.k overflowing to inf - inf) keeps its row NaN,
    as eager's softmax does, where zeroing every NaN would hide it behind a finite answer."""
    empty = (s == float("-inf")).all(dim=-1, keepdim=True)
    return torch.softmax(s, dim=-1).masked_fill(empty, 0.0)


# The sizes attention's operands q [B, H, Tq, D], k [B, Hkv, Tk, D], v [B, Hkv, Tk, Dv] must
# share: (what, (operand, dim), (operand, dim)). V's head dim Dv is free (MLA's values are
# narrower than its queries and keys). Nothing downstream checks these: PyTorch's CPU SDPA
# with enable_gqa reads past a shorter V, and the Triton kernels index K and V with Q's
# batch and K's length.
ATTENTION_SHARED_SIZES = (
    ("batch size", ("q", 0), ("k", 0)),
    ("batch size", ("k", 0), ("v", 0)),
    ("kv heads", ("k", 1), ("v", 1)),
    ("key count", ("k", 2), ("v", 2)),
    ("head dim", ("q", 3), ("k", 3)),
)


def _check_attention_sizes(q, k, v):
    operands = {"q": q, "k": k, "v": v}
    for what, (a, i), (b, j) in ATTENTION_SHARED_SIZES:
        x, y = operands[a].shape[i], operands[b].shape[j]
        if not dims_equal(x, y):
            raise IRTypeError(f"attention: {a} and {b} differ in {what} ({x} vs {y}) in q {q}, k {k}, v {v}; "
                              f"it wants q [B, H, Tq, D], k [B, Hkv, Tk, D], v [B, Hkv, Tk, Dv]")
    if not dims_equal(sympy.Mod(q.shape[1], k.shape[1]), 0) and k.shape[1].is_number and q.shape[1].is_number:
        raise IRTypeError(f"attention: {q.shape[1]} query heads is not a multiple of {k.shape[1]} kv heads")


def _check_attention_bias(bias, q, k):
    """The bias adds to the scores [B, H, Tq, Tk]: each of its dims (aligned from the
    right, as torch broadcasts) is 1 or that size."""
    want = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    fits = bias.rank <= 4 and all(d == 1 or dims_equal(d, w) for d, w in zip(bias.shape[::-1], want[::-1]))
    if not fits:
        raise IRTypeError(f"attention: bias {bias} does not broadcast to the scores "
                          f"[{', '.join(map(str, want))}] ([B, H, Tq, Tk], each dim that size or 1)")


def infer_attention(types, attrs):
    q, k, v = (_t(types, i) for i in range(3))
    if q.rank != 4 or k.rank != 4 or v.rank != 4:
        raise IRTypeError(f"attention wants [B, H, T, D] operands, got {q}, {k}, {v}")
    _check_attention_sizes(q, k, v)
    last = len(types)
    if attrs.get("sinks"):
        if last < 4:
            raise IRTypeError("attention {sinks=true} takes its sinks f32[H] as the last input")
        sinks = _t(types, last - 1)
        if sinks.rank != 1 or not dims_equal(sinks.shape[0], q.shape[1]) or not sinks.dtype.is_floating_point:
            raise IRTypeError(f"attention: sinks must be a float [H={q.shape[1]}] tensor (one per query head), "
                              f"got {sinks}")
        last -= 1
    if attrs.get("alibi"):
        if last < 4:
            raise IRTypeError("attention {alibi=true} takes its slopes f32[H] after the bias")
        slopes = _t(types, last - 1)
        if slopes.rank != 1 or not dims_equal(slopes.shape[0], q.shape[1]) or not slopes.dtype.is_floating_point:
            raise IRTypeError(f"attention: alibi slopes must be a float [H={q.shape[1]}] tensor, got {slopes}")
        last -= 1
    if last > 4:
        raise IRTypeError("attention: an input after the bias needs alibi=true (slopes) or sinks=true (sinks)")
    if last == 4:
        _check_attention_bias(_t(types, 3), q, k)
    window = attrs.get("window")
    if window is not None and (not isinstance(window, (int, sympy.Integer)) or isinstance(window, bool) or window < 1):
        raise IRTypeError(f"attention: window must be a positive int, got {window!r}")
    softcap = attrs.get("softcap")
    if softcap is not None and not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap > 0):
        raise IRTypeError(f"attention: softcap must be a positive finite number, got {softcap!r}")
    return [TensorType(q.shape[:-1] + (v.shape[-1],), q.dtype)]


def infer_kv_append(types, attrs):
    cache, new = _t(types, 0), _t(types, 1)
    if cache.rank != 4 or new.rank != 4:
        raise IRTypeError(f"kv_append wants a [B, Hkv, S, D] cache and [B, Hkv, T, D] keys/values, got {cache}, {new}")
    if not (dims_equal(cache.shape[1], new.shape[1]) and dims_equal(cache.shape[3], new.shape[3])):
        raise IRTypeError(f"kv_append: cache {cache} and new entries {new} differ in heads or head dim")
    return [TensorType(cache.shape[:2] + (as_dim(attrs["start"]) + new.shape[2], cache.shape[3]), cache.dtype)]


def kv_append_at(cache, new, *, start):
    """kv_append with `start` a 0-d int64 device tensor (the static decode step,
    runtime/static_decode.py): `new` lands at slots start.. of rows 0..B-1 without a host
    read of `start`, and the whole buffer comes back (the key bias masks the slots past
    the new tokens), so the step's shapes are the same every token. The caller checks
    that start + T fits the buffer."""
    b, t = new.shape[0], new.shape[2]
    index = start.view(1) if t == 1 else start + torch.arange(t, device=cache.device)
    rows = cache[:b]
    rows.index_copy_(2, index, new.to(cache.dtype))
    return rows


def kv_append_reference(cache, new, *, start):
    """Write `new` into the cache at positions start..start+T (rows 0..B-1 of the buffer)
    and return the filled prefix, a view: [B, Hkv, start + T, D]. Mutates `cache`.
    With `start` a 0-d int64 device tensor: `kv_append_at`."""
    if isinstance(start, torch.Tensor):  # a device-side length: no host read
        return kv_append_at(cache, new, start=start)
    b, t = new.shape[0], new.shape[2]
    if start + t > cache.shape[2]:
        raise ValueError(f"kv_append: the KV cache holds {cache.shape[2]} positions, but {start} + {t} are needed: "
                         f"the model was optimized with a KV cache of max_seq_len={cache.shape[2]} positions, and a "
                         f"call (prompt plus generated tokens) may not run past it; to run {start + t} positions, "
                         f"optimize again with kv_cache=fxforge.KVCacheConfig(max_seq_len={start + t}) or more")
    cache[:b, :, start:start + t] = new
    return cache[:b, :, :start + t]


def infer_paged_kv_write(types, attrs):
    if len(types) == 5:  # (k_cache, v_cache, k, v, slots): a layer's K and V, one write
        k_cache, v_cache, k, v, slots = types
        return infer_paged_kv_write([k_cache, k, slots], attrs) + infer_paged_kv_write([v_cache, v, slots], attrs)
    if len(types) != 3:
        raise IRTypeError(f"paged_kv_write takes (cache, new, slots) or (k_cache, v_cache, k, v, slots), "
                          f"got {len(types)} inputs")
    cache, new, slots = _t(types, 0), _t(types, 1), _t(types, 2)
    if cache.rank != 4 or new.rank != 4:
        raise IRTypeError(f"paged_kv_write wants a [blocks, block size, Hkv, D] cache and [B, Hkv, T, D] "
                          f"keys/values, got {cache}, {new}")
    if not (dims_equal(cache.shape[2], new.shape[1]) and dims_equal(cache.shape[3], new.shape[3])):
        raise IRTypeError(f"paged_kv_write: cache {cache} and new entries {new} differ in heads or head dim")
    if slots.rank != 2 or slots.dtype.is_floating_point or not (
            dims_equal(slots.shape[0], new.shape[0]) and dims_equal(slots.shape[1], new.shape[2])):
        raise IRTypeError(f"paged_kv_write: slots must be an int [B, T] tensor matching {new}, got {slots}")
    return [cache]


def paged_kv_write_reference(*tensors):
    """paged_kv_write(cache, new, slots), or (k_cache, v_cache, k, v, slots): both written
    with the same slots, returns (k_cache, v_cache)."""
    if len(tensors) == 5:
        k_cache, v_cache, k, v, slots = tensors
        return _paged_write(k_cache, k, slots), _paged_write(v_cache, v, slots)
    return _paged_write(*tensors)


def _paged_write(cache, new, slots):
    """Write new [B, Hkv, T, D] into the slots of a paged cache [blocks, block size, Hkv, D]:
    token t of row b goes to slot slots[b, t] (block slot // block size, offset slot % block
    size); a slot of -1 is not written (a left-padding token). Returns the cache; mutates it.

    Without a host sync (a decode step on a GPU is captured as a CUDA graph): no boolean
    indexing, whose output shape is data-dependent. A skipped token is written instead to
    the slot of the first written one, with that one's value (or slot 0 gets its own value
    back when nothing is written), so entries that share a slot all carry the same value
    and the result does not depend on which write lands last."""
    flat = cache.view(-1, cache.shape[2], cache.shape[3])
    where = slots.reshape(-1).long()
    if where.device.type == "cpu" and bool((where >= flat.shape[0]).any()):  # CUDA asserts on the device
        raise ValueError(f"paged_kv_write: slot {int(where.max())} is outside the cache's {flat.shape[0]} slots "
                         f"({cache.shape[0]} blocks of {cache.shape[1]})")
    rows = new.transpose(1, 2).reshape(-1, new.shape[1], new.shape[3]).to(cache.dtype)
    keep = where >= 0
    # the first written entry (0 if none is), picked by index_select: indexing with a 0-d
    # tensor would read it on the host
    first = torch.argmax(keep.to(torch.int32)).view(1)
    some = keep.index_select(0, first)
    stand_in = torch.where(some, where.index_select(0, first), 0)
    value = torch.where(some[:, None, None], rows.index_select(0, first), flat[:1])
    flat.index_copy_(0, torch.where(keep, where, stand_in), torch.where(keep[:, None, None], rows, value))
    return cache


def paged_key_slots(block_table, row_start, keys: int, block_size: int):
    """(slot [B, keys], valid [B, keys]): where key j of row b lives in a paged cache. Row
    b's tokens are packed from its first block on: key j is its token j - row_start[b], in
    block block_table[b, (j - row_start[b]) // block_size]. Keys before the row's start are
    its left padding: not stored (valid False, slot 0)."""
    rel = torch.arange(keys, device=block_table.device)[None, :] - row_start.long()[:, None]
    valid = rel >= 0
    rel = rel.clamp(min=0)
    index = (rel // block_size).clamp(max=block_table.shape[1] - 1)
    blocks = torch.gather(block_table.long(), 1, index)
    return blocks * block_size + rel % block_size, valid


def gather_paged(cache, block_table, row_start, keys: int):
    """The dense [B, Hkv, keys, D] view of a paged cache [blocks, block size, Hkv, D]: row b's
    key j as paged_key_slots places it; padding keys read as 0."""
    slots, valid = paged_key_slots(block_table, row_start, keys, cache.shape[1])
    flat = cache.view(-1, cache.shape[2], cache.shape[3])
    dense = flat[slots] * valid[:, :, None, None].to(cache.dtype)  # [B, keys, Hkv, D]
    return dense.transpose(1, 2)


def infer_paged_attention(types, attrs):
    q, kc, vc, table, start, bias = (_t(types, i) for i in range(6))
    if kc.rank != 4 or vc.rank != 4 or not all(dims_equal(a, b) for a, b in zip(kc.shape[:3], vc.shape[:3])):
        raise IRTypeError(f"paged_attention wants K and V caches [blocks, block size, Hkv, D], got {kc}, {vc}")
    if table.rank != 2 or table.dtype.is_floating_point or start.rank != 1 or start.dtype.is_floating_point:
        raise IRTypeError(f"paged_attention: the block table must be int [B, blocks per row] and the row starts "
                          f"int [B], got {table}, {start}")
    if bias.rank != 4:
        raise IRTypeError(f"paged_attention: the key bias must be [B, 1|H, 1|T, keys], got {bias}")
    # the dense operands the kernel reads through the table: [B, Hkv, keys, D]
    keys = bias.shape[3]
    dense = [TensorType((q.shape[0], c.shape[2], keys, c.shape[3]), q.dtype) for c in (kc, vc)]
    return infer_attention([q, *dense, bias, *types[6:]], attrs)


def paged_attention_reference(q, k_cache, v_cache, block_table, row_start, bias, slopes=None, sink=None, *, causal,
                              scale, softcap=None, window=None, alibi=False, sinks=False):
    """attention(q, K, V, bias, [slopes]) where K and V are read from paged caches through
    the block table (gather_paged), over as many keys as the bias has; the caches may be of
    a narrower dtype than q (they are cast, as the dense layout casts its view)."""
    keys = bias.shape[-1]
    k = gather_paged(k_cache, block_table, row_start, keys).to(q.dtype)
    v = gather_paged(v_cache, block_table, row_start, keys).to(q.dtype)
    return attention_reference(q, k, v, bias, slopes, sink, causal=causal, scale=scale, softcap=softcap,
                               window=window, alibi=alibi, sinks=sinks)


def infer_all_gather(types, attrs):
    return [_times_along(_t(types), attrs["dim"], attrs["world_size"])]


def _check_world(op: str, world_size: int):
    """The default process group must have `world_size` ranks: a graph sharded for N ranks
    run in a process group of another size (or in one process) would give wrong numbers."""
    import torch.distributed as dist

    size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if size != world_size:
        raise RuntimeError(f"{op}: this graph was sharded for {world_size} ranks, but the process group has {size}; "
                           f"launch it with `torchrun --nproc-per-node {world_size}` (torch.distributed initialized) "
                           "or optimize the model again for this world size")


def all_reduce_reference(x, *, world_size):
    """The sum of `x` over the ranks of torch.distributed's default process group (a new
    tensor); the identity for a world of one. Backends run it on their own process group."""
    _check_world("all_reduce", world_size)
    if world_size == 1:
        return x
    import torch.distributed as dist

    out = x.contiguous().clone()
    dist.all_reduce(out)
    return out


def all_gather_reference(x, *, dim, world_size):
    """The ranks' `x` concatenated along `dim`, in rank order (default process group); the
    identity for a world of one."""
    _check_world("all_gather", world_size)
    if world_size == 1:
        return x
    import torch.distributed as dist

    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim)


def _packed(parts, qattrs, tensors):
    from .quant_formats import Packed

    return Packed.from_parts(dict(zip(parts, tensors)), dict(qattrs))


def quant_linear_reference(x, *tensors, parts, qattrs, bias):
    """Dequantize-then-matmul (ir/quant_formats.py defines the packed layouts)."""
    from .quant_formats import quant_linear_reference as ref

    packed = _packed(parts, qattrs, tensors[:len(parts)])
    return ref(x, packed, tensors[len(parts)] if bias else None)


def infer_quant_linear(types, attrs):
    x = _t(types)
    want = 1 + len(attrs["parts"]) + bool(attrs["bias"])
    if len(types) != want:
        raise IRTypeError(f"{len(attrs['parts'])} packed parts and bias={str(attrs['bias']).lower()} "
                          f"mean {want} inputs, got {len(types)}")
    n, k = dict(attrs["qattrs"])["shape"]
    if not dims_equal(x.shape[-1], k):
        raise IRTypeError(f"quant_linear: input {x} does not fit a [{n}, {k}] weight")
    return [TensorType(x.shape[:-1] + (sympy.Integer(n),), x.dtype)]


def scalar_exponent(value, dtype: torch.dtype):
    """A constant as the Python number a pow takes for its exponent, rounded to the
    constant's dtype (None: not a real number). The model ran pow(Tensor, Scalar)
    (`x.pow(2)` in an RMSNorm), which squares by x * x; a 0-dim tensor exponent takes the
    general pow kernel instead: not always the same float (the last bit of some squares
    differed) and 4-10x slower on the CPU (a decoding step's 61 RMSNorm squares: 9.4 us
    each at 6 rows against 1.8)."""
    if isinstance(value, (bool, complex)) or not isinstance(value, (int, float)) or dtype.is_complex:
        return None
    number = torch.tensor(value, dtype=dtype).item()
    return float(number) if dtype.is_floating_point else int(number)


def _run_body(operands, body, outputs, step):
    """Walk a fused_pointwise body; `step(op, args, attrs)` computes one step."""
    results = []
    for op, args, attrs in body:
        vals = [operands[int(a[2:])] if a.startswith("in") else results[int(a[1:])] for a in args]
        results.append(step(op, vals, dict(attrs)))
    return [results[int(o[1:])] for o in outputs]


_STEP_REF = re.compile(r"in\d+|t\d+")


def _check_body(n_operands: int, body, outputs):
    """A body read from text may name operands or steps that do not exist; say which,
    instead of failing with an IndexError deep in the walk."""
    for i, step in enumerate(body):
        if not (isinstance(step, tuple) and len(step) == 3 and isinstance(step[0], str)
                and isinstance(step[1], tuple) and isinstance(step[2], tuple)):
            raise IRTypeError(f"step t{i} is {step!r}, not (op, (operands...), ((attr, value)...))")
        op, args, step_attrs = step
        if op not in OPS:
            raise IRTypeError(f"step t{i}: unknown op {op!r}")
        for a in args:
            if not (isinstance(a, str) and _STEP_REF.fullmatch(a)):
                raise IRTypeError(f"step t{i}: operand {a!r} is not in<i> or t<j>")
            limit, what = (n_operands, "inputs") if a.startswith("in") else (i, "earlier steps")
            if int(a[2:] if a.startswith("in") else a[1:]) >= limit:
                raise IRTypeError(f"step t{i}: {a} is not one of the {limit} {what}")
        if not all(isinstance(kv, tuple) and len(kv) == 2 and isinstance(kv[0], str) for kv in step_attrs):
            raise IRTypeError(f"step t{i}: attrs {step_attrs!r} are not (name, value) pairs")
        why = signature_problem(OPS[op], len(args), dict(step_attrs))
        if why:
            raise IRTypeError(f"step t{i}: {why}")
    for o in outputs:
        if not (_STEP_REF.fullmatch(o) and o.startswith("t") and int(o[1:]) < len(body)):
            raise IRTypeError(f"output {o!r} is not one of the {len(body)} steps")


def into_problem(n_inputs: int, attrs) -> str | None:
    """What is wrong with a fused_pointwise node's `into` (None: nothing). Each pair
    (output k, input i) stores output k into input i, a KV cache, as kv_append would; the
    destinations are the node's last inputs, one per pair, and no body step reads them
    (the kernel never loads the buffer it writes)."""
    into = attrs.get("into") or ()
    if not into:
        return "start without into" if attrs.get("start") is not None else None
    if attrs.get("start") is None:
        return "into needs start"
    if not all(isinstance(p, tuple) and len(p) == 2 and all(isinstance(x, int) for x in p) for p in into):
        return f"into must be (output, input) pairs of ints, got {into!r}"
    dests = [i for _, i in into]
    if sorted(dests) != list(range(n_inputs - len(into), n_inputs)):
        return f"into's destinations {dests} must be the last {len(into)} inputs, one each"
    outs = [k for k, _ in into]
    if len(set(outs)) != len(outs) or not all(0 <= k < len(attrs["outputs"]) for k in outs):
        return f"into names outputs {outs}, not distinct outputs of {len(attrs['outputs'])}"
    first = n_inputs - len(into)
    if any(int(a[2:]) >= first for _, args, _ in attrs["body"] for a in args if a.startswith("in")):
        return "a body step reads a destination of into"
    return None


def infer_fused_pointwise(types, attrs):
    # `row` (the reduced row length, if the body reduces rows) does not change types
    _check_body(len(types), attrs["body"], attrs["outputs"])
    why = into_problem(len(types), attrs)
    if why:
        raise IRTypeError(f"fused_pointwise: {why}")
    outs = _run_body(list(types), attrs["body"], attrs["outputs"], lambda op, ts, a: OPS[op].infer(ts, a)[0])
    for k, i in attrs.get("into") or ():
        if attrs.get("row") is not None:
            raise IRTypeError("fused_pointwise: a row kernel cannot store into a destination")
        outs[k] = infer_kv_append([types[i], outs[k]], {"start": attrs["start"]})[0]
    return outs


def fused_pointwise_reference(*tensors, body, outputs, row=None, into=(), start=None):
    """Evaluate the fused steps one by one with each op's torch reference; an output named
    in `into` is then appended to its destination (kv_append at `start`, or with `start` a
    0-d device tensor, the static decode step's append). A pow whose exponent is a
    constant takes it as a number, as the model's `x.pow(2)` did (`scalar_exponent`)."""
    numbers = {}  # a const step's index -> its value as a pow exponent
    for k, (op, args, attrs) in enumerate(body):
        if op == "const":
            a = dict(attrs)
            numbers[k] = scalar_exponent(a["value"], a["dtype"])
    exponents = iter([numbers.get(int(args[1][1:])) if op == "pow" and len(args) == 2 and args[1].startswith("t")
                      else None for op, args, _ in body])

    def step(op, vals, a):
        number = next(exponents)
        if op == "const":
            device = tensors[0].device if tensors else None
            return OPS[op].reference(**a, device=device)
        if number is not None:
            return OPS[op].reference(vals[0], number, **a)
        return OPS[op].reference(*vals, **a)
    outs = _run_body(list(tensors), body, outputs, step)
    for k, i in into or ():
        outs[k] = kv_append_reference(tensors[i], outs[k], start=start)
    return outs[0] if len(outs) == 1 else tuple(outs)


# --------------------------------------------------------------------------------------
def _template_arity(triton: str) -> tuple[int, int]:
    """A pointwise template names each operand ({0}, {1}, ...), so it fixes the arity."""
    used = {int(i) for i in re.findall(r"\{(\d+)\}", triton)}
    return (len(used), len(used))


def _pw(name, ref, triton, infer=infer_pointwise, attrs="", doc=""):
    return OpDef(name, "pointwise", infer, ref, triton=triton, doc=doc, arity=_template_arity(triton), attrs=attrs)


def _unary_float(name, ref, triton):
    return _pw(name, ref, triton, infer_float_unary)


VARIADIC = None  # the max of an arity that takes any number of inputs
REDUCE = "dims: ints, keepdim: bool"

OPS_LIST: list[OpDef] = [
    # constants
    OpDef("const", "constant", infer_const, _const, triton="{value}",
          doc="a 0-dim constant (fill=true: a masked_fill value, which the dtype must hold)",
          arity=(0, 0), attrs="value: scalar|complex, dtype: dtype, fill?: bool", traits={"needs_device"}),
    # pointwise (the arity comes from the template)
    _pw("add", torch.add, "{0} + {1}"),
    _pw("sub", torch.sub, "{0} - {1}"),
    _pw("mul", torch.mul, "{0} * {1}"),
    _pw("div", torch.div, "{0} / {1}", infer_true_div),
    _pw("pow", torch.pow, "pow({0}, {1})"),  # codegen: small constant integer or 0.5 exponents
    # NaN in either operand gives NaN, as in torch (Triton's default returns the other one)
    _pw("maximum", torch.maximum, "tl.maximum({0}, {1}, propagate_nan=tl.PropagateNan.ALL)"),
    _pw("minimum", torch.minimum, "tl.minimum({0}, {1}, propagate_nan=tl.PropagateNan.ALL)"),
    _pw("eq", torch.eq, "{0} == {1}", infer_compare),
    _pw("ne", torch.ne, "{0} != {1}", infer_compare),
    _pw("lt", torch.lt, "{0} < {1}", infer_compare),
    _pw("le", torch.le, "{0} <= {1}", infer_compare),
    _pw("gt", torch.gt, "{0} > {1}", infer_compare),
    _pw("ge", torch.ge, "{0} >= {1}", infer_compare),
    # truth values first: a bitwise & or | of ints is not the logical one (2 & 1 is 0), nor
    # defined on floats
    _pw("logical_and", torch.logical_and, "(({0} != 0) & ({1} != 0))", infer_compare),
    _pw("logical_or", torch.logical_or, "(({0} != 0) | ({1} != 0))", infer_compare),
    _pw("logical_not", torch.logical_not, "({0} == 0)", infer_compare),
    _pw("neg", torch.neg, "-{0}", infer_same),
    _pw("abs", torch.abs, "tl.abs({0})", infer_same),
    _pw("floor", torch.floor, "tl.floor({0})", infer_same),
    _pw("relu", torch.relu, "tl.maximum({0}, 0.0, propagate_nan=tl.PropagateNan.ALL)", infer_same),
    _unary_float("exp", torch.exp, "tl.exp({0})"),
    _unary_float("log", torch.log, "tl.log({0})"),
    # log(1 + x) with 1 + x's rounding undone (Goldberg's formula): exact to float
    # precision for small x, where tl.log(1.0 + x) is not; 1 + x = inf is the answer itself
    # (the correction would be inf / inf)
    _unary_float("log1p", torch.log1p,
                 "tl.where(1.0 + {0} == 1.0, {0}, tl.where(1.0 + {0} == float(\"inf\"), 1.0 + {0}, "
                 "tl.log(1.0 + {0}) * ({0} / tl.where(1.0 + {0} == 1.0, 1.0, (1.0 + {0}) - 1.0))))"),
    # Cephes' tanhf: an odd polynomial below |x| = 0.625 (2*sigmoid(2x) - 1 cancels there:
    # tanh(2e-8) came out 0), above it (1 - e) / (1 + e) with e = exp(-2|x|) and x's sign,
    # which never overflows (|x| = inf: e = 0). x * (1 + x^2 p) keeps tanh(-0.0) = -0.0.
    # About 2 float32 ulp everywhere; no libdevice, so the interpreter runs it too
    _unary_float("tanh", torch.tanh,
                 "tl.where(tl.abs({0}) < 0.625, {0} * (1.0 + ({0} * {0}) * ((((-5.70498872745e-3 * ({0} * {0}) "
                 "+ 2.06390887954e-2) * ({0} * {0}) - 5.37397155531e-2) * ({0} * {0}) + 1.33314422036e-1) "
                 "* ({0} * {0}) - 3.33332819422e-1)), tl.where({0} < 0.0, -1.0, 1.0) * "
                 "((1.0 - tl.exp(-2.0 * tl.abs({0}))) / (1.0 + tl.exp(-2.0 * tl.abs({0})))))"),
    _unary_float("sigmoid", torch.sigmoid, "tl.sigmoid({0})"),
    _unary_float("rsqrt", torch.rsqrt, "tl.rsqrt({0})"),
    _unary_float("sqrt", torch.sqrt, "tl.sqrt({0})"),
    _unary_float("erf", torch.erf, "tl.erf({0})"),
    _unary_float("cos", torch.cos, "tl.cos({0})"),
    _unary_float("sin", torch.sin, "tl.sin({0})"),
    _unary_float("reciprocal", torch.reciprocal, "1.0 / {0}"),
    _pw("silu", F.silu, "{0} * tl.sigmoid({0})", infer_same),
    _pw("gelu", _gelu, "gelu_{approximate}({0})", infer_same, attrs="approximate?: str"),
    _pw("clamp", _clamp, "clamp({0}, {min}, {max})", infer_same, attrs="min: float|size|none, max: float|size|none"),
    _pw("cast", _cast, "{0}.to({dtype})", infer_cast, attrs="dtype: dtype"),
    _pw("where", torch.where, "tl.where({0}, {1}, {2})", infer_where),
    # reductions (over explicit dims)
    OpDef("sum", "reduction", infer_sum, _sum, attrs=f"{REDUCE}, dtype?: dtype|none", traits={"row_reduction"}),
    OpDef("mean", "reduction", infer_mean, _mean, attrs=f"{REDUCE}, dtype?: dtype|none", traits={"row_reduction"}),
    OpDef("amax", "reduction", infer_minmax_reduce, _amax, attrs=REDUCE, traits={"row_reduction"}),
    OpDef("amin", "reduction", infer_minmax_reduce, _amin, attrs=REDUCE, traits={"row_reduction"}),
    OpDef("softmax", "reduction", infer_softmax, _softmax, attrs="dim: int, dtype?: dtype|none", traits={"row_op"}),
    OpDef("log_softmax", "reduction", infer_softmax, _log_softmax, attrs="dim: int, dtype?: dtype|none"),
    OpDef("layer_norm", "reduction", infer_norm, _layer_norm, arity=(1, 3),
          attrs="shape: sizes, eps: float, weight: bool, bias: bool", doc="layer_norm(x, [weight], [bias])",
          traits={"row_op"}),
    OpDef("rms_norm", "reduction", infer_norm, _rms_norm, arity=(1, 2),
          attrs="shape: sizes, eps: float|none, weight: bool", doc="rms_norm(x, [weight])", traits={"row_op"}),
    # views and data movement
    OpDef("view", "view", infer_view, lambda x, *, shape: x.reshape(tuple(shape)), doc="reshape (copies when it must)",
          attrs="shape: sizes"),
    OpDef("permute", "view", infer_permute, lambda x, *, dims: x.permute(tuple(dims)), attrs="dims: ints",
          traits={"row_safe"}),
    OpDef("expand", "view", infer_expand, lambda x, *, shape: x.expand(tuple(shape)), attrs="shape: sizes"),
    OpDef("slice", "view", infer_slice, _slice, attrs="dim: int, start: size, end: size|none, step: int",
          traits={"row_safe"}),
    OpDef("select", "view", infer_select, lambda x, *, dim, index: x.select(dim, index), attrs="dim: int, index: size"),
    OpDef("unsqueeze", "view", infer_unsqueeze, lambda x, *, dim: x.unsqueeze(dim), attrs="dim: int",
          traits={"row_safe"}),
    OpDef("squeeze", "view", infer_squeeze, lambda x, *, dims: x.squeeze(tuple(dims)) if dims else x,
          attrs="dims: ints"),
    OpDef("cat", "other", infer_cat, lambda *xs, dim: torch.cat(xs, dim), arity=(1, VARIADIC), attrs="dim: int",
          traits={"row_safe"}),
    OpDef("repeat_interleave", "other", infer_repeat_interleave,
          lambda x, *, repeats, dim: torch.repeat_interleave(x, repeats, dim), attrs="repeats: int, dim: int",
          doc="each element `repeats` times in a row along dim (interleaved rotary tables)",
          traits={"row_safe"}),  # along a dim other than the leading one (kv_cache checks the dim)
    # matmul family
    OpDef("matmul", "matmul", infer_matmul, torch.matmul, arity=(2, 2), traits={"row_safe"}),
    OpDef("linear", "matmul", infer_linear, _linear, arity=(2, 3), doc="linear(x, weight, [bias])"),
    OpDef("embedding", "other", infer_embedding, _embedding, arity=(2, 2), doc="embedding(weight, ids)",
          traits={"row_safe"}),
    # creation
    OpDef("arange", "creation", infer_arange, _arange, arity=(0, 0),
          attrs="start: size|float, end: size|float, step: size|float, dtype: dtype", traits={"needs_device"}),
    OpDef("full", "creation", infer_full, _full, arity=(0, 0), attrs="shape: sizes, value: scalar, dtype: dtype",
          traits={"needs_device"}),
    OpDef("tril", "other", infer_same, lambda x, *, diagonal: torch.tril(x, diagonal), attrs="diagonal: size"),
    OpDef("triu", "other", infer_same, lambda x, *, diagonal: torch.triu(x, diagonal), attrs="diagonal: size"),
    # attention as torch spells it, and as fxforge fuses it
    OpDef("sdpa", "other", infer_sdpa, _sdpa, doc="torch's scaled_dot_product_attention, exact semantics",
          arity=(3, 4), attrs="causal: bool, scale: float, enable_gqa?: bool"),
    OpDef("attention", "fused", infer_attention, attention_reference, origin="fuse_attention",
          doc="fused attention(q, k, v, [bias], [slopes], [sinks]) {causal, scale, softcap?, window?, alibi?, "
              "sinks?}; K/V heads may be fewer (GQA); alibi=true: per-head slopes after the bias; sinks=true: "
              "the last input is a logit per query head that joins the softmax with a zero value",
          arity=(3, 6), attrs="causal: bool, scale: float, softcap?: float|none, window?: int|none, alibi?: bool, "
                              "sinks?: bool"),
    OpDef("kv_append", "other", infer_kv_append, kv_append_reference, origin="kv_cache",
          doc="kv_append(cache, new) {start}: write new K or V at start, return cache[:, :, :start+T]; mutates",
          arity=(2, 2), attrs="start: size", traits={"stateful"}),
    OpDef("paged_kv_write", "other", infer_paged_kv_write, paged_kv_write_reference, origin="kv_cache",
          doc="paged_kv_write(cache, new, slots): write new K or V [B, Hkv, T, D] into slots [B, T] of a paged "
              "cache [blocks, block size, Hkv, D] (-1: not written); returns the cache; mutates. "
              "paged_kv_write(k_cache, v_cache, k, v, slots): a layer's K and V, returns both caches",
          arity=(3, 5), traits={"stateful"}),
    OpDef("paged_attention", "fused", infer_paged_attention, paged_attention_reference, origin="kv_cache",
          doc="paged_attention(q, k_cache, v_cache, block_table, row_start, bias, [slopes], [sinks]) {causal, "
              "scale, softcap?, window?, alibi?, sinks?}: attention over bias.shape[-1] keys read from paged "
              "caches through the block table (row b's key j is its token j - row_start[b])",
          arity=(6, 8), attrs="causal: bool, scale: float, softcap?: float|none, window?: int|none, alibi?: bool, "
                              "sinks?: bool"),
    # tensor parallelism (passes/shard.py): collectives over the ranks of a process group
    OpDef("all_reduce", "other", infer_same, all_reduce_reference, origin="shard",
          doc="all_reduce(x) {world_size}: the sum of x over the ranks (after a row-parallel linear)",
          attrs="world_size: int", traits={"collective"}),
    OpDef("all_gather", "other", infer_all_gather, all_gather_reference, origin="shard",
          doc="all_gather(x) {dim, world_size}: the ranks' x concatenated along dim (vocabulary-parallel logits)",
          attrs="dim: int, world_size: int", traits={"collective"}),
    OpDef("fused_pointwise", "fused", infer_fused_pointwise, fused_pointwise_reference, origin="fuse_elementwise",
          doc="a chain of pointwise ops run as one kernel; body lists the steps; into=((k, i), ...) {start}: "
              "output k is kv_append(input i, its value) {start}, stored by the kernel itself (mutates)",
          arity=(0, VARIADIC), attrs="body: tuple, outputs: strs, row?: int, into?: tuple, start?: size",
          traits={"row_safe"}),
    OpDef("linear_fused", "fused", infer_linear_fused, linear_fused_reference, origin="fuse_linear_pointwise",
          doc="linear(prologue(x...), weight, [bias]) with an epilogue on column ranges of its output (and down=true: "
              "a down linear of the epilogue result, an MLP; parts/qattrs: a quant_linear's packed parts in place "
              "of the weight), one op "
              "(ir/linear_fused.py); results: the epilogue's outputs (or the linear's), then the prologue's extras",
          arity=(2, VARIADIC), attrs=LINEAR_FUSED_ATTRS),
    OpDef("rope_attention", "fused", infer_rope_attention, rope_attention_reference, origin="fuse_rope_attention",
          doc="rope_attention(q, k, v, cos, sin, k_cache, v_cache, [bias]) {causal, scale, start}: rotate-half "
              "rotary of q and k, kv_append of k' and v at start, attention over the caches (ir/rope_attention.py); "
              "mutates",
          arity=(7, 8), attrs=ROPE_ATTENTION_ATTRS, traits={"stateful"}),
    OpDef("quant_linear", "fused", infer_quant_linear, quant_linear_reference, origin="quantize",
          doc="x @ dequantize(packed weight)^T [+ bias]; parts name the packed tensors",
          arity=(2, VARIADIC), attrs="parts: strs, qattrs: pairs, bias: bool"),
    # the fallback
    OpDef("torch_call", "opaque", infer_torch_call, _torch_call, doc="any ATen op the IR does not model",
          arity=(0, VARIADIC), attrs="target: str, args: tuple, kwargs: pairs"),
]

OPS: dict[str, OpDef] = {op.name: op for op in OPS_LIST}


def get(name: str) -> OpDef:
    try:
        return OPS[name]
    except KeyError:
        raise KeyError(f"unknown IR op {name!r}; known ops: {', '.join(sorted(OPS))}") from None


def register_op(op: OpDef, registry: dict[str, OpDef] | None = None) -> OpDef:
    """Add an op (for example from a user pass). The registry is explicit, not hidden state."""
    registry = OPS if registry is None else registry
    if op.name in registry and registry[op.name] is not op:
        raise ValueError(f"IR op {op.name!r} is already registered")
    if op.kind not in KINDS:
        raise ValueError(f"op kind {op.kind!r} is not one of {KINDS}")
    registry[op.name] = op
    return op


def infer_types(op: str, types: list[Type], attrs: dict) -> list[Type] | None:
    return get(op).infer(types, attrs)


# ATen ops that draw random numbers or touch state: never merged, folded or dropped.
IMPURE_TARGETS = ("rand", "randn", "randint", "bernoulli", "dropout", "normal", "uniform", "multinomial",
                  "native_dropout", "copy_", "index_put_", "fill_", "empty")


def is_pure(node) -> bool:
    """Every IR op is a function of its inputs, except the stateful ones (they write a
    buffer; so does a fused_pointwise with `into`), the collectives (they talk to other
    ranks), and opaque calls to random or mutating ATen ops (and, to be safe, any
    in-place op, whose name ends in '_')."""
    op = OPS.get(node.op)
    if op is not None and (op.has("stateful") or op.has("collective")):
        return False
    if node.op == "fused_pointwise" and node.attrs.get("into"):  # it writes a KV cache
        return False
    if node.op != "torch_call":
        return True
    name = node.attrs["target"].split(".")[1]
    return not (name.endswith("_") or any(name.startswith(t) for t in IMPURE_TARGETS))
