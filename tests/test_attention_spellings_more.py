"""Attention spellings fuse_attention proves besides the common ones: a bias subtracted from
the scores (`s - slopes * (i - j)`, `s - penalty`: the bias times -1, exact), and nanoGPT's
causal mask sliced from a tril buffer shorter than the pass's long probe (block_size < 64:
the slice clamps there, as the model cannot run there either, so the longest length the
mask fits is probed)."""
import math

import pytest
import torch
import torch.nn as nn

import fxforge
from fxforge.ir.guards import GuardError

H, D = 4, 16
SLOPES = torch.tensor([2 ** (-8 * (i + 1) / H) for i in range(H)])


class SubtractedBias(nn.Module):
    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling
        self.register_buffer("slopes", SLOPES.clone(), persistent=False)

    def forward(self, q, k, v, pen=None):
        t = q.shape[2]
        i = torch.arange(t)
        s = q @ k.transpose(-1, -2) * 0.25
        if self.spelling == "alibi":
            s = s - self.slopes.view(1, H, 1, 1) * (i[:, None] - i[None, :]).float()
        else:
            s = s - pen
        s = s.masked_fill(i[None, :] > i[:, None], float("-inf"))
        return s.softmax(-1) @ v


@pytest.mark.parametrize("spelling", ["alibi", "penalty"])
def test_a_subtracted_bias_is_fused(spelling):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, H, 8, D) for _ in range(3))
    pen = (torch.rand(2, 1, 8, 8) * 3,) if spelling == "penalty" else ()
    model = SubtractedBias(spelling).eval()
    fast = fxforge.optimize(model, (q, k, v, *pen), verbose=False)
    assert fast.graph.count("attention") == 1
    calls = [(q, k, v, *pen), tuple(torch.randn_like(x) for x in (q, k, v, *pen))]
    if spelling == "alibi":
        assert "1 alibi" in fast.report()
        calls.append(tuple(torch.randn(1, H, 8, D) for _ in range(3)))
    for args in calls:
        torch.testing.assert_close(fast(*args), model(*args), atol=1e-5, rtol=1e-5)


class BiasMinusScores(nn.Module):
    """pen - s: the scores negated, not attention of them."""

    def forward(self, q, k, v, pen):
        return (pen - q @ k.transpose(-1, -2)).softmax(-1) @ v


def test_a_bias_minus_the_scores_is_not_fused():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, H, 6, D) for _ in range(3))
    pen = torch.rand(2, 1, 6, 6)
    fast = fxforge.optimize(BiasMinusScores().eval(), (q, k, v, pen), verbose=False)
    assert fast.graph.count("attention") == 0
    torch.testing.assert_close(fast(q, k, v, pen), BiasMinusScores()(q, k, v, pen))


class NanoGPT(nn.Module):
    """nanoGPT's manual path: att.masked_fill(self.bias[:, :, :T, :T] == 0, -inf)."""

    def __init__(self, block_size: int, vocab: int = 50, width: int = 32, heads: int = 4):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(block_size, width)
        self.c_attn, self.c_proj, self.head = nn.Linear(width, 3 * width), nn.Linear(width, width), nn.Linear(width, vocab)
        self.heads = heads
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, idx):
        b, t = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(t))
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.c_attn(x).chunk(3, dim=-1))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        y = (att.softmax(-1) @ v).transpose(1, 2).contiguous().view(b, t, -1)
        return self.head(x + self.c_proj(y))


@pytest.mark.parametrize("block_size", [16, 63])
def test_a_causal_buffer_shorter_than_the_long_probe_is_causal(block_size):
    torch.manual_seed(0)
    model = NanoGPT(block_size).eval()
    ids = torch.randint(0, 50, (2, 8))
    fast = fxforge.optimize(model, (ids,), verbose=False)
    assert "1 causal" in fast.report()
    longest = torch.randint(0, 50, (1, block_size))
    torch.testing.assert_close(fast(longest), model(longest), atol=1e-5, rtol=1e-5)
    with pytest.raises((GuardError, IndexError)):  # eager refuses past its buffer too
        fast(torch.randint(0, 50, (1, block_size + 1)))


class CrossAttention(nn.Module):
    """nn.MultiheadAttention over a memory (a decoder's cross-attention): export names the
    memory's batch B1, B only under a guard, so k's head dim read floor(8*B1/B). The pass
    declined nothing and its attention op failed its type check (a crash in optimize());
    with it off, the view MHA makes after contiguous() met the non-contiguous tensor (the IR
    drops contiguous()): a crash at the first call; and batch 1 was refused."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.mha = nn.MultiheadAttention(32, 4, batch_first=batch_first)

    def forward(self, x, memory):
        return self.mha(x, memory, memory, need_weights=False)[0]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("disable", [(), ("fuse_attention",)], ids=["default", "no_fuse_attention"])
def test_cross_attention_through_multihead_attention_answers(batch_first, disable):
    torch.manual_seed(0)
    model = CrossAttention(batch_first).eval()
    shape = (lambda b, t: (b, t, 32)) if batch_first else (lambda b, t: (t, b, 32))
    x, memory = torch.randn(shape(2, 5)), torch.randn(shape(2, 7))
    fast = fxforge.optimize(model, (x, memory), disable=disable, verbose=False)
    # the memory's batch is the queries' (capture unifies the two: a guard says them equal)
    assert fast.graph.count("attention") == (0 if disable else 1)
    one = torch.randn(shape(1, 3)), torch.randn(shape(1, 4))
    with torch.no_grad():
        for args in ((x, memory), one):
            torch.testing.assert_close(fast(*args), model(*args), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="the graph needs them equal"):
        fast(x, torch.randn(shape(3, 7)))


class ReturnsWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=True)


def test_returned_probabilities_are_the_reason_given():
    model = ReturnsWeights().eval()
    x = torch.randn(2, 5, 32)
    fast = fxforge.optimize(model, (x,), verbose=False)
    assert "returns the attention probabilities too" in fast.report()
    assert "spelling is not one" not in fast.report()
    with torch.no_grad():
        for got, want in zip(fast(x), model(x)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
