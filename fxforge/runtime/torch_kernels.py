"""Fast plain-torch implementations of fused IR ops, for the `torch` backend (CPU).

Each equals the op's reference in `ir/ops.py` (tests check it) but calls PyTorch's
optimized library kernels instead of spelling the math out.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ir.ops import causal_keep


def attention_sdpa(q, k, v, bias=None, *, causal: bool, scale: float):
    """attention via F.scaled_dot_product_attention. SDPA's is_causal is top-left aligned
    when Tq != Tk; ours is bottom-right (new queries at the end of the keys), so that case
    becomes an explicit mask. GQA maps query heads onto fewer KV heads without copies
    where SDPA supports it (enable_gqa), else by repeating K/V."""
    tq, tk = q.shape[-2], k.shape[-2]
    groups = q.shape[1] // k.shape[1]
    if tq == 1 and groups > 1 and (bias is None or bias.shape[1] == 1):
        # decoding: the query heads of a group all sit at the one position, so they can be
        # rows of one query block over the shared K/V head, with no copy of the cache
        b, h, _, d = q.shape
        out = attention_sdpa(q.reshape(b, k.shape[1], groups, d), k, v, bias, causal=False, scale=scale)
        return out.reshape(b, h, 1, d)
    mask = None
    if bias is not None:
        mask = bias.to(q.dtype) if bias.dtype != q.dtype else bias
    if causal and tq == 1:
        causal = False  # bottom-right aligned: the one query sees every key
    if causal and (tq != tk or mask is not None):
        keep = causal_keep(tq, tk, q.device)
        causal_bias = torch.zeros(tq, tk, dtype=q.dtype, device=q.device).masked_fill(~keep, float("-inf"))
        mask = causal_bias if mask is None else mask + causal_bias
        causal = False
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
