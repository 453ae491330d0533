"""fuse_attention on masks over a query length and a key length of their own (cross-
attention, a memory): a mask form is concluded only where it holds for every relation
between the two lengths a call can have, and declined masks get one report note each."""
import math

import pytest
import torch
import torch.nn as nn

import fxforge
from fxforge.ir.guards import GuardError
from fxforge.passes.shape_eval import sample_sizes

D, H = 32, 4
FINFO_MIN = torch.finfo(torch.float32).min


class _BottomRightCausal(nn.Module):
    """Query i (the last T of S positions) sees keys j <= i + S - T of a memory of S keys:
    with more queries than keys, the first T - S rows see no key at all."""

    def __init__(self, fill, memory_first=False, checked=False, offset_cap=None):
        super().__init__()
        self.fill, self.memory_first, self.checked, self.offset_cap = fill, memory_first, checked, offset_cap
        self.q = nn.Linear(D, D)
        self.kv = nn.Linear(D, 2 * D)

    def forward(self, a, b):
        x, mem = (b, a) if self.memory_first else (a, b)
        B, T, _ = x.shape
        S = mem.shape[1]
        if self.checked:
            torch._check(T <= S)
        q = self.q(x).view(B, T, H, -1).transpose(1, 2)
        k, v = self.kv(mem).view(B, S, 2, H, -1).permute(2, 0, 3, 1, 4)
        if self.offset_cap is None:
            keep = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)
        else:  # the offset S - T, but never over the cap: causal only while S - T <= cap
            offset = torch.full((), S - T).clamp(max=self.offset_cap)
            keep = torch.arange(S)[None, :] - torch.arange(T)[:, None] <= offset
        s = (q @ k.transpose(-1, -2)) * (D // H) ** -0.5
        s = s.masked_fill(~keep, self.fill)
        return (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D)


def _optimize(model, t=5, s=9):
    x, mem = torch.randn(2, t, D), torch.randn(2, s, D)
    return fxforge.optimize(model, (mem, x) if model.memory_first else (x, mem), verbose=False)


def _call_both(model, fast, t, s):
    x, mem = torch.randn(1, t, D), torch.randn(1, s, D)
    args = (mem, x) if model.memory_first else (x, mem)
    return fast(*args), model(*args)


def _causal_attentions(fast):
    return [n for n in fast.graph.nodes if n.op == "attention" and n.attrs["causal"]]


def test_samples_put_each_of_two_lengths_above_the_other():
    """Samples with T < T1 only never showed a mask at more queries than keys."""
    g = fxforge.parse("graph(%x: f32[B, T, 8], %m: f32[B, T1, 8]) {\n  %1: f32[B, T, 8] = neg(%x)\n"
                      "  return (%1, %m)\n}")
    sym = {str(s): s for s in sample_sizes(g)[0]}
    orders = {(sz[sym["T"]] > sz[sym["T1"]]) for sz in sample_sizes(g)}
    assert orders == {True, False}


@pytest.mark.parametrize("memory_first", [False, True])
def test_bottom_right_causal_over_fewer_keys_keeps_the_eager_answer(memory_first):
    """Was attention{causal=true}: right while T <= S, but at T=7, S=4 the first 3 rows see no
    key, so eager's softmax over all-finfo.min scores is the mean of V and the fused op gave
    something else (0.96 off). The mask now stays the op's bias."""
    torch.manual_seed(0)
    model = _BottomRightCausal(FINFO_MIN, memory_first).eval()
    fast = _optimize(model)
    assert fast.graph.count("attention") == 1 and not _causal_attentions(fast), fast.ir
    for t, s in [(5, 9), (6, 6), (7, 4), (3, 1)]:
        out, ref = _call_both(model, fast, t, s)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_bottom_right_causal_over_fewer_keys_with_neg_inf_fill_is_not_fused():
    """With a -inf fill those rows are NaN in eager: fusing (causal or with the mask as a
    bias) gives 0 there, so the attention stays unfused, with the empty-row note only."""
    torch.manual_seed(0)
    model = _BottomRightCausal(float("-inf")).eval()
    fast = _optimize(model)
    assert fast.graph.count("attention") == 0, fast.ir
    report = fast.report()
    assert "leaves some query row no key" in report and "spelling is not one" not in report
    out, ref = _call_both(model, fast, 7, 4)
    assert ref[:, :3].isnan().all() and torch.equal(out.isnan(), ref.isnan())
    torch.testing.assert_close(out[:, 3:], ref[:, 3:], atol=1e-5, rtol=1e-5)


def test_an_offset_capped_past_the_samples_is_not_taken_for_causal():
    """Under a guard T <= S, causal while S - T <= 16 (every sample, and the long probes
    that give both lengths one size), not beyond: each length alone is probed long too."""
    torch.manual_seed(0)
    model = _BottomRightCausal(FINFO_MIN, checked=True, offset_cap=16).eval()
    fast = _optimize(model)
    assert not _causal_attentions(fast), fast.ir
    out, ref = _call_both(model, fast, 2, 40)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_a_guard_that_keeps_queries_within_keys_lets_the_mask_be_causal():
    """torch._check(T <= S): no call has more queries than keys, so bottom-right causal is
    proven for every call the guards let through; one outside them is refused."""
    torch.manual_seed(0)
    model = _BottomRightCausal(FINFO_MIN, checked=True).eval()
    fast = _optimize(model)
    assert len(_causal_attentions(fast)) == 1 and fast.graph.count("attention") == 1, fast.ir
    for t, s in [(5, 9), (6, 6), (1, 3)]:
        out, ref = _call_both(model, fast, t, s)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(GuardError):
        fast(torch.randn(1, 7, D), torch.randn(1, 4, D))


class _CachedDecoding(nn.Module):
    """T new positions after P cached ones: keys cat(past, new) of P + T, never fewer than
    the queries."""

    def forward(self, x, past):  # x [B, T, 3, H, 8] (q, k, v), past [B, P, 2, H, 8] (k, v)
        q, k, v = x.permute(2, 0, 3, 1, 4)
        past_k, past_v = past.permute(2, 0, 3, 1, 4)
        T, P = q.shape[2], past_k.shape[2]
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        keep = torch.ones(T, P + T, dtype=torch.bool).tril(diagonal=P)
        s = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~keep, float("-inf"))
        return s.softmax(-1) @ v


def test_cached_decoding_mask_over_past_and_new_keys_is_still_causal():
    torch.manual_seed(0)
    model = _CachedDecoding().eval()

    def args(t, p):
        return torch.randn(2, t, 3, H, 8), torch.randn(2, p, 2, H, 8)

    fast = fxforge.optimize(model, args(5, 9), verbose=False)
    assert len(_causal_attentions(fast)) == 1 and fast.graph.count("attention") == 1, fast.ir
    for t, p in [(1, 7), (6, 2), (3, 3)]:
        a = args(t, p)
        torch.testing.assert_close(fast(*a), model(*a), atol=1e-5, rtol=1e-5)


class _PaddingNegInfAndPlain(nn.Module):
    """One attention masked with -inf from an input padding mask (declined), and one plain
    (fused): the driver sweeps twice, and tried the declined one in each."""

    def forward(self, q, k, v, mask):
        s = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(mask[:, None, None, :] == 0, float("-inf"))
        plain = torch.softmax(k @ q.transpose(-1, -2) * 0.3, -1) @ v
        return s.softmax(-1) @ v + plain


def test_a_declined_neg_inf_fill_gets_one_note_counted_once():
    """The report said '2 attention(s) left unfused' for one, and then also called its
    spelling unknown ('softmax ops whose probabilities feed a matmul')."""
    q, k, v = (torch.randn(2, 2, 4, 8) for _ in range(3))
    fast = fxforge.optimize(_PaddingNegInfAndPlain(), (q, k, v, torch.ones(2, 4, dtype=torch.long)), verbose=False)
    assert fast.graph.count("attention") == 1
    report = fast.report()
    assert "1 attention(s) left unfused" in report and "finfo(dtype).min" in report, report
    assert "softmax ops whose probabilities feed a matmul" not in report, report


class _SquareSubsequentMask(nn.Module):
    """nn.Transformer's float mask (0, and -inf above the diagonal), made in forward from
    the length: shape-only, so the causal attribute."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(D, H, batch_first=True)

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.attn(x, x, x, attn_mask=mask, need_weights=False)[0]


def test_generate_square_subsequent_mask_made_in_forward_is_causal():
    torch.manual_seed(0)
    model = _SquareSubsequentMask().eval()
    fast = fxforge.optimize(model, (torch.randn(2, 6, D),), verbose=False)
    assert len(_causal_attentions(fast)) == 1 and fast.graph.count("attention") == 1, fast.ir
    x = torch.randn(1, 9, D)
    torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=1e-5)
