"""Decode attention that applies the rotary itself and stores the new K/V: the
`rope_attention` op (ir/rope_attention.py) for few query positions, ONE launch where the
unfused op took two (the generated rotary-and-store kernel, then decode attention).

    rope_decode_attention_triton(q, k, v, cos, sin, k_cache, v_cache, bias=None, *,
                                 causal, scale, start, programs=None) -> [B, H, T, D]

q [B, H, T, D], k, v [B, Hkv, T, D]: the pre-rotary projections (strided views are fine);
cos, sin broadcast to [B, 1, T, D]; k_cache, v_cache [B', Hkv, S, D] dense caches whose
rows 0..B-1 hold positions < start; `start` a Python int, or a 0-d int64 device tensor
(the static decode step: read by the kernel, never by the host). Equal to
`rope_attention_reference`: the caches get the rotated k and v at [start, start + T).

The split-context kernel of decode_attention.py, with these differences:
  - a program's rows are (query head of its KV head's group, query position): G x T rows;
  - q is rotated on load (rotate-half: element d pairs with d +- D/2, the first half
    negated), in float32 and rounded once to q's dtype, as the generated pointwise
    kernel computes it;
  - the cache is read only below `start`; the T new keys come from k and v themselves
    (rotated here too), and only the last split's program of each (batch, KV head) reads
    them, applies the causal mask among them, and stores them into the caches. Programs of
    one launch never read what another writes: the other programs stop at `start`;
  - with a device-side `start` the splits cover the key bias's length (the buffer), and
    each stops at `start`: the slots past the new keys, which the bias hides, are not read.
The partial softmaxes are combined by decode_attention's combine kernel (rows (b, h, t)),
which is not launched when one split covers the context.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...ir.rope_attention import rope_attention_reference
from .attention import add_bias, check_head_dim_strides, load_kv_block, needs_wide, online_softmax_step
from .decode_attention import _INTERPRET, _LOG2E, _decode_combine_kernel, _programs, combine_block, num_splits, \
    split_launch

__all__ = ["rope_decode_attention_triton", "rope_attention_reference", "fused_rows", "supports", "rope_launch",
           "MAX_ROWS"]

# A program holds G x T query rows; past this many the op runs as its composition (a prompt,
# or a wide speculative step): compiled for sm_90 with 64 rows it spilled kilobytes.
MAX_ROWS = 16


@triton.jit
def _rope_decode_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, bias_ptr, m_ptr, l_ptr, acc_ptr, out_ptr, start_ptr,
    # sizes
    H, GROUPS, T, TK, CHUNK, NUM_SPLITS, start_int, qk_scale,
    # strides
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, scb, sct, scd, ssb, sst, ssd,
    skcb, skch, skcn, skcd, svcb, svch, svcn, svcd, sbb, sbh, sbt, sbn,
    # constexprs
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, START_PTR: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr, ONE_SPLIT: tl.constexpr,
):
    # START_PTR: the cache length is read from start_ptr (a 0-d int64 tensor), else start_int.
    # ONE_SPLIT: as in the decode kernel, this program normalises and writes out_ptr
    # ([B, H, T, HEAD_DIM], contiguous); otherwise it writes its partials ([B, H, T, NUM_SPLITS]
    # for m and l, and D_PAD wide for acc).
    pid_bkv = tl.program_id(0)  # (batch, kv head)
    split = tl.program_id(1)
    hkv = H // GROUPS
    b = pid_bkv // hkv
    kvh = pid_bkv % hkv
    if START_PTR:
        start = tl.load(start_ptr).to(tl.int32)
    else:
        start = start_int

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    g = offs_m // T
    t = offs_m % T
    m_valid = offs_m < GROUPS * T
    d_valid = offs_d < HEAD_DIM
    heads = kvh * GROUPS + g
    half = HEAD_DIM // 2
    partner = tl.where(offs_d < half, offs_d + half, offs_d - half)  # rotate_half's source element
    sign = tl.where(offs_d < half, -1.0, 1.0)

    # q rotated on load: x * cos + rotate_half(x) * sin
    qm = m_valid[:, None] & d_valid[None, :]
    q_row = q_ptr + b * sqb + heads[:, None] * sqh + t[:, None] * sqt
    x = tl.load(q_row + offs_d[None, :] * sqd, mask=qm, other=0.0).to(tl.float32)
    xp = tl.load(q_row + partner[None, :] * sqd, mask=qm, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + b * scb + t[:, None] * sct + offs_d[None, :] * scd, mask=qm, other=0.0).to(tl.float32)
    s_ = tl.load(sin_ptr + b * ssb + t[:, None] * sst + offs_d[None, :] * ssd, mask=qm, other=0.0).to(tl.float32)
    q = (x * c + (sign[None, :] * xp) * s_).to(q_ptr.dtype.element_ty)
    if DOT_F32:
        q = q.to(tl.float32)

    kc_base = kc_ptr + b * skcb + kvh * skch
    vc_base = vc_ptr + b * svcb + kvh * svch
    bias_row = b * sbb + heads[:, None] * sbh + t[:, None] * sbt  # 32-bit offsets, not a tile of pointers
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)

    if split == NUM_SPLITS - 1:
        # the T new keys: rotated k and v from the projections, stored into the caches at
        # start.. by this program alone, and attended from registers (no other program
        # reads those slots in this launch)
        offs_j = tl.arange(0, BLOCK_T)
        j_valid = offs_j < T
        km = d_valid[:, None] & j_valid[None, :]  # [D_PAD, BLOCK_T]: k transposed, as tl.dot takes it
        k_col = k_ptr + b * skb + kvh * skh + offs_j[None, :] * skt
        kx = tl.load(k_col + offs_d[:, None] * skd, mask=km, other=0.0).to(tl.float32)
        kxp = tl.load(k_col + partner[:, None] * skd, mask=km, other=0.0).to(tl.float32)
        kcos = tl.load(cos_ptr + b * scb + offs_j[None, :] * sct + offs_d[:, None] * scd, mask=km, other=0.0)
        ksin = tl.load(sin_ptr + b * ssb + offs_j[None, :] * sst + offs_d[:, None] * ssd, mask=km, other=0.0)
        k = (kx * kcos.to(tl.float32) + (sign[:, None] * kxp) * ksin.to(tl.float32)).to(kc_ptr.dtype.element_ty)
        vm = j_valid[:, None] & d_valid[None, :]
        v = tl.load(v_ptr + b * svb + kvh * svh + offs_j[:, None] * svt + offs_d[None, :] * svd, mask=vm, other=0.0)
        n_new = start + offs_j
        tl.store(kc_base + n_new[None, :] * skcn + offs_d[:, None] * skcd, k, mask=km)
        tl.store(vc_base + n_new[:, None] * svcn + offs_d[None, :] * svcd, v.to(vc_ptr.dtype.element_ty), mask=vm)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale
        keep = m_valid[:, None] & j_valid[None, :]
        if CAUSAL:  # query t is at start + t: it sees new keys 0..t
            keep = keep & (offs_j[None, :] <= t[:, None])
        if HAS_BIAS:
            bias = tl.load(bias_ptr + bias_row + n_new[None, :] * sbn, mask=keep, other=0.0)
            s = add_bias(s, bias)
        s = tl.where(keep, s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, PRECISION)

    # the cached keys of this split: [lo, hi) below start (every query sees them)
    lo = split * CHUNK
    hi = tl.minimum(tl.minimum(lo + CHUNK, TK), start)
    for start_n in range(lo, hi, BLOCK_N):
        n_idx = start_n + offs_n
        n_valid = n_idx < hi
        k, v = load_kv_block(kc_base, vc_base, n_idx, n_valid, offs_d, d_valid, skcn, skcd, svcn, svcd, DOT_F32)
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale  # log2 units
        keep = m_valid[:, None] & n_valid[None, :]
        if HAS_BIAS:
            bias = tl.load(bias_ptr + bias_row + n_idx[None, :] * sbn, mask=keep, other=0.0)
            s = add_bias(s, bias)
        s = tl.where(keep, s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, PRECISION)

    row = (b * H + heads) * T + t  # (b, h, t), contiguous in out and in the partials
    if ONE_SPLIT:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=m_valid[:, None] & d_valid[None, :])
    else:
        part = row * NUM_SPLITS + split
        tl.store(m_ptr + part, m_i, mask=m_valid)
        tl.store(l_ptr + part, l_i, mask=m_valid)
        tl.store(acc_ptr + part[:, None] * D_PAD + offs_d[None, :], acc, mask=m_valid[:, None])


def rope_launch(dtype: torch.dtype, d_pad: int) -> dict:
    """The kernel's key block and warps on a GPU: decode attention's key block (halved for
    float32, and 16 keys for float32 from head dim 64) and 8 warps. Compiled for sm_90 with
    4 warps and decode's blocks it spilled (float32 head dim 64: 40 bytes; 128: 11 KB), the
    rotary and the new-key tile adding to the decode kernel's registers; with 8 warps and
    halved float32 blocks, none but on sm_80 at float32 head dim 64 writing partials (32
    keys: 20 bytes), which 16 keys remove (gpu_specs.rope_decode_specs: no spill at any
    launched config on sm_80 or sm_90)."""
    block_n = split_launch(dtype, d_pad)["BLOCK_N"]
    if dtype == torch.float32:
        block_n = 16 if d_pad >= 64 else max(16, block_n // 2)
    return {"BLOCK_N": block_n, "num_warps": 8}


def fused_rows(q, k_cache) -> int:
    """The query rows one program holds: (query heads per KV head) x query positions."""
    return (q.shape[1] // k_cache.shape[1]) * q.shape[2]


def supports(q, k, v, cos, sin, k_cache, v_cache, bias=None) -> bool:
    """Whether the fused kernel takes these operands (else the backend runs the composition):
    few rows per program, one float dtype, an even head dim up to 128 (at 256 it spilled
    on sm_90: 436 bytes in float32, 20 in bfloat16, where decode attention alone does not),
    a bias of at most 4 dims, and 32-bit offsets."""
    tensors = (q, k, v, cos, sin, k_cache, v_cache)
    d = q.shape[-1]
    return (q.dim() == 4 and k_cache.dim() == 4 and k_cache.shape[1] > 0 and q.shape[1] % k_cache.shape[1] == 0
            and 1 <= fused_rows(q, k_cache) <= MAX_ROWS and d % 2 == 0 and 2 <= d <= 128
            and q.dtype in (torch.float32, torch.float16, torch.bfloat16) and all(x.dtype == q.dtype for x in tensors)
            and (bias is None or bias.dim() <= 4) and not needs_wide(*tensors, bias))


def rope_decode_attention_triton(q, k, v, cos, sin, k_cache, v_cache, bias=None, *, causal: bool, scale: float,
                                 start, programs: int | None = None):
    """The launch wrapper: check, allocate partials, launch the fused kernel and (with more
    than one split) the combine kernel. `programs`: how many programs to fill (default: the
    device's; tests pass it to choose one split or several)."""
    if not supports(q, k, v, cos, sin, k_cache, v_cache, bias):
        raise ValueError(f"rope decode attention does not take q {tuple(q.shape)} {q.dtype}, k_cache "
                         f"{tuple(k_cache.shape)} {k_cache.dtype} (see supports())")
    bsz, heads, tq, d = q.shape
    kv_heads = k_cache.shape[1]
    if k.shape != (bsz, kv_heads, tq, d) or v.shape != k.shape or v_cache.shape[1:2] != k_cache.shape[1:2] \
            or k_cache.shape[3] != d or v_cache.shape[3] != d or min(k_cache.shape[0], v_cache.shape[0]) < bsz:
        raise ValueError(f"rope decode attention: k {tuple(k.shape)}, v {tuple(v.shape)}, caches "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)} do not fit q {tuple(q.shape)}")
    on_device = isinstance(start, torch.Tensor)
    capacity = min(k_cache.shape[2], v_cache.shape[2])
    if on_device:  # the static step: every slot of the buffer (the bias hides those past the new keys)
        tk = bias.shape[-1] if bias is not None else capacity
        if tk > capacity:
            raise ValueError(f"rope decode attention: a bias over {tk} keys, but the caches hold {capacity}")
    else:
        start = int(start)
        tk = start + tq
        if tk > capacity:
            raise ValueError(f"rope decode attention: the KV cache holds {capacity} positions, but {start} + {tq} "
                             "are needed")
    cos, sin = (x.expand(bsz, 1, tq, d) for x in (cos, sin))
    if bias is not None:
        try:
            bias = bias.expand(bsz, heads, tq, tk)
        except RuntimeError:
            raise ValueError(f"rope decode attention: bias {tuple(bias.shape)} does not broadcast to "
                             f"[{bsz}, {heads}, {tq}, {tk}]") from None
    check_head_dim_strides(d, q, k, v, cos, sin, k_cache, v_cache, what="rope decode attention")
    out = torch.empty(bsz, heads, tq, d, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    groups = heads // kv_heads
    d_pad = max(16, triton.next_power_of_2(d))
    block_m = max(16, triton.next_power_of_2(groups * tq))
    block_t = max(16, triton.next_power_of_2(tq))
    launch = {"BLOCK_N": 16, "num_warps": 4} if _INTERPRET else rope_launch(q.dtype, d_pad)
    block_n = launch["BLOCK_N"]
    chunk, splits = num_splits(bsz * kv_heads, max(tk, 1), block_n,
                               programs if programs is not None else _programs(q.device))
    one_split = splits == 1
    if one_split:
        m = l = acc = out
    else:
        m = torch.empty(bsz, heads, tq, splits, dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)
        acc = torch.empty(bsz, heads, tq, splits, d_pad, dtype=torch.float32, device=q.device)
    bs = tuple(bias.stride(i) for i in range(4)) if bias is not None else (0, 0, 0, 0)
    _rope_decode_kernel[(bsz * kv_heads, splits)](
        q, k, v, cos, sin, k_cache, v_cache, bias if bias is not None else q, m, l, acc, out,
        start if on_device else q,
        heads, groups, tq, tk, chunk, splits, 0 if on_device else start, float(scale) * _LOG2E,
        *q.stride(), *k.stride(), *v.stride(), cos.stride(0), cos.stride(2), cos.stride(3),
        sin.stride(0), sin.stride(2), sin.stride(3), *k_cache.stride(), *v_cache.stride(), *bs,
        HEAD_DIM=d, D_PAD=d_pad, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_T=block_t, HAS_BIAS=bias is not None,
        CAUSAL=bool(causal), START_PTR=on_device, ONE_SPLIT=one_split, DOT_F32=_INTERPRET and q.dtype == torch.bfloat16,
        PRECISION="ieee" if q.dtype == torch.float32 or _INTERPRET else "tf32",
        num_warps=launch["num_warps"],
    )
    if one_split:
        return out
    _decode_combine_kernel[(bsz * heads * tq,)](
        m, l, acc, out, m, heads * tq, splits, out.stride(0), out.stride(2), out.stride(3),
        HEAD_DIM=d, D_PAD=d_pad, BLOCK_S=combine_block(splits), WIDE=False, SINKS=False, num_warps=4,
    )
    return out
