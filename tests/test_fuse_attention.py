"""fuse_attention: every spelling becomes one attention op, the negative cases stay
unfused, every attention in the zoo fuses, and outputs still equal eager."""
import inspect
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxforge
from fxforge.ir import parse, typecheck
from fxforge.passes.fuse_attention import fuse_attention
from fxforge.passes.manager import PassContext

import zoo
from helpers import assert_close_to_eager, benchmark_table

H, D = 4, 16


def heads(x):  # [B, T, H*D] -> [B, H, T, D]
    return x.view(x.size(0), x.size(1), H, D).transpose(1, 2)


def causal_tril(t, device=None):
    return torch.tril(torch.ones(t, t, dtype=torch.bool, device=device))


class Spelling(nn.Module):
    """x [B, T, 3*H*D] splits into q, k, v of [B, T, H, D] (heads in dim 2), transposed to
    [B, H, T, D]; `kind` picks the attention spelling."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.drop = nn.Dropout(0.1)
        self.register_buffer("bias", torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64))
        self.register_buffer("slopes", torch.tensor([2.0 ** -(2 * (i + 1)) for i in range(H)]))

    def forward(self, x):
        q, k, v = (y.view(x.size(0), x.size(1), H, D).transpose(1, 2) for y in x.chunk(3, dim=-1))
        t = q.size(2)
        kind = self.kind
        if kind == "sdpa_causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if kind == "sdpa_bool_mask":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_tril(t, q.device))
        if kind == "sdpa_scale":
            return F.scaled_dot_product_attention(q, k, v, scale=0.3)
        if kind == "sdpa_gqa":
            return F.scaled_dot_product_attention(q, k[:, :2], v[:, :2], is_causal=True, enable_gqa=True)
        if kind == "div_sqrt_masked_fill":
            s = q @ k.transpose(-2, -1) / math.sqrt(D)
            s = s.masked_fill(~causal_tril(t, q.device), float("-inf"))
            return self.drop(F.softmax(s, dim=-1)) @ v
        if kind == "mul_triu_where_finfo":
            s = torch.matmul(q, k.transpose(2, 3)) * (D ** -0.5)
            upper = torch.triu(torch.ones(t, t, dtype=torch.bool, device=q.device), diagonal=1)
            s = torch.where(upper, torch.finfo(s.dtype).min, s)
            return torch.matmul(F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)
        if kind == "prescaled_q_and_k_arange_mask":
            scale = D ** -0.25
            s = (q * scale) @ (k * scale).transpose(-1, -2)
            i = torch.arange(t, device=q.device)
            mask = torch.where(i[None, :] <= i[:, None], 0.0, float("-inf"))
            return F.softmax(s + mask, dim=-1) @ v
        if kind == "buffer_slice":
            s = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D))
            s = s.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
            return F.softmax(s, dim=-1) @ v
        if kind == "bmm_folded_heads":
            b = q.size(0)
            q3, k3, v3 = (x.reshape(b * H, t, D) for x in (q, k, v))
            s = torch.baddbmm(torch.zeros(b * H, t, t, device=q.device), q3, k3.transpose(1, 2), beta=0.0,
                              alpha=1 / math.sqrt(D))
            return torch.bmm(F.softmax(s, dim=-1), v3).view(b, H, t, D)
        if kind == "repeat_kv_expand":
            kk = k[:, :2, None, :, :].expand(k.size(0), 2, 2, t, D).reshape(k.size(0), 4, t, D)
            vv = v[:, :2, None, :, :].expand(v.size(0), 2, 2, t, D).reshape(v.size(0), 4, t, D)
            s = q @ kk.transpose(-2, -1) * D ** -0.5
            return F.softmax(s, dim=-1) @ vv
        if kind == "repeat_interleave":
            kk, vv = k[:, :2].repeat_interleave(2, dim=1), v[:, :2].repeat_interleave(2, dim=1)
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=True)
        if kind == "additive_data_mask":
            # a mask that depends on the data is kept as the bias input
            s = q @ k.transpose(-2, -1) * D ** -0.5 + (v.sum(-1, keepdim=True) > 0).float().transpose(-1, -2) * -1e9
            return F.softmax(s, dim=-1) @ v
        # -- variants: soft-cap, sliding window, ALiBi slopes, multi-query by broadcasting --
        if kind == "softcap_then_causal":  # Gemma2: scale, divide, tanh, multiply, then the mask
            s = q @ k.transpose(-2, -1) * D ** -0.5
            s = torch.tanh(s / 2.0) * 2.0
            return F.softmax(s.masked_fill(~causal_tril(t, q.device), float("-inf")), dim=-1) @ v
        if kind == "band_window":  # Mistral-style band: causal and at most 3 keys back
            keep = causal_tril(t, q.device) & torch.triu(torch.ones(t, t, dtype=torch.bool, device=q.device), -2)
            s = q @ k.transpose(-2, -1) * D ** -0.5
            return F.softmax(s.masked_fill(~keep, torch.finfo(s.dtype).min), dim=-1) @ v
        if kind == "alibi_key_positions":  # bloom: slopes * key position (a per-row shift of k - q)
            slopes = self.slopes
            pos = torch.ones(1, t, dtype=torch.long, device=q.device).cumsum(-1) - 1
            s = q @ k.transpose(-2, -1) * D ** -0.5 + slopes[None, :, None, None] * pos[:, None, None, :]
            return F.softmax(s.masked_fill(~causal_tril(t, q.device), float("-inf")), dim=-1) @ v
        if kind == "alibi_relative_sdpa":  # mpt: slopes * (k - q) as an SDPA float mask with the causal part
            slopes = self.slopes * 3.0
            i = torch.arange(t, device=q.device)
            rel = (i[None, :] - i[:, None]).float()
            mask = slopes[:, None, None] * rel + torch.where(i[None, :] <= i[:, None], 0.0, float("-inf"))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None])
        if kind == "mqa_broadcast":  # falcon / gpt_bigcode: one K/V head, broadcast by matmul
            s = q @ k[:, :1].transpose(-2, -1) / math.sqrt(D)
            s = s.masked_fill(~causal_tril(t, q.device), float("-inf"))
            return F.softmax(s, dim=-1) @ v[:, :1]
        if kind == "mqa_broadcast_inplace_div":  # falcon's scores.div_(c)
            s = q @ k[:, :1].transpose(-2, -1)
            s.div_(math.sqrt(D))
            s = s + torch.where(causal_tril(t, q.device), 0.0, torch.finfo(s.dtype).min)
            return F.softmax(s, dim=-1) @ v[:, :1]
        # -- variants that must not become attributes (they stay a bias, or unfused) --
        if kind == "alibi_bf16":  # falcon builds ALiBi in bfloat16: rounded, not slopes * position
            slopes = self.slopes
            pos = torch.arange(t, device=q.device)
            alibi = (slopes[:, None].bfloat16() * pos[None, :]).float()
            s = q @ k.transpose(-2, -1) * D ** -0.5 + alibi[None, :, None, :]
            return F.softmax(s.masked_fill(~causal_tril(t, q.device), float("-inf")), dim=-1) @ v
        if kind == "slopes_that_scale_with_length":  # position / T: linear at each T, not ALiBi
            pos = torch.arange(t, device=q.device).float()
            pos = pos / (pos.sum() + 1.0)
            s = q @ k.transpose(-2, -1) * D ** -0.5 + pos
            return F.softmax(s.masked_fill(~causal_tril(t, q.device), float("-inf")), dim=-1) @ v
        if kind == "bias_before_softcap":  # the mask inside the tanh: not what the op computes
            s = q @ k.transpose(-2, -1) * D ** -0.5
            s = torch.where(causal_tril(t, q.device), 0.0, -1e4) + s
            return F.softmax(torch.tanh(s / 30.0) * 30.0, dim=-1) @ v
        # -- negative cases: must stay unfused --
        if kind == "softmax_other_dim":
            return F.softmax(q @ k.transpose(-2, -1) * D ** -0.5, dim=-2) @ v
        if kind == "tanh_softcap":
            s = 30.0 * torch.tanh(q @ k.transpose(-2, -1) * D ** -0.5 / 30.0)
            return F.softmax(s, dim=-1) @ v
        if kind == "weights_returned":
            p = F.softmax(q @ k.transpose(-2, -1) * D ** -0.5, dim=-1)
            return p @ v, p
        if kind == "masked_fill_not_negative":
            s = (q @ k.transpose(-2, -1) * D ** -0.5).masked_fill(~causal_tril(t, q.device), 0.5)
            return F.softmax(s, dim=-1) @ v
        raise ValueError(kind)


# spelling -> (fused attention ops, causal?)
FUSED = {
    "sdpa_causal": True, "sdpa_bool_mask": True, "sdpa_scale": False, "sdpa_gqa": True,
    "div_sqrt_masked_fill": True, "mul_triu_where_finfo": True, "prescaled_q_and_k_arange_mask": True,
    "buffer_slice": True, "bmm_folded_heads": False, "repeat_kv_expand": False, "repeat_interleave": True,
    "additive_data_mask": False,
    "tanh_softcap": False, "softcap_then_causal": True, "band_window": True, "alibi_key_positions": True,
    "alibi_relative_sdpa": True, "mqa_broadcast": True, "mqa_broadcast_inplace_div": True,
    "alibi_bf16": False, "slopes_that_scale_with_length": False,
}
# spelling -> the variant attributes (and inputs) its attention gets; others get none
VARIANT_ATTRS = {
    "tanh_softcap": {"softcap": 30.0}, "softcap_then_causal": {"softcap": 2.0}, "band_window": {"window": 3},
    "alibi_key_positions": {"alibi": True}, "alibi_relative_sdpa": {"alibi": True},
}
UNFUSED = ["softmax_other_dim", "weights_returned", "masked_fill_not_negative", "bias_before_softcap"]


def qkv(b, t):
    return (torch.randn(b, t, 3 * H * D),)


def check_equal(model, fast):
    for b, t in [(1, 1), (2, 5), (3, 13)]:
        inputs = qkv(b, t)
        with torch.no_grad():
            ref = model(*inputs)
        out = fast(*inputs)
        for r, o in zip(ref if isinstance(ref, tuple) else (ref,), out if isinstance(out, tuple) else (out,)):
            assert_close_to_eager(r, o)


@pytest.mark.parametrize("kind", FUSED)
def test_spelling_fuses_to_one_attention(kind):
    model = Spelling(kind).eval()
    fast = fxforge.optimize(model, qkv(2, 7))
    atts = [n for n in fast.graph.nodes if n.op == "attention"]
    assert len(atts) == 1, fast.ir
    assert atts[0].attrs["causal"] is FUSED[kind], fast.ir
    variant = {a: atts[0].attrs[a] for a in ("softcap", "window", "alibi") if a in atts[0].attrs}
    assert variant == VARIANT_ATTRS.get(kind, {}), fast.ir
    if "alibi" in variant:  # slopes f32[H], no [B, H, T, T] bias
        assert len(atts[0].inputs) == 4 and atts[0].inputs[3].type.shape == (H,), fast.ir
    if kind.startswith("mqa"):
        assert int(atts[0].inputs[1].shape[1]) == 1 and "div_" not in fast.ir, fast.ir
    if kind in ("alibi_bf16", "slopes_that_scale_with_length"):
        assert len(atts[0].inputs) == 4 and atts[0].inputs[3].rank == 4  # exact, as a bias
    ops = fast.graph.op_counts()
    assert "softmax" not in ops and "sdpa" not in ops
    if kind in ("sdpa_gqa", "repeat_kv_expand", "repeat_interleave"):
        # the repeat is gone: the op reads the 2 KV heads directly
        assert int(atts[0].inputs[1].shape[1]) == 2 and "expand" not in ops and "repeat_interleave" not in fast.ir
    check_equal(model, fast)


@pytest.mark.parametrize("kind", UNFUSED)
def test_unprovable_spellings_stay_unfused(kind):
    model = Spelling(kind).eval()
    fast = fxforge.optimize(model, qkv(2, 7))
    assert fast.graph.count("attention") == 0, fast.ir
    assert fast.graph.count("softmax") == 1
    check_equal(model, fast)


def test_ir_text_before_and_after():
    before = parse("""graph(%q: f32[B, 4, T, 16], %k: f32[B, 2, T, 16], %v: f32[B, 2, T, 16]) {
  %1: f32[B, 2, 1, T, 16] = unsqueeze(%k) {dim=2}
  %2: f32[B, 2, 2, T, 16] = expand(%1) {shape=(B, 2, 2, T, 16)}
  %3: f32[B, 4, T, 16] = view(%2) {shape=(B, 4, T, 16)}
  %4: f32[B, 2, 1, T, 16] = unsqueeze(%v) {dim=2}
  %5: f32[B, 2, 2, T, 16] = expand(%4) {shape=(B, 2, 2, T, 16)}
  %6: f32[B, 4, T, 16] = view(%5) {shape=(B, 4, T, 16)}
  %7: f32[B, 4, 16, T] = permute(%3) {dims=(0, 1, 3, 2)}
  %8: f32[B, 4, T, T] = matmul(%q, %7)
  %9: f32[] = const() {value=4.0, dtype=f32}
  %10: f32[B, 4, T, T] = div(%8, %9)
  %11: i64[T] = arange() {start=0, end=T, step=1, dtype=i64}
  %12: i64[T, 1] = unsqueeze(%11) {dim=1}
  %13: i64[1, T] = unsqueeze(%11) {dim=0}
  %14: bool[T, T] = gt(%13, %12)
  %15: f32[] = const() {value=-inf, dtype=f32}
  %16: f32[B, 4, T, T] = where(%14, %15, %10)
  %17: f32[B, 4, T, T] = softmax(%16) {dim=3, dtype=none}
  %18: f32[B, 4, T, 16] = matmul(%17, %6)
  return (%18)
}""")
    ctx = PassContext()
    after = fuse_attention(before, ctx)
    typecheck(after)
    assert str(after) == """graph(%q: f32[B, 4, T, 16], %k: f32[B, 2, T, 16], %v: f32[B, 2, T, 16]) {
  %1: f32[B, 4, T, 16] = attention(%q, %k, %v) {causal=true, scale=0.25}
  return (%1)
}"""
    assert ctx.rules["matmul_softmax_matmul"] == 1


def test_constants_first_are_matched_after_cleanup_puts_them_last():
    # fuse_attention matches `x * c` only; cleanup's canonical form turns `c * x` (and
    # `x / 4`) into it, so the rule table needs one spelling, not one per operand order
    from fxforge.passes.cleanup import cleanup

    before = parse("""graph(%q: f32[B, 4, T, 16], %k: f32[B, 4, T, 16], %v: f32[B, 4, T, 16]) {
  %1: f32[] = const() {value=0.5, dtype=f32}
  %2: f32[B, 4, T, 16] = mul(%1, %q)
  %3: f32[B, 4, 16, T] = permute(%k) {dims=(0, 1, 3, 2)}
  %4: f32[B, 4, T, T] = matmul(%2, %3)
  %5: f32[] = const() {value=4.0, dtype=f32}
  %6: f32[B, 4, T, T] = div(%4, %5)
  %7: f32[B, 4, T, T] = mul(%1, %6)
  %8: f32[B, 4, T, T] = softmax(%7) {dim=3, dtype=none}
  %9: f32[B, 4, T, 16] = matmul(%8, %v)
  return (%9)
}""")
    assert fuse_attention(before).count("attention") == 0  # the raw spelling is not matched
    after = fuse_attention(cleanup(before))
    typecheck(after)
    (att,) = [n for n in after.nodes if n.op == "attention"]
    assert att.attrs["scale"] == 0.5 * 0.25 * 0.5 and not att.attrs["causal"]


ZOO = {
    "nanogpt_fx": (zoo.nanogpt_traced, 2), "gpt2_eager": (lambda: zoo.gpt2("eager"), 2),
    "gpt2_sdpa": (lambda: zoo.gpt2("sdpa"), 2), "llama_eager": (lambda: zoo.llama("eager"), 2),
    "llama_sdpa_gqa": (lambda: zoo.llama("sdpa"), 2),
}


@pytest.mark.parametrize("name", ZOO)
def test_every_attention_in_the_zoo_fuses_causal(name):
    make, layers = ZOO[name]
    model, vocab = make()
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),))
    stats = next(s for s in fast.stats if s.name == "fuse_attention")
    assert sum(stats.rules.values()) == layers
    atts = [n for n in fast.graph.nodes if n.op == "attention"]
    assert len(atts) == layers and all(n.attrs["causal"] and len(n.inputs) == 3 for n in atts)
    assert fast.graph.count("softmax") == 0 and fast.graph.count("sdpa") == 0


def test_padding_mask_stays_as_bias_and_matches_eager():
    model, vocab = zoo.llama("sdpa")
    ids = torch.randint(0, vocab, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :4] = 0
    fast = fxforge.optimize(model, example_kwargs={"input_ids": ids, "attention_mask": mask})
    atts = [n for n in fast.graph.nodes if n.op == "attention"]
    assert len(atts) == 2 and all(len(n.inputs) == 4 and not n.attrs["causal"] for n in atts)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    out = fast(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@zoo.needs_smollm2()
def test_smollm2_fuses_30_of_30(smollm2_captures):
    model, tok = zoo.smollm2()
    fast = fxforge.optimize(model, (tok("The capital of France is", return_tensors="pt").input_ids,),
                            capture_cache=smollm2_captures)
    atts = [n for n in fast.graph.nodes if n.op == "attention"]
    assert len(atts) == 30 and all(n.attrs["causal"] for n in atts)
    # GQA: 9 query heads read 3 KV heads, no repeat left
    assert all(int(n.inputs[0].shape[1]) == 9 and int(n.inputs[1].shape[1]) == 3 for n in atts)


@pytest.mark.parametrize("tq, tk", [(5, 5), (1, 9), (4, 9)])
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_torch_backend_attention_equals_reference(tq, tk, groups, with_bias, causal):
    from fxforge.ir.ops import attention_reference
    from fxforge.runtime.torch_kernels import attention_sdpa

    q = torch.randn(2, 3 * groups, tq, 16)
    k, v = torch.randn(2, 3, tk, 16), torch.randn(2, 3, tk, 16)
    bias = torch.randn(2, 1, 1, tk) if with_bias else None
    torch.testing.assert_close(attention_sdpa(q, k, v, bias, causal=causal, scale=0.3),
                               attention_reference(q, k, v, bias, causal=causal, scale=0.3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tq, tk, bias_heads", [(6, 20, None), (6, 20, 1), (6, 20, 9), (6, 6, None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_gqa_reads_kv_heads_as_repeated_kv_would(tq, tk, bias_heads, dtype, monkeypatch):
    # several queries per row (a verification step, a prefill chunk; (6, 6): is_causal) on
    # the CPU: SDPA reads each K/V head for its 3 query heads, with no copy of K/V, and the
    # answer is the copies' bit for bit
    import torch.nn.functional as F

    from fxforge.runtime.torch_kernels import attention_sdpa

    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 9, tq, 16, generator=gen).to(dtype)
    k, v = (torch.randn(2, 3, tk, 16, generator=gen).to(dtype) for _ in range(2))
    bias = None if bias_heads is None else torch.randn(2, bias_heads, tq, tk, generator=gen).to(dtype)
    keep = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
    mask = torch.zeros(tq, tk, dtype=dtype).masked_fill(~keep, float("-inf")) + (0 if bias is None else bias)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                                         attn_mask=mask, scale=0.3)

    def no_copies(*args, **kwargs):
        raise AssertionError("K/V repeated on the CPU")

    monkeypatch.setattr(torch.Tensor, "repeat_interleave", no_copies)
    assert torch.equal(attention_sdpa(q, k, v, bias, causal=True, scale=0.3), ref)


@pytest.mark.parametrize("name", ["gpt2_sdpa", "llama_sdpa_gqa"])
def test_interpret_backend_runs_the_triton_attention_kernel(name):
    model, vocab = ZOO[name][0]()
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),), backend="interpret")
    from fxforge.runtime.backends import attention_dispatch

    # FlashAttention for T > 1, the split-context decode kernel for T = 1
    assert inspect.unwrap(fast.program.fn.__globals__["op_attention"]) is attention_dispatch
    for b, t in [(1, 1), (2, 11)]:
        ids = torch.randint(0, vocab, (b, t))
        with torch.no_grad():
            ref = model(ids)
        assert_close_to_eager(ref, fast(ids))


@pytest.mark.parametrize("window", [4, 16])  # 16: longer than every size the causal check samples
def test_sliding_window_becomes_the_window_attribute_and_equals_eager_beyond_it(window):
    model, vocab = zoo.mistral(sliding_window=window)
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 9)),))
    attention = [n for n in fast.graph.nodes if n.op == "attention"]
    assert attention and all(n.attrs["causal"] and n.attrs["window"] == window and len(n.inputs) == 3
                             for n in attention)
    for t in (window - 1, window + 1, 2 * window + 3):
        ids = torch.randint(0, vocab, (2, t))
        with torch.no_grad():
            ref = model(ids).logits
        torch.testing.assert_close(fast(ids).logits, ref, atol=1e-5, rtol=1e-5)


def test_mistral_without_a_window_still_folds_to_causal():
    model, vocab = zoo.mistral(sliding_window=None, n_layer=1)
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 9)),))
    assert [n.attrs["causal"] for n in fast.graph.nodes if n.op == "attention"] == [True]


def test_the_gqa_attention_benchmark_runs():
    """benchmarks/gqa_attention.py (docs/benchmarks.md): each case checks that the torch
    backend's attention equals SDPA on repeated K/V, then times both."""
    rows = benchmark_table("gqa_attention.py", "--cases", "3x7,4x4", "--heads", "4x2", "--head-dim", "8",
                           "--repeat", "2")
    assert [row[0] for row in rows] == ["3x7", "4x4"], rows
    assert all(float(row[1]) > 0 and float(row[2]) > 0 for row in rows), rows


def test_attention_left_unfused_is_named_in_the_report():
    class ClampedScores(torch.nn.Module):  # a clamp between the scores and the softmax: not provably attention
        def forward(self, q, k, v):
            return torch.softmax((q @ k.transpose(-1, -2)).clamp(max=30.0), dim=-1) @ v

    class Router(torch.nn.Module):  # a softmax that feeds a top-k: not attention
        def forward(self, x):
            return torch.softmax(x, dim=-1).topk(2, dim=-1).values

    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    fast = fxforge.optimize(ClampedScores(), (q, k, v))
    assert fast.graph.count("attention") == 0
    assert "1 softmax ops whose probabilities feed a matmul" in fast.report()
    torch.testing.assert_close(fast(q, k, v), ClampedScores()(q, k, v))
    assert "softmax ops whose probabilities" not in fxforge.optimize(Router(), (torch.randn(2, 6),)).report()


class _PaddingMaskedWithNegInf(nn.Module):
    def forward(self, q, k, v, mask):  # mask [B, Tk] of 0/1 (key padding)
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        s = s.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
        return s.softmax(-1) @ v


def test_neg_inf_fill_from_an_input_mask_stays_unfused_with_a_note():
    """A row the padding mask drops entirely is NaN in eager and was 0 once fused (SDPA's
    convention): not provably the same, so declined, with the remedy in the report; a
    causal -inf fill (shape-only: no row is ever empty) still fuses."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 4, 8) for _ in range(3))
    mask = torch.ones(2, 4, dtype=torch.long)
    model = _PaddingMaskedWithNegInf().eval()
    fast = fxforge.optimize(model, (q, k, v, mask))
    assert fast.graph.count("attention") == 0
    assert "finfo(dtype).min" in fast.report()
    mask[1] = 0
    out, ref = fast(q, k, v, mask), model(q, k, v, mask)
    assert torch.equal(out.isnan(), ref.isnan()) and ref[1].isnan().all()
    assert torch.allclose(out[0], ref[0], atol=1e-6)
    causal = fxforge.optimize(Spelling("div_sqrt_masked_fill").eval(), qkv(2, 7))
    assert causal.graph.count("attention") == 1


class _HiddenWindow(nn.Module):
    """A sliding window (or chunk, or clamped ALiBi distance) of 20 / 16 keys written so
    that no integer constant says how wide: the proof must probe past it."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.register_buffer("window", torch.tensor(20), persistent=False)

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = x.view(B, T, 3, 2, 16).permute(2, 0, 3, 1, 4)
        i = torch.arange(T)
        d = i[:, None] - i[None, :]
        keep = d >= 0
        if self.how == "float_lt":
            keep = keep & (d < 20.0)
        elif self.how == "float_mul":
            keep = keep & (d * 0.05 < 1.0)
        elif self.how == "buffer_0d":
            keep = keep & (d < self.window)
        elif self.how == "tensor_in_forward":
            keep = keep & (d < torch.tensor(20))
        elif self.how == "float_chunks":
            f = i.float()
            keep = keep & (torch.floor(f[:, None] / 16.0) == torch.floor(f[None, :] / 16.0))
        s = q @ k.transpose(-1, -2) / 4.0
        if self.how == "clamped_alibi":
            s = s + torch.tensor([0.5, 0.25]).view(-1, 1, 1) * (-d).float().clamp(min=-20.0)
        return s.masked_fill(~keep, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("how", ["float_lt", "float_mul", "buffer_0d", "tensor_in_forward", "float_chunks",
                                 "clamped_alibi"])
def test_a_window_hidden_in_floats_or_tensors_is_not_dropped(how):
    """Masks proven causal at lengths 5-12 only became plain causal though they drop keys
    20 (16) back: the probe lengths now count float constants, their reciprocals, clamp
    bounds and small tensors' values, and always include a generous power of two."""
    torch.manual_seed(0)
    model = _HiddenWindow(how).eval()
    fast = fxforge.optimize(model, (torch.randn(2, 8, 96),))
    if how in ("float_lt", "float_mul", "buffer_0d", "tensor_in_forward"):
        assert [n.attrs.get("window") for n in fast.graph.nodes if n.op == "attention"] == [20]
    x = torch.randn(1, 40, 96)
    torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=1e-5)


class _StrictlyCausal(nn.Module):
    def __init__(self, fill):
        super().__init__()
        self.fill = fill

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = x.view(B, T, 3, 2, 16).permute(2, 0, 3, 1, 4)
        i = torch.arange(T)
        s = (q @ k.transpose(-1, -2) / 4.0).masked_fill(~(i[None, :] < i[:, None]), self.fill)
        return s.softmax(-1) @ v


def test_shape_mask_leaving_a_row_no_key_under_neg_inf_is_not_fused():
    """Query 0 sees no key (j < i): eager's softmax of an all -inf row is NaN, fused
    attention gives 0, so the rewrite declines (with a note); a finite fill stays fused."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 96)
    model = _StrictlyCausal(float("-inf")).eval()
    fast = fxforge.optimize(model, (x,))
    assert fast.graph.count("attention") == 0
    assert "leaves some query row no key" in fast.report()
    out, ref = fast(x), model(x)
    assert ref[:, :, 0].isnan().all() and torch.equal(out.isnan(), ref.isnan())
    torch.testing.assert_close(out[:, :, 1:], ref[:, :, 1:])
    finite = fxforge.optimize(_StrictlyCausal(torch.finfo(torch.float32).min).eval(), (x,))
    assert finite.graph.count("attention") == 1
