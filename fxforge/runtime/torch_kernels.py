"""Fast plain-torch implementations of fused IR ops, for the `torch` backend (CPU):
attention through SDPA, quantized linears through PyTorch's packed-weight kernels.

Each equals the op's reference in `ir/ops.py` (tests check it) but calls PyTorch's
optimized library kernels instead of spelling the math out.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ir.ops import (_packed, alibi_bias, attention_inputs, attention_reference, causal_keep,
                      paged_key_slots, window_keep)
from ..ir.quant_formats import Int8Packed, W8A8Packed, dequantize_weight, w8a8_linear_decomposed


def attention_sdpa(q, k, v, bias=None, slopes=None, sink=None, *, causal: bool, scale: float, softcap=None,
                   window=None, alibi: bool = False, sinks: bool = False):
    """attention via F.scaled_dot_product_attention. SDPA's is_causal is top-left aligned
    when Tq != Tk; ours is bottom-right (new queries at the end of the keys), so that case
    becomes an explicit mask. GQA maps query heads onto fewer KV heads without copies
    on the CPU (SDPA's enable_gqa), else by repeating K/V. A sliding window and ALiBi
    slopes become part of the additive mask ([1, H, Tq, Tk] at most; with one query, the
    keys before the window are sliced off instead). SDPA has no soft-cap: soft-capped
    attention runs the reference (float32), and so does a call where SDPA's CPU kernel would
    turn a NaN into zeros (_nan_blind). Sinks: see attention_sinks_sdpa."""
    bias, slopes, sink = attention_inputs(bias, slopes, sink, alibi=alibi, sinks=sinks)
    if 0 in q.shape[:3]:  # no query rows (an empty batch, heads folded with it): 0 KV heads to divide by
        return q.new_empty(*q.shape[:3], v.shape[-1])
    if _nan_blind(q, k):
        return attention_reference(q, k, v, bias, slopes, sink, causal=causal, scale=scale, softcap=softcap,
                                   window=window)
    if sink is not None:
        return attention_sinks_sdpa(q, k, v, bias, slopes, sink, causal=causal, scale=scale, softcap=softcap,
                                    window=window)
    if softcap is not None:
        return attention_reference(q, k, v, bias, slopes, causal=causal, scale=scale, softcap=softcap, window=window)
    tq, tk = q.shape[-2], k.shape[-2]
    if window is not None and tq == 1 and tk > window:
        # decoding: the one query sees only the last `window` keys (relative positions, and
        # so ALiBi, are the same in the view)
        start = tk - int(window)
        k, v = k[:, :, start:], v[:, :, start:]
        bias = bias[..., start:] if bias is not None and bias.shape[-1] != 1 else bias
        tk, window = tk - start, None
    bias = _window_and_alibi_added(q, bias, slopes, window, tq, tk)
    groups = q.shape[1] // k.shape[1]
    if tq == 1 and groups > 1 and (bias is None or bias.shape[1] in (1, q.shape[1])):
        # decoding: the query heads of a group all sit at the one position, so they can be
        # rows of one query block over the shared K/V head, with no copy of the cache
        b, h, _, d = q.shape
        if bias is not None and bias.shape[1] == h:  # per-head (ALiBi): head h = kv head * groups + g
            bias = bias.reshape(bias.shape[0], k.shape[1], groups, bias.shape[-1])
        out = attention_sdpa(q.reshape(b, k.shape[1], groups, d), k, v, bias, causal=False, scale=scale)
        return out.reshape(b, h, 1, v.shape[-1])  # the values' head dim (MLA's differs from d)
    mask = None if bias is None else _as_mask(bias, q)
    if causal and tq == 1:
        causal = False  # bottom-right aligned: the one query sees every key
    if causal and (tq != tk or mask is not None):
        mask = _causal_added(mask, tq, tk, _mask_dtype(q), q.device)
        causal = False
    if groups > 1 and q.device.type == "cpu":
        # SDPA's CPU kernels read each K/V head for its query heads (the same values, bit
        # for bit, as repeating K/V): level at 6 queries over 22 keys, 1.5x faster over 400,
        # 2.3x for 64 queries over 600 (benchmarks/gqa_attention.py, docs/benchmarks.md)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                              enable_gqa=True)
    if groups > 1:  # elsewhere a mask can rule out the GQA-aware kernels (CUDA's flash has none)
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


# PyTorch's CPU flash kernel (SDPA's, and the sinks path's) takes the max of a block of
# fewer keys than its vector width (8 floats with AVX2, 16 with AVX-512) in scalar code
# that skips NaN: a row whose every score there is NaN (a NaN in its query, or in every key
# it sees; an inf times keys of both signs) then reads as a row with no key, and gives zeros
# where eager's softmax, and the op's reference, give NaN. From this many keys on, the
# vectorized max keeps the NaN. In float16 and bfloat16 it drops it at any number of keys.
NAN_BLIND_KEYS = 16
_HALF = (torch.float16, torch.bfloat16)


def _nan_blind(q, k) -> bool:
    """Whether SDPA's CPU kernel could turn this call's NaN into zeros (NAN_BLIND_KEYS):
    a NaN or inf in q or k over so few keys (or any number, in half precision); then the
    reference computes it. The check reads q and k once, beside a call that reads them
    once per query block. (q.k overflowing from finite operands is not seen here: only the
    soft-capped calls, which run the reference, keep that NaN.)"""
    return (q.device.type == "cpu" and (k.shape[-2] < NAN_BLIND_KEYS or q.dtype in _HALF)
            and not bool(torch.isfinite(q).all() and torch.isfinite(k).all()))


def _window_and_alibi_added(q, bias, slopes, window, tq: int, tk: int):
    """bias plus a sliding window's -inf and ALiBi's slopes * (k_pos - q_pos) (bottom-right
    aligned), in q's dtype; bias as it is where there is neither."""
    if window is None and slopes is None:
        return bias
    extra = torch.zeros(1, 1, tq, tk, dtype=torch.float32, device=q.device)
    if window is not None:
        extra = extra.masked_fill(~window_keep(tq, tk, int(window), q.device), float("-inf"))
    if slopes is not None:
        extra = extra + alibi_bias(slopes, tq, tk)
    extra = extra.to(_mask_dtype(q))
    return extra if bias is None else _as_mask(bias, q) + extra


def _mask_dtype(q) -> torch.dtype:
    """The dtype of the additive mask SDPA gets: q's, but float32 for float16 on the CPU
    (whose kernels take it and compute in float32 anyway): fuse_attention's bias holds a
    masked_fill's value as a number that swamps any score (SWAMP, -2**100), which float16
    cannot hold."""
    return torch.float32 if q.device.type == "cpu" and q.dtype == torch.float16 else q.dtype


def _as_mask(bias, q):
    """bias in _mask_dtype(q); on a device whose kernels take float16 masks only, a finite
    value beyond float16's range is its min (what the model's fill would have been), not -inf."""
    dtype = _mask_dtype(q)
    if bias.dtype == dtype:
        return bias
    if dtype == torch.float16 and bias.dtype.is_floating_point:
        low = torch.finfo(dtype).min
        bias = torch.where(torch.isneginf(bias), bias, bias.clamp_min(low))
    return bias.to(dtype)


def _causal_added(mask, tq: int, tk: int, dtype, device):
    """mask (or nothing) plus -inf above the bottom-right aligned diagonal."""
    keep = causal_keep(tq, tk, device)
    causal_bias = torch.zeros(tq, tk, dtype=dtype, device=device).masked_fill(~keep, float("-inf"))
    return causal_bias if mask is None else mask + causal_bias


def _full_mask(q, k, bias, slopes, *, causal: bool, window) -> torch.Tensor | None:
    """The additive mask [.., Tq, Tk] (_mask_dtype(q)) of bias, ALiBi slopes, causal and
    window (bottom-right aligned), or None when there is nothing to mask."""
    tq, tk = q.shape[-2], k.shape[-2]
    mask = _window_and_alibi_added(q, bias, slopes, window, tq, tk)
    if mask is not None:
        mask = _as_mask(mask, q)
    return _causal_added(mask, tq, tk, _mask_dtype(q), q.device) if causal and tq > 1 else mask


def attention_sinks_sdpa(q, k, v, bias, slopes, sink, *, causal: bool, scale: float, softcap=None, window=None):
    """attention with sinks (a logit per query head that joins the softmax with a zero
    value): on the CPU, SDPA's flash kernel also returns each row's logsumexp L, and
    out * sigmoid(L - sink) = out * Z / (Z + e^sink) with Z = e^L the row's softmax sum, so
    the N x N scores are never made. Elsewhere (and for float64, which that kernel does
    not take) exactly: one more key of zeros in front of K and V, whose score 0 the mask
    raises to the sink. A soft-cap runs the reference."""
    if softcap is not None:
        return attention_reference(q, k, v, bias, slopes, sink, causal=causal, scale=scale, softcap=softcap,
                                   window=window, alibi=slopes is not None, sinks=True)
    heads, groups = q.shape[1], q.shape[1] // k.shape[1]
    mask = _full_mask(q, k, bias, slopes, causal=causal, window=window)
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16, torch.float16):
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=mask, scale=scale)
        gate = torch.sigmoid(lse.float() - sink.float().reshape(1, heads, 1))
        return (out.float() * gate.unsqueeze(-1)).to(q.dtype)
    b, tq = q.shape[0], q.shape[2]
    zeros = k.new_zeros(k.shape[0], k.shape[1], 1, k.shape[3])
    k = torch.cat([zeros, k], dim=2)
    v = torch.cat([v.new_zeros(v.shape[0], v.shape[1], 1, v.shape[3]), v], dim=2)
    column = sink.to(_mask_dtype(q)).reshape(1, heads, 1, 1)
    if mask is None:
        mask = torch.zeros(1, 1, 1, k.shape[2] - 1, dtype=_mask_dtype(q), device=q.device)
    shape = torch.broadcast_shapes(mask.shape[:-1], (1, heads, 1))
    mask = torch.cat([column.expand(*shape, 1), mask.expand(*shape, mask.shape[-1])], dim=-1)
    if mask.shape[0] not in (1, b) or mask.shape[2] not in (1, tq):
        raise ValueError(f"attention: a bias of shape {tuple(mask.shape)} does not fit the scores")
    return attention_sdpa(q, k, v, mask, causal=False, scale=scale)


class PagedAttentionSDPA:
    """paged_attention on the torch backend, one per built program: K/V gathered through the
    block table into dense [B, Hkv, keys, D] tensors, then attention_sdpa.

    Every layer of a step reads the same block table and row starts, so the key slots are
    worked out once per step (the last step's are kept, matched by tensor identity and
    version) instead of twice per layer: ten small ops x 2 x layers per decode step.

    Padding keys read as 0 (the op's definition), but where the step's key bias masks every
    one of them (the dtype's lowest value or -inf: what the engine's and generate()'s steps
    give them) the zeroing is skipped: a masked key gets exactly zero weight whatever it
    holds, and a padding key holds its own row's first key (paged_key_slots), so it is
    non-finite only where that row's real first key already makes the output so. The same
    answer, without an index_fill_ per K and V per layer (3.5% of a 16-row CPU decode step).

    Decode steps (one query per row) on the CPU, padding masked: the engine's rows differ
    in length by hundreds of keys (prompts of 16-512 tokens and more), and one padded batch
    gathers and attends over the longest row's keys for every row. So the rows are split
    into groups of similar length (length_groups), each gathered and attended over its own
    longest row's keys: the keys every row of a group has as padding are left out, which
    changes no answer (they had exactly zero weight): SmolLM2 serving's 16-row steps gathered
    20-30% fewer keys, and took 13-32% less time on one thread."""

    def __init__(self):
        self._last = None  # (table, row_start, keys, block size, versions, flat slots, valid)
        self._masked = None  # (bias, its version, slots of _last, whether the bias masks the padding)
        self._groups = None  # (table, row_start, keys, block size, versions, groups): see _length_groups

    @staticmethod
    def _same_step(last, table, row_start, keys: int, block_size: int, versions: tuple) -> bool:
        """Whether a per-step record `last` (table, row_start, keys, block size, versions,
        ...) was made for these inputs (`versions`: theirs now, _versions): the same
        tensors, unchanged since, and sizes. Never for inference tensors (made inside
        torch.inference_mode): they keep no version, so an in-place edit could not be told
        from the same step."""
        return (None not in versions and last is not None and last[0] is table and last[1] is row_start
                and last[2:5] == (keys, block_size, versions))

    @staticmethod
    def _versions(*tensors) -> tuple:
        """The tensors' version counters (None for an inference tensor, which has none)."""
        return tuple(None if t.is_inference() else t._version for t in tensors)

    def _slots(self, table, row_start, keys: int, block_size: int):
        last, versions = self._last, self._versions(table, row_start)
        if self._same_step(last, table, row_start, keys, block_size, versions):
            return last[5], last[6]
        slots, valid = paged_key_slots(table, row_start, keys, block_size)
        if table.device.type == "cpu":
            # the padding keys as flat indices, to zero just those: multiplying the whole
            # gathered [B, keys, Hkv, D] by a [B, keys, 1, 1] mask cost more than the
            # gather itself on the CPU (a broadcast over the two innermost dims), twice a
            # layer; on a GPU, nonzero would be a host sync (and break graph capture)
            padding = (~valid).flatten().nonzero().flatten()
        else:
            padding = valid[:, :, None, None]
        self._last = last = (table, row_start, keys, block_size, versions, slots.flatten(), padding)
        return last[5], last[6]

    def _bias_masks_padding(self, bias, padding, rows: int) -> bool:
        """Whether `bias` gives every padding key (flat indices `padding`, CPU) the dtype's
        lowest value or -inf, in every head and query row; once per step, as the slots."""
        masked, (version,) = self._masked, self._versions(bias)
        if (masked is not None and masked[0] is bias and version is not None and masked[1] == version
                and masked[2] is padding):
            return masked[3]
        answer = True
        if padding.numel():
            # [B, keys, the rest] as rows of B * keys, the flat key indices of the slots
            per_key = bias.expand(rows, *bias.shape[1:]).movedim(-1, 1).reshape(rows * bias.shape[-1], -1)
            answer = bool((per_key.index_select(0, padding) <= torch.finfo(bias.dtype).min).all())
        self._masked = (bias, version, padding, answer)
        return answer

    def gather(self, cache, table, row_start, keys: int, dtype, zero_padding: bool = True):
        """gather_paged's values (padding keys read as 0, or with zero_padding=False as
        their slots hold: see the class), as `dtype`."""
        slots, padding = self._slots(table, row_start, keys, cache.shape[1])
        if padding.dtype == torch.bool:  # the mask of kept keys [B, keys, 1, 1]
            return (_gather_keys(cache, slots, keys, cache.dtype) * padding.transpose(1, 2).to(cache.dtype)).to(dtype)
        return _gather_keys(cache, slots, keys, dtype, padding if zero_padding else None)

    def __call__(self, q, k_cache, v_cache, block_table, row_start, bias, slopes=None, sink=None, *, causal: bool,
                 scale: float, softcap=None, window=None, alibi: bool = False, sinks: bool = False):
        keys = bias.shape[-1]
        zero = True
        if block_table.device.type == "cpu" and softcap is None:
            _, padding = self._slots(block_table, row_start, keys, k_cache.shape[1])
            zero = not self._bias_masks_padding(bias, padding, row_start.shape[0])
        if not zero and q.shape[2] == 1 and q.shape[0] > 1 and window is None and slopes is None and not alibi \
                and not sinks:
            groups = self._length_groups(block_table, row_start, keys, k_cache.shape[1])
            if len(groups) > 1:
                return self._grouped_decode(q, k_cache, v_cache, bias, groups, scale)
        k = self.gather(k_cache, block_table, row_start, keys, q.dtype, zero)
        v = self.gather(v_cache, block_table, row_start, keys, q.dtype, zero)
        return attention_sdpa(q, k, v, bias, slopes, sink, causal=causal, scale=scale, softcap=softcap, window=window,
                              alibi=alibi, sinks=sinks)

    def _length_groups(self, table, row_start, keys: int, block_size: int):
        """The step's rows in groups of similar length, once per step (as the slots): for
        each, (its rows [n], its first key, its keys, the flat slots of its keys [n * keys])."""
        last, versions = self._groups, self._versions(table, row_start)
        if self._same_step(last, table, row_start, keys, block_size, versions):
            return last[5]
        groups, starts = [], row_start.tolist()
        for rows in length_groups(starts, keys):
            first = min(starts[b] for b in rows)
            index = torch.tensor(rows, dtype=torch.long)
            slots, _ = paged_key_slots(table.index_select(0, index), row_start.index_select(0, index) - first,
                                       keys - first, block_size)
            groups.append((index, first, keys - first, slots.flatten()))
        self._groups = (table, row_start, keys, block_size, versions, groups)
        return groups

    @staticmethod
    def _grouped_decode(q, k_cache, v_cache, bias, groups, scale: float):
        """Each group's attention over its own keys (padding masked: nothing to zero)."""
        out = torch.empty_like(q)
        for index, first, keys, slots in groups:
            dense = [_gather_keys(cache, slots, keys, q.dtype) for cache in (k_cache, v_cache)]
            rows_bias = bias if bias.shape[0] == 1 else bias.index_select(0, index)
            out.index_copy_(0, index, attention_sdpa(q.index_select(0, index), *dense, rows_bias[..., first:],
                                                     causal=False, scale=scale))
        return out


def _gather_keys(cache, slots, keys: int, dtype, zero=None):
    """[rows, Hkv, keys, D] in `dtype`: the paged cache's `slots` (flat, rows x keys), the
    flat positions `zero` (if given) zeroed."""
    flat = cache.view(-1, cache.shape[2], cache.shape[3])
    dense = flat.index_select(0, slots)
    if zero is not None:
        dense.index_fill_(0, zero, 0)
    return dense.view(-1, keys, *flat.shape[1:]).transpose(1, 2).to(dtype)


# A group's fixed cost in a decode step, in gathered keys of one row: its own ops per layer
# (two gathers, an SDPA, the query and output copies) cost about as much as gathering and
# attending over this many keys.
GROUP_COST_KEYS = 384


def length_groups(starts: list[int], keys: int, cost: int | None = None) -> list[list[int]]:
    """The rows (indices into `starts`, each row's first key of `keys`) in groups that
    minimize the keys gathered (each group: its rows x the keys from its earliest start on)
    plus `cost` (default GROUP_COST_KEYS) per group; rows in order of start, the longest first."""
    cost = GROUP_COST_KEYS if cost is None else cost
    order = sorted(range(len(starts)), key=lambda b: starts[b])
    best, cut = [0] + [None] * len(order), [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for begin in range(end):  # the group order[begin:end], its longest row order[begin]
            total = best[begin] + (end - begin) * (keys - starts[order[begin]]) + cost
            if best[end] is None or total < best[end]:
                best[end], cut[end] = total, begin
    groups, end = [], len(order)
    while end:
        groups.append(order[cut[end]:end])
        end = cut[end]
    return groups[::-1]


# -- quantized linears -----------------------------------------------------------------------
def _int8pack_mm(x2: Tensor, qweight: Tensor, scale: Tensor) -> Tensor | None:
    """torch._weight_int8pack_mm where it exists and pays off on CPU, else None.

    Measured on CPU (torch 2.13): the bf16 path is vectorized and fast at every M; the
    float32 path beats dequantize+matmul only for very small M.  float16 x is upcast.
    The bf16 path returns garbage (or crashes) when K is not a multiple of its vector width
    (seen with K=100, 33, 257), so it is only used for K % 64 == 0; its scales are rounded
    to bf16 (about one bf16 ulp of extra error on the output).
    """
    fn = getattr(torch, "_weight_int8pack_mm", None)
    if fn is None or x2.device.type != "cpu" or qweight.data_ptr() % 64 != 0:
        # (a weight at an address not 64-byte aligned, a view into a safetensors buffer:
        # the bf16 kernel crashed the process on one 8 bytes off 16)
        return None
    try:
        if x2.dtype == torch.bfloat16:
            if x2.shape[1] % 64 != 0:
                return None
            return fn(x2.contiguous(), qweight.contiguous(), scale.to(torch.bfloat16).contiguous())
        if x2.shape[0] <= 2:
            return fn(x2.float().contiguous(), qweight.contiguous(), scale.float().contiguous())
    except (RuntimeError, NotImplementedError):
        return None
    return None


def _int_mm(a: Tensor, b_t: Tensor) -> Tensor:
    """int8 [M, K] x int8 [K, N] -> exact product as float32 (torch._int_mm when it works)."""
    fn = getattr(torch, "_int_mm", None)
    if fn is not None:
        try:
            return fn(a, b_t).float()
        except (RuntimeError, NotImplementedError):
            pass
    return (a.double() @ b_t.double()).float()


def quant_linear_torch(x: Tensor, packed, bias: Tensor | None = None, weight: Tensor | None = None) -> Tensor:
    """The "torch" backend: fast CPU path, same result as ``quant_linear_reference``.

    ``weight``: optionally a pre-dequantized float [N, K] weight (the caller's cache; nothing
    is cached here).  int8: ``torch._weight_int8pack_mm`` when available and profitable (see
    ``_int8pack_mm``), else dequantize + float32 matmul.  int4/nf4: dequantize + float32 matmul
    (on CPU, ``optimize()`` sends int4 weights to ``aten._weight_int4pack_mm_for_cpu`` instead:
    that kernel needs a layout of its own, made once per weight, see runtime/cpu_int4.py;
    this function only sees the weights it could not take).  w8a8: the reference
    decomposition with ``torch._int_mm`` for the int8 product (``weight`` is used for the
    outliers' columns; a row's result is bitwise the same in any batch).
    """
    n, k = packed.shape
    if isinstance(packed, W8A8Packed):
        return w8a8_linear_decomposed(x, packed, bias, packed.threshold, int_mm=_int_mm, weight=weight)
    x2 = _flatten_x(x, k)
    y = None
    if weight is None and isinstance(packed, Int8Packed):
        y = _int8pack_mm(x2, packed.qweight, packed.scale)
        if y is not None:
            y = y.float()
    if y is None:
        w = weight if weight is not None else dequantize_weight(packed, torch.float32)
        y = F.linear(x2.float(), w.float())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def _flatten_x(x: Tensor, k: int) -> Tensor:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"quantized linear: x must be float32/float16/bfloat16, got {x.dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"quantized linear: x has {x.shape[-1]} input features, the weight expects {k}")
    return x.reshape(-1, k)


def quant_linear_with(impl):
    """The quant_linear IR op (x, *packed parts[, bias]) {parts, qattrs, bias} over
    `impl(x, packed, bias)`."""
    def quant_linear(x, *tensors, parts, qattrs, bias):
        packed = _packed(parts, qattrs, tensors[:len(parts)])
        return impl(x, packed, tensors[len(parts)] if bias else None)

    return quant_linear


quant_linear_op = quant_linear_with(quant_linear_torch)
