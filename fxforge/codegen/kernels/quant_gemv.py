"""Triton split-K GEMV for the quantized linears at decode sizes (M <= 16 rows).

At M = 1 a quantized linear only has to stream its packed weight once, which is 2-4x fewer
bytes than fp16's: it is a bandwidth problem, not a tiling one. The tiled GEMM in
``quant_matmul`` gets too few programs at these sizes (one per N tile, each looping all of
K) to keep an H100/H200's 132 SMs busy. This kernel instead cuts K into ``split_k`` slices
as well, so a decode-sized weight becomes a few programs per SM, each streaming one
contiguous [BLOCK_N, K / split_k] slab of it.

Kernel
    ``_gemv_kernel`` one kernel for the four formats (``FORMAT``: int8, int4, nf4, w8a8).
      * 4-bit weights are loaded once per byte, as [BLOCK_N, BLOCK_K // 2] uint8 tiles, and
        the two nibbles dotted separately against x's even and odd columns: nothing is
        interleaved.
      * a K tile never straddles a quantization group (BLOCK_K divides the group size), so
        the group's scale/zero/absmax factor out of the tile's dot:
        sum_k (q - z) s x = s (sum_k q x - z sum_k x). No per-element dequantization.
      * nf4 codes are looked up in a 16-entry float32 table in device memory (64 bytes: a
        warp's 32 lookups hit one cache line, i.e. one load per element), not the 15-select
        tree the GEMM uses per element.
      * one row (BLOCK_M = 1): ``tl.sum`` of broadcast products in float32 (int32 for w8a8);
        2..16 rows: ``tl.dot`` with BLOCK_M = 16.
      * w8a8 quantizes x per token inside every program: the per-row scale needs the amax
        over all of K, which every program reads (x is a few KB, from L2), so a decode step
        stays one launch per linear.
    Split-K combine (the pattern of kernels/arrival.py, which holds the counters): each
    program stores its partial tile (float32; w8a8's exact int32 sum
    as its bit pattern) to a scratch buffer and bumps its N tile's arrival counter; the
    program that arrives last sums the partials in split order (deterministic, and exact for
    int32), applies the epilogue (per-channel scale, w8a8's scales and outliers, bias) and
    resets the counter to 0. The counters therefore are zero between calls with no memset
    and no host state, which is what a CUDA-graph replay needs; they are allocated (zeroed)
    once per device, outside a capture.

``gemv_plan`` picks blocks and split_k per call shape from fixed tables (no autotuning: one
specialization per format/dtype/row class, enumerated by ``gpu_specs.quant_gemv_specs``).
"""
from __future__ import annotations

import dataclasses
import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import arrival

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

FMT_INT8, FMT_INT4, FMT_NF4, FMT_W8A8 = 0, 1, 2, 3
MAX_ROWS = 16  # the decode path: up to this many rows of x
# Programs per SM the split aims for: several resident per SM keep enough loads in flight.
PROGRAMS_PER_SM = 4
# The partials' round trip (write + read, float32 per output per split, in L2) may cost at
# most this fraction of the weight's bytes (from HBM); it bounds split_k when M grows.
PARTIAL_BYTES_FRACTION = 1.0
# One arrival counter per N tile, allocated once per device (N up to 2**16 * BLOCK_N).
MAX_TILES = 1 << 16

# (BLOCK_N, largest BLOCK_K, num_warps) per (format, rows class, float32 x): tiles of 16-32
# weight bytes per thread, lean enough (registers) for several programs per SM. One row:
# 16-byte loads along K; 16 rows: tensor-core tiles (fp32 x dots in exact fp32 FMA loops:
# narrower there).
GEMV_CONFIGS = {
    ("int8", 1, False): (16, 256, 4), ("int8", 1, True): (16, 256, 4),
    ("w8a8", 1, False): (16, 256, 4), ("w8a8", 1, True): (16, 256, 4),
    ("4bit", 1, False): (32, 64, 4), ("4bit", 1, True): (32, 64, 4),  # BLOCK_K 128: 115-160 registers
    ("int8", 16, False): (32, 128, 4), ("int8", 16, True): (16, 32, 4),
    ("w8a8", 16, False): (32, 32, 4), ("w8a8", 16, True): (16, 32, 4),
    ("4bit", 16, False): (64, 64, 4), ("4bit", 16, True): (16, 32, 4),
}
_CONFIG_FORMAT = {FMT_INT8: "int8", FMT_INT4: "4bit", FMT_NF4: "4bit", FMT_W8A8: "w8a8"}
# Interpreter: small tiles so that the tests' small shapes split K into several programs.
_INTERPRET_CONFIG = (16, 32, 4)


@dataclasses.dataclass(frozen=True)
class GemvPlan:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    split_k: int
    k_per_split: int  # a multiple of block_k


def _pow2_divisor(g: int, cap: int) -> int:
    """The largest power of two dividing g, at most cap."""
    return min(g & -g, cap)


def gemv_plan(fmt: int, m: int, n: int, k: int, group_size: int, fp32_x: bool, num_sms: int) -> GemvPlan | None:
    """Blocks and split for a decode-sized call, or None where the GEMM should run instead
    (too many rows, a 4-bit group too small for a K tile, too many N tiles)."""
    if m > MAX_ROWS or m <= 0:
        return None
    block_m = 1 if m == 1 else 16
    four_bit = fmt in (FMT_INT4, FMT_NF4)
    if INTERPRET:
        block_n, block_k, warps = _INTERPRET_CONFIG
    else:
        block_n, block_k, warps = GEMV_CONFIGS[(_CONFIG_FORMAT[fmt], block_m, fp32_x)]
    if four_bit:
        block_k = _pow2_divisor(group_size, block_k)  # a K tile inside one group
        if block_k < (32 if block_m > 1 else 16):     # dots of the half tiles need K >= 16
            return None
    n_tiles = triton.cdiv(n, block_n)
    if n_tiles > MAX_TILES:
        return None
    k_iters = triton.cdiv(k, block_k)
    # w8a8 programs each read all of x for the per-token scales: with several rows, one
    # program per SM keeps those re-reads near the weight's own bytes
    target = num_sms if fmt == FMT_W8A8 and m > 1 else PROGRAMS_PER_SM * num_sms
    split = min(k_iters, triton.cdiv(target, n_tiles))
    weight_bytes_per_k = 0.5 if four_bit else 1.0
    split = max(1, min(split, int(PARTIAL_BYTES_FRACTION * k * weight_bytes_per_k / (8 * m))))
    iters = triton.cdiv(k_iters, split)
    split = triton.cdiv(k_iters, iters)  # no empty slice
    return GemvPlan(block_m, block_n, block_k, warps, split, iters * block_k)


# --------------------------------------------------------------------------- jit helpers
@triton.jit
def _nf4_value(q):
    """NF4_CODE[q] for 4-bit codes q, as a select tree over the 16 constants (quant_formats'
    float32 values, written out). The GEMM uses it per element; the GEMV only to build its
    table (`_nf4_table_kernel`)."""
    a = tl.where(q < 2, tl.where(q < 1, -1.0, -0.6961928009986877),
                 tl.where(q < 3, -0.5250730514526367, -0.39491748809814453))
    b = tl.where(q < 6, tl.where(q < 5, -0.28444138169288635, -0.18477343022823334),
                 tl.where(q < 7, -0.09105003625154495, 0.0))
    c = tl.where(q < 10, tl.where(q < 9, 0.07958029955625534, 0.16093020141124725),
                 tl.where(q < 11, 0.24611230194568634, 0.33791524171829224))
    d = tl.where(q < 14, tl.where(q < 13, 0.44070982933044434, 0.5626170039176941),
                 tl.where(q < 15, 0.7229568362236023, 1.0))
    lo = tl.where(q < 4, a, b)
    hi = tl.where(q < 12, c, d)
    return tl.where(q < 8, lo, hi)


@triton.jit
def _split_tile(x, mask_m, threshold, HAS_OUTLIERS: tl.constexpr):
    """LLM.int8()'s split of a [BLOCK_M, BLOCK_K] float32 tile of x, per token: (inliers,
    the outlier mask [BLOCK_M, BLOCK_K], whether the tile has one). An entry is an outlier
    of its row if |x| > threshold (quant_formats.w8a8_split_activations): no row's split
    depends on another's. Rows past M (mask_m) hold zeros: never an outlier, for
    threshold > 0, and a zero product otherwise."""
    if HAS_OUTLIERS:
        out = tl.abs(x) > threshold
        return tl.where(out, 0.0, x), out, tl.max(tl.where(out, 1, 0)) > 0
    else:
        return x, x != x, False


@triton.jit
def _round_to_int8(v):
    """torch.round(v).clamp(-127, 127) as int8: round half to even (floor(v + 0.5) is exact
    for |v| <= 127.5, then a tie goes to the even neighbour)."""
    q = tl.floor(v + 0.5)
    q = tl.where((q - v == 0.5) & (q % 2 != 0), q - 1.0, q)
    return tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int8)


@triton.jit
def _rows_dot(a, w, BLOCK_M: tl.constexpr, DOT_F32: tl.constexpr):
    """a [BLOCK_M, BK] times w [BN, BK] (w's rows are output channels) -> [BLOCK_M, BN] in
    float32. One row: broadcast products reduced along K (no tensor-core tile to fill);
    more rows: tl.dot."""
    if BLOCK_M == 1:
        return tl.sum(w.to(tl.float32) * a.to(tl.float32), axis=1)[None, :]
    elif DOT_F32:
        return tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
    else:
        return tl.dot(a, tl.trans(w.to(a.dtype)))


@triton.jit
def _rows_dot_int8(a, w, BLOCK_M: tl.constexpr):
    """`_rows_dot` of int8 operands, exact in int32."""
    if BLOCK_M == 1:
        return tl.sum(w.to(tl.int32) * a.to(tl.int32), axis=1)[None, :]
    else:
        return tl.dot(a, tl.trans(w), out_dtype=tl.int32)


@triton.jit
def _w8a8_row_scales(x_ptr, offs_m, mask_m, K, stride_xm, stride_xk, threshold,
                     HAS_OUTLIERS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_KX: tl.constexpr):
    """The per-token int8 scale of every row, over all of K (outlier columns excluded):
    max(amax / 127, tiny), bitwise quant_formats' quantize_activations_per_token."""
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_KX):
        offs_k = k0 + tl.arange(0, BLOCK_KX)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0).to(tl.float32)
        inlier, _, _ = _split_tile(x, mask_m, threshold, HAS_OUTLIERS)
        amax = tl.maximum(amax, tl.max(tl.abs(inlier), axis=1))
    return tl.maximum(tl.math.div_rn(amax, 127.0), 1.1754943508222875e-38)


# --------------------------------------------------------------------------- kernels
@triton.jit
def _gemv_kernel(
    # pointers (lut: the nf4 table; part: split-K partials; count: arrival counters per N tile)
    x_ptr, w_ptr, scale_ptr, zero_ptr, bias_ptr, lut_ptr, out_ptr, part_ptr, count_ptr,
    # sizes
    M, N, K, GROUP, SPLIT_K, K_PER_SPLIT,
    # strides (w in elements of the stored tensor: bytes along K // 2 for 4-bit)
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg,
    stride_om, stride_on,
    threshold,
    # constexprs
    FORMAT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_OUTLIERS: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # the K slices of one N tile are neighbours in launch order: they finish close together
    pid = tl.program_id(0)
    pid_n = pid // SPLIT_K
    pid_s = pid % SPLIT_K
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_lo = pid_s * K_PER_SPLIT
    k_hi = tl.minimum(K, k_lo + K_PER_SPLIT)
    FOUR_BIT: tl.constexpr = FORMAT == 1 or FORMAT == 2
    HALF_K: tl.constexpr = BLOCK_K // 2

    if FORMAT == 3:
        a_s = _w8a8_row_scales(x_ptr, offs_m, mask_m, K, stride_xm, stride_xk, threshold, HAS_OUTLIERS,
                               BLOCK_M, 2048 // BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # w8a8's outlier columns

    for k0 in range(k_lo, k_hi, BLOCK_K):
        if FOUR_BIT:
            # K % GROUP == 0 and BLOCK_K divides GROUP: no K tail, one group per tile
            offs_j = tl.arange(0, HALF_K)
            byte = tl.load(w_ptr + offs_n[:, None] * stride_wn + (k0 // 2 + offs_j)[None, :] * stride_wk,
                           mask=mask_n[:, None], other=0).to(tl.int32)
            x_even = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + 2 * offs_j)[None, :] * stride_xk,
                             mask=mask_m[:, None], other=0.0)
            x_odd = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + 2 * offs_j + 1)[None, :] * stride_xk,
                            mask=mask_m[:, None], other=0.0)
            lo = byte & 0xF
            hi = byte >> 4
            if FORMAT == 2:
                lo = tl.load(lut_ptr + lo)
                hi = tl.load(lut_ptr + hi)
            part = _rows_dot(x_even, lo, BLOCK_M, DOT_F32) + _rows_dot(x_odd, hi, BLOCK_M, DOT_F32)
            g = k0 // GROUP
            s = tl.load(scale_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0.0).to(tl.float32)
            if FORMAT == 1:
                z = tl.load(zero_ptr + offs_n * stride_zn + g * stride_zg, mask=mask_n, other=0).to(tl.float32)
                x_sum = tl.sum(x_even.to(tl.float32) + x_odd.to(tl.float32), axis=1)
                part = part - x_sum[:, None] * z[None, :]
            acc += part * s[None, :]
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                        mask=mask_n[:, None] & mask_k[None, :], other=0)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            if FORMAT == 0:
                acc += _rows_dot(x, w, BLOCK_M, DOT_F32)  # the channel scale comes in the epilogue
            else:
                xf = x.to(tl.float32)
                inlier, outlier, any_out = _split_tile(xf, mask_m, threshold, HAS_OUTLIERS)
                acc += _rows_dot_int8(_round_to_int8(tl.math.div_rn(inlier, a_s[:, None])), w, BLOCK_M)
                if HAS_OUTLIERS:
                    if any_out:
                        acc_out += _rows_dot(tl.where(outlier, xf, 0.0), w, BLOCK_M, True)

    # split-K: publish this slice's partial; the last slice of the tile to arrive finishes it
    PLANES: tl.constexpr = 2 if FORMAT == 3 and HAS_OUTLIERS else 1
    tile = offs_m[:, None] * N + offs_n[None, :]
    tile_mask = mask_m[:, None] & mask_n[None, :]
    plane = M * N
    mine = part_ptr + pid_s * PLANES * plane + tile
    if FORMAT == 3:
        tl.store(mine, acc.to(tl.float32, bitcast=True), mask=tile_mask)
        if HAS_OUTLIERS:
            tl.store(mine + plane, acc_out, mask=tile_mask)
    else:
        tl.store(mine, acc, mask=tile_mask)
    tl.debug_barrier()  # every thread's partial is written before the release below
    arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
    if arrived == SPLIT_K - 1:
        tl.atomic_xchg(count_ptr + pid_n, 0)  # ready for the next call (or graph replay)
        # ".cg": read at L2, where the other programs' stores are; never a stale L1 line
        if FORMAT == 3:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        else:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        total_out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s in range(0, SPLIT_K):
            p = part_ptr + s * PLANES * plane + tile
            if FORMAT == 3:
                total += tl.load(p, mask=tile_mask, other=0.0, cache_modifier=".cg").to(tl.int32, bitcast=True)
                if HAS_OUTLIERS:
                    total_out += tl.load(p + plane, mask=tile_mask, other=0.0, cache_modifier=".cg")
            else:
                total += tl.load(p, mask=tile_mask, other=0.0, cache_modifier=".cg")
        if FORMAT == 0:
            y = total * tl.load(scale_ptr + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        elif FORMAT == 3:
            w_s = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)
            y = total.to(tl.float32) * a_s[:, None] * w_s[None, :]
            if HAS_OUTLIERS:
                y = y + total_out * w_s[None, :]
        else:
            y = total
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
                 y.to(out_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _nf4_table_kernel(out_ptr):
    """Writes NF4_CODE (float32 [16]) on the device: no host-to-device copy, so it can run
    inside a CUDA-graph capture too."""
    i = tl.arange(0, 16)
    tl.store(out_ptr + i, _nf4_value(i))


# --------------------------------------------------------------------------- device scratch
# Per device (kernels/arrival.py's registry): the arrival counters, "count" (zero between
# calls: the last program of a tile resets its counter), and the NF4 table, "nf4".
_SCRATCH = arrival.SCRATCH


def _nf4_table(device: torch.device) -> Tensor:
    table = torch.empty(16, dtype=torch.float32, device=device)
    _nf4_table_kernel[(1,)](table)
    return table


def _scratch(device: torch.device, nf4: bool) -> dict[str, Tensor]:
    entry = {"count": arrival.counters(device, "count", MAX_TILES)}
    if nf4:
        entry["nf4"] = arrival.device_buffer(device, "nf4", _nf4_table)
    return entry


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def gemv_launch(fmt: int, x2: Tensor, w: Tensor, scale: Tensor, zero: Tensor | None, bias: Tensor | None,
                out: Tensor, n: int, k: int, group_size: int, dot_f32: bool, plan: GemvPlan,
                threshold: float | None = None) -> None:
    """Launch the split-K GEMV for a plan from `gemv_plan` (x2 [M, K], out [M, N]; the
    caller checked the shapes). Scale strides as the GEMM's: [N] or [N, K // group]."""
    m = x2.shape[0]
    device = x2.device
    scratch = _scratch(device, fmt == FMT_NF4)
    planes = 2 if fmt == FMT_W8A8 and threshold is not None else 1
    part = torch.empty(plan.split_k * planes * m * n, dtype=torch.float32, device=device)
    stride_sg = scale.stride(1) if scale.dim() == 2 else 0
    if zero is None:
        zero, stride_zn, stride_zg = scale, 0, 0  # unused placeholder pointer
    else:
        stride_zn, stride_zg = zero.stride(0), zero.stride(1)
    grid = (triton.cdiv(n, plan.block_n) * plan.split_k,)
    _gemv_kernel[grid](
        x2, w, scale, zero, bias if bias is not None else scale, scratch.get("nf4", scale), out, part,
        scratch["count"],
        m, n, k, group_size, plan.split_k, plan.k_per_split,
        x2.stride(0), x2.stride(1), w.stride(0), w.stride(1), scale.stride(0), stride_sg, stride_zn, stride_zg,
        out.stride(0), out.stride(1), float(threshold) if threshold is not None else 0.0,
        FORMAT=fmt, HAS_BIAS=bias is not None, HAS_OUTLIERS=threshold is not None, DOT_F32=dot_f32,
        BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k, num_warps=plan.num_warps)
