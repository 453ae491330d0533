"""Attention variants spelled out as the models spell them (in float64), to cross-check the
op's reference and the kernels against something that shares no code with them."""
import torch


def eager_attention(q, k, v, bias=None, *, scale, causal=True, softcap=None, window=None, slopes=None):
    """repeat_kv (Llama), scores, Gemma2's soft-cap (divide, tanh, multiply), Bloom's ALiBi
    (slopes times the key position from a cumsum of ones: a per-row shift of ours), and a
    sliding window as a band cut from tril/triu (Mistral), filled with finfo.min."""
    h, hkv = q.shape[1], k.shape[1]
    b, tq, tk = q.shape[0], q.shape[2], k.shape[2]
    k = k[:, :, None].expand(b, hkv, h // hkv, tk, k.shape[-1]).reshape(b, h, tk, k.shape[-1])
    v = v[:, :, None].expand(b, hkv, h // hkv, tk, v.shape[-1]).reshape(b, h, tk, v.shape[-1])
    s = torch.matmul(q.double(), k.double().transpose(2, 3)) * scale
    if softcap is not None:
        s = s / softcap
        s = torch.tanh(s)
        s = s * softcap
    if slopes is not None:
        key_pos = torch.ones(b, tk, dtype=torch.long).cumsum(-1) - 1
        s = s + slopes.double()[None, :, None, None] * key_pos[:, None, None, :].double()
    if bias is not None:
        s = s + bias.double()
    keep = torch.ones(tq, tk, dtype=torch.bool)
    if causal:
        keep = torch.tril(keep, diagonal=tk - tq)
    if window is not None:
        keep = keep & torch.triu(torch.ones(tq, tk, dtype=torch.bool), diagonal=tk - tq - window + 1)
    s = s.masked_fill(~keep, torch.finfo(s.dtype).min)
    return torch.matmul(torch.softmax(s, dim=-1), v.double())


def alibi_slopes(h: int) -> torch.Tensor:
    """Bloom's slopes for h heads (h a power of two here): 2^(-8 i / h)."""
    return torch.tensor([2.0 ** (-8.0 * (i + 1) / h) for i in range(h)])


def check_variant_kernel(kernel, reference, tol, q, k, v, bias=None, *, slopes=None, **kw):
    """Run `kernel` and `reference` (same signature) on one attention variant: the reference
    must equal the eager spelling, and the kernel the reference, within `tol` (absolute)."""
    import torch

    extra = (bias,) if slopes is None else (bias, slopes)
    out = kernel(q, k, v, *extra, alibi=slopes is not None, **kw)
    ref = reference(q, k, v, *extra, alibi=slopes is not None, **kw)
    eager = eager_attention(q, k, v, bias, slopes=slopes, **kw)
    tol = tol * max(1.0, ref.abs().max().item())
    torch.testing.assert_close(ref.float(), eager.float(), atol=tol, rtol=0)
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=0)
    return out


def narrow_then_wide(run, q, k, v, bias, variant: str, window: int, module, monkeypatch):
    """`run(q, k, v, bias[, slopes], **kw)` with 32-bit offsets, then with the 64-bit (WIDE)
    specialization forced by lowering `module.INDEX_32_LIMIT` to 1: (narrow, wide).
    variant "all" adds a soft-cap, a sliding `window` and ALiBi."""
    kw = dict(causal=True, scale=0.2)
    if variant == "all":
        kw.update(softcap=3.0, window=window, alibi=True)
    args = (q, k, v, bias) + ((alibi_slopes(q.shape[1]),) if variant == "all" else ())
    narrow = run(*args, **kw)
    monkeypatch.setattr(module, "INDEX_32_LIMIT", 1)
    return narrow, run(*args, **kw)
