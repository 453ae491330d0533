"""Triton quantized-matmul kernels (dequantize inside the K loop); the CPU torch path is in
runtime/torch_kernels.py.

The packed layouts and the reference semantics live in :mod:`fxforge.ir.quant_formats`;
every kernel here is checked against :func:`~fxforge.ir.quant_formats.quant_linear_reference`
(re-exported below as ``*_reference``), nothing is re-derived.

Kernels
    ``_weight_only_kernel``  one kernel for the weight-only schemes, specialised by the
        ``FORMAT`` constexpr: int8 (per-channel scale applied in the epilogue), int4 (nibble
        unpack with shifts/masks, ``(q - zero) * scale`` per group) and nf4 (nibble unpack,
        ``NF4_CODE[q]`` from a select tree over its 16 constants, ``* absmax`` per group).  The
        x tile is loaded in its own dtype, the dequantized weight tile is cast to it and
        ``tl.dot`` accumulates in float32.  float32 inputs use ``input_precision="ieee"``
        (exact fp32, not tf32).
    ``_w8a8_kernel``  int8 x int8 -> int32 ``tl.dot`` with the per-token (row) and
        per-channel (column) scales, bias and the float32 outlier contribution fused into the
        epilogue.  The per-token activation quantization and the LLM.int8() outlier split run
        on the device without a host round trip: inside the kernel for M <= 16 (``SPLIT``:
        a decode step is one launch per linear), in sync-free torch ops above. The outliers
        (per token: a row's entries above the threshold) are a mask, not an index list, and
        the GEMM adds their float32 product (x's outliers, 0 elsewhere, @ the int8 weight,
        times the channel scale) in the same K loop, skipping tiles without outliers.

Decode sizes: up to 16 rows of x (``quant_gemv.MAX_ROWS``) the launch wrappers run the split-K
GEMV of :mod:`fxforge.codegen.kernels.quant_gemv` instead (the same formats and numerics,
bandwidth-oriented: K split over several programs per N tile, 4-bit bytes loaded once, the
group factors out of each tile's dot), unless it declines the shape (a 4-bit group smaller
than a K tile, operands past 2**31 elements); the kernels below are the prefill path.

Autotuning: two config sets, keyed on ``(M_BUCKET, N, K)`` where ``M_BUCKET`` is M rounded up
to a power of two (capped at 4096) so that a new sequence length does not trigger a new
autotuning run; M <= 16 (decoding) uses BLOCK_M=16 configs that split finely along N.
Under ``TRITON_INTERPRET=1`` (detected when this module is imported, which is when the
kernels are built) no autotuning happens: one small fixed config is used.

Interpreter caveat: triton 3.9's interpreter computes bf16 ``tl.dot`` wrongly, so in
interpreter mode bf16 tiles are upcast to float32 before the dot (the GPU path dots in bf16).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from fxforge.codegen.kernels import quant_gemv
from fxforge.codegen.kernels.quant_gemv import _nf4_value, _round_to_int8, _split_tile  # noqa: F401 (used in kernels)
from fxforge.ir.quant_formats import (
    Int4Packed,
    Int8Packed,
    NF4Packed,
    W8A8Packed,
    quant_linear_reference,
    quantize_activations_per_token,
    w8a8_linear_reference,
    w8a8_outliers,
)

__all__ = [
    "int8_linear_triton", "int4_linear_triton", "nf4_linear_triton", "w8a8_linear_triton",
    "quant_linear_triton",
    "int8_linear_reference", "int4_linear_reference", "nf4_linear_reference", "w8a8_linear_reference",
    "quant_linear_reference", "INTERPRET",
]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_FMT_INT8, _FMT_INT4, _FMT_NF4 = 0, 1, 2
_SMALL_M = 16
_SUPPORTED_X = (torch.float32, torch.float16, torch.bfloat16)

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
_LARGE_M_CONFIGS = [
    (64, 64, 64, 4, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 128, 64, 8, 3),
    (128, 128, 32, 8, 4), (64, 64, 128, 4, 3), (32, 64, 128, 4, 4),
]
_SMALL_M_CONFIGS = [
    (16, 16, 128, 2, 4), (16, 32, 128, 4, 4), (16, 64, 128, 4, 3), (16, 32, 256, 4, 3),
    (16, 64, 64, 4, 4), (16, 128, 64, 4, 3),
]
_INTERPRET_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64}


# Staged x and weight tiles (the weight both as loaded and dequantized) within this many
# bytes leave room for layout-conversion scratch under sm_80's 163 KB of shared memory.
_STAGED_BYTES = 128 * 1024
# float32 activations dot in exact fp32 (FMA loops, not tensor cores): bigger weight or
# accumulator tiles than these spilled 3-21 KB per thread on sm_90 (docs/gpu-compile.md).
_FP32_W_TILE = 4096
_FP32_ACC_TILE = 1024


def _fits(config: tuple, itemsize: int) -> bool:
    bm, bn, bk, _, stages = config
    staged = stages * (bm * bk * itemsize + bk * bn * (1 + itemsize))
    small_enough = itemsize < 4 or (bk * bn <= _FP32_W_TILE and bm * bn <= _FP32_ACC_TILE)
    return staged <= _STAGED_BYTES and small_enough


def launch_configs(small_m: bool, x_dtype: torch.dtype) -> list[tuple]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) the autotuner tries on a GPU for
    this M size class and activation dtype (int8 for W8A8): those that fit every target.
    No large-M tile is lean enough for fp32: it takes the small-M tiles (more programs)."""
    spec = _SMALL_M_CONFIGS if small_m else _LARGE_M_CONFIGS
    itemsize = torch.empty((), dtype=x_dtype).element_size()
    fitting = [c for c in spec if _fits(c, itemsize)]
    if not fitting and not small_m:
        return launch_configs(True, x_dtype)
    return fitting or spec[:1]


def _prune_configs(configs, named_args, **kwargs):
    """The autotuner's early prune: the configs `launch_configs` allows for x's dtype
    (built afresh: for fp32 at large M they come from the small-M list)."""
    x = named_args.get("x_ptr", named_args.get("a_ptr"))
    small = configs[0].kwargs["BLOCK_M"] == _SMALL_M
    return _configs(launch_configs(small, x.dtype))


def _configs(spec):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in spec]


# --------------------------------------------------------------------------- kernels
@triton.jit
def _tile_offsets(N, WIDE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The rows and columns of this program's output tile. A 1-D grid (axis 1 of a CUDA grid
    stops at 65535 programs), N tiles varying fastest; WIDE (an operand spans 2**31 elements
    or more) computes the offsets in 64 bits."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_n = pid % num_n
    pid_m = pid // num_n
    if WIDE:
        pid_n = pid_n.to(tl.int64)
        pid_m = pid_m.to(tl.int64)
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def _weight_only_kernel(
    # pointers
    x_ptr, w_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr,
    # sizes
    M, N, K, M_BUCKET,
    # strides (w strides are in elements of the stored tensor: bytes along K // 2 for 4-bit)
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg,
    stride_om, stride_on,
    # constexprs
    FORMAT: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m, offs_n = _tile_offsets(N, WIDE, BLOCK_M, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_mask = mask_k[:, None] & mask_n[None, :]
        if FORMAT == 0:
            # int8 [N, K]; the per-channel scale is applied once, in the epilogue
            w = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                        mask=w_mask, other=0).to(tl.float32)
        else:
            # 4-bit codes, two per byte along K: k = 2j low nibble, k = 2j + 1 high nibble
            byte = tl.load(w_ptr + (offs_k[:, None] // 2) * stride_wk + offs_n[None, :] * stride_wn,
                           mask=w_mask, other=0).to(tl.int32)
            q = (byte >> ((offs_k[:, None] % 2) * 4)) & 0xF
            if GROUP_SIZE % BLOCK_K == 0:
                # the whole K tile lies in one group: one scale (and zero) per column
                g = k0 // GROUP_SIZE
                s = tl.load(scale_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0.0)
                s = s.to(tl.float32)[None, :]
                if FORMAT == 1:
                    z = tl.load(zero_ptr + offs_n * stride_zn + g * stride_zg, mask=mask_n, other=0)
                    z = z.to(tl.float32)[None, :]
            else:
                g2 = (offs_k // GROUP_SIZE)[:, None]
                s = tl.load(scale_ptr + offs_n[None, :] * stride_sn + g2 * stride_sg, mask=w_mask, other=0.0)
                s = s.to(tl.float32)
                if FORMAT == 1:
                    z = tl.load(zero_ptr + offs_n[None, :] * stride_zn + g2 * stride_zg, mask=w_mask, other=0)
                    z = z.to(tl.float32)
            if FORMAT == 1:
                w = (q.to(tl.float32) - z) * s
            else:
                w = _nf4_value(q) * s
        if DOT_F32:
            acc = tl.dot(a.to(tl.float32), w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w.to(a.dtype), acc)
    if FORMAT == 0:
        col_scale = tl.load(scale_ptr + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc * col_scale[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _w8a8_kernel(
    # pointers (a: int8 x_q, or with SPLIT the float x itself)
    a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, xo_ptr, cm_ptr, out_ptr,
    # sizes
    M, N, K, M_BUCKET,
    # strides
    stride_am, stride_ak, stride_wn, stride_wk, stride_xom, stride_xok, stride_om, stride_on,
    threshold,
    # constexprs
    HAS_BIAS: tl.constexpr, HAS_OUTLIERS: tl.constexpr, SPLIT: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m, offs_n = _tile_offsets(N, WIDE, BLOCK_M, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if SPLIT:
        # x is small (M <= BLOCK_M: one tile holds every row), so each program splits it
        # itself (_split_tile) instead of a launch of its own: first the per-token scales
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                        mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0).to(tl.float32)
            inlier, _, _ = _split_tile(x, mask_m, threshold, HAS_OUTLIERS)
            amax = tl.maximum(amax, tl.max(tl.abs(inlier), axis=1))
        a_s = tl.maximum(tl.math.div_rn(amax, 127.0), 1.1754943508222875e-38)
    else:
        a_s = tl.load(a_scale_ptr + offs_m, mask=mask_m, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc_out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a_mask = mask_m[:, None] & mask_k[None, :]
        w = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0)
        if SPLIT:
            x = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                        mask=a_mask, other=0.0).to(tl.float32)
            inlier, outlier, any_out = _split_tile(x, mask_m, threshold, HAS_OUTLIERS)
            a = _round_to_int8(tl.math.div_rn(inlier, a_s[:, None]))
            acc = tl.dot(a, w, acc, out_dtype=tl.int32)  # triton 3.6 wants the int32 accumulator named
            if HAS_OUTLIERS:
                if any_out:
                    acc_out = tl.dot(tl.where(outlier, x, 0.0), w.to(tl.float32), acc_out, input_precision="ieee")
        else:
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak, mask=a_mask, other=0)
            acc = tl.dot(a, w, acc, out_dtype=tl.int32)
            if HAS_OUTLIERS:
                # the outlier columns of x (zero elsewhere) against the int8 weight, in
                # float32; a K tile without outliers (the usual case) skips it
                if tl.max(tl.load(cm_ptr + offs_k, mask=mask_k, other=0), axis=0) > 0:
                    xo = tl.load(xo_ptr + offs_m[:, None] * stride_xom + offs_k[None, :] * stride_xok,
                                 mask=a_mask, other=0.0)
                    acc_out = tl.dot(xo, w.to(tl.float32), acc_out, input_precision="ieee")
    w_s = tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0)
    y = acc.to(tl.float32) * a_s[:, None] * w_s[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    if HAS_OUTLIERS:
        y = y + acc_out * w_s[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             y.to(out_ptr.dtype.element_ty), mask=out_mask)


_KEY = ["M_BUCKET", "N", "K"]
_PRUNE = {"early_config_prune": _prune_configs}
_weight_only_small = triton.autotune(configs=_configs(_SMALL_M_CONFIGS), key=_KEY, prune_configs_by=_PRUNE)(
    _weight_only_kernel)
_weight_only_large = triton.autotune(configs=_configs(_LARGE_M_CONFIGS), key=_KEY, prune_configs_by=_PRUNE)(
    _weight_only_kernel)
_w8a8_small = triton.autotune(configs=_configs(_SMALL_M_CONFIGS), key=_KEY, prune_configs_by=_PRUNE)(_w8a8_kernel)
_w8a8_large = triton.autotune(configs=_configs(_LARGE_M_CONFIGS), key=_KEY, prune_configs_by=_PRUNE)(_w8a8_kernel)


# --------------------------------------------------------------------------- launch helpers
def _m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), 4096)


# A launch whose x, weight or output spans this many elements or more gets the WIDE
# specialization (64-bit offsets); below it, offsets stay in 32 bits.
INDEX_32_LIMIT = 2 ** 31


def _launch(jit_kernel, small, large, m, n, k, args, constexprs):
    """Launch with a fixed config under the interpreter, else the autotuner for M's size class."""
    constexprs = dict(constexprs, WIDE=max(m * k, m * n, n * k) >= INDEX_32_LIMIT)
    if INTERPRET:
        blocks = _INTERPRET_BLOCKS
        grid = (triton.cdiv(n, blocks["BLOCK_N"]) * triton.cdiv(m, blocks["BLOCK_M"]),)
        jit_kernel[grid](*args, **constexprs, **blocks)
        return
    tuner = small if m <= _SMALL_M else large
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
    tuner[grid](*args, **constexprs)


def _flatten_x(x: Tensor, k: int) -> Tensor:
    if x.dtype not in _SUPPORTED_X:
        raise ValueError(f"quantized linear: x must be float32/float16/bfloat16, got {x.dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"quantized linear: x has {x.shape[-1]} input features, the weight expects {k}")
    return x.reshape(-1, k)


def _check_bias(bias: Tensor | None, n: int) -> Tensor | None:
    if bias is None:
        return None
    if bias.shape != (n,):
        raise ValueError(f"quantized linear: bias must have shape [{n}], got {list(bias.shape)}")
    return bias.contiguous()


def _dot_f32(x: Tensor) -> bool:
    return x.dtype == torch.float32 or (INTERPRET and x.dtype == torch.bfloat16)


def _weight_only_launch(x, w, scale, zero, bias, n, k, fmt, group_size):
    x2 = _flatten_x(x, k)
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m > 0 and n > 0:
        bias = _check_bias(bias, n)
        if scale.dim() == 1:
            stride_sn, stride_sg = scale.stride(0), 0
        else:
            stride_sn, stride_sg = scale.stride(0), scale.stride(1)
        if zero is None:
            zero, stride_zn, stride_zg = scale, 0, 0  # unused placeholder pointer
        else:
            stride_zn, stride_zg = zero.stride(0), zero.stride(1)
        args = (x2, w, scale, zero, bias if bias is not None else scale, out,
                m, n, k, _m_bucket(m),
                x2.stride(0), x2.stride(1), w.stride(0), w.stride(1), stride_sn, stride_sg, stride_zn, stride_zg,
                out.stride(0), out.stride(1))
        plan = _gemv_plan(fmt, m, n, k, group_size, x2)
        if plan is not None:
            quant_gemv.gemv_launch(fmt, x2, w, scale, None if zero is scale else zero, bias, out, n, k, group_size,
                                   _dot_f32(x), plan)
            return out.reshape(*x.shape[:-1], n)
        constexprs = dict(FORMAT=fmt, GROUP_SIZE=group_size, HAS_BIAS=bias is not None, DOT_F32=_dot_f32(x))
        _launch(_weight_only_kernel, _weight_only_small, _weight_only_large, m, n, k, args, constexprs)
    return out.reshape(*x.shape[:-1], n)


# The most rows the split-K GEMV takes on a GPU, per format: where it beat the tiled kernel.
# Measured on an H200 in a CUDA graph (K x N = 2048 x 5632, docs/benchmarks.md, GPU run 5):
# int4 12.3 vs 22.3 us at 1 row, 18.4 vs 22.4 at 16; nf4 21.1 vs 132 and 61 vs 133; w8a8 10.1
# vs 83 at 1 row but 163 vs 54 at 16 (every program re-reads x for its scales); int8 15.2 vs
# 8.7 and 9.0 vs 8.3 (the tiled kernel's 16-byte loads already stream its weight). Elsewhere
# (the interpreter) every format takes it up to MAX_ROWS, so the tests run the kernel. None:
# no per-format limit.
GEMV_ROWS_ON_GPU = {quant_gemv.FMT_INT8: 0, quant_gemv.FMT_INT4: 16, quant_gemv.FMT_NF4: 16,
                    quant_gemv.FMT_W8A8: 1}


def _gemv_plan(fmt, m, n, k, group_size, x2):
    """The split-K GEMV's plan for a decode-sized call (quant_gemv), or None: the GEMM.
    Operands past 2**31 elements stay on the GEMM (the GEMV indexes in 32 bits)."""
    rows = quant_gemv.MAX_ROWS
    if x2.is_cuda and GEMV_ROWS_ON_GPU is not None:
        rows = min(rows, GEMV_ROWS_ON_GPU.get(fmt, rows))
    if m > rows or max(m * k, m * n, n * k) >= INDEX_32_LIMIT:
        return None
    return quant_gemv.gemv_plan(fmt, m, n, k, group_size, x2.dtype == torch.float32,
                                quant_gemv.num_sms(x2.device))


def _check_group(n: int, k: int, group_size: int, *tensors: Tensor) -> None:
    if group_size <= 0 or k % group_size or group_size % 2:
        raise ValueError(f"in_features K={k} must be a multiple of an even group_size, got group_size={group_size}")
    for t in tensors:
        if tuple(t.shape) != (n, k // group_size):
            raise ValueError(f"group scales/zeros must have shape [{n}, {k // group_size}], got {list(t.shape)}")


# --------------------------------------------------------------------------- public wrappers
def int8_linear_triton(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """Weight-only int8: y = x @ (qweight * scale[:, None]).T + bias.

    qweight int8 [N, K], scale float [N] (see ``quant_formats.Int8Packed``).
    """
    if qweight.dtype != torch.int8:
        raise ValueError(f"int8_linear_triton: qweight must be int8, got {qweight.dtype}")
    n, k = qweight.shape
    return _weight_only_launch(x, qweight, scale.contiguous(), None, bias, n, k, _FMT_INT8, 1)


def int4_linear_triton(x: Tensor, qpacked: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                       bias: Tensor | None = None) -> Tensor:
    """Weight-only int4: qpacked uint8 [N, K // 2] (low nibble = even k), scales float [N, K // g],
    zeros (uint8 or float, integer-valued) [N, K // g]; W = (q - zero) * scale per group."""
    n, k = qpacked.shape[0], qpacked.shape[1] * 2
    _check_group(n, k, group_size, scales, zeros)
    return _weight_only_launch(x, qpacked, scales, zeros, bias, n, k, _FMT_INT4, group_size)


def nf4_linear_triton(x: Tensor, qpacked: Tensor, absmax: Tensor, group_size: int,
                      bias: Tensor | None = None) -> Tensor:
    """Weight-only NF4: qpacked uint8 [N, K // 2] of code indices, absmax float [N, K // g]
    (already dequantized when the weight is double-quantized: ``NF4Packed.group_absmax()``);
    W = NF4_CODE[q] * absmax; the code values are constants in the kernel (``_nf4_value``)."""
    n, k = qpacked.shape[0], qpacked.shape[1] * 2
    _check_group(n, k, group_size, absmax)
    return _weight_only_launch(x, qpacked, absmax, None, bias, n, k, _FMT_NF4, group_size)


def w8a8_linear_triton(x: Tensor, qweight: Tensor, wscale: Tensor, bias: Tensor | None = None,
                       threshold: float | None = 6.0) -> Tensor:
    """W8A8 with LLM.int8() outliers: per-token int8 activations x int8 weights in a Triton
    int32 GEMM; each row's outliers (its entries with |x| > threshold) are computed in
    float32 against the int8 weight columns (scaled per channel) in the same kernel, and
    are zeroed before that row's per-token quantization: a row's result depends on it alone.

    Nothing waits for the device: the outliers are a column mask, never an index list whose
    length the host would read. Up to 16 rows (a decode step) the kernel splits and
    quantizes x itself, in one launch (SPLIT); more rows are split by `w8a8_split_on_device`
    first. Either way x_q and the scales are bitwise the reference's."""
    if qweight.dtype != torch.int8:
        raise ValueError(f"w8a8_linear_triton: qweight must be int8, got {qweight.dtype}")
    n, k = qweight.shape
    x2 = _flatten_x(x, k)
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m > 0 and n > 0:
        bias = _check_bias(bias, n)
        wscale = wscale.float().contiguous()
        plan = _gemv_plan(quant_gemv.FMT_W8A8, m, n, k, 1, x2)
        if plan is not None:
            quant_gemv.gemv_launch(quant_gemv.FMT_W8A8, x2, qweight, wscale, None, bias, out, n, k, 1,
                                   _dot_f32(x), plan, threshold)
            return out.reshape(*x.shape[:-1], n)
        split = m <= _SMALL_M
        if split:
            a, a_scale, x_out, cols = x2, wscale, None, None
            has_out = threshold is not None
        else:
            a, a_scale, x_out, cols = w8a8_split_on_device(x2, threshold)
            has_out = x_out is not None
        stride_xo = (x_out.stride(0), x_out.stride(1)) if x_out is not None else (0, 0)
        args = (a, a_scale, qweight, wscale, bias if bias is not None else wscale,
                x_out if x_out is not None else wscale, cols if cols is not None else qweight, out,
                m, n, k, _m_bucket(m),
                a.stride(0), a.stride(1), qweight.stride(0), qweight.stride(1), *stride_xo,
                out.stride(0), out.stride(1), float(threshold) if threshold is not None else 0.0)
        constexprs = dict(HAS_BIAS=bias is not None, HAS_OUTLIERS=has_out, SPLIT=split)
        _launch(_w8a8_kernel, _w8a8_small, _w8a8_large, m, n, k, args, constexprs)
    return out.reshape(*x.shape[:-1], n)


def w8a8_split_on_device(x2: Tensor, threshold: float | None):
    """(x_q int8 [M, K], x_scale float32 [M], x_out float32 [M, K] or None, cols int8 [K]
    or None): `w8a8_split_activations` with the outliers as a mask (x_out holds x where an
    entry is an outlier of its row, 0 elsewhere; cols marks the columns holding one, for
    the GEMM to skip K tiles without) instead of an index list, in torch ops with no
    data-dependent shape. x_q and x_scale are bitwise the reference's."""
    x2f = x2.float()
    if threshold is None:
        x_q, x_scale = quantize_activations_per_token(x2f)
        return x_q, x_scale, None, None
    out = w8a8_outliers(x2f, threshold)
    x_q, x_scale = quantize_activations_per_token(x2f.masked_fill(out, 0.0))
    return x_q, x_scale, x2f.masked_fill(~out, 0.0), out.any(dim=0).to(torch.int8)


def quant_linear_triton(x: Tensor, packed, bias: Tensor | None = None) -> Tensor:
    """Dispatch on ``packed.scheme`` to the Triton kernel (double-quantized NF4 absmax is
    dequantized in torch first, per call: small, N*K/group_size elements)."""
    if isinstance(packed, Int8Packed):
        return int8_linear_triton(x, packed.qweight, packed.scale, bias)
    if isinstance(packed, Int4Packed):
        return int4_linear_triton(x, packed.qweight, packed.scales, packed.zeros, packed.group_size, bias)
    if isinstance(packed, NF4Packed):
        return nf4_linear_triton(x, packed.qweight, packed.group_absmax(), packed.group_size, bias)
    if isinstance(packed, W8A8Packed):
        return w8a8_linear_triton(x, packed.qweight, packed.scale, bias, packed.threshold)
    raise ValueError(f"quant_linear_triton: not a packed weight: {type(packed).__name__}")


# --------------------------------------------------------------------------- references
def int8_linear_reference(x, qweight, scale, bias=None):
    """Torch reference for :func:`int8_linear_triton` (quant_formats' reference)."""
    return quant_linear_reference(x, Int8Packed(qweight, scale, tuple(qweight.shape)), bias)


def int4_linear_reference(x, qpacked, scales, zeros, group_size, bias=None):
    """Torch reference for :func:`int4_linear_triton`."""
    shape = (qpacked.shape[0], qpacked.shape[1] * 2)
    return quant_linear_reference(x, Int4Packed(qpacked, scales, zeros, shape, group_size=group_size), bias)


def nf4_linear_reference(x, qpacked, absmax, group_size, bias=None):
    """Torch reference for :func:`nf4_linear_triton`."""
    shape = (qpacked.shape[0], qpacked.shape[1] * 2)
    return quant_linear_reference(x, NF4Packed(qpacked, absmax, None, None, None, shape, group_size=group_size), bias)
