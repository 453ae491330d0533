"""Weight quantization formats: how a float weight is quantized, packed and dequantized.

Pure torch (no triton): this module is the single source of truth for every packed
layout and for the reference semantics; the Triton kernels in
``fxforge.codegen.kernels.quant_matmul`` read exactly these layouts and are tested
against :func:`quant_linear_reference`.

Weights use the ``nn.Linear`` layout: ``W`` is ``[N, K]`` (out features, in features)
and ``y = x @ W.T + b``.  Schemes (``SCHEMES``):

``int8``  weight-only, symmetric absmax per output channel.
    ``qweight`` int8 ``[N, K]`` in [-127, 127]; ``scale`` float32 ``[N]`` with
    ``scale[n] = max|W[n, :]| / 127``; ``W ~= qweight * scale[:, None]``.

``int4``  weight-only, asymmetric per group of ``group_size`` consecutive input features
    (default 128).  Per (n, group): the range ``[min(w_min, 0), max(w_max, 0)]`` (it always
    contains 0, which is what makes an integer zero point in [0, 15] possible and keeps the
    error bound below), ``scale = range / 15`` and ``zero = round(-min / scale)`` in [0, 15];
    ``q = clamp(round(W / scale) + zero, 0, 15)``; ``W ~= (q - zero) * scale``.
    ``qweight`` uint8 ``[N, K // 2]``: element ``k = 2j`` in the LOW nibble of byte ``j``,
    ``k = 2j + 1`` in the HIGH nibble.  ``scales`` float32 ``[N, K // group_size]``,
    ``zeros`` uint8 ``[N, K // group_size]`` (integer zero points, one byte each).
    With ``zero_point="float"`` the range is the group's own ``[w_min, w_max]`` (0 need not
    be in it) and ``zeros = -w_min / scale`` is float32, so ``W ~= q * scale + w_min``: a
    uniform grid that fits an offset group exactly (the asymmetric int4 of GGUF's Q4_1,
    HQQ and AWQ), at 3 more bytes per group. The kernels read either kind of zero.

``nf4``  4-bit NormalFloat (QLoRA, Dettmers et al. 2023), per group of ``group_size``
    (default 64, as QLoRA/bitsandbytes): ``absmax = max|W|`` of the group, ``W / absmax`` in
    [-1, 1] is rounded to the nearest of the 16 ``NF4_CODE`` values, and the 4-bit code
    *index* is packed two per byte exactly like int4.  ``W ~= NF4_CODE[q] * absmax``.
    Without double quantization ``absmax`` is float32 ``[N, K // group_size]``.
    With ``double_quant=True`` (QLoRA's second quantization, with symmetric int8 instead of
    bitsandbytes' 8-bit dynamic float map): ``c = absmax.flatten() - offset`` with
    ``offset = mean(absmax)`` is quantized in blocks of 256 consecutive values to int8
    (``absmax_q`` int8 ``[N * K // group_size]``, ``absmax_scale`` float32 ``[n_blocks]`` =
    block absmax / 127, ``absmax_offset`` float32 ``[1]``); ``absmax`` is then
    ``absmax_q * absmax_scale[block] + offset``, which adds at most ``absmax_scale / 2`` of
    error per group scale, i.e. at most ``absmax_scale / 2`` per weight element.

``w8a8``  int8 weights exactly as ``int8`` (``qweight`` int8 ``[N, K]``, ``scale`` float32
    ``[N]``) plus per-token dynamic int8 activation quantization at run time with LLM.int8()
    outlier decomposition, decided per token (row): the entries of row m whose |value|
    exceeds ``threshold`` (default 6.0; ``None`` disables the decomposition), its outliers,
    are computed in float32 against the weight columns **dequantized from int8** -- no float
    copy of the weight is kept, so the memory is the same as ``int8``.  Implication: outliers
    are exact in the activation but still carry the int8 weight rounding error (<= scale/2
    per element), unlike LLM.int8() which keeps those columns in fp16.  The row's other
    entries are quantized per token (``x_scale[m] = max|x[m, inliers of m]| / 127``) and
    computed as an int8 x int8 -> int32 product scaled by ``x_scale[m] * scale[n]``.  Each
    row's result depends on that row alone, bitwise: the same in any batch (LLM.int8()
    chooses outlier *columns* over the whole input, so a row's result would change with the
    other rows it is batched with).

Every packed object is a small dataclass of plain tensors with ``tensors()`` (named tensors,
e.g. to store as graph parameters), ``attrs()`` (plain python values: scheme, shape,
group_size, ...) and ``from_parts(tensors, attrs)``; :func:`unpack_parts` rebuilds any of them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

__all__ = [
    "SCHEMES", "SCHEME_OPTIONS", "ACTIVATION_DTYPES", "SUPPORTED_GROUP_SIZES", "NF4_CODE", "DOUBLE_QUANT_BLOCK",
    "Int8Packed", "Int4Packed", "NF4Packed", "W8A8Packed", "Packed", "NonFiniteWeightError",
    "check_quantizable", "fitting_group_size", "quantize_weight", "dequantize_weight", "packed_nbytes",
    "unpack_parts",
    "quant_linear_reference", "quantize_activations_per_token", "w8a8_linear_reference",
    "w8a8_outliers", "w8a8_split_activations", "w8a8_outlier_matmul", "w8a8_linear_decomposed",
    "nf4_code_table", "nf4_dequantize_absmax",
    "pack_nibbles", "unpack_nibbles", "decode_nibbles",
]

SCHEMES = ("int8", "int4", "nf4", "w8a8")

# Options each scheme accepts in quantize_weight / check_quantizable, with their defaults.
SCHEME_OPTIONS: dict[str, dict[str, Any]] = {
    "int8": {},
    "int4": {"group_size": 128, "zero_point": "int"},
    "nf4": {"group_size": 64, "double_quant": False},
    "w8a8": {"threshold": 6.0},
}
# The activation dtypes each scheme's kernels take (x of quant_linear). int8 / int4 / nf4
# kernels compute in float32 with x in one of the three; w8a8 quantizes x itself, so any
# float dtype (float64 included) reaches it.
ACTIVATION_DTYPES: dict[str, tuple[torch.dtype, ...] | None] = {
    "int8": (torch.float32, torch.float16, torch.bfloat16),
    "int4": (torch.float32, torch.float16, torch.bfloat16),
    "nf4": (torch.float32, torch.float16, torch.bfloat16),
    "w8a8": None,  # any floating-point dtype
}
# Group sizes every path runs: the reference and the Triton kernels take any even size that
# divides K, but PyTorch's packed int4 CPU kernel (runtime/cpu_int4.py) takes exactly these.
SUPPORTED_GROUP_SIZES = (32, 64, 128, 256)
DOUBLE_QUANT_BLOCK = 256

# The 16 NF4 code values, exactly as in QLoRA / bitsandbytes (`get_4bit_type("nf4")`).
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

_TINY = torch.finfo(torch.float32).tiny
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.float64: "float64"}


def nf4_code_table(device: torch.device | str | None = None) -> Tensor:
    """The NF4 code values as a float32 [16] tensor (index = stored 4-bit code)."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


# --------------------------------------------------------------------------- packed types
class Packed:
    """Base of the packed-weight dataclasses: tensors()/attrs()/from_parts()/to()/nbytes().

    ``Packed.from_parts(tensors, attrs)`` on the base class dispatches on ``attrs["scheme"]``.
    """

    scheme: ClassVar[str]
    _TENSOR_FIELDS: ClassVar[tuple[str, ...]]
    _OPTIONAL_TENSORS: ClassVar[tuple[str, ...]] = ()

    def tensors(self) -> dict[str, Tensor]:
        out = {}
        for name in self._TENSOR_FIELDS:
            t = getattr(self, name)
            if t is not None:
                out[name] = t
        return out

    def attrs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"scheme": self.scheme}
        for f in fields(self):  # type: ignore[arg-type]
            if f.name not in self._TENSOR_FIELDS:
                v = getattr(self, f.name)
                out[f.name] = tuple(v) if isinstance(v, (list, tuple)) else v
        return out

    @classmethod
    def from_parts(cls, tensors: dict[str, Tensor], attrs: dict[str, Any]):
        if cls is Packed:
            return _scheme_class(attrs.get("scheme")).from_parts(tensors, attrs)
        attrs = dict(attrs)
        scheme = attrs.pop("scheme", cls.scheme)
        if scheme != cls.scheme:
            raise ValueError(f"{cls.__name__}.from_parts: attrs describe scheme {scheme!r}, not {cls.scheme!r}")
        missing = [n for n in cls._TENSOR_FIELDS if n not in tensors and n not in cls._OPTIONAL_TENSORS]
        if missing:
            raise ValueError(f"{cls.__name__}.from_parts: missing tensors {missing}")
        kwargs = {n: tensors.get(n) for n in cls._TENSOR_FIELDS}
        if "shape" in attrs:
            attrs["shape"] = tuple(int(s) for s in attrs["shape"])
        kwargs.update(attrs)
        return cls(**kwargs)

    def to(self, device: torch.device | str):
        """A copy with every tensor moved to ``device`` (dtypes unchanged)."""
        return type(self).from_parts({k: v.to(device) for k, v in self.tensors().items()}, self.attrs())

    def nbytes(self) -> int:
        return packed_nbytes(self)  # type: ignore[arg-type]

    @property
    def out_features(self) -> int:
        return self.shape[0]  # type: ignore[attr-defined]

    @property
    def in_features(self) -> int:
        return self.shape[1]  # type: ignore[attr-defined]


@dataclass(eq=False)
class Int8Packed(Packed):
    qweight: Tensor          # int8 [N, K]
    scale: Tensor            # float32 [N]
    shape: tuple[int, int]   # (N, K)
    orig_dtype: str = "float32"
    scheme: ClassVar[str] = "int8"
    _TENSOR_FIELDS: ClassVar[tuple[str, ...]] = ("qweight", "scale")


@dataclass(eq=False)
class W8A8Packed(Packed):
    qweight: Tensor          # int8 [N, K]
    scale: Tensor            # float32 [N]
    shape: tuple[int, int]
    threshold: float | None = 6.0
    orig_dtype: str = "float32"
    scheme: ClassVar[str] = "w8a8"
    _TENSOR_FIELDS: ClassVar[tuple[str, ...]] = ("qweight", "scale")


@dataclass(eq=False)
class Int4Packed(Packed):
    qweight: Tensor          # uint8 [N, K // 2], low nibble = even k
    scales: Tensor           # float32 [N, K // group_size]
    zeros: Tensor            # [N, K // group_size]: uint8 integer zero points in [0, 15], or float32
    shape: tuple[int, int]
    group_size: int = 128
    orig_dtype: str = "float32"
    scheme: ClassVar[str] = "int4"
    _TENSOR_FIELDS: ClassVar[tuple[str, ...]] = ("qweight", "scales", "zeros")


@dataclass(eq=False)
class NF4Packed(Packed):
    qweight: Tensor                      # uint8 [N, K // 2], code indices, low nibble = even k
    absmax: Tensor | None                # float32 [N, G]             (double_quant=False)
    absmax_q: Tensor | None              # int8 [N * G]               (double_quant=True)
    absmax_scale: Tensor | None          # float32 [ceil(N*G / 256)]  (double_quant=True)
    absmax_offset: Tensor | None         # float32 [1]                (double_quant=True)
    shape: tuple[int, int]
    group_size: int = 64
    double_quant: bool = False
    orig_dtype: str = "float32"
    scheme: ClassVar[str] = "nf4"
    _TENSOR_FIELDS: ClassVar[tuple[str, ...]] = ("qweight", "absmax", "absmax_q", "absmax_scale", "absmax_offset")
    _OPTIONAL_TENSORS: ClassVar[tuple[str, ...]] = ("absmax", "absmax_q", "absmax_scale", "absmax_offset")

    def __post_init__(self):
        if self.double_quant:
            if self.absmax_q is None or self.absmax_scale is None or self.absmax_offset is None:
                raise ValueError("NF4Packed(double_quant=True) needs absmax_q, absmax_scale and absmax_offset")
        elif self.absmax is None:
            raise ValueError("NF4Packed(double_quant=False) needs absmax")

    def group_absmax(self) -> Tensor:
        """Per-group absmax as float32 [N, G] (undoing the double quantization if any)."""
        if not self.double_quant:
            return self.absmax.float()  # type: ignore[union-attr]
        n, k = self.shape
        return nf4_dequantize_absmax(self.absmax_q, self.absmax_scale, self.absmax_offset,  # type: ignore[arg-type]
                                     (n, k // self.group_size))


_CLASSES: dict[str, type] = {"int8": Int8Packed, "int4": Int4Packed, "nf4": NF4Packed, "w8a8": W8A8Packed}


def unpack_parts(tensors: dict[str, Tensor], attrs: dict[str, Any]) -> Packed:
    """Rebuild a packed object from ``packed.tensors()`` and ``packed.attrs()``."""
    scheme = attrs.get("scheme")
    return _scheme_class(scheme).from_parts(tensors, attrs)


def _scheme_class(scheme: Any) -> type:
    if scheme not in _CLASSES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; known schemes: {', '.join(SCHEMES)}")
    return _CLASSES[scheme]


# --------------------------------------------------------------------------- checks
def _resolve_options(scheme: str, options: dict[str, Any]) -> dict[str, Any]:
    _scheme_class(scheme)
    accepted = SCHEME_OPTIONS[scheme]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"scheme {scheme!r} does not take option(s) {unknown}; "
                         f"accepted: {sorted(accepted) or 'none'}")
    return {**accepted, **options}


def fitting_group_size(in_features: int, requested: int) -> int | None:
    """The largest supported group size <= `requested` that divides `in_features`
    (None if none does): e.g. 64 for K=576 when 128 was asked for."""
    fits = [g for g in SUPPORTED_GROUP_SIZES if g <= requested and in_features % g == 0]
    return max(fits) if fits else None


def check_quantizable(scheme: str, shape, **options) -> str | None:
    """Why a weight of ``shape`` cannot be quantized with ``scheme`` (None if it can).

    Raises ValueError only for an unknown scheme or unknown options (caller bugs); a
    shape/option combination that simply does not fit is reported as a reason string so a
    pass can skip the layer and say why.
    """
    opts = _resolve_options(scheme, options)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2:
        return f"{scheme}: weight must be 2-D [out_features, in_features], got shape {list(shape)}"
    n, k = shape
    if n <= 0 or k <= 0:
        return f"{scheme}: empty weight of shape {list(shape)}"
    if scheme in ("int4", "nf4"):
        g = opts["group_size"]
        if not isinstance(g, int) or g not in SUPPORTED_GROUP_SIZES:
            return f"{scheme}: group_size must be one of {SUPPORTED_GROUP_SIZES}, got {g!r}"
        if k % g != 0:
            return (f"{scheme}: in_features K={k} is not divisible by group_size={g} "
                    f"(K must be a multiple of the group size, and even for 4-bit packing)")
    if scheme == "w8a8":
        t = opts["threshold"]
        if t is not None and not (isinstance(t, (int, float)) and t > 0):
            return f"w8a8: threshold must be a positive number or None, got {t!r}"
    return None


def _check_weight(weight: Tensor, scheme: str, opts: dict[str, Any]) -> None:
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise ValueError(f"{scheme}: weight must be a floating-point tensor, "
                         f"got {getattr(weight, 'dtype', type(weight))}")
    reason = check_quantizable(scheme, weight.shape, **opts)
    if reason is not None:
        raise ValueError(reason)
    bad = ~torch.isfinite(weight)
    count = int(bad.sum())
    if count:
        raise NonFiniteWeightError(scheme, list(weight.shape), count, [int(i) for i in bad.nonzero()[0]])


class NonFiniteWeightError(ValueError):
    """A weight with inf or nan, which no scale can quantize; `shape`, `count` and `first`
    (the index of the first such element) say where, for a caller that knows its name."""

    def __init__(self, scheme: str, shape: list, count: int, first: list):
        self.shape, self.count, self.first = shape, count, first
        super().__init__(f"{scheme}: weight of shape {shape} contains {count} non-finite element"
                         f"{'s' if count > 1 else ''} (inf or nan; the first at {first}): a quantization "
                         f"scale from them would be inf or nan")


# --------------------------------------------------------------------------- packing helpers
def pack_nibbles(q: Tensor) -> Tensor:
    """uint8 [N, K//2] from 4-bit values [N, K]: q[:, 2j] -> low nibble, q[:, 2j+1] -> high."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] & 0xF) | ((q[:, 1::2] & 0xF) << 4)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_nibbles`: uint8 [N, K] with values in [0, 15]."""
    lo = packed & 0xF
    hi = (packed >> 4) & 0xF
    return torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)


def decode_nibbles(packed: Tensor, values: Tensor) -> Tensor:
    """float32 [N, K] of ``values[q]`` for the 4-bit codes q packed in ``packed`` [N, K//2].

    One lookup per byte in a 256-row table of (low, high) pairs: the same values as
    ``values[unpack_nibbles(packed)]``, in a third of the time (this runs at every call of a
    dequantizing CPU product)."""
    byte = torch.arange(256, device=values.device)
    pairs = torch.stack([values[byte & 0xF], values[byte >> 4]], dim=-1)  # [256, 2]
    # index_select with int32 indices: 4x faster on CPU than indexing with a long copy
    return pairs.index_select(0, packed.reshape(-1).int()).reshape(packed.shape[0], packed.shape[1] * 2)


def _absmax_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8: (q int8, scale float32 [rows]); w is float32 2-D."""
    absmax = w.abs().amax(dim=1)
    scale = (absmax / 127.0).clamp_min(_TINY)  # guards zero (and denormal-only) rows
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


# --------------------------------------------------------------------------- quantize
def quantize_weight(weight: Tensor, scheme: str, **options) -> Packed:
    """Quantize a float ``[N, K]`` weight; options per ``SCHEME_OPTIONS``.

    Raises ValueError with the reason for an unknown scheme, unknown option, non-float or
    non-finite weight, or a shape the scheme cannot pack (see :func:`check_quantizable`).
    """
    opts = _resolve_options(scheme, options)
    _check_weight(weight, scheme, opts)
    orig = _DTYPE_NAMES.get(weight.dtype, "float32")
    w = weight.detach().to(torch.float32)
    n, k = w.shape
    if scheme in ("int8", "w8a8"):
        q, scale = _absmax_int8(w)
        if scheme == "int8":
            return Int8Packed(q, scale, (n, k), orig_dtype=orig)
        t = opts["threshold"]
        return W8A8Packed(q, scale, (n, k), threshold=None if t is None else float(t), orig_dtype=orig)

    g = opts["group_size"]
    wg = w.reshape(n, k // g, g)
    if scheme == "int4" and opts["zero_point"] == "float":
        wmin, wmax = wg.amin(dim=2), wg.amax(dim=2)
        # a group of (nearly) equal values has no range to divide into 16 levels: its scale
        # is floored at its magnitude / (15 * 2**20), so w / scale and the zero point stay
        # near 15 * 2**20 (a constant group of 5.0 at the float32-tiny floor made w / scale
        # inf, and its outputs NaN); the level 0 then sits at wmin, within scale / 2 of all
        magnitude = torch.maximum(wmin.abs(), wmax.abs())
        scales = torch.maximum((wmax - wmin) / 15.0, magnitude * (2.0 ** -20 / 15.0)).clamp_min(_TINY)
        zeros = -wmin / scales
        q = torch.round(wg / scales[..., None] + zeros[..., None]).clamp_(0, 15)
        return Int4Packed(pack_nibbles(q.reshape(n, k)), scales.contiguous(), zeros.contiguous(), (n, k),
                          group_size=g, orig_dtype=orig)
    if scheme == "int4":
        wmin = wg.amin(dim=2).clamp(max=0.0)
        wmax = wg.amax(dim=2).clamp(min=0.0)
        scales = ((wmax - wmin) / 15.0).clamp_min(_TINY)
        zeros = torch.round(-wmin / scales).clamp_(0, 15)
        q = (torch.round(wg / scales[..., None]) + zeros[..., None]).clamp_(0, 15)
        return Int4Packed(pack_nibbles(q.reshape(n, k)), scales.contiguous(), zeros.to(torch.uint8), (n, k),
                          group_size=g, orig_dtype=orig)

    # nf4
    absmax = wg.abs().amax(dim=2).clamp_min(_TINY)
    normed = (wg / absmax[..., None]).clamp_(-1.0, 1.0)
    code = nf4_code_table(w.device)
    mids = (code[1:] + code[:-1]) / 2
    idx = torch.bucketize(normed, mids)  # nearest code (ties go to the upper code)
    qweight = pack_nibbles(idx.reshape(n, k))
    if not opts["double_quant"]:
        return NF4Packed(qweight, absmax.contiguous(), None, None, None, (n, k), group_size=g, orig_dtype=orig)
    absmax_q, absmax_scale, offset = _double_quantize(absmax.flatten())
    return NF4Packed(qweight, None, absmax_q, absmax_scale, offset, (n, k), group_size=g, double_quant=True,
                     orig_dtype=orig)


def _double_quantize(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    offset = a.mean().reshape(1)
    c = a - offset
    nblocks = math.ceil(c.numel() / DOUBLE_QUANT_BLOCK)
    padded = torch.zeros(nblocks * DOUBLE_QUANT_BLOCK, dtype=torch.float32, device=a.device)
    padded[: c.numel()] = c
    q, scale = _absmax_int8(padded.reshape(nblocks, DOUBLE_QUANT_BLOCK))
    return q.flatten()[: c.numel()].contiguous(), scale, offset


def nf4_dequantize_absmax(absmax_q: Tensor, absmax_scale: Tensor, absmax_offset: Tensor, shape) -> Tensor:
    """Undo the double quantization: float32 absmax of ``shape`` ([N, G])."""
    idx = torch.arange(absmax_q.numel(), device=absmax_q.device) // DOUBLE_QUANT_BLOCK
    a = absmax_q.float() * absmax_scale.float()[idx] + absmax_offset.float()
    return a.reshape(shape)


# --------------------------------------------------------------------------- dequantize
def _dequantize_int4(packed: Int4Packed) -> Tensor:
    """float32 [N, K] of `(q - z) * scale`. The nibbles are split with byte operations (a
    quarter of float32's traffic), and with integer zero points `q - z` (in [-15, 15]) is
    taken in int8, exactly; so the only float32 passes are the conversion and the scale.
    This runs at every call of a dequantizing CPU product: a lookup of (zero, byte) pairs
    did the same in three float32 passes and was 1.3-3.6x slower (benchmarks/dequantize.py,
    docs/benchmarks.md, issue 20)."""
    n, k = packed.shape
    g = packed.group_size
    byte = packed.qweight.reshape(n, k // g, g // 2)
    codes = torch.stack([byte & 0xF, byte >> 4], dim=-1).view(n, k // g, g)  # (low, high): pack_nibbles' order
    scales = packed.scales.float()[..., None]
    if packed.zeros.dtype.is_floating_point:
        return codes.float().sub_(packed.zeros.float()[..., None]).mul_(scales).reshape(n, k)
    diff = codes.view(torch.int8).sub_(packed.zeros.to(torch.int8)[..., None])
    return diff.float().mul_(scales).reshape(n, k)


def dequantize_weight(packed: Packed, dtype: torch.dtype = torch.float32) -> Tensor:
    """The float ``[N, K]`` weight the packed object represents (computed in float32)."""
    n, k = packed.shape
    if isinstance(packed, (Int8Packed, W8A8Packed)):
        w = packed.qweight.float() * packed.scale.float()[:, None]
    elif isinstance(packed, Int4Packed):
        w = _dequantize_int4(packed)
    elif isinstance(packed, NF4Packed):
        g = packed.group_size
        vals = decode_nibbles(packed.qweight, nf4_code_table(packed.qweight.device)).reshape(n, k // g, g)
        w = vals.mul_(packed.group_absmax()[..., None]).reshape(n, k)
    else:
        raise ValueError(f"not a packed weight: {type(packed).__name__}; known schemes: {', '.join(SCHEMES)}")
    return w.to(dtype)


def packed_nbytes(packed: Packed) -> int:
    """Bytes of every tensor held by ``packed`` (quantized values, scales, zeros, offsets)."""
    return sum(t.numel() * t.element_size() for t in packed.tensors().values())


# --------------------------------------------------------------------------- w8a8 pieces
def quantize_activations_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """Dynamic symmetric int8 per token (row): x [..., K] -> (x_q int8 [..., K], x_scale float32 [...]).

    ``x_scale = max|x[row]| / 127`` (tiny for an all-zero row), ``x_q = round(x / x_scale)``.
    """
    lead = x.shape[:-1]
    q, scale = _absmax_int8(x.detach().reshape(-1, x.shape[-1]).float())
    return q.reshape(x.shape), scale.reshape(lead)


def w8a8_outliers(x2: Tensor, threshold: float) -> Tensor:
    """bool [M, K]: the outliers of x2 [M, K], each row's own: |x2[m, k]| > threshold."""
    return x2.abs() > threshold


def w8a8_split_activations(x2: Tensor, threshold: float | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """LLM.int8() decomposition of x2 [M, K], per token: (x_q int8 [M, K], x_scale float32 [M], outlier_idx).

    Row m's outliers are its entries with |x| > threshold (:func:`w8a8_outliers`): they are
    zeroed in that row only before its per-token quantization, so a row's x_q and x_scale
    depend on that row alone.  ``outlier_idx`` (int64 [n_out], or None if there are none)
    lists the columns that hold an outlier in some row: where :func:`w8a8_outlier_matmul`
    looks for them.
    """
    x2 = x2.float()
    idx = None
    if threshold is not None and x2.numel() > 0:
        out = w8a8_outliers(x2, threshold)
        cols = out.any(dim=0)
        if bool(cols.any()):
            idx = cols.nonzero().squeeze(1)
            x2 = x2.masked_fill(out, 0.0)
    x_q, x_scale = quantize_activations_per_token(x2)
    return x_q, x_scale, idx


def w8a8_outlier_matmul(x2: Tensor, qweight: Tensor, scale: Tensor, idx: Tensor, threshold: float,
                        weight: Tensor | None = None) -> Tensor:
    """float32 [M, N] contribution of the outliers in columns ``idx``: y[m] = sum over the k
    in idx with |x2[m, k]| > threshold (row m's own outliers) of x2[m, k] * W[:, k], W
    dequantized from int8 (or taken from ``weight``, a pre-dequantized [N, K] float weight).

    Each row adds its own outliers one at a time, in ascending k (one rounded product and
    one rounded sum each; a row with fewer outliers than another adds exact zeros after its
    last): row m's result is bitwise the same in any batch, on any device. A matmul over
    the columns would not be: it groups its sums by position, and another row's outlier
    column puts a zero between two of row m's. Cost: (most outliers in a row) x M x N."""
    xo = x2[:, idx].float()
    out = w8a8_outliers(xo, threshold)
    if weight is not None:
        w_t = weight[:, idx].float().T
    else:
        w_t = (qweight[:, idx].float() * scale.float()[:, None]).T
    w_t = w_t.contiguous()
    y = torch.zeros(x2.shape[0], w_t.shape[1], dtype=torch.float32, device=x2.device)
    if bool(out.all()):  # one row (a decode step), or outlier features every row has
        for j in range(w_t.shape[0]):
            y.add_(xo[:, j, None] * w_t[j][None, :])
        return y
    rank = int(out.sum(dim=1).max())
    # per row: the positions of its outliers first, in ascending column order (a stable
    # sort), then others whose value is replaced by 0
    order = torch.sort((~out).to(torch.uint8), dim=1, stable=True).indices[:, :rank]
    vals = xo.gather(1, order).masked_fill(~out.gather(1, order), 0.0)
    # a rank whose column is every row's reads one weight row instead of one per row
    shared = (order == order[:1]).all(dim=0).tolist()
    for r in range(rank):
        w_r = w_t[order[0, r]][None, :] if shared[r] else w_t[order[:, r]]
        y.add_(vals[:, r, None] * w_r)
    return y


def _exact_int_mm(a: Tensor, b_t: Tensor) -> Tensor:
    # float64 holds every int8 x int8 dot product exactly for K < 2**36 (and works on CUDA, unlike int64 mm)
    return (a.to(torch.float64) @ b_t.to(torch.float64)).float()


def w8a8_linear_decomposed(x: Tensor, packed: W8A8Packed, bias: Tensor | None, threshold: float | None,
                           int_mm: Callable[[Tensor, Tensor], Tensor] | None = None,
                           weight: Tensor | None = None) -> Tensor:
    """The w8a8 computation with a pluggable exact int8 product.

    ``int_mm(a int8 [M, K], b int8 [K, N]) -> float32 [M, N]`` must be exact (default: float64
    matmul); ``weight`` optionally supplies pre-dequantized columns for the outliers.
    y = int_mm(x_q, qweight.T) * x_scale[:, None] * scale[None, :] + outliers + bias.
    """
    n, k = packed.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features, the w8a8 weight expects {k}")
    x2 = x.reshape(-1, k)
    x_q, x_scale, idx = w8a8_split_activations(x2, threshold)
    acc = (int_mm or _exact_int_mm)(x_q, packed.qweight.T)
    y = acc * x_scale[:, None] * packed.scale.float()[None, :]
    if idx is not None:
        y = y + w8a8_outlier_matmul(x2, packed.qweight, packed.scale, idx, threshold, weight)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def w8a8_linear_reference(x: Tensor, packed: W8A8Packed, bias: Tensor | None = None,
                          threshold: float | None | str = "packed") -> Tensor:
    """Reference w8a8 linear (threshold defaults to ``packed.threshold``); output in x.dtype."""
    if threshold == "packed":
        threshold = packed.threshold
    return w8a8_linear_decomposed(x, packed, bias, threshold)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- reference linear
def quant_linear_reference(x: Tensor, packed: Packed, bias: Tensor | None = None) -> Tensor:
    """Reference quantized linear: x [..., K] -> [..., N] in x.dtype.

    Weight-only schemes: dequantize, matmul in float32, add bias, cast.  w8a8: the
    per-token activation quantization + outlier decomposition of :func:`w8a8_linear_reference`.
    """
    if isinstance(packed, W8A8Packed):
        return w8a8_linear_reference(x, packed, bias)
    n, k = packed.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features, the {packed.scheme} weight expects {k}")
    w = dequantize_weight(packed, torch.float32)
    y = x.reshape(-1, k).float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
