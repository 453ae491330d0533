"""Attention sinks (SINKS) in the Triton kernels: prefill flash, split decode (one split
and several, where the combine kernel adds the sink once), and their paged reads, through
Triton's interpreter on CPU, against a float64 torch reference written out here:

    out_i = sum_j e^(s_ij - m) v_j / (sum_j e^(s_ij - m) + e^(sink_h - m))."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fxforge.codegen.kernels import decode_attention  # noqa: E402
from fxforge.codegen.kernels.attention import attention_triton, paged_attention_triton  # noqa: E402
from fxforge.codegen.kernels.decode_attention import (decode_attention_triton,  # noqa: E402
                                                      paged_decode_attention_triton)

TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def sinks_reference(q, k, v, sink, bias=None, *, causal, scale, window=None, softcap=None):
    """The sink as one more softmax term with a zero value, in float64."""
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    s = q @ k.transpose(-1, -2) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    tq, tk = s.shape[-2:]
    if bias is not None:
        s = s + bias.double().cpu()
    pos = torch.arange(tq, device="cpu")[:, None] + (tk - tq)
    j = torch.arange(tk, device="cpu")[None, :]
    if causal:
        s = s.masked_fill(j > pos, float("-inf"))
    if window is not None:
        s = s.masked_fill(j <= pos - window, float("-inf"))
    sink = sink.double().cpu().view(1, -1, 1, 1)
    m = torch.maximum(s.amax(-1, keepdim=True), sink)
    e = (s - m).exp()
    return (e @ v) / (e.sum(-1, keepdim=True) + (sink - m).exp())


def check(out, ref, dtype):
    tol = TOL[dtype] * max(1.0, ref.abs().max().item())
    torch.testing.assert_close(out.double().cpu(), ref, atol=tol, rtol=0)


def qkv(b, h, hkv, tq, tk, d=32, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)  # a CPU generator: the case is built on the CPU, then moved
    q, k, v = (torch.randn(b, n, t, d, generator=gen, device="cpu") for n, t in ((h, tq), (hkv, tk), (hkv, tk)))
    sink = torch.randn(h, generator=gen, device="cpu") * 2
    dev = torch.get_default_device()
    return tuple(t.to(dtype).to(dev) for t in (q, k, v)) + (sink.to(dev),)


@pytest.mark.parametrize("tq, tk, causal, window", [(5, 5, True, None), (20, 37, True, None), (17, 17, False, None),
                                                     (24, 40, True, 6)])
@pytest.mark.parametrize("h, hkv", [(4, 4), (4, 2)])
def test_prefill(tq, tk, causal, window, h, hkv):
    q, k, v, sink = qkv(2, h, hkv, tq, tk)
    out = attention_triton(q, k, v, sink, causal=causal, scale=0.3, window=window, sinks=True)
    check(out, sinks_reference(q, k, v, sink, causal=causal, scale=0.3, window=window), q.dtype)


def test_prefill_with_bias_softcap_and_masked_rows():
    # a row whose every key is masked by -inf gives zeros (all weight on the sink)
    q, k, v, sink = qkv(2, 4, 2, 6, 9)
    bias = torch.randn(2, 1, 6, 9)
    bias[1, :, 2] = float("-inf")
    out = attention_triton(q, k, v, bias, sink, causal=False, scale=0.3, softcap=4.0, sinks=True)
    ref = sinks_reference(q, k, v, sink, bias, causal=False, scale=0.3, softcap=4.0)
    check(out, ref, q.dtype)
    assert out[1, :, 2].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_half_precision(dtype):
    q, k, v, sink = qkv(1, 4, 2, 16, 16, dtype=dtype)
    out = attention_triton(q, k, v, sink, causal=True, scale=0.3, sinks=True)
    check(out, sinks_reference(q, k, v, sink, causal=True, scale=0.3), dtype)


@pytest.mark.parametrize("tk", [1, 10, 37, 130])
@pytest.mark.parametrize("b, h, hkv", [(1, 4, 1), (2, 4, 2), (3, 4, 4)])
def test_decode_one_and_several_splits(tk, b, h, hkv):
    q, k, v, sink = qkv(b, h, hkv, 1, tk)
    out = decode_attention_triton(q, k, v, sink, causal=True, scale=0.3, sinks=True)
    check(out, sinks_reference(q, k, v, sink, causal=True, scale=0.3), q.dtype)


def test_decode_splits_really_split_and_the_sink_enters_once(monkeypatch):
    # 130 keys over one batch x KV head: several splits, then the combine kernel (the sink
    # counted once there); 10 keys over 12 batch x KV heads: one split (ONE_SPLIT)
    launches = []
    real = decode_attention._decode_combine_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                launches.append(kw["SINKS"])
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(decode_attention, "_decode_combine_kernel", Spy())
    q, k, v, sink = qkv(1, 4, 1, 1, 130)
    chunk, splits = decode_attention.num_splits(1, 130, 16, decode_attention._programs(q.device))
    assert splits > 1
    out = decode_attention_triton(q, k, v, sink, causal=True, scale=0.3, sinks=True)
    check(out, sinks_reference(q, k, v, sink, causal=True, scale=0.3), q.dtype)
    assert launches == [True]
    q, k, v, sink = qkv(6, 4, 2, 1, 10)
    out = decode_attention_triton(q, k, v, sink, causal=True, scale=0.3, sinks=True)
    check(out, sinks_reference(q, k, v, sink, causal=True, scale=0.3), q.dtype)
    assert launches == [True]  # one split: no combine launch


def test_decode_with_bias_window_and_softcap():
    q, k, v, sink = qkv(2, 4, 2, 1, 70)
    bias = torch.randn(2, 1, 1, 70)
    bias[0, ..., :5] = torch.finfo(torch.float32).min
    out = decode_attention_triton(q, k, v, bias, sink, causal=True, scale=0.3, window=20, softcap=3.0, sinks=True)
    check(out, sinks_reference(q, k, v, sink, bias, causal=True, scale=0.3, window=20, softcap=3.0), q.dtype)


def paged(k, v, page=4, seed=0):
    """k, v [B, Hkv, T, D] scattered into paged caches; (caches, table, row starts 0)."""
    b, hkv, t, d = k.shape
    per_row = -(-t // page)
    ids = torch.randperm(b * per_row + 2, generator=torch.Generator().manual_seed(seed), device="cpu").int()
    table = ids[:b * per_row].view(b, per_row)
    kc = torch.zeros(b * per_row + 2, page, hkv, d, dtype=k.dtype, device="cpu")
    vc = torch.zeros_like(kc)
    for row in range(b):
        for n in range(per_row):
            blk = int(table[row, n])
            take = slice(n * page, min(t, (n + 1) * page))
            width = take.stop - take.start
            kc[blk, :width] = k[row, :, take].transpose(0, 1).cpu()
            vc[blk, :width] = v[row, :, take].transpose(0, 1).cpu()
    dev = torch.get_default_device()
    return kc.to(dev), vc.to(dev), table.to(dev), torch.zeros(b, dtype=torch.int32, device=dev)


@pytest.mark.parametrize("tq, tk", [(1, 37), (1, 130), (6, 23)])
def test_paged(tq, tk):
    q, k, v, sink = qkv(2, 4, 2, tq, tk)
    kc, vc, table, starts = paged(k, v)
    bias = torch.zeros(2, 1, 1, tk)
    kernel = paged_decode_attention_triton if tq == 1 else paged_attention_triton
    out = kernel(q, kc, vc, table, starts, bias, sink, causal=True, scale=0.3, sinks=True)
    check(out, sinks_reference(q, k, v, sink, causal=True, scale=0.3), q.dtype)


def test_sinks_of_the_wrong_shape_are_refused():
    q, k, v, sink = qkv(1, 4, 2, 3, 3)
    with pytest.raises(ValueError, match="sinks must be"):
        attention_triton(q, k, v, sink[:2], causal=True, scale=0.3, sinks=True)
    with pytest.raises(ValueError, match="sinks must be"):
        decode_attention_triton(q[:, :, :1], k, v, sink[:2], causal=True, scale=0.3, sinks=True)
