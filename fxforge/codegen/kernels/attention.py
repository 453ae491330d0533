"""FlashAttention forward in Triton: tiles of Q/K/V in on-chip memory, an online softmax
(running max and sum in float32), never an N x N buffer.

    attention_triton(q, k, v, bias=None, slopes=None, sink=None, *, causal, scale, softcap=None,
                     window=None, alibi=False, sinks=False) -> [B, H, Tq, D]

q: [B, H, Tq, D]; k, v: [B, Hkv, Tk, D] with H a multiple of Hkv (query head h reads KV
head h // (H // Hkv), as repeat_interleave would, without copying). causal is bottom-right
aligned: query i sees key j iff j <= i + (Tk - Tq), which is what cached decoding needs.
bias is additive, broadcastable to [B, H, Tq, Tk] (broadcast dims get stride 0, no copy).
A query row that sees no key at all (every key masked or -inf) gives zeros; one whose
every key has the same huge finite bias (finfo.min) gives their average, as eager (add_bias).
Variants, each a constexpr flag so the plain kernel is compiled as before:
  SOFTCAP  scores become tanh(s / softcap) * softcap (Gemma2, Grok) before bias and masks;
  WINDOW   keys `window` or more positions before the query are dropped (sliding-window
           attention: Mistral, Gemma2), and key blocks wholly before the window are skipped;
  ALIBI    slopes[h] * (k_pos - q_pos) is added (bloom, mpt, falcon): slopes f32[H], no
           [B, H, Tq, Tk] bias in memory.
  SINKS    a logit per query head (f32[H]) joins each row's softmax as a key whose value
           is zero (gpt-oss): the online softmax starts from it (m = sink, l = 1, acc = 0)
           instead of from nothing, so a row that sees no key gives zeros.
Head dims 16..256 of any size (padded to a power of two with masked loads), any lengths,
fp32/fp16/bf16, arbitrary strides.
  PAGED    K/V are read from paged caches [blocks, block size, Hkv, D] through a block table
           (`paged_attention_triton`, the paged layout of the kv_cache pass): each key tile's
           rows are gathered block by block from the row's start; no dense copy is made.
  WIDE     some tensor spans 2**31 elements or more (a long KV cache, a big batch): program
           ids and key-row offsets are int64; otherwise offsets stay in 32 bits.
The grid is one axis of (query block, batch x head) programs (`attention_grid`): CUDA's
axes 1 and 2 stop at 65535, which a large batch x heads would pass.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ...ir.ops import attention_inputs, attention_reference

__all__ = ["attention_triton", "paged_attention_triton", "attention_reference", "load_kv_block", "check_sinks",
           "paged_slots", "online_softmax_step", "add_bias", "attention_grid", "check_grid", "GRID_LIMITS", "INDEX_32_LIMIT",
           "needs_wide", "span", "check_head_dim_strides", "no_query_rows"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# (BLOCK_M, BLOCK_N, num_warps, num_stages) the autotuner may try on a GPU; the last two are
# for wide heads (256) and fp32, where the others overflow shared memory or spill.
GPU_CONFIGS = [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4), (64, 32, 4, 4), (32, 32, 4, 2),
               (64, 32, 8, 2), (32, 16, 8, 2)]
# Pipelined K and V tiles plus the Q tile must leave room for Triton's layout-conversion
# scratch under sm_80's 163 KB; the float32 accumulator and Q tile live in registers, and
# past this many accumulator elements per thread ptxas spills (docs/gpu-compile.md).
_TILE_BYTES = 128 * 1024
_ACC_PER_THREAD = {2: 64, 4: 32}  # by element size: fp32 dots are FMA loops, not tensor-core tiles
# fp32 configs with 3-4 stages spilled 0.6-18 KB per thread on sm_90 even at head dim 64
_MAX_STAGES = {2: 4, 4: 2}


# Programs a CUDA grid may have along axes 0, 1 and 2: a launch past them fails.
GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)


def check_grid(grid: tuple) -> tuple:
    """The grid, after checking every axis against GRID_LIMITS (a clear error rather than a
    failed launch)."""
    for axis, (n, limit) in enumerate(zip(grid, GRID_LIMITS)):
        if n > limit:
            raise ValueError(f"attention: a grid of {grid} programs is over CUDA's {limit} on axis {axis}")
    return grid


def attention_grid(tq: int, batch_heads: int, block_m: int) -> tuple:
    """The prefill kernel's grid: one axis of (query block, batch x head) programs, query
    blocks varying fastest (so programs reading the same K/V run together). Axis 1 would
    stop at 65535 batch x heads, or query blocks; axis 0 holds 2**31 - 1."""
    return check_grid((triton.cdiv(tq, block_m) * batch_heads,))


# A launch where some tensor spans this many elements or more gets the WIDE specialization
# (64-bit offsets); below it, the common case, offsets stay in 32 bits. One threshold for
# the prefill and the decode kernels (quant_matmul has its own, the same).
INDEX_32_LIMIT = 2 ** 31


def span(t: torch.Tensor) -> int:
    """Elements from a tensor's first to one past its last: what offsets from its data
    pointer reach (a prefix view of a big cache reaches across the whole cache; a
    broadcast dim, stride 0, adds nothing)."""
    if t.numel() == 0:
        return 0
    return 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))


def needs_wide(*tensors) -> bool:
    """Whether a kernel reading these tensors (None ignored) needs 64-bit offsets (WIDE)."""
    return max((span(t) for t in tensors if t is not None), default=0) >= INDEX_32_LIMIT


def check_head_dim_strides(head_dim: int, *tensors, what: str = "attention"):
    """Offsets along the head dim stay 32-bit even when WIDE (64-bit ones there cost the
    decode kernel registers it does not have): a [..., head_dim] tensor strided so far
    along it that they pass 2**31 is refused, not read from the wrong place."""
    for t in tensors:
        if (head_dim - 1) * t.stride(-1) >= 2 ** 31:
            raise ValueError(f"{what}: a head-dim stride of {t.stride(-1)} elements puts offsets past 2**31; "
                             "pass a tensor with a smaller last stride (e.g. .contiguous())")


def _fits(config: tuple, itemsize: int, d_pad: int) -> bool:
    bm, bn, warps, stages = config
    tiles = (2 * bn * max(stages - 1, 1) + bm) * d_pad * itemsize
    return (tiles <= _TILE_BYTES and bm * d_pad <= _ACC_PER_THREAD[itemsize] * 32 * warps
            and stages <= _MAX_STAGES[itemsize])


def launch_configs(dtype: torch.dtype, d_pad: int) -> list[tuple]:
    """The GPU configs the autotuner tries for this dtype and padded head dim: those that
    fit every target's shared memory without heavy spills (the smallest if none does)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return [c for c in GPU_CONFIGS if _fits(c, itemsize, d_pad)] or [GPU_CONFIGS[-1]]


def _prune_configs(configs, named_args, **kwargs):
    """The autotuner's early prune: keep the configs `launch_configs` allows."""
    allowed = launch_configs(named_args["q_ptr"].dtype, kwargs["D_PAD"])
    kept = [c for c in configs
            if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed]
    return kept or configs[-1:]


def _configs():
    if _INTERPRET:  # the interpreter runs every config on the CPU: one small one
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in GPU_CONFIGS]


@triton.jit
def load_kv_block(k_base, v_base, n_idx, n_valid, offs_d, d_valid, skn, skd, svn, svd, DOT_F32: tl.constexpr):
    """One block of keys, transposed for q @ k ([D_PAD, BLOCK_N]), and its values
    ([BLOCK_N, D_PAD]); masked rows and padded head dims read as 0. Shared by the prefill
    and the decode kernels."""
    k = tl.load(k_base + n_idx[None, :] * skn + offs_d[:, None] * skd,
                mask=n_valid[None, :] & d_valid[:, None], other=0.0)
    v = tl.load(v_base + n_idx[:, None] * svn + offs_d[None, :] * svd,
                mask=n_valid[:, None] & d_valid[None, :], other=0.0)
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def paged_slots(table_row, row_start, n_idx, n_valid, page: tl.constexpr, pages):
    """(slot, inside): where key n of a row lives in a paged cache: its token n - row_start
    is at block table_row[(n - row_start) // page], offset (n - row_start) % page, i.e. slot
    block * page + offset of the cache seen as [slots, Hkv, D] (the wrappers check that
    blocks are contiguous runs of slots). Keys before row_start (left padding) and past the
    table are not inside: load_kv_block reads them as 0, as the reference's gather does
    (their key bias masks them). One i32 vector, like the dense path's key index, and the
    block size a constexpr (a power of two: shifts, not divisions), so the paged read costs
    the kernels few extra registers (the decode split kernel has no other config to fall
    back on if it spills)."""
    rel = n_idx - row_start
    inside = n_valid & (rel >= 0)
    rel = tl.where(inside, rel, 0)
    blk_idx = rel // page
    inside = inside & (blk_idx < pages)
    blk = tl.load(table_row + blk_idx, mask=inside, other=0)
    return blk * page + rel % page, inside


@triton.jit
def read_kv_tile(k_base, v_base, n_idx, n_valid, offs_d, d_valid, skn, skd, svn, svd, q_dtype,
                 table_row, row_start, pages, PAGED: tl.constexpr, PAGE: tl.constexpr, DOT_F32: tl.constexpr,
                 WIDE: tl.constexpr):
    """The K and V tile of keys n_idx (load_kv_block), read in place from a dense cache or,
    when PAGED, through the row's block table (paged_slots). Shared by the prefill and the
    decode kernels. WIDE: the rows' offsets (key or slot times its stride) in 64 bits; the
    key index itself, and the head-dim offsets, stay 32-bit (the registers it saves kept
    the decode kernel from spilling)."""
    if PAGED:
        slot, inside = paged_slots(table_row, row_start, n_idx, n_valid, PAGE, pages)
        if WIDE:
            slot = slot.to(tl.int64)
        k, v = load_kv_block(k_base, v_base, slot, inside, offs_d, d_valid, skn, skd, svn, svd, DOT_F32)
        k = k.to(q_dtype)  # a cache narrower than the queries (KVCacheConfig.dtype)
        v = v.to(q_dtype)
    else:
        rows = n_idx
        if WIDE:
            rows = n_idx.to(tl.int64)
        k, v = load_kv_block(k_base, v_base, rows, n_valid, offs_d, d_valid, skn, skd, svn, svd, DOT_F32)
    return k, v


@triton.jit
def online_softmax_step(s, v, m_i, l_i, acc, PRECISION: tl.constexpr):
    """Fold one block of scores s [M, N] (log2 units, -inf where masked) and values
    v [N, D] into the running max m_i, sum l_i and output acc (FlashAttention's online
    softmax). Shared by the prefill and the decode kernels."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # a row with nothing visible yet has m_new = -inf: shift by 0 to avoid inf - inf
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


# The largest bias add_bias scales as it is: times log2 e it stays below float32's largest
# finite value (3.4028e38); any larger finite one is scaled as this (finfo.min -> -3.39e38).
BIAS_LIMIT: tl.constexpr = tl.constexpr(2.35e38)


@triton.jit
def add_bias(s, bias):
    """Scores s (log2 units) plus an additive bias (natural units). A finite bias below
    -FLT_MAX / log2 e (torch.finfo(f32).min, HF's mask fill) times log2 e would overflow
    to -inf, and a row whose every key has it would see no key and give zeros, where
    eager's softmax(scores + finfo.min), every masked score rounding to finfo.min, gives
    the uniform average over the keys. So a finite bias is clamped to +-BIAS_LIMIT before
    the scaling: every finfo.min key gets the same finite score, still so far below any
    visible key that its weight beside one is exactly 0. A -inf bias stays -inf and NaN
    stays NaN (the comparisons are false for both)."""
    b = bias.to(tl.float32)
    finite = (b >= -3.4028234663852886e38) & (b <= 3.4028234663852886e38)
    b = tl.where(finite, tl.minimum(tl.maximum(b, -BIAS_LIMIT), BIAS_LIMIT), b)
    return s + b * 1.4426950408889634


@triton.jit
def tanh_f32(x):
    """tanh through sigmoid (tl has no tanh that runs in the interpreter too); absolute
    error about one float32 ulp of 1, which is what softmax sees of a score. Not the
    pointwise template's polynomial (accurate relative to tiny results): its registers
    made the decode split kernel spill (SOFTCAP, paged, bf16 on sm_80)."""
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.autotune(configs=_configs(), key=["TQ_BUCKET", "TK_BUCKET", "HEAD_DIM", "CAUSAL", "HAS_BIAS", "SOFTCAP",
                                          "WINDOW", "ALIBI", "PAGED", "SINKS"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _attention_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, bias_ptr, slopes_ptr, sinks_ptr, out_ptr, table_ptr, start_ptr,
    # sizes
    H, GROUPS, TQ, TK, TQ_BUCKET, TK_BUCKET, qk_scale, softcap, window, pages,
    # strides
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sbb, sbh, sbm, sbn, sob, soh, som, sod, stb,
    # constexprs
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, ALIBI: tl.constexpr, PAGED: tl.constexpr,
    PAGE: tl.constexpr, WIDE: tl.constexpr, SINKS: tl.constexpr,
):
    # softcap: the cap in log2 units (cap * log2 e); window: W (keys); both read only when
    # their flag is set. PAGED: k/v are [blocks, page, Hkv, D] caches (skn/svn: a slot's
    # stride; skb/svb unused) read through row b's block table (pages entries, stb apart)
    # from its start (start_ptr[b]), PAGE tokens a block; table_ptr, start_ptr, pages, stb
    # unused otherwise. WIDE: some tensor spans 2**31 elements or more: the program ids (so
    # batch, head and query offsets) and the key rows' offsets are int64.
    # one grid axis (attention_grid): query blocks vary fastest, then batch x head
    num_m = tl.cdiv(TQ, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    pid_bh = pid // num_m
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    if WIDE:
        pid_m = pid_m.to(tl.int64)
        pid_bh = pid_bh.to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // GROUPS

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < TQ
    d_valid = offs_d < HEAD_DIM

    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    if PAGED:
        k_base = k_ptr + kvh * skh
        v_base = v_ptr + kvh * svh
        table_row = table_ptr + b * stb
        row_start = tl.load(start_ptr + b)
    else:
        k_base = k_ptr + b * skb + kvh * skh
        v_base = v_ptr + b * svb + kvh * svh
        table_row, row_start = table_ptr, 0  # unused: read_kv_tile reads the cache in place

    # exp2 is the fast path on GPUs: fold log2(e) into the scale once.
    if SINKS:
        # the sink as a key every row sees first: score sink[h] (log2 units), value 0
        sink = tl.load(sinks_ptr + h).to(tl.float32) * 1.4426950408889634
        m_i = tl.full((BLOCK_M,), 0.0, dtype=tl.float32) + sink
        l_i = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
    else:
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)

    # Causal: key blocks entirely above this query block's last row are never visited.
    offset = TK - TQ
    hi = TK
    if CAUSAL:
        hi = tl.minimum(TK, (pid_m + 1) * BLOCK_M + offset)
    lo = 0
    if WINDOW:
        # Sliding window: key blocks wholly before the first row's window are never visited.
        lo = tl.maximum(pid_m * BLOCK_M + offset - window + 1, 0) // BLOCK_N * BLOCK_N
    if ALIBI:
        slope = tl.load(slopes_ptr + h).to(tl.float32) * 1.4426950408889634
    for start_n in range(lo, hi, BLOCK_N):
        n_idx = start_n + offs_n
        n_valid = n_idx < TK
        k, v = read_kv_tile(k_base, v_base, n_idx, n_valid, offs_d, d_valid, skn, skd, svn, svd, q.dtype,
                            table_row, row_start, pages, PAGED, PAGE, DOT_F32, WIDE)
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale  # already in log2 units
        if SOFTCAP:
            s = tanh_f32(s / softcap) * softcap
        if ALIBI:
            s += slope * (n_idx[None, :] - (offs_m[:, None] + offset)).to(tl.float32)
        keep = m_valid[:, None] & n_valid[None, :]
        if CAUSAL:
            keep = keep & (n_idx[None, :] <= offs_m[:, None] + offset)
        if WINDOW:
            keep = keep & (n_idx[None, :] > offs_m[:, None] + offset - window)
        if HAS_BIAS:
            n_bias = n_idx
            if WIDE:
                n_bias = n_idx.to(tl.int64)
            bias = tl.load(bias_ptr + b * sbb + h * sbh + offs_m[:, None] * sbm + n_bias[None, :] * sbn,
                           mask=keep, other=0.0)
            s = add_bias(s, bias)
        s = tl.where(keep, s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, PRECISION)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # rows that saw no key: output zeros, not NaN
    out = acc / l_safe[:, None]
    tl.store(out_ptr + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
             out.to(out_ptr.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])


def _bucket(n: int) -> int:
    """Autotune once per power-of-two length bucket, not once per sequence length."""
    return triton.next_power_of_2(max(int(n), 16))


def check_sinks(heads: int, sink, device, what="attention"):
    """The sinks as contiguous float32 [H] (or None), after checking their shape."""
    if sink is None:
        return None
    if sink.dim() != 1 or sink.shape[0] != heads:
        raise ValueError(f"{what}: sinks must be [H={heads}], got {tuple(sink.shape)}")
    return sink.to(device=device, dtype=torch.float32).contiguous()


def check_variants(heads: int, slopes, softcap, window, device, what="attention"):
    """Check the variant arguments; returns slopes as contiguous float32 [H] (or None)."""
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{what}: softcap must be positive, got {softcap!r}")
    if window is not None and not int(window) >= 1:
        raise ValueError(f"{what}: window must be a positive number of keys, got {window!r}")
    if slopes is not None:
        if slopes.dim() != 1 or slopes.shape[0] != heads:
            raise ValueError(f"{what}: alibi slopes must be [H={heads}], got {tuple(slopes.shape)}")
        slopes = slopes.to(device=device, dtype=torch.float32).contiguous()
    return slopes


def no_query_rows(q, v):
    """The output of attention with no query rows (q [B, H, Tq, D] with B, H or Tq 0: an
    empty batch, or heads folded with one), empty [B, H, Tq, Dv] as eager's; else None.
    The wrappers ask first: their head-ratio check would divide by 0 KV heads."""
    if q.dim() == 4 and 0 in q.shape[:3]:
        return q.new_empty(*q.shape[:3], v.shape[-1])
    return None


def attention_triton(q, k, v, bias=None, slopes=None, sink=None, *, causal: bool, scale: float, softcap=None,
                     window=None, alibi: bool = False, sinks: bool = False):
    """The launch wrapper: check, allocate, launch. See the module docstring."""
    bias, slopes, sink = attention_inputs(bias, slopes, sink, alibi=alibi, sinks=sinks)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be [B, H, T, D], got shape {tuple(t.shape)}")
    empty = no_query_rows(q, v)
    if empty is not None:
        return empty
    bsz, heads, tq, d = q.shape
    _, kv_heads, tk, _ = k.shape
    if k.shape[0] != bsz or v.shape[:3] != k.shape[:3] or k.shape[-1] != d or v.shape[-1] != d:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must be [B={bsz}, Hkv, Tk, D={d}]")
    if heads % kv_heads:
        raise ValueError(f"attention: {heads} query heads is not a multiple of {kv_heads} kv heads")
    if not 1 <= d <= 256:
        raise ValueError(f"attention: head dim {d} is outside 1..256")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"attention: q, k, v must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("attention: q, k, v must be on one device")
    return _launch(q, k, v, bias, slopes, tk, kv_heads, None, causal=causal, scale=scale, softcap=softcap,
                   window=window, sink=sink)


def paged_attention_triton(q, k_cache, v_cache, block_table, row_start, bias, slopes=None, sink=None, *,
                           causal: bool, scale: float, softcap=None, window=None, alibi: bool = False,
                           sinks: bool = False):
    """paged_attention (ir/ops.py): attention over bias.shape[-1] keys read from the paged
    caches [blocks, block size, Hkv, D] through block_table [B, blocks per row] from each
    row's start (row_start [B]); the caches may be narrower than q."""
    bias, slopes, sink = attention_inputs(bias, slopes, sink, alibi=alibi, sinks=sinks)
    if q.dim() != 4:
        raise ValueError(f"paged attention: q must be [B, H, T, D], got shape {tuple(q.shape)}")
    empty = no_query_rows(q, v_cache)
    if empty is not None:
        return empty
    bsz, heads, tq, d = q.shape
    check_paged(q, k_cache, v_cache, block_table, row_start, bias, "paged attention")
    kv_heads = k_cache.shape[2]
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"paged attention: q must be float32, float16 or bfloat16, got {q.dtype}")
    if not 1 <= d <= 256:
        raise ValueError(f"paged attention: head dim {d} is outside 1..256")
    return _launch(q, k_cache, v_cache, bias, slopes, bias.shape[-1], kv_heads,
                   (block_table.contiguous(), row_start.to(torch.int32).contiguous()),
                   causal=causal, scale=scale, softcap=softcap, window=window, sink=sink)


def kv_addressing(q, k, v, paged):
    """How the kernels address K/V (prefill and decode alike): (block table, row starts,
    block size, blocks per row, table row stride, the eight K/V strides in the kernel's
    order). `paged`: None for dense [B, Hkv, T, D] views, else (block_table, row_start) over
    [blocks, block size, Hkv, D] caches, whose strides go in (block, head, slot, dim) order."""
    if paged is None:  # PAGE=1 and q as the unused pointers: one specialization for every dense call
        return q, q, 1, 1, 0, (*k.stride(), *v.stride())
    table, starts = paged
    kv_strides = tuple(t.stride(i) for t in (k, v) for i in (0, 2, 1, 3))
    return table, starts, k.shape[1], table.shape[1], table.stride(0), kv_strides


def check_paged(q, k_cache, v_cache, block_table, row_start, bias, what: str):
    """The checks of the paged wrappers (prefill and decode)."""
    bsz, heads, _, d = q.shape
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[3] != d:
        raise ValueError(f"{what}: k and v caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)} must both be "
                         f"[blocks, block size, Hkv, D={d}]")
    if heads % k_cache.shape[2]:
        raise ValueError(f"{what}: {heads} query heads is not a multiple of {k_cache.shape[2]} kv heads")
    if block_table.dim() != 2 or block_table.shape[0] != bsz or block_table.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{what}: block_table must be int32/int64 [B={bsz}, blocks per row], got "
                         f"{block_table.dtype} {tuple(block_table.shape)}")
    if row_start.shape != (bsz,):
        raise ValueError(f"{what}: row_start must be [B={bsz}], got {tuple(row_start.shape)}")
    if bias is None or bias.dim() != 4:
        raise ValueError(f"{what}: needs the key bias [B, 1|H, 1|T, keys] (it gives the number of keys)")
    if not (q.device == k_cache.device == v_cache.device == block_table.device == row_start.device):
        raise ValueError(f"{what}: q, the caches, block_table and row_start must be on one device")
    for name, c in (("k", k_cache), ("v", v_cache)):
        if c.stride(0) != c.shape[1] * c.stride(1):  # the kernels address slot = block * size + offset
            raise ValueError(f"{what}: the {name} cache's blocks must be contiguous runs of slots (stride(0) == "
                             f"block size x stride(1)), got strides {c.stride()}; allocate it as one "
                             "[blocks, block size, Hkv, D] tensor")


def _launch(q, k, v, bias, slopes, tk: int, kv_heads: int, paged, *, causal, scale, softcap, window, sink=None):
    """Allocate and launch the kernel; k, v are [B, Hkv, Tk, D], or paged caches with
    paged = (block_table, row_start)."""
    bsz, heads, tq, d = q.shape
    if bias is not None:
        try:
            bias = bias.expand(bsz, heads, tq, tk)
        except RuntimeError:
            raise ValueError(f"attention: bias {tuple(bias.shape)} does not broadcast to "
                             f"[{bsz}, {heads}, {tq}, {tk}]") from None
    slopes = check_variants(heads, slopes, softcap, window, q.device)
    sink = check_sinks(heads, sink, q.device)
    out = torch.empty(bsz, heads, tq, d, dtype=q.dtype, device=q.device)
    if tq == 0 or bsz * heads == 0:
        return out
    bias_arg = bias if bias is not None else q  # never read when HAS_BIAS is false
    bs = bias.stride() if bias is not None else (0, 0, 0, 0)
    check_head_dim_strides(d, q, k, v)
    wide = needs_wide(q, k, v, bias, out)
    d_pad = max(16, triton.next_power_of_2(d))

    def grid(meta):
        return attention_grid(tq, bsz * heads, meta["BLOCK_M"])

    table, starts, page, pages, stb, kv_strides = kv_addressing(q, k, v, paged)

    _attention_kernel[grid](
        q, k, v, bias_arg, slopes if slopes is not None else q, sink if sink is not None else q, out, table, starts,
        heads, heads // kv_heads, tq, tk, _bucket(tq), _bucket(tk), float(scale) * 1.4426950408889634,
        float(softcap) * 1.4426950408889634 if softcap is not None else 1.0,
        int(window) if window is not None else 0, pages,
        *q.stride(), *kv_strides, *bs, *out.stride(), stb,
        HEAD_DIM=d, D_PAD=d_pad, CAUSAL=bool(causal), HAS_BIAS=bias is not None,
        SOFTCAP=softcap is not None, WINDOW=window is not None, ALIBI=slopes is not None, PAGED=paged is not None,
        PAGE=page, WIDE=wide, SINKS=sink is not None,
        # triton 3.9's interpreter miscomputes bf16 dots: compute those in fp32 there.
        DOT_F32=_INTERPRET and q.dtype == torch.bfloat16,
        # fp32 inputs keep full fp32 products (tf32 would cost ~1e-3 relative error)
        PRECISION="ieee" if q.dtype == torch.float32 or _INTERPRET else "tf32",
    )
    return out


def flops(b: int, h: int, tq: int, tk: int, d: int, causal: bool) -> float:
    """Matmul FLOPs of attention (two matmuls of 2*Tq*Tk*D each), halved when causal."""
    f = 4.0 * b * h * tq * tk * d
    return f / 2 if causal else f

