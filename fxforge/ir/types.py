"""Types of IR values: tensors with symbolic shapes, and symbolic integers.

Dynamic dimensions (batch, sequence) are sympy Symbols, so one graph serves every
length and passes can reason about sizes with sympy's algebra.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property, lru_cache

import sympy
import torch

# Short dtype names used by the text form: `f32[B, T, 768]`. Every plain dtype torch has
# (a fixed number of bytes per element, not quantized: torch.qint8 and the sub-byte
# shells torch.uint4 / bits8 are not) has one, so that a model holding a tensor of any of
# them prints and parses back; the ones newer than the oldest torch fxforge runs on are
# looked up by name (_NEWER_DTYPE_NAMES).
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float64: "f64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "bool",
    torch.complex64: "c64",
    torch.complex128: "c128",
    torch.complex32: "c32",
}
_NEWER_DTYPE_NAMES = {"uint16": "u16", "uint32": "u32", "uint64": "u64",
                      "float8_e4m3fn": "f8e4m3fn", "float8_e4m3fnuz": "f8e4m3fnuz",
                      "float8_e5m2": "f8e5m2", "float8_e5m2fnuz": "f8e5m2fnuz",
                      "float8_e8m0fnu": "f8e8m0fnu", "float4_e2m1fn_x2": "f4e2m1fnx2"}
DTYPE_NAMES.update({getattr(torch, attr): name for attr, name in _NEWER_DTYPE_NAMES.items() if hasattr(torch, attr)})
DTYPES_BY_NAME: dict[str, torch.dtype] = {v: k for k, v in DTYPE_NAMES.items()}

Dim = sympy.Expr


@lru_cache(maxsize=None)
def symbol(name: str) -> sympy.Symbol:
    """The one symbol of this name. Every dynamic size is a positive integer, and sympy
    compares symbols by name *and* assumptions, so all code must build them here."""
    return sympy.Symbol(name, integer=True, positive=True)


def as_dim(d) -> sympy.Expr:
    """Normalise an int, SymInt-ish expression or sympy expression to a sympy expression."""
    if isinstance(d, sympy.Basic):
        return d
    if isinstance(d, bool):
        raise TypeError(f"a size cannot be a bool: {d!r}")
    if isinstance(d, int):
        return sympy.Integer(d)
    raise TypeError(f"not a size: {d!r} ({type(d).__name__})")


def dims_equal(a, b) -> bool:
    a, b = as_dim(a), as_dim(b)
    if a == b:
        return True
    diff = a - b
    if diff.is_number:
        return bool(diff == 0)
    if diff.is_polynomial(*diff.free_symbols):
        # expanded, a polynomial is zero only as the literal 0: no simplify (which costs about
        # a millisecond a call, and passes ask this of every slice and select they look at)
        return sympy.expand(diff) == 0
    return sympy.simplify(diff) == 0


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise TypeError(f"fxforge IR has no name for dtype {dtype}: it holds tensors of the plain dtypes "
                        f"({', '.join(str(d).removeprefix('torch.') for d in DTYPE_NAMES)}), not quantized "
                        "(torch.qint8, ...) or sub-byte (torch.uint4, torch.bits8, ...) ones; keep such a "
                        "tensor out of the model, or store it as one of those dtypes") from None


@dataclass(frozen=True)
class TensorType:
    shape: tuple[sympy.Expr, ...]
    dtype: torch.dtype

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(as_dim(d) for d in self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    def numel(self) -> sympy.Expr:
        n = sympy.Integer(1)
        for d in self.shape:
            n = n * d
        return n

    def same_as(self, other: "Type") -> bool:
        return (
            isinstance(other, TensorType)
            and other.dtype == self.dtype
            and other.rank == self.rank
            and all(dims_equal(a, b) for a, b in zip(self.shape, other.shape))
        )

    def free_symbols(self) -> set:
        out = set()
        for d in self.shape:
            out |= d.free_symbols
        return out

    def __str__(self) -> str:
        return self._text

    @cached_property
    def _text(self) -> str:
        # Printing sympy sizes is slow and the IR is printed after every pass (dumps),
        # mostly with the same Values; the type is immutable, so its text is kept.
        return f"{dtype_name(self.dtype)}[{', '.join(str(d) for d in self.shape)}]"


@dataclass(frozen=True)
class SymType:
    """A symbolic integer value (for example a cache length passed in at run time)."""

    def same_as(self, other: "Type") -> bool:
        return isinstance(other, SymType)

    def __str__(self) -> str:
        return "int"


Type = TensorType | SymType


def is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


@lru_cache(maxsize=None)
def _meta(dtype: torch.dtype, zero_dim: bool) -> torch.Tensor:
    return torch.empty(() if zero_dim else (1,), dtype=dtype, device="meta")


def promote(*types: TensorType) -> torch.dtype:
    """Result dtype of a pointwise op, with torch's rules (0-dim tensors count like scalars)."""
    metas = [_meta(t.dtype, t.rank == 0) for t in types]
    result = metas[0]
    if len(metas) == 1:
        return result.dtype
    # torch.result_type is binary; fold while keeping a non-0-dim representative.
    dtype = torch.result_type(metas[0], metas[1])
    rank_any = any(t.rank > 0 for t in types[:2])
    for t, m in zip(types[2:], metas[2:]):
        dtype = torch.result_type(_meta(dtype, not rank_any), m)
        rank_any = rank_any or t.rank > 0
    return dtype


def broadcast_shapes(*shapes: tuple[sympy.Expr, ...]) -> tuple[sympy.Expr, ...]:
    """Numpy broadcasting over symbolic sizes. A 1 broadcasts; otherwise sizes must agree."""
    rank = max((len(s) for s in shapes), default=0)
    out = []
    for i in range(rank):
        size = sympy.Integer(1)
        for s in shapes:
            j = i - (rank - len(s))
            if j < 0:
                continue
            d = s[j]
            if d == 1:
                continue
            if size == 1:
                size = d
            elif not dims_equal(size, d):
                raise TypeError(f"shapes {[tuple(map(str, s)) for s in shapes]} do not broadcast (dim {i}: {size} vs {d})")
        out.append(size)
    return tuple(out)


class IntegerQuotients:
    """A sympy printer mixin: floor/ceiling of a quotient of sizes printed as Python's
    integer `//` of its numerator and denominator (exact at every size, where a float
    quotient is not). The program (runtime/program.py) and the guard checks (guards.py)
    both print sizes with it; the code printed needs `math` in its namespace."""

    def _print_floor(self, e):
        num, den = e.args[0].as_numer_denom()
        if den == 1:  # math.floor(x.shape[1] * 0.3): an int, where a float's `// 1` is a float
            return f"math.floor({self._print(num)})"
        return f"(({self._print(num)}) // ({self._print(den)}))"

    def _print_ceiling(self, e):
        num, den = e.args[0].as_numer_denom()
        if den == 1:
            return f"math.ceil({self._print(num)})"
        return f"(-((-({self._print(num)})) // ({self._print(den)})))"


class TorchFunctions:
    """A sympy printer mixin: torch's own sympy functions (torch.utils._sympy.functions) as
    the Python that computes them as eager does. export writes them where the model does
    float arithmetic on sizes (`x.shape[1] ** 0.5` is FloatPow(ToFloat(T), 0.5),
    `x.shape[1] / 3` IntTrueDiv(T, 3)); the spellings are torch's own PythonPrinter's. The
    code printed needs `math` in its namespace."""

    def _arg(self, e, i: int = 0) -> str:
        return f"({self._print(e.args[i])})"

    def _print_ToFloat(self, e):
        return f"float{self._arg(e)}"

    def _print_FloatPow(self, e):
        return f"({self._arg(e)} ** {self._arg(e, 1)})"

    _print_PowByNatural = _print_FloatPow

    def _print_FloatTrueDiv(self, e):
        return f"({self._arg(e)} / {self._arg(e, 1)})"

    _print_IntTrueDiv = _print_FloatTrueDiv

    def _print_TruncToFloat(self, e):
        return f"float(math.trunc{self._arg(e)})"

    def _print_TruncToInt(self, e):
        return f"math.trunc{self._arg(e)}"

    def _print_FloorToInt(self, e):
        return f"math.floor{self._arg(e)}"

    def _print_CeilToInt(self, e):
        return f"math.ceil{self._arg(e)}"

    def _print_RoundToInt(self, e):
        return f"round{self._arg(e)}"

    def _print_RoundDecimal(self, e):
        return f"round({self._print(e.args[0])}, {self._print(e.args[1])})"

    def _print_Identity(self, e):
        return self._arg(e)

    def _print_Float(self, e):
        # every digit: sympy's str keeps 15, and 0.333333333333333 is not the float 1/3
        return repr(float(e))

    def _print_Infinity(self, e):
        return "math.inf"

    def _print_NegativeInfinity(self, e):
        return "(-math.inf)"

    def _print_NaN(self, e):
        return "math.nan"

    def _print_Function(self, e):
        name = type(e).__name__
        if name.startswith("OpaqueUnaryFn_"):  # math.sqrt(x.shape[1]) and its kin
            return f"math.{name[len('OpaqueUnaryFn_'):]}{self._arg(e)}"
        return super()._print_Function(e)


# -- size expressions as text (an output that is a size: capture.py writes, module.py reads) --
class _SizeText(sympy.printing.str.StrPrinter):
    def _print_Float(self, e):
        return repr(float(e))  # every digit: sympy's str keeps 15


def size_text(e: sympy.Expr) -> str:
    """`e` as text that `parse_size_text` reads back exactly (its floats with every digit)."""
    return _SizeText().doprint(e)


_SIZE_TEXT = re.compile(r"[\w\s+\-*/%(),.<>=!&|~]*")  # (& | ~: conditions on sizes)


def parse_size_text(text: str) -> sympy.Expr:
    """The inverse of size_text: arithmetic on size symbols, numbers, sympy's and torch's
    functions of sizes (torch.utils._sympy.functions), nothing else (parse_expr runs Python)."""
    from sympy.parsing.sympy_parser import parse_expr
    from torch.utils._sympy import functions as tf

    if not _SIZE_TEXT.fullmatch(text) or "__" in text or re.search(r"\.[A-Za-z_]", text):
        raise ValueError(f"cannot read size expression {text!r}: only names, numbers and arithmetic are allowed")
    functions = {"floor": sympy.floor, "ceiling": sympy.ceiling, "Mod": sympy.Mod, "Max": sympy.Max,
                 "Min": sympy.Min, "Eq": sympy.Eq, "Ne": sympy.Ne, "sqrt": sympy.sqrt, "Abs": sympy.Abs}
    names = {}
    for name in set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text)):
        fn = functions.get(name) or getattr(tf, name, None)
        is_function = name in functions or isinstance(fn, type) and issubclass(fn, sympy.Function)
        names[name] = fn if is_function else symbol(name)
    e = parse_expr(text, local_dict=names, global_dict={"Integer": sympy.Integer, "Float": sympy.Float,
                                                        "Rational": sympy.Rational, "Symbol": sympy.Symbol})
    if not isinstance(e, sympy.Basic):  # a tuple, say: the caller says what it wanted (parse_dim: a number)
        return e
    # a float read back has the digits' precision; as a double it is the one written
    return e.xreplace({f: sympy.Float(float(f)) for f in e.atoms(sympy.Float)})
