"""Triton quantized-matmul kernels (dequantize inside the K loop); the CPU torch path is in
runtime/torch_kernels.py.

The packed layouts and the reference semantics live in :mod:`fxforge.ir.quant_formats`;
every kernel here is checked against :func:`~fxforge.ir.quant_formats.quant_linear_reference`
(re-exported below as ``*_reference``), nothing is re-derived.

Kernels
    ``_weight_only_kernel``  one kernel for the weight-only schemes, specialised by the
        ``FORMAT`` constexpr: int8 (per-channel scale applied in the epilogue), int4 (nibble
        unpack with shifts/masks, ``(q - zero) * scale`` per group) and nf4 (nibble unpack,
        ``code[q]`` gathered from a 16-entry float32 table, ``* absmax`` per group).  The
        x tile is loaded in its own dtype, the dequantized weight tile is cast to it and
        ``tl.dot`` accumulates in float32.  float32 inputs use ``input_precision="ieee"``
        (exact fp32, not tf32).
    ``_w8a8_kernel``  int8 x int8 -> int32 ``tl.dot`` with the per-token (row) and
        per-channel (column) scales, bias and the float32 outlier contribution fused into the
        epilogue.  The per-token activation quantization and the LLM.int8() outlier split run
        in torch (``w8a8_split_activations``), as does the small outlier matmul
        (``w8a8_outlier_matmul``: x[:, outliers] @ W_deq[:, outliers].T): its result is passed
        to the kernel as a residual.

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

from fxforge.ir.quant_formats import (
    Int4Packed,
    Int8Packed,
    NF4Packed,
    W8A8Packed,
    nf4_code_table,
    quant_linear_reference,
    w8a8_linear_reference,
    w8a8_outlier_matmul,
    w8a8_split_activations,
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
def _weight_only_kernel(
    # pointers
    x_ptr, w_ptr, scale_ptr, zero_ptr, table_ptr, bias_ptr, out_ptr,
    # sizes
    M, N, K, M_BUCKET,
    # strides (w strides are in elements of the stored tensor: bytes along K // 2 for 4-bit)
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg,
    stride_om, stride_on,
    # constexprs
    FORMAT: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
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
                w = tl.load(table_ptr + q) * s
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
    # pointers
    a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, res_ptr, out_ptr,
    # sizes
    M, N, K, M_BUCKET,
    # strides
    stride_am, stride_ak, stride_wn, stride_wk, stride_rm, stride_rn, stride_om, stride_on,
    # constexprs
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0)
        w = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0)
        acc = tl.dot(a, w, acc)
    a_s = tl.load(a_scale_ptr + offs_m, mask=mask_m, other=0.0)
    w_s = tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0)
    y = acc.to(tl.float32) * a_s[:, None] * w_s[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    if HAS_RES:
        y = y + tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn,
                        mask=out_mask, other=0.0)
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


def _launch(jit_kernel, small, large, m, n, args, constexprs):
    """Launch with a fixed config under the interpreter, else the autotuner for M's size class."""
    if INTERPRET:
        blocks = _INTERPRET_BLOCKS
        grid = (triton.cdiv(n, blocks["BLOCK_N"]), triton.cdiv(m, blocks["BLOCK_M"]))
        jit_kernel[grid](*args, **constexprs, **blocks)
        return
    tuner = small if m <= _SMALL_M else large
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"]))  # noqa: E731
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


def _weight_only_launch(x, w, scale, zero, table, bias, n, k, fmt, group_size):
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
        args = (x2, w, scale, zero, table if table is not None else scale, bias if bias is not None else scale, out,
                m, n, k, _m_bucket(m),
                x2.stride(0), x2.stride(1), w.stride(0), w.stride(1), stride_sn, stride_sg, stride_zn, stride_zg,
                out.stride(0), out.stride(1))
        constexprs = dict(FORMAT=fmt, GROUP_SIZE=group_size, HAS_BIAS=bias is not None, DOT_F32=_dot_f32(x))
        _launch(_weight_only_kernel, _weight_only_small, _weight_only_large, m, n, args, constexprs)
    return out.reshape(*x.shape[:-1], n)


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
    return _weight_only_launch(x, qweight, scale.contiguous(), None, None, bias, n, k, _FMT_INT8, 1)


def int4_linear_triton(x: Tensor, qpacked: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                       bias: Tensor | None = None) -> Tensor:
    """Weight-only int4: qpacked uint8 [N, K // 2] (low nibble = even k), scales float [N, K // g],
    zeros (uint8 or float, integer-valued) [N, K // g]; W = (q - zero) * scale per group."""
    n, k = qpacked.shape[0], qpacked.shape[1] * 2
    _check_group(n, k, group_size, scales, zeros)
    return _weight_only_launch(x, qpacked, scales, zeros, None, bias, n, k, _FMT_INT4, group_size)


def nf4_linear_triton(x: Tensor, qpacked: Tensor, absmax: Tensor, group_size: int, bias: Tensor | None = None,
                      code_table: Tensor | None = None) -> Tensor:
    """Weight-only NF4: qpacked uint8 [N, K // 2] of code indices, absmax float [N, K // g]
    (already dequantized when the weight is double-quantized: ``NF4Packed.group_absmax()``);
    W = NF4_CODE[q] * absmax.  ``code_table`` (float32 [16] on x's device) may be passed to
    avoid building it per call."""
    n, k = qpacked.shape[0], qpacked.shape[1] * 2
    _check_group(n, k, group_size, absmax)
    if code_table is None:
        code_table = nf4_code_table(x.device)
    return _weight_only_launch(x, qpacked, absmax, None, code_table, bias, n, k, _FMT_NF4, group_size)


def w8a8_linear_triton(x: Tensor, qweight: Tensor, wscale: Tensor, bias: Tensor | None = None,
                       threshold: float | None = 6.0) -> Tensor:
    """W8A8 with LLM.int8() outliers: per-token int8 activations (torch) x int8 weights in a
    Triton int32 GEMM; outlier columns (|x| > threshold anywhere in this input) are computed in
    float32 by torch against int8-dequantized weight columns and added in the kernel epilogue."""
    if qweight.dtype != torch.int8:
        raise ValueError(f"w8a8_linear_triton: qweight must be int8, got {qweight.dtype}")
    n, k = qweight.shape
    x2 = _flatten_x(x, k)
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m > 0 and n > 0:
        bias = _check_bias(bias, n)
        wscale = wscale.float().contiguous()
        x_q, x_scale, idx = w8a8_split_activations(x2, threshold)
        res = None if idx is None else w8a8_outlier_matmul(x2, qweight, wscale, idx).contiguous()
        args = (x_q, x_scale, qweight, wscale, bias if bias is not None else wscale,
                res if res is not None else x_scale, out,
                m, n, k, _m_bucket(m),
                x_q.stride(0), x_q.stride(1), qweight.stride(0), qweight.stride(1),
                res.stride(0) if res is not None else 0, res.stride(1) if res is not None else 0,
                out.stride(0), out.stride(1))
        constexprs = dict(HAS_BIAS=bias is not None, HAS_RES=res is not None)
        _launch(_w8a8_kernel, _w8a8_small, _w8a8_large, m, n, args, constexprs)
    return out.reshape(*x.shape[:-1], n)


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
