"""Decode attention (one query per sequence) in Triton, split across the context
(flash-decoding): with Tq = 1 there is no query dimension to spread over the GPU, so the
keys are cut into chunks, each program reduces one chunk for one KV head (all the query
heads that share it, so K/V are read once per group), and a second kernel combines the
partial softmaxes. When one chunk covers the context (short contexts, or enough
batch x KV heads to fill the GPU without splitting), the split kernel normalises and
writes the output itself (ONE_SPLIT) and the combine kernel is not launched: one launch.

    decode_attention_triton(q, k, v, bias=None, slopes=None, sink=None, *, causal, scale, softcap=None,
                            window=None, alibi=False, sinks=False) -> [B, H, 1, D]

q: [B, H, 1, D]; k, v: [B, Hkv, Tk, D] (strided views of a KV cache are fine); bias is
additive, broadcastable to [B, H, 1, Tk]. With one query, bottom-right causal masking hides
nothing, so `causal` does not change the result. Equal to `attention_reference`.
Variants: SOFTCAP (tanh(s / softcap) * softcap) and ALIBI (slopes[h] * (k_pos - q_pos),
slopes f32[H]) are constexpr flags of the split kernel; a sliding window of W keys is a
view of the last W keys (and of the bias), so the splits cover only the window. PAGED
reads K/V from paged caches through a block table (`paged_decode_attention_triton`).
SINKS (a logit per query head joining the softmax with a zero value) enters exactly once:
the split kernel starts from it when it is the only split (ONE_SPLIT), else the combine
kernel adds it to the partials' max and sum. WIDE (64-bit offsets past 2**31 elements) as
in the prefill kernel. Grids (`decode_grids`):
batch x KV heads on axis 0, at most 65535 splits on axis 1.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ...ir.ops import attention_reference
from ...ir.ops import attention_inputs
from .attention import (GRID_LIMITS, add_bias, check_grid, check_head_dim_strides, check_paged, check_sinks,
                        check_variants,
                        kv_addressing, needs_wide, no_query_rows, online_softmax_step, read_kv_tile, tanh_f32)

__all__ = ["decode_attention_triton", "paged_decode_attention_triton", "attention_reference", "num_splits",
           "split_launch", "combine_block", "decode_grids"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, bias_ptr, slopes_ptr, sinks_ptr, m_ptr, l_ptr, acc_ptr, out_ptr, table_ptr, start_ptr,
    # sizes
    H, GROUPS, TK, CHUNK, NUM_SPLITS, qk_scale, softcap, pages, start_shift,
    # strides
    sqb, sqh, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sbb, sbh, sbn, stb,
    # constexprs
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr,
    ONE_SPLIT: tl.constexpr, WIDE: tl.constexpr, SINKS: tl.constexpr,
):
    # softcap: the cap in log2 units, read only with SOFTCAP. PAGED: as in the prefill
    # kernel (skn/svn a slot's stride; skb/svb unused); start_shift: keys cut off the
    # front for a window (key n of this view is the row's key n + start_shift).
    # ONE_SPLIT: this program saw every key of its rows, so it normalises and writes the
    # output itself (out_ptr: [B, H, 1, HEAD_DIM], contiguous, as the wrapper allocates it)
    # and no combine kernel is launched; m/l/acc are unused then. Otherwise it writes its
    # partials and out_ptr is unused. WIDE: some tensor spans 2**31 elements or more: the
    # program id (so batch, head and partials' offsets) and the key rows' offsets are int64.
    pid_bkv = tl.program_id(0)  # (batch, kv head)
    split = tl.program_id(1)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    if WIDE:
        pid_bkv = pid_bkv.to(tl.int64)
    hkv = H // GROUPS
    b = pid_bkv // hkv
    kvh = pid_bkv % hkv

    g_valid = offs_g < GROUPS
    d_valid = offs_d < HEAD_DIM
    heads = kvh * GROUPS + offs_g

    q = tl.load(q_ptr + b * sqb + heads[:, None] * sqh + offs_d[None, :] * sqd,
                mask=g_valid[:, None] & d_valid[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    if PAGED:
        k_base = k_ptr + kvh * skh
        v_base = v_ptr + kvh * svh
        table_row = table_ptr + b * stb
        row_start = tl.load(start_ptr + b) - start_shift
    else:
        k_base = k_ptr + b * skb + kvh * skh
        v_base = v_ptr + b * svb + kvh * svh
        table_row, row_start = table_ptr, 0  # unused: read_kv_tile reads the cache in place

    if SINKS and ONE_SPLIT:
        # the only split: the sink (a key of value 0 every row sees) starts the softmax;
        # with several, the combine kernel adds it once
        m_i = tl.load(sinks_ptr + heads, mask=g_valid, other=0.0).to(tl.float32) * 1.4426950408889634
        l_i = tl.full((BLOCK_G,), 1.0, dtype=tl.float32)
    else:
        m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, D_PAD), dtype=tl.float32)
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, TK)
    if ALIBI:
        slope = tl.load(slopes_ptr + heads, mask=g_valid, other=0.0).to(tl.float32) * 1.4426950408889634
    for start_n in range(lo, hi, BLOCK_N):
        n_idx = start_n + offs_n
        n_valid = n_idx < hi
        k, v = read_kv_tile(k_base, v_base, n_idx, n_valid, offs_d, d_valid, skn, skd, svn, svd, q.dtype,
                            table_row, row_start, pages, PAGED, PAGE, DOT_F32, WIDE)
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale  # log2 units
        if SOFTCAP:
            s = tanh_f32(s / softcap) * softcap
        if ALIBI:  # the query is at position TK - 1
            s += slope[:, None] * (n_idx - (TK - 1))[None, :].to(tl.float32)
        keep = g_valid[:, None] & n_valid[None, :]
        if HAS_BIAS:
            n_bias = n_idx
            if WIDE:
                n_bias = n_idx.to(tl.int64)
            bias = tl.load(bias_ptr + b * sbb + heads[:, None] * sbh + n_bias[None, :] * sbn, mask=keep, other=0.0)
            s = add_bias(s, bias)
        s = tl.where(keep, s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, PRECISION)

    if ONE_SPLIT:
        # what the combine kernel computes for one split (its weight exp2(m - m) is 1); the
        # group's first row as a scalar base, the tile's offsets from it small (a [G, D] tile
        # of per-row offsets spilled 8 bytes at head dim 64, paged, on sm_80)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + (b * H + kvh * GROUPS) * HEAD_DIM + (offs_g[:, None] * HEAD_DIM + offs_d[None, :]),
                 out.to(out_ptr.dtype.element_ty), mask=g_valid[:, None] & d_valid[None, :])
    else:
        # partials: [B, H, NUM_SPLITS] for m and l, [B, H, NUM_SPLITS, D_PAD] for acc (contiguous)
        row = (b * H + heads) * NUM_SPLITS + split
        tl.store(m_ptr + row, m_i, mask=g_valid)
        tl.store(l_ptr + row, l_i, mask=g_valid)
        tl.store(acc_ptr + row[:, None] * D_PAD + offs_d[None, :], acc, mask=g_valid[:, None])


@triton.jit
def _decode_combine_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr, sinks_ptr,
    H, NUM_SPLITS,
    sob, soh, sod,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_S: tl.constexpr, WIDE: tl.constexpr,
    SINKS: tl.constexpr,
):
    # Splits are visited BLOCK_S at a time (a long context on a big GPU has hundreds): a
    # [splits, D_PAD] tile in one piece would spill. With splits <= BLOCK_S it is one pass.
    # WIDE: as in the split kernel (base, and so every partial's offset, is then int64).
    pid = tl.program_id(0)  # (batch, head)
    offs_d = tl.arange(0, D_PAD)
    if WIDE:
        pid = pid.to(tl.int64)
    b = pid // H
    h = pid % H
    base = pid * NUM_SPLITS
    m_max = tl.full((), float("-inf"), dtype=tl.float32)
    if SINKS:  # the sink: one more partial, of max sink[h] (log2 units), sum 1 and output 0
        sink = tl.load(sinks_ptr + h).to(tl.float32) * 1.4426950408889634
        m_max = tl.maximum(m_max, sink)
    for s0 in range(0, NUM_SPLITS, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        m = tl.load(m_ptr + base + offs_s, mask=offs_s < NUM_SPLITS, other=float("-inf"))
        m_max = tl.maximum(m_max, tl.max(m, 0))
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    total = tl.zeros((), dtype=tl.float32)
    if SINKS:
        total += tl.exp2(sink - m_max)
    out = tl.zeros((D_PAD,), dtype=tl.float32)
    for s0 in range(0, NUM_SPLITS, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_valid = offs_s < NUM_SPLITS
        m = tl.load(m_ptr + base + offs_s, mask=s_valid, other=float("-inf"))
        l = tl.load(l_ptr + base + offs_s, mask=s_valid, other=0.0)
        w = tl.where(s_valid & (m > float("-inf")), tl.exp2(m - m_max), 0.0)
        acc = tl.load(acc_ptr + (base + offs_s)[:, None] * D_PAD + offs_d[None, :], mask=s_valid[:, None], other=0.0)
        total += tl.sum(l * w, 0)
        out += tl.sum(acc * w[:, None], 0)
    out = out / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + b * sob + h * soh + offs_d * sod, out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


def num_splits(batch_kv_heads: int, tk: int, block_n: int, programs: int) -> tuple[int, int]:
    """(chunk, splits): enough splits that batch * kv_heads * splits fills `programs`
    slots, each chunk a multiple of the key block and at least one block; at most 65535
    splits (they are axis 1 of the split kernel's grid)."""
    want = min(max(1, programs // max(batch_kv_heads, 1)), GRID_LIMITS[1])
    chunk = triton.cdiv(triton.cdiv(tk, want), block_n) * block_n
    chunk = max(chunk, block_n)
    return chunk, triton.cdiv(tk, chunk)


# The split kernel is launched without autotuning, so its one config must fit every target:
# K and V tiles of BLOCK_N x D_PAD within this many bytes each keep it far under sm_80's
# 163 KB of shared memory and free of spills (fp32 at head dim 256 with 64 keys needed
# 284 KB, docs/gpu-compile.md).
_KV_TILE_BYTES = 16 * 1024
_MAX_COMBINE_BLOCK = 32


def split_launch(dtype: torch.dtype, d_pad: int, paged: bool = False) -> dict:
    """The split kernel's key block and warps on a GPU: 64 keys, fewer for wide heads, and
    8 warps from head dim 128 (with 4, sm_90 spilled 824 bytes a thread at 128 in float32,
    32-36 in float16/bfloat16, without variant flags; the [16, 256] accumulator spilled
    at 256) and for paged reads (the block-table lookups took it to 255 registers and
    spilled 84-336 bytes on sm_90 at head dim 64 with 4 warps; none with 8). The same with
    64-bit offsets (WIDE). float32 at head dim 256 pipelines 2 stages, not 3: with aligned
    arguments (16-byte copies staged in shared memory) the paged read spilled 4-8 bytes a
    thread on sm_80 and sm_90 with 3 (gpu_compile, `KernelSpec.aligned`)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    block_n = 64
    while block_n > 16 and block_n * d_pad * itemsize > _KV_TILE_BYTES:
        block_n //= 2
    stages = 2 if itemsize == 4 and d_pad >= 256 else 3
    return {"BLOCK_N": block_n, "num_warps": 8 if d_pad >= 128 or paged else 4, "num_stages": stages}


def decode_grids(batch: int, heads: int, kv_heads: int, splits: int) -> tuple[tuple, tuple]:
    """(split grid, combine grid): batch x KV heads on axis 0 (it holds 2**31 - 1, axis 1
    only 65535) and the splits on axis 1; the combine kernel one program per (batch, head)."""
    return check_grid((batch * kv_heads, splits)), check_grid((batch * heads,))


def combine_block(splits: int) -> int:
    """BLOCK_S of the combine kernel: all splits in one pass up to _MAX_COMBINE_BLOCK."""
    return min(max(2, triton.next_power_of_2(splits)), _MAX_COMBINE_BLOCK)


def _programs(device) -> int:
    if _INTERPRET or device.type != "cuda":
        return 8  # the interpreter: a few splits, so the combine step is exercised
    return 4 * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def decode_attention_triton(q, k, v, bias=None, slopes=None, sink=None, *, causal: bool, scale: float, softcap=None,
                            window=None, alibi: bool = False, sinks: bool = False):
    """The launch wrapper: check, allocate partials, launch the split kernel and (with
    more than one split) the combine kernel."""
    bias, slopes, sink = attention_inputs(bias, slopes, sink, alibi=alibi, sinks=sinks)
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"decode attention takes one query per sequence [B, H, 1, D], got {tuple(q.shape)}")
    empty = no_query_rows(q, v)
    if empty is not None:
        return empty
    bsz, heads, _, d = q.shape
    if k.dim() != 4 or k.shape[0] != bsz or v.shape[:3] != k.shape[:3] or k.shape[-1] != d or v.shape[-1] != d:
        raise ValueError(f"decode attention: k {tuple(k.shape)} and v {tuple(v.shape)} must be [B={bsz}, Hkv, Tk, D={d}]")
    kv_heads, tk = k.shape[1], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"decode attention: {heads} query heads is not a multiple of {kv_heads} kv heads")
    if not 1 <= d <= 256:
        raise ValueError(f"decode attention: head dim {d} is outside 1..256")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"decode attention: q, k, v must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    return _launch(q, k, v, bias, slopes, tk, kv_heads, None, scale=scale, softcap=softcap, window=window, sink=sink)


def paged_decode_attention_triton(q, k_cache, v_cache, block_table, row_start, bias, slopes=None, sink=None, *,
                                  causal: bool, scale: float, softcap=None, window=None, alibi: bool = False,
                                  sinks: bool = False):
    """paged_attention with one query per row: K/V read from the paged caches [blocks, block
    size, Hkv, D] through block_table from each row's start, over bias.shape[-1] keys."""
    bias, slopes, sink = attention_inputs(bias, slopes, sink, alibi=alibi, sinks=sinks)
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"paged decode attention takes one query per sequence [B, H, 1, D], got {tuple(q.shape)}")
    empty = no_query_rows(q, v_cache)
    if empty is not None:
        return empty
    check_paged(q, k_cache, v_cache, block_table, row_start, bias, "paged decode attention")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not 1 <= q.shape[3] <= 256:
        raise ValueError(f"paged decode attention: q must be float32/16 or bfloat16 with a head dim in 1..256, got "
                         f"{q.dtype} {tuple(q.shape)}")
    return _launch(q, k_cache, v_cache, bias, slopes, bias.shape[-1], k_cache.shape[2],
                   (block_table.contiguous(), row_start.to(torch.int32).contiguous()),
                   scale=scale, softcap=softcap, window=window, sink=sink)


def _launch(q, k, v, bias, slopes, tk: int, kv_heads: int, paged, *, scale, softcap, window, sink=None):
    """Partials, split and combine kernels (the split kernel alone when one split covers
    the context); k, v are [B, Hkv, Tk, D], or paged caches with paged = (block_table, row_start)."""
    bsz, heads, _, d = q.shape
    if bias is not None:
        try:
            bias = bias.expand(bsz, heads, 1, tk)
        except RuntimeError:
            raise ValueError(f"decode attention: bias {tuple(bias.shape)} does not broadcast to "
                             f"[{bsz}, {heads}, 1, {tk}]") from None
    slopes = check_variants(heads, slopes, softcap, window, q.device, "decode attention")
    sink = check_sinks(heads, sink, q.device, "decode attention")
    start = 0
    if window is not None and tk > int(window):
        # the one query (at position Tk - 1) sees only the last `window` keys: the splits
        # cover those, and ALiBi's relative positions are the same in the view
        start = tk - int(window)
        if paged is None:
            k, v = k[:, :, start:], v[:, :, start:]
        bias = bias[..., start:] if bias is not None else None
        tk = tk - start
    out = torch.empty(bsz, heads, 1, d, dtype=q.dtype, device=q.device)
    if bsz * heads == 0:
        return out
    groups = heads // kv_heads
    d_pad = max(16, triton.next_power_of_2(d))
    block_g = max(16, triton.next_power_of_2(groups))
    launch = {"BLOCK_N": 16, "num_warps": 4} if _INTERPRET else split_launch(q.dtype, d_pad, paged is not None)
    block_n = launch["BLOCK_N"]
    chunk, splits = num_splits(bsz * kv_heads, max(tk, 1), block_n, _programs(q.device))
    one_split = splits == 1
    if one_split:  # the split kernel writes `out` itself: no partials, no combine launch
        m = l = acc = out
    else:
        m = torch.empty(bsz, heads, splits, dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)
        acc = torch.empty(bsz, heads, splits, d_pad, dtype=torch.float32, device=q.device)
    split_grid, combine_grid = decode_grids(bsz, heads, kv_heads, splits)
    bias_arg = bias if bias is not None else q
    bs = (bias.stride(0), bias.stride(1), bias.stride(3)) if bias is not None else (0, 0, 0)
    # k, v: the views the kernel reads (a window's) or the whole paged caches
    check_head_dim_strides(d, q, k, v, what="decode attention")
    wide = needs_wide(q, k, v, bias, out, None if one_split else acc)
    table, starts, page, pages, stb, kv_strides = kv_addressing(q, k, v, paged)
    _decode_split_kernel[split_grid](
        q, k, v, bias_arg, slopes if slopes is not None else q, sink if sink is not None else q, m, l, acc, out,
        table, starts,
        heads, groups, tk, chunk, splits, float(scale) * _LOG2E,
        float(softcap) * _LOG2E if softcap is not None else 1.0, pages, start,
        q.stride(0), q.stride(1), q.stride(3), *kv_strides, *bs, stb,
        HEAD_DIM=d, D_PAD=d_pad, BLOCK_G=block_g, BLOCK_N=block_n, HAS_BIAS=bias is not None,
        SOFTCAP=softcap is not None, ALIBI=slopes is not None, PAGED=paged is not None, PAGE=page,
        ONE_SPLIT=one_split, WIDE=wide, SINKS=sink is not None, DOT_F32=_INTERPRET and q.dtype == torch.bfloat16,
        PRECISION="ieee" if q.dtype == torch.float32 or _INTERPRET else "tf32",
        num_warps=launch["num_warps"], num_stages=launch.get("num_stages", 3),
    )
    if one_split:
        return out
    _decode_combine_kernel[combine_grid](
        m, l, acc, out, sink if sink is not None else m, heads, splits, out.stride(0), out.stride(1), out.stride(3),
        HEAD_DIM=d, D_PAD=d_pad, BLOCK_S=combine_block(splits), WIDE=wide, SINKS=sink is not None, num_warps=4,
    )
    return out
