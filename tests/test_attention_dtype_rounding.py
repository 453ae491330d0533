"""fuse_attention and the dtypes between the two matmuls of an attention.

  - scores or probabilities rounded to a narrower dtype on the way (`scores.half().float()`,
    `probs.bfloat16().float()`, a softmax in float16, in a float32 model): the fused op
    computes in float32 and would drop that rounding (max abs diff 5e-4 .. 4e-3 on outputs
    ~1), so the match declines and the ops run as written;
  - softmax and `@ v` in a wider dtype than q k^T (float32 q, k with float64 values; a
    float16 model doing softmax @ v.float()): one op in one dtype cannot compute both (SDPA
    raised "Expected query, key, and value to have the same dtype" on every call), so the
    match declines;
  - exact widenings and rounding back to the model's dtype (softmax in float32 or float64,
    `.to(v.dtype)` / `.to(query.dtype)` before `@ v`, a no-op cast) still fuse."""
import warnings

import pytest
import torch
import torch.nn as nn

import fxforge


class Attn(nn.Module):
    """fn(q k^T / sqrt(D), v) on [B, T, H, D] inputs, the heads moved to dim 1."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, q, k, v):
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        return self.fn(q @ k.transpose(-1, -2) / 8 ** 0.5, v).transpose(1, 2)


def _inputs(b, t, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, t, 2, 8, generator=gen).to(dtype) for _ in range(3))


def _optimize_and_compare(fn, dtype=torch.float32, atol=1e-5, rtol=1e-5):
    """The optimized model on other inputs than its example's, against eager; its IR."""
    model = Attn(fn).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = fxforge.optimize(model, example_inputs=_inputs(2, 6, dtype))
    args = _inputs(3, 9, dtype, seed=1)
    with torch.no_grad():
        ref = model(*args)
    out = fast(*args)
    assert out.dtype == ref.dtype
    assert torch.allclose(out.float(), ref.float(), atol=atol, rtol=rtol), (out.float() - ref.float()).abs().max()
    return fast.ir


# -- bug 1: a narrowing round trip between the matmuls is not what float32 attention computes --
ROUNDED = {
    "scores_half_float": lambda a, v: a.half().float().softmax(-1) @ v,
    "scores_bfloat16_float": lambda a, v: a.bfloat16().float().softmax(-1) @ v,
    "probs_bfloat16_float": lambda a, v: a.softmax(-1).bfloat16().float() @ v,
    "probs_half_float": lambda a, v: a.softmax(-1).half().float() @ v,
    "softmax_in_half": lambda a, v: a.half().softmax(-1).float() @ v,
    "softmax_in_bfloat16_to_float": lambda a, v: torch.softmax(a.bfloat16(), -1, dtype=torch.float32) @ v,
}


@pytest.mark.parametrize("name", list(ROUNDED))
def test_narrowing_round_trip_between_the_matmuls_stays_unfused(name):
    ir = _optimize_and_compare(ROUNDED[name])
    assert "attention(" not in ir


# -- casts that change no value the float32 op computes: still fused --------------------------
EXACT = {
    "no_cast": lambda a, v: a.softmax(-1) @ v,
    "noop_float": lambda a, v: a.float().softmax(-1).float() @ v,
    "softmax_in_float64_rounded_back": lambda a, v: a.double().softmax(-1).float() @ v,
    "softmax_dtype_float64_to_float": lambda a, v: torch.softmax(a, -1, dtype=torch.float64).to(v.dtype) @ v,
}


@pytest.mark.parametrize("name", list(EXACT))
def test_exact_casts_between_the_matmuls_still_fuse(name):
    ir = _optimize_and_compare(EXACT[name], atol=1e-5, rtol=1e-5)
    assert "attention(" in ir


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_softmax_upcast_and_cast_back_still_fuses_in_half_models(dtype):
    # transformers' eager attention: softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    def fn(a, v):
        return torch.softmax(a, dim=-1, dtype=torch.float32).to(v.dtype) @ v

    ir = _optimize_and_compare(fn, dtype=dtype, atol=2e-2, rtol=2e-2)
    assert "attention(" in ir


# -- bug 2: softmax and @ v in a wider dtype than q k^T --------------------------------------
def _wide_values(wide):
    def fn(a, v):
        return (a.to(wide).softmax(-1) @ v.to(wide)).to(v.dtype)
    return fn


@pytest.mark.parametrize("dtype, wide", [(torch.float32, torch.float64), (torch.float16, torch.float32),
                                         (torch.bfloat16, torch.float32)], ids=["f32_f64", "f16_f32", "bf16_f32"])
def test_softmax_and_values_in_a_wider_dtype_run_and_equal_eager(dtype, wide):
    ir = _optimize_and_compare(_wide_values(wide), dtype=dtype)
    assert "attention(" not in ir


def test_wide_softmax_cast_back_before_the_values_still_fuses():
    # scores.float().softmax(-1).to(v.dtype) @ v in a float16 model: one float16 attention
    def fn(a, v):
        return a.float().softmax(-1).to(v.dtype) @ v

    ir = _optimize_and_compare(fn, dtype=torch.float16, atol=2e-3, rtol=2e-3)
    assert "attention(" in ir


# -- attention sinks: their walkers skip casts the same way -----------------------------------
class Sinks(nn.Module):
    """Causal attention with a per-head sink, as a softmax column or as a gate (gpt-oss,
    granite_swa), `spelling` saying where the probabilities or the gate are rounded."""

    def __init__(self, spelling):
        super().__init__()
        torch.manual_seed(0)
        self.spelling = spelling
        self.qkv = nn.Linear(8, 24)
        self.sinks = nn.Parameter(torch.randn(2))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 2, 4).permute(2, 0, 3, 1, 4)
        i = torch.arange(t)
        s = (q @ k.transpose(-1, -2) / 2.0).masked_fill(~(i[None, :] <= i[:, None]), torch.finfo(x.dtype).min)
        if self.spelling.startswith("cat"):
            p = torch.softmax(torch.cat([s, self.sinks.reshape(1, -1, 1, 1).expand(b, -1, t, 1)], -1), -1)
            if self.spelling == "cat_rounded":
                p = p.bfloat16().float()
            return p[..., :-1] @ v
        d = torch.logsumexp(s, -1) - self.sinks.reshape(1, -1, 1)
        if self.spelling == "gate_rounded":
            d = d.bfloat16().float()
        return (torch.softmax(s, -1) @ v) * torch.sigmoid(d).unsqueeze(-1)


@pytest.mark.parametrize("spelling, fused", [("cat", True), ("gate", True), ("cat_rounded", False),
                                             ("gate_rounded", False)])
def test_sinks_with_a_narrowing_round_trip_stay_unfused(spelling, fused):
    model = Sinks(spelling).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = fxforge.optimize(model, (torch.randn(2, 5, 8),))
    x = torch.randn(3, 7, 8)
    with torch.no_grad():
        ref = model(x)
    assert torch.allclose(fast(x), ref, atol=1e-5, rtol=1e-5), (fast(x) - ref).abs().max()
    assert ("attention(" in fast.ir) == fused
