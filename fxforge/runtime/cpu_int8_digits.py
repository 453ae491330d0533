"""float32 x int8-weight products on the CPU's int8 matrix units: x split exactly enough
into three int8 "digits", each multiplied exactly with int32 sums.

Why: an int8 weight-only product on the CPU used to dequantize the weight at every call
and run a float32 GEMM, so a quantized model was slower than the float one at prefill
(issue 20). With int8 matrix units (AMX) an int8 product with int32 sums runs several
times faster than a float32 GEMM of the same shape, and three of them still beat it,
at float32's accuracy.

The split, per activation row m (c_m = 63 * 2^16 / max_k |x_mk|; a zero row takes c_m as if
its max were 1: its digits are all zero):
    x_mk c_m + 1.5 * 2^23  rounds to a float32 in (2^23, 2^24), where float32's step is 1:
the addition itself rounds x_mk c_m to an integer V_mk (|V| < 2^22), and the float's low
three bytes hold V + 2^22 as an unsigned base-256 number b2 b1 b0 (mantissa bits; byte 2's
top bit is the exponent's lowest, 0 here). So, with no integer conversion at all,
    V = 2^16 (b2 - 64) + 2^8 b1 + b0,     x_mk = V / c_m + e,
    |e| <= 3/4 / c_m = 1.8e-7 max_k |x_mk|
(1/2 for the rounding to an integer, 1/4 for float32's rounding of the product x c_m below
2^22). That is the size of float32's own rounding of the row's largest element (2^-24 =
6e-8 relative): a float32 GEMM rounds each product and partial sum as much, and the tests
measure the two within a small factor of each other against float64.

The products are exact: the digits are bytes b in [0, 255] (zero point 64 for b2, 0 for b1
and b0) and the weights |q| <= 127, so an int32 sum of K products stays below 2^31 for K up
to 66,311 (`MAX_K`; a longer row is not split, the caller takes another path). Only where
the CPU multiplies int8 with int32 sums in hardware (VNNI, AMX): older AVX-512/AVX2 int8
kernels add pairs of u8 x s8 products in saturating int16, which would not be exact, so the
caller gates this on AMX (`cpu_quant.amx_available`). The byte view assumes a
little-endian CPU (`digits_available` checks the whole product on this machine).

Then y_mn = s_n / c_m (P2 + P1/256 + P0/65536) 2^16, P_i the int32 product of byte i's
digits with q_n and s_n the weight's per-output-channel scale. Two kernels, by row count:
- more than FEW_ROWS rows: oneDNN's quantized linear (what torch.compile's x86 int8 path
  calls) does each product on a copy of the weight prepacked once (`prepack`; one more byte
  per weight), scales its int32 sums by s_n times the digit's weight, and adds them into one
  float32 output ("sum" post-op): no [M, N] int32 product is written and read back. One
  pass by 2^16 / c_m (and the bias) ends it.
- up to FEW_ROWS rows (decoding, verification steps): one `torch._int_mm` of the three
  digit matrices stacked along rows with the graph's own weight (its transposed view, no
  copy). It takes signed int8, so each byte is read as b - 128 (one XOR of its top bit) and
  the int32 sums get 128 Q_n back (64 Q_n for b2; Q_n = sum_k q_nk), still exact; then the
  three are combined in float32. One call instead of three: 1.4-1.9x faster than oneDNN up
  to 16 rows, level at 32, slower from 64 on (one thread, SmolLM2's int8 weights; at 1024
  rows 1.3-5x slower: 3072x576, 43 against 8.9 ms).

Also measured: splitting x into radix-128 digits with float rounding took about twelve
passes over x where this byte view takes four (row max, one multiply-add, one byte
transpose: 2.1 against 1.5 ms for 1024x576).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .derived import Versions

SPAN = 63 * 2**16  # |V| <= SPAN (+ rounding) < 2^22
MAGIC = 1.5 * 2**23  # V + MAGIC lies in (2^23, 2^24): float32 steps of exactly 1
TOP_ZERO_POINT = 64  # byte 2 holds (V + 2^22) >> 16: the top digit is b2 - 64
DIGIT_WEIGHTS = (1.0 / 2**16, 1.0 / 2**8, 1.0)  # bytes 0, 1, 2
ZERO_POINTS = (0, 0, TOP_ZERO_POINT)
# int32 sums are exact while K * 255 * 127 < 2^31 (unsigned byte digits)
MAX_K = (2**31 - 1) // (255 * 127)
# Up to this many rows one torch._int_mm on the stacked digits; above, oneDNN's three products.
FEW_ROWS = 16
# int32 added back to each digit's product with q_n, in units of Q_n: b - 128 read, b (or b2 - 64) meant
_SIGNED_SHIFT = (128, 128, 128 - TOP_ZERO_POINT)


def row_factor(x2: Tensor) -> Tensor | None:
    """c_m = SPAN / max_k |x_mk| as float32 [M, 1] (SPAN for a zero row); None when a row
    holds inf or NaN or is so small that c_m overflows: those calls are not split."""
    amax = x2.abs().amax(dim=1, keepdim=True)
    c = torch.div(SPAN, amax.masked_fill_(amax == 0, 1.0))
    return c if bool(((c > 0) & (c < float("inf"))).all()) else None


def split_digits(x2: Tensor, c: Tensor) -> Tensor:
    """uint8 [3, M, K]: the bytes b0, b1, b2 of round(x2 * c) + 2^22 (see the module
    docstring), for float32 x2 [M, K] and its row factors c [M, 1]."""
    m, k = x2.shape
    shifted = torch.addcmul(torch.tensor(MAGIC, dtype=torch.float32), x2, c)
    return shifted.view(torch.uint8).view(m, k, 4).permute(2, 0, 1)[:3].contiguous()


def digit_value(digits: Tensor) -> Tensor:
    """float64 [M, K]: the V the digits stand for (for tests: x ~ V / c)."""
    b = digits.double()
    return (b[2] - TOP_ZERO_POINT) * 2**16 + b[1] * 2**8 + b[0]


@dataclass
class DigitWeight:
    """One int8 weight prepacked for oneDNN's quantized linear, and its row sums for the few-row kernel."""
    qweight: Tensor  # the graph's own [N, K] int8 weight: identifies the call (and keeps its id alive)
    packed: Tensor   # oneDNN's layout (an opaque mkldnn tensor, N * K bytes)
    scale: Tensor    # float32 [N]
    zero_points: Tensor  # int64 [N] zeros: the weight is symmetric
    out_features: int
    shift: Tensor  # int32 [3, 1, N]: _SIGNED_SHIFT[i] * Q_n, Q_n = sum_k q_nk (the few-row kernel)
    scale_source: Tensor | None = None  # the graph's own scale (`scale` may be a float32 copy of it)
    watch: Versions | None = None  # the versions of qweight and scale_source when this was packed


def refresh(weight: DigitWeight):
    """Prepack `weight` again: its qweight or scale changed in place since (fast.state_dict()
    edits, fast.load_state_dict; runtime/derived.py)."""
    fresh = prepack(weight.qweight, weight.scale_source)
    weight.packed, weight.scale, weight.shift = fresh.packed, fresh.scale, fresh.shift
    weight.watch.renew()


def prepack(qweight: Tensor, scale: Tensor) -> DigitWeight:
    """The weight [N, K] in oneDNN's int8 layout, for any number of activation rows."""
    n = qweight.shape[0]
    packed = torch.ops.onednn.qlinear_prepack(qweight.contiguous(), None)
    shift = torch.tensor(_SIGNED_SHIFT, dtype=torch.int32)[:, None, None] * qweight.sum(1, dtype=torch.int32)
    return DigitWeight(qweight, packed, scale.float().contiguous(), torch.zeros(n, dtype=torch.int64), n, shift,
                       scale, Versions(qweight, scale))


def _few_rows(digits: Tensor, w: DigitWeight) -> Tensor:
    """float32 [M, N] = s_n (P2 + P1/256 + P0/65536): one torch._int_mm of the stacked digits."""
    _, m, k = digits.shape
    signed = digits.bitwise_xor_(0x80).view(torch.int8).view(3 * m, k)  # b - 128
    p = torch._int_mm(signed, w.qweight.t()).view(3, m, -1).add_(w.shift)  # exact: |sum| <= K * 255 * 127
    y = p[2].float()
    return y.add_(p[1], alpha=1.0 / 2**8).add_(p[0], alpha=1.0 / 2**16).mul_(w.scale)


def _onednn(digits: Tensor, w: DigitWeight) -> Tensor:
    """float32 [M, N] = s_n (P2 + P1/256 + P0/65536): three oneDNN products into one output."""
    qlinear = torch.ops.onednn.qlinear_pointwise
    y = None
    for i in range(3):  # y += s_n P_i weight_i, smallest first, in place ("sum" post-op)
        if y is None:
            y = qlinear(digits[i], DIGIT_WEIGHTS[i], ZERO_POINTS[i], w.packed, w.scale, w.zero_points, None,
                        1.0, 0, torch.float32, "none", [], "")
        else:
            y = qlinear.binary(digits[i], DIGIT_WEIGHTS[i], ZERO_POINTS[i], w.packed, w.scale, w.zero_points, y,
                               None, 1.0, 0, torch.float32, 1.0, 0, "sum", 1.0, "none", [], "")
    return y


def digit_linear(x: Tensor, weight: DigitWeight, bias: Tensor | None = None) -> Tensor | None:
    """y = x @ W.T (+ bias), W = qweight * scale[:, None], for float x [..., K] (computed in
    float32, returned in x's dtype): three exact int8 products summed into one float32
    output. None where x has a row this split does not take (inf, NaN, tiny): the caller
    runs another path."""
    if weight.watch is not None and weight.watch.changed():
        refresh(weight)
    k = x.shape[-1]
    if k > MAX_K:
        return None
    x2 = x.reshape(-1, k).float()
    c = row_factor(x2)
    if c is None:
        return None
    digits = split_digits(x2, c)
    y = _few_rows(digits, weight) if x2.shape[0] <= FEW_ROWS else _onednn(digits, weight)
    y.mul_(torch.div(2**16, c))
    if bias is not None:
        y.add_(bias.float())
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.out_features)


def digits_available() -> bool:
    """oneDNN's quantized linear is in this PyTorch build and gives float32-accurate products
    here (which also checks the byte order the split reads)."""
    ops = torch.ops.onednn
    if not (hasattr(ops, "qlinear_pointwise") and hasattr(ops, "qlinear_prepack")):
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        q = torch.randint(-127, 128, (16, 64), generator=gen, device="cpu", dtype=torch.int8)
        s = torch.rand(16, generator=gen, device="cpu") + 0.5
        weight = prepack(q, s)
        for rows in (3, FEW_ROWS + 1):  # both kernels
            x = torch.randn(rows, 64, generator=gen, device="cpu")
            y = digit_linear(x, weight)
            ref = x.double() @ (q.double() * s.double()[:, None]).t()
            if y is None or not bool(((y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()).item()):
                return False
        return True
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
