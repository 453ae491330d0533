"""ATen -> IR lowering rules, one table.

Each rule gets a `LowerCtx` (builder + helpers), the fx node's arguments with fx nodes
already replaced by IR values (tensors) or sympy expressions (SymInts), and its kwargs.
It returns a Value, a tuple of Values (for multi-result ops), or the same input Value
(an identity). Any ATen op missing from `RULES` becomes an opaque `torch_call`.
Rules may also return `FALLBACK` to ask for the opaque call (e.g. dropout in training).
"""
from __future__ import annotations

import math
from typing import Callable

import sympy
import torch

from . import roles
from .builder import Builder
from .graph import Value
from .einsum import plan as einsum_plan, product_plan
from .types import TensorType, as_dim, dims_equal, promote

FALLBACK = object()
DROP = object()  # asserts and other nodes with no value


class LowerCtx:
    """What a rule needs besides its arguments: the builder and the fx node's own result
    type (shapes from torch.export's metadata are exact, so views use them directly)."""

    def __init__(self, builder: Builder, out_types: list | None, node=None, fixed_dtypes: dict | None = None):
        self.b = builder
        self.out_types = out_types
        self.node = node  # the fx node lowered (its meta says which torch function the model called)
        # (dtype, module class, call) -> (dtype, where) for each no-op cast the model's code
        # asked for by a fixed float dtype (`x.float()` on a float32 x): capture writes the
        # values into the graph's signature, and `to(dtype)` refuses another dtype where
        # there are any (runtime/retarget.py)
        self.fixed_dtypes = fixed_dtypes

    @property
    def out_shape(self):
        return self.out_types[0].shape

    @property
    def out_dtype(self):
        return self.out_types[0].dtype

    def tensor(self, x, like=()) -> Value:
        """A Value for a tensor operand, or a 0-dim const for a Python/sympy scalar, typed
        as `_const_dtype` says for the op's tensor operands `like`."""
        if isinstance(x, Value):
            return x
        return self.b.const(x, _const_dtype(x, like))

    def pointwise(self, op: str, *xs, cond: Value | None = None):
        """`op` on `xs` (tensor Values and Python/sympy scalars; `where` takes its `cond`
        first), promoted as torch promotes them: dimensioned tensors over 0-dim tensors
        over Python scalars, each within its category (torch.result_type).

        A scalar becomes a 0-dim constant, which the IR promotes as a 0-dim tensor. That is
        torch's answer wherever a dimensioned tensor takes part (a 0-dim one of the same
        category never wins over it), not where every tensor operand is 0-dim too:
        `where(mask, torch.tensor(0.0, dtype=bf16), finfo.min)` is bf16 in torch, a f32
        constant would make it f32. There the constant takes the result dtype where it
        holds the scalar exactly (the same number, so every kernel computes the same);
        otherwise the 0-dim tensors are viewed as [1] (dimensioned, so they win, and the
        constant keeps its value: bf16 kernels compute with a Python scalar in float32,
        not rounded to bf16) and the result viewed back. FALLBACK (torch runs the op)
        where neither gives torch's dtype."""
        like = tuple(x for x in xs if isinstance(x, Value))
        dtypes = [None if isinstance(x, Value) else _const_dtype(x, like) for x in xs]
        want = _torch_result_dtype(xs)
        rows = False
        if want is not None and _promoted(xs, dtypes, rows) != want:
            scalars = [x for x in xs if not isinstance(x, Value)]
            if all(_holds_exactly(x, want) for x in scalars):
                dtypes = [d if d is None else want for d in dtypes]
            elif all(v.rank == 0 for v in like):
                rows = True
            else:
                return FALLBACK
            if _promoted(xs, dtypes, rows) != want:
                return FALLBACK
        values = [self.b.const(x, d) if not isinstance(x, Value) else self.emit("unsqueeze", x, dim=0) if rows else x
                  for x, d in zip(xs, dtypes)]
        out = self.emit(op, *([cond] if cond is not None else []), *values)
        if rows and (cond is None or cond.rank == 0):
            out = self.emit("squeeze", out, dims=(0,))
        return out

    def emit(self, op, *inputs, **attrs):
        return self.b.emit(op, *inputs, **attrs)


def _is_float_scalar(x) -> bool:
    if isinstance(x, bool):
        return False
    return isinstance(x, float) or (isinstance(x, sympy.Basic) and x.is_number and not x.is_integer
                                    and x.is_real)


def _has_float_tensor(like) -> bool:
    return any(isinstance(v, Value) and isinstance(v.type, TensorType) and v.type.dtype.is_floating_point
               for v in like)


def _computes_in_float64(like) -> bool:
    types = [v.type for v in like if isinstance(v, Value) and isinstance(v.type, TensorType)]
    return bool(types) and promote(*types) == torch.float64


def _scalar_sample(x):
    """A Python number of x's kind: bool, int, float or complex is all that torch's
    promotion reads of a scalar (a size expression `T` is an int, `T / 2` a float)."""
    if isinstance(x, (bool, complex)):
        return x
    if isinstance(x, sympy.logic.boolalg.Boolean) and not isinstance(x, sympy.Expr):
        return True  # a size condition (`T >= 7`): a bool (a Symbol is a Boolean too, and an Expr)
    if isinstance(x, int) or (isinstance(x, sympy.Basic) and x.is_integer):
        return 1
    return 1.0


def _const_dtype(x, like) -> torch.dtype:
    """The dtype of the constant for scalar `x` among the tensor operands `like`: torch's
    default for its kind (float32 for a float, int64 for an int...). A Python float is a
    weak scalar in torch: a double that the op converts to the dtype it computes in. Where
    the tensor operands promote to float64 (`x * 0.044715` in a float64 model) it is a
    float64 constant, the model's exact value, not one rounded to float32 first."""
    if _is_float_scalar(x) and _computes_in_float64(like):
        return torch.float64
    if _is_float_scalar(x) and _has_float_tensor(like):
        # among float tensors the op computes in theirs, whatever torch.set_default_dtype
        # says: a float16 default must not round `x * 0.1` or an eps to float16 first
        return torch.float32
    return torch.tensor(_scalar_sample(x)).dtype


def _torch_result_dtype(xs) -> torch.dtype | None:
    """torch.result_type of an op's operands, one of them a Python scalar; None where there
    is nothing to decide (no scalar, no tensor, a non-tensor Value). The rules here give an
    op one scalar at most beside its tensors; those are folded into one tensor of their
    promoted dtype, dimensioned if any of them is."""
    tensors = [x for x in xs if isinstance(x, Value)]
    scalars = [x for x in xs if not isinstance(x, Value)]
    if len(scalars) != 1 or not tensors or not all(isinstance(v.type, TensorType) for v in tensors):
        return None
    types = [v.type for v in tensors]
    zero_dim = all(t.rank == 0 for t in types)
    tensor = torch.empty(() if zero_dim else (1,), dtype=promote(*types), device="meta")
    return torch.result_type(tensor, _scalar_sample(scalars[0]))


def _promoted(xs, const_dtypes, rows: bool) -> torch.dtype:
    """The dtype the IR promotes the operands to, each scalar a 0-dim constant of its dtype
    in `const_dtypes`, and each tensor viewed as [1] where `rows`."""
    types = [(TensorType((1,), x.dtype) if rows else x.type) if isinstance(x, Value) else TensorType((), d)
             for x, d in zip(xs, const_dtypes)]
    return promote(*types)


def _holds_exactly(x, dtype: torch.dtype) -> bool:
    """Whether a constant of `dtype` holds the number `x` exactly (not a size expression,
    which is known only at each call)."""
    if isinstance(x, sympy.Basic):
        if not x.is_number:
            return False
        x = int(x) if x.is_integer else float(x)
    try:
        return torch.tensor(x, dtype=dtype).item() == x
    except (RuntimeError, OverflowError, TypeError):  # out of the dtype's range
        return False


def _dims(x: Value, dims) -> tuple[int, ...]:
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return tuple(range(x.rank))
    if isinstance(dims, int):
        dims = [dims]
    return tuple(d % max(x.rank, 1) for d in dims)


# -- pointwise --------------------------------------------------------------------------
def binary(op: str) -> Callable:
    def rule(c: LowerCtx, a, b, alpha=1, **_):
        b = _times_alpha(c, b, alpha, a)
        return b if b is FALLBACK else c.pointwise(op, a, b)
    return rule


def unary(op: str) -> Callable:
    return lambda c, x, **_: c.emit(op, x)


def rsub(c: LowerCtx, x, other, alpha=1):
    x = _times_alpha(c, x, alpha, other)
    return x if x is FALLBACK else c.pointwise("sub", other, x)


def _times_alpha(c: LowerCtx, x, alpha, other):
    """alpha * x of `add(other, x, alpha=alpha)`. torch computes other + alpha * x in one
    step, alpha in the operands' dtype: one rounding in floats (a multiply-add), which a
    mul and then an add are not, and a bool alpha on bools, which a mul by an int
    constant promotes to int64. FALLBACK but for integer operands, exact either way."""
    if alpha == 1:
        return x
    if any(isinstance(v, Value) and (v.dtype.is_floating_point or v.dtype.is_complex or v.dtype == torch.bool)
           for v in (x, other)) or not isinstance(alpha, int):
        return FALLBACK
    return c.pointwise("mul", x, alpha)


def bitwise(logical_op: str) -> Callable:
    def rule(c: LowerCtx, a, b):
        a, b = c.tensor(a), c.tensor(b)
        if a.dtype == torch.bool and b.dtype == torch.bool:
            return c.emit(logical_op, a, b)
        return FALLBACK
    return rule


def bitwise_not(c: LowerCtx, x):
    return c.emit("logical_not", x) if x.dtype == torch.bool else FALLBACK


def div_mode(c: LowerCtx, a, b, rounding_mode=None):
    return c.pointwise("div", a, b) if rounding_mode is None else FALLBACK


def pow_rule(c: LowerCtx, a, b):
    if isinstance(b, bool):  # torch takes `x ** True` as x ** 1; a bool tensor exponent has no kernel
        return FALLBACK
    return c.pointwise("pow", a, b)


def gelu(c: LowerCtx, x, approximate="none"):
    return c.emit("gelu", x, approximate=approximate)


def clamp(c: LowerCtx, x, min=None, max=None):
    # a bound computed from a size (x.clamp(max=x.shape[1] / 10)) is no float attr: torch
    # runs the call, the program computing the bound at each call's sizes
    if isinstance(min, (Value, sympy.Basic)) or isinstance(max, (Value, sympy.Basic)):
        return FALLBACK
    return c.emit("clamp", x, min=min, max=max)


def where(c: LowerCtx, cond, a, b):
    return c.pointwise("where", a, b, cond=c.tensor(cond))


def masked_fill(c: LowerCtx, x, mask, value):
    # masked_fill keeps x's dtype, whatever the fill value's type. A number filled into a
    # float tensor (-1e9, -10**9) is marked `fill`: torch converts it to x's dtype and raises where that dtype cannot hold
    # it (-1e9 in float16), which OptimizedModel.to(dtype) must do too (runtime/retarget.py).
    if isinstance(value, Value):
        fill = c.b.cast(value, x.dtype)
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and x.dtype.is_floating_point:
        fill = c.b.emit("const", value=float(value), dtype=x.dtype, fill=True)
    else:
        fill = c.b.const(value, x.dtype)
    return c.emit("where", mask, fill, x)


def to_dtype(c: LowerCtx, x, *args, **kwargs):
    dtype = kwargs.get("dtype")
    for a in args:
        if isinstance(a, torch.dtype):
            dtype = a
    if dtype is None:
        dtype = c.out_dtype
    out = c.b.cast(x, dtype)
    if out is x:
        _note_fixed_dtype(c, x, dtype)
    return out


# The methods by which a model's code names a float dtype of its own. `x.to(dt)` (aten's
# to.dtype, a positional dtype) counts too: the trace cannot tell `x.to(torch.float32)`
# from `x.to(other.dtype)`, so a no-op one pins (a refusal, never a wrong answer); `type()`
# and `type_as()` (GPT-2's `attn_weights.type(value.dtype)`) and a move to a device
# (`x.to(device)`, which torch records with x's own dtype) follow another tensor's dtype.
_FIXED_DTYPE_METHODS = {"float": "x.float()", "double": "x.double()", "half": "x.half()",
                        "bfloat16": "x.bfloat16()"}


def _note_fixed_dtype(c: LowerCtx, x: Value, dtype: torch.dtype):
    """Record a cast the model asked for that is a no-op at capture (its operand already
    has `dtype`): the IR drops it, but in another dtype the model would still cast there."""
    node = c.node
    if c.fixed_dtypes is None or node is None or not dtype.is_floating_point \
            or not isinstance(x.type, TensorType) or not x.dtype.is_floating_point:
        return
    method = str((node.meta.get("torch_fn") or ("", ""))[1]).rpartition(".")[2]
    if method in _FIXED_DTYPE_METHODS:
        call = _FIXED_DTYPE_METHODS[method]
    elif method == "to" and str(node.target) == "aten.to.dtype":
        call = "x.to(dtype)"
    else:
        return
    stack = node.meta.get("nn_module_stack") or {}
    path, cls = list(stack.values())[-1] if stack else ("", "")
    cls = cls.rpartition(".")[2] if isinstance(cls, str) else getattr(cls, "__name__", "")
    key = (dtype, cls, call)  # one entry per module class and call: Llama's 32 norms are one
    if key not in c.fixed_dtypes:
        where = f"{path or 'the model'}{f' ({cls})' if cls else ''}"
        c.fixed_dtypes[key] = (dtype, roles.FIXED_CAST, f"{call} in {where}")


def type_as(c: LowerCtx, x, other):
    return c.b.cast(x, other.dtype)


def identity(c: LowerCtx, x, *args, **kwargs):
    return x


def dropout(c: LowerCtx, x, p, train):
    return x if (not train or p == 0) else FALLBACK


# -- reductions ---------------------------------------------------------------------------
def reduce(op: str) -> Callable:
    def rule(c: LowerCtx, x, dims=None, keepdim=False, dtype=None):
        attrs = {"dims": _dims(x, dims), "keepdim": keepdim}
        if op in ("sum", "mean"):
            attrs["dtype"] = dtype
        return c.emit(op, x, **attrs)
    return rule


def reduce_all(op: str) -> Callable:
    """sum(x) / max(x) with no dims: the same reduction over every dim."""
    over_dims = reduce(op)
    return lambda c, x, dtype=None: over_dims(c, x, None, False, dtype)


def softmax_int(op: str) -> Callable:
    def rule(c: LowerCtx, x, dim, dtype=None):
        return c.emit(op, x, dim=dim % x.rank, dtype=dtype)
    return rule


def softmax_internal(op: str) -> Callable:
    def rule(c: LowerCtx, x, dim, half_to_float=False):
        return c.emit(op, x, dim=dim % x.rank, dtype=torch.float32 if half_to_float else None)
    return rule


def layer_norm(c: LowerCtx, x, shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    inputs = [x] + [t for t in (weight, bias) if t is not None]
    return c.b.emit("layer_norm", *inputs, shape=tuple(shape), eps=float(eps),
                    weight=weight is not None, bias=bias is not None)


def rms_norm(c: LowerCtx, x, shape, weight=None, eps=None):
    inputs = [x] + ([weight] if weight is not None else [])
    return c.b.emit("rms_norm", *inputs, shape=tuple(shape), eps=None if eps is None else float(eps),
                    weight=weight is not None)


# -- views --------------------------------------------------------------------------------
def view(c: LowerCtx, x, *args, **kwargs):
    return c.emit("view", x, shape=c.out_shape)


def expand(c: LowerCtx, x, *args, **kwargs):
    return c.emit("expand", x, shape=c.out_shape)


def permute(c: LowerCtx, x, dims):
    return c.emit("permute", x, dims=tuple(d % x.rank for d in dims))


def transpose(c: LowerCtx, x, d0, d1):
    dims = list(range(x.rank))
    d0, d1 = d0 % x.rank, d1 % x.rank
    dims[d0], dims[d1] = dims[d1], dims[d0]
    return c.emit("permute", x, dims=tuple(dims))


def t(c: LowerCtx, x):
    return x if x.rank < 2 else transpose(c, x, 0, 1)


def numpy_t(c: LowerCtx, x):
    """x.T: every dim reversed (falcon's FalconLinear spells x @ W.T with it)."""
    return x if x.rank < 2 else c.emit("permute", x, dims=tuple(reversed(range(x.rank))))


def matrix_t(c: LowerCtx, x):
    """x.mT (x.mH of a real tensor): the last two dims swapped."""
    return transpose(c, x, -2, -1)


def matrix_h(c: LowerCtx, x):
    if x.dtype.is_complex:  # the conjugate too: left to PyTorch
        return FALLBACK
    return transpose(c, x, -2, -1)


def slice_rule(c: LowerCtx, x, dim=0, start=None, end=None, step=1):
    dim = dim % x.rank
    size = x.shape[dim]
    start = as_dim(0 if start is None else start)
    # A negative start counts from the end, a symbolic one too (`x[:, -T:]` is start=-T):
    # the IR's start is the index torch settles on, so that the op means the same at every
    # size. A start whose sign depends on the sizes (`T - 5`) is torch's to settle per call.
    if start.is_negative:
        start = size + start
        if start.is_negative:
            start = sympy.Integer(0)
    if not start.is_nonnegative:
        raise TypeError(f"slice: the sign of start {start} depends on the sizes")
    # The end comes from the exact result length, so clamping rules (end past the size,
    # negative ends, INT64_MAX) are settled once, by torch.export's own shape logic.
    length = c.out_shape[dim]
    end = sympy.simplify(start + length * step)
    if start == 0 and step == 1 and end == size:
        return x
    return c.emit("slice", x, dim=dim, start=start, end=end, step=step)


def narrow(c: LowerCtx, x, dim, start, length):
    """x.narrow(dim, start, length): the slice [start, start + length) (a tensor start is
    torch's to settle)."""
    if isinstance(start, (torch.Tensor, Value)):
        return FALLBACK
    return slice_rule(c, x, dim, start)  # (its end comes from the result's length)


def select(c: LowerCtx, x, dim, index):
    dim = dim % x.rank
    index = as_dim(index)
    if index.is_negative:  # counted from the end, symbolic (`x[:, -T]`) or not
        index = x.shape[dim] + index
    if not index.is_nonnegative:
        raise TypeError(f"select: the sign of index {index} depends on the sizes")
    return c.emit("select", x, dim=dim, index=index)


def unsqueeze(c: LowerCtx, x, dim):
    return c.emit("unsqueeze", x, dim=dim % (x.rank + 1))


def squeeze(c: LowerCtx, x, dims=None):
    if dims is None:
        dims = tuple(i for i, s in enumerate(x.shape) if s == 1)
    elif isinstance(dims, int):
        dims = (dims,)
    dims = tuple(d % x.rank for d in dims if x.shape[d % x.rank] == 1)
    return c.emit("squeeze", x, dims=dims) if dims else x


def cat(c: LowerCtx, tensors, dim=0):
    tensors = [c.tensor(t) for t in tensors]
    if len(tensors) == 1:
        return tensors[0]
    return c.emit("cat", *tensors, dim=dim % tensors[0].rank)


def repeat_interleave(c: LowerCtx, x, repeats, dim=None, output_size=None):
    if dim is None or not isinstance(repeats, int) or isinstance(repeats, bool):
        return FALLBACK  # flattening or per-element repeats: kept as torch runs it
    return c.emit("repeat_interleave", x, repeats=repeats, dim=dim % x.rank)


def split(c: LowerCtx, x, sizes, dim=0):
    dim = dim % x.rank
    total = x.shape[dim]
    if isinstance(sizes, (int, sympy.Basic)):
        if not as_dim(total).is_number:
            return FALLBACK
        chunk = int(sizes)
        sizes = [min(chunk, int(total) - s) for s in range(0, int(total), chunk)]
    outs, start = [], sympy.Integer(0)
    for s in sizes:
        outs.append(c.emit("slice", x, dim=dim, start=start, end=start + s, step=1))
        start = start + s
    return tuple(outs)


def chunk(c: LowerCtx, x, chunks, dim=0):
    size = x.shape[dim % x.rank]
    if not size.is_number:
        return FALLBACK
    return split(c, x, -(-int(size) // chunks), dim)


def unbind(c: LowerCtx, x, dim=0):
    dim = dim % x.rank
    if not x.shape[dim].is_number:
        return FALLBACK
    return tuple(c.emit("select", x, dim=dim, index=i) for i in range(int(x.shape[dim])))


# -- matmul ---------------------------------------------------------------------------------
def matmul(c: LowerCtx, a, b):
    return c.emit("matmul", a, b)


def linear(c: LowerCtx, x, w, bias=None):
    return c.b.emit("linear", *([x, w] + ([bias] if bias is not None else [])))


def addmm(c: LowerCtx, bias, a, b, beta=1, alpha=1):
    # addmm(bias, x, W) = beta * bias + alpha * (x @ W). GPT-2's Conv1D is spelled this way.
    out = c.emit("matmul", a, b)
    if alpha != 1:
        out = c.pointwise("mul", out, alpha)
    if beta != 1:
        bias = c.pointwise("mul", bias, beta)
    if out is FALLBACK or bias is FALLBACK:
        return FALLBACK
    return c.pointwise("add", out, bias) if beta != 0 else out


def baddbmm(c: LowerCtx, inp, a, b, beta=1, alpha=1):
    return addmm(c, inp, a, b, beta, alpha)


def einsum(c: LowerCtx, equation, operands, path=None):
    """A two-operand einsum that is one batched matrix product (see ir/einsum.py): views
    around a `matmul`, so attention spelled with einsum fuses like `q @ k^T`. Any other
    equation stays the opaque call."""
    operands = list(operands)
    if (not isinstance(equation, str) or len(operands) != 2 or not all(isinstance(x, Value) for x in operands)
            or operands[0].dtype != operands[1].dtype or not operands[0].dtype.is_floating_point):
        return FALLBACK
    p = einsum_plan(equation, [x.shape for x in operands])
    if p is None:
        return _einsum_product(c, equation, operands)
    a, b = (_einsum_operand(c, x, o) for x, o in zip(operands, (p.a, p.b)))
    out = c.emit("matmul", a, b)
    if p.squeeze:
        out = c.emit("squeeze", out, dims=p.squeeze)
    if p.out_dims != tuple(range(out.rank)):
        out = c.emit("permute", out, dims=p.out_dims)
    if c.out_types is not None and not (out.rank == len(c.out_shape)
                                        and all(dims_equal(x, y) for x, y in zip(out.shape, c.out_shape))):
        return FALLBACK  # (cannot happen for a plan; the emitted nodes would be dead code)
    return out


def _einsum_product(c: LowerCtx, equation: str, operands: list) -> Value:
    """An einsum that sums no index ('i,j->ij'): the operands' broadcast product (ir/einsum.py)."""
    plan = product_plan(equation, [x.rank for x in operands])
    if plan is None:
        return FALLBACK
    placed = []
    for x, o in zip(operands, plan):
        if o.dims != tuple(range(x.rank)):
            x = c.emit("permute", x, dims=o.dims)
        for dim in o.unsqueeze:
            x = c.emit("unsqueeze", x, dim=dim)
        placed.append(x)
    out = c.pointwise("mul", *placed)
    if out is FALLBACK or (c.out_types is not None and not (
            out.rank == len(c.out_shape) and all(dims_equal(x, y) for x, y in zip(out.shape, c.out_shape)))):
        return FALLBACK  # (sizes einsum broadcasts otherwise)
    return out


def _einsum_operand(c: LowerCtx, x: Value, o) -> Value:
    for _ in range(o.unsqueeze):
        x = c.emit("unsqueeze", x, dim=x.rank)
    return c.emit("permute", x, dims=o.dims) if o.dims != tuple(range(x.rank)) else x


def embedding(c: LowerCtx, w, ids, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    return c.emit("embedding", w, ids)


def index_rows(c: LowerCtx, x, indices):
    """table[ids] on a 2-D table with one integer index tensor is a row lookup: an
    embedding (a sinusoidal position table indexed by position ids, as CTRL does)."""
    if not (isinstance(x, Value) and x.rank == 2 and len(indices) == 1 and isinstance(indices[0], Value)
            and indices[0].dtype in (torch.int64, torch.int32)):
        return FALLBACK
    return c.emit("embedding", x, indices[0])


# -- creation -------------------------------------------------------------------------------
def arange(c: LowerCtx, *args, **kwargs):
    nums = [a for a in args if not isinstance(a, (torch.dtype, torch.device, torch.layout))]
    start, end, step = {1: (0, nums[0], 1) if nums else None, 2: (*nums, 1), 3: tuple(nums)}[len(nums)]
    if isinstance(start, Value) or isinstance(end, Value):
        return FALLBACK
    return c.emit("arange", start=as_dim(start) if not isinstance(start, float) else start,
                  end=as_dim(end) if not isinstance(end, float) else end, step=step, dtype=c.out_dtype)


def full_like_out(value_index: int | None, value=None):
    """zeros/ones/full/new_*/*_like: a constant of the result's shape and dtype."""
    def rule(c: LowerCtx, *args, **kwargs):
        fill = value if value_index is None else args[value_index]
        if isinstance(fill, Value):
            return FALLBACK
        return c.emit("full", shape=c.out_shape, value=fill, dtype=c.out_dtype)
    return rule


def scalar_tensor(c: LowerCtx, value, **kwargs):
    return c.b.const(value, c.out_dtype)


def tril_triu(op: str) -> Callable:
    return lambda c, x, diagonal=0: c.emit(op, x, diagonal=diagonal)


def sdpa(c: LowerCtx, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if dropout_p:
        return FALLBACK
    if scale is None:
        d = q.shape[-1]
        if not d.is_number:
            return FALLBACK
        scale = 1.0 / math.sqrt(int(d))
    inputs = [q, k, v] + ([attn_mask] if attn_mask is not None else [])
    return c.b.emit("sdpa", *inputs, causal=bool(is_causal), scale=float(scale), enable_gqa=bool(enable_gqa))


def drop(c: LowerCtx, *args, **kwargs):
    return DROP


# --------------------------------------------------------------------------------------------
_BINARY = {"add": "add", "sub": "sub", "mul": "mul", "div": "div", "maximum": "maximum",
           "minimum": "minimum", "eq": "eq", "ne": "ne", "lt": "lt", "le": "le", "gt": "gt", "ge": "ge",
           "logical_and": "logical_and", "logical_or": "logical_or"}
_UNARY = ["neg", "exp", "log", "tanh", "sigmoid", "rsqrt", "sqrt", "erf", "relu", "silu", "abs", "cos",
          "sin", "reciprocal", "logical_not", "floor", "log1p"]

RULES: dict[str, Callable] = {}
for _name, _op in _BINARY.items():
    for _overload in ("Tensor", "Scalar", "default"):
        if _overload in getattr(torch.ops.aten, _name).overloads():
            RULES[f"aten.{_name}.{_overload}"] = binary(_op)
for _name in _UNARY:
    RULES[f"aten.{_name}.default"] = unary(_name)

RULES.update({
    "aten.rsub.Scalar": rsub, "aten.rsub.Tensor": rsub,
    "aten.div.Tensor_mode": div_mode,
    "aten.pow.Tensor_Scalar": pow_rule, "aten.pow.Tensor_Tensor": pow_rule, "aten.pow.Scalar": pow_rule,
    "aten.bitwise_and.Tensor": bitwise("logical_and"), "aten.__and__.Tensor": bitwise("logical_and"),
    "aten.bitwise_or.Tensor": bitwise("logical_or"), "aten.__or__.Tensor": bitwise("logical_or"),
    "aten.bitwise_not.default": bitwise_not,
    "aten.gelu.default": gelu,
    "aten.clamp.default": clamp,
    "aten.clamp_min.default": lambda c, x, m: clamp(c, x, min=m),
    "aten.clamp_max.default": lambda c, x, m: clamp(c, x, max=m),
    "aten.where.self": where, "aten.where.ScalarOther": where, "aten.where.ScalarSelf": where,
    "aten.where.Scalar": where,
    "aten.masked_fill.Scalar": masked_fill, "aten.masked_fill.Tensor": masked_fill,
    "aten.to.dtype": to_dtype, "aten.to.dtype_layout": to_dtype, "aten._to_copy.default": to_dtype,
    "aten.to.device": to_dtype, "aten.type_as.default": type_as,
    "aten.clone.default": identity, "aten.alias.default": identity, "aten.detach.default": identity,
    "aten.lift_fresh_copy.default": identity, "aten.contiguous.default": identity,
    "aten.dropout.default": dropout,
    "aten.sum.dim_IntList": reduce("sum"), "aten.sum.default": reduce_all("sum"),
    "aten.mean.dim": reduce("mean"), "aten.mean.default": reduce_all("mean"),
    "aten.amax.default": reduce("amax"), "aten.amin.default": reduce("amin"),
    "aten.max.default": reduce_all("amax"), "aten.min.default": reduce_all("amin"),
    "aten.softmax.int": softmax_int("softmax"), "aten._softmax.default": softmax_internal("softmax"),
    "aten.log_softmax.int": softmax_int("log_softmax"),
    "aten._log_softmax.default": softmax_internal("log_softmax"),
    "aten.layer_norm.default": layer_norm, "aten.rms_norm.default": rms_norm,
    "aten.view.default": view, "aten.reshape.default": view, "aten._unsafe_view.default": view,
    "aten.flatten.using_ints": view, "aten.unflatten.int": view,
    "aten.expand.default": expand, "aten.expand_as.default": expand,
    "aten.permute.default": permute, "aten.transpose.int": transpose, "aten.t.default": t,
    "aten.numpy_T.default": numpy_t, "aten.mT.default": matrix_t, "aten.mH.default": matrix_h,
    "aten.adjoint.default": matrix_h,
    "aten.slice.Tensor": slice_rule, "aten.narrow.default": narrow, "aten.select.int": select,
    "aten.unsqueeze.default": unsqueeze,
    "aten.squeeze.dim": squeeze, "aten.squeeze.dims": squeeze, "aten.squeeze.default": squeeze,
    "aten.cat.default": cat, "aten.concat.default": cat, "aten.repeat_interleave.self_int": repeat_interleave,
    "aten.split.Tensor": split, "aten.split_with_sizes.default": split, "aten.unbind.int": unbind,
    "aten.chunk.default": chunk,
    "aten.matmul.default": matmul, "aten.mm.default": matmul, "aten.bmm.default": matmul,
    "aten.einsum.default": einsum,
    "aten.linear.default": linear, "aten.addmm.default": addmm, "aten.baddbmm.default": baddbmm,
    "aten.embedding.default": embedding, "aten.index.Tensor": index_rows,
    "aten.arange.default": arange, "aten.arange.start": arange, "aten.arange.start_step": arange,
    "aten.full.default": full_like_out(1), "aten.zeros.default": full_like_out(None, 0),
    "aten.ones.default": full_like_out(None, 1), "aten.new_zeros.default": full_like_out(None, 0),
    "aten.new_ones.default": full_like_out(None, 1), "aten.new_full.default": full_like_out(2),
    "aten.zeros_like.default": full_like_out(None, 0), "aten.ones_like.default": full_like_out(None, 1),
    "aten.full_like.default": full_like_out(1), "aten.scalar_tensor.default": scalar_tensor,
    "aten.tril.default": tril_triu("tril"), "aten.triu.default": tril_triu("triu"),
    "aten.scaled_dot_product_attention.default": sdpa,
    "aten._assert_tensor_metadata.default": drop, "aten._assert_scalar.default": drop,
    "aten.sym_constrain_range_for_size.default": drop, "aten._assert_async.msg": drop,
    "aten.sym_constrain_range.default": drop,
})


def lowered_ops() -> set[str]:
    """IR op names some ATen rule can produce, for the registry-coverage test."""
    return set(_BINARY.values()) | set(_UNARY) | {
        "const", "pow", "gelu", "clamp", "where", "cast", "sum", "mean", "amax", "amin", "softmax",
        "log_softmax", "layer_norm", "rms_norm", "view", "expand", "permute", "slice", "select",
        "unsqueeze", "squeeze", "cat", "repeat_interleave", "matmul", "linear", "embedding", "arange", "full", "tril",
        "triu", "sdpa", "torch_call", "logical_and", "logical_or", "logical_not"}


__all__ = ["RULES", "LowerCtx", "FALLBACK", "DROP", "lowered_ops"]
