"""Attention spelled with torch.einsum: an einsum that is one batched matrix product lowers
to views around a `matmul`, so fuse_attention fuses it like `q @ k.transpose(-2, -1)`
(heads in dim 1 or dim 2, with or without a causal mask and a scale), kv_cache takes it,
and every other einsum stays the opaque call, still equal to eager."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxforge
from fxforge.ir.einsum import plan

from helpers import assert_close_to_eager

H, D = 4, 16


class EinsumSpelling(nn.Module):
    """x [B, T, 3*H*D] splits into q, k, v of [B, T, H, D]; `kind` picks the spelling.
    Results are [B, T, H*D] whichever dim the heads are in."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.register_buffer("bias", torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64))

    def forward(self, x):
        b, t = x.size(0), x.size(1)
        q, k, v = (y.view(b, t, H, D) for y in x.chunk(3, dim=-1))  # heads in dim 2
        kind = self.kind
        if kind == "heads_dim1_div_masked_fill_buffer":
            q, k, v = (y.transpose(1, 2) for y in (q, k, v))
            s = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(D)
            s = s.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
            y = torch.einsum("bhqk,bhkd->bhqd", F.softmax(s, dim=-1), v)
            return y.transpose(1, 2).reshape(b, t, H * D)
        if kind == "heads_dim1_no_mask_mul":
            q, k, v = (y.transpose(1, 2) for y in (q, k, v))
            s = torch.einsum("bhqd,bhkd->bhqk", q, k) * D ** -0.5
            y = torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v)
            return y.transpose(1, 2).reshape(b, t, H * D)
        if kind == "heads_dim2_tril_masked_fill":
            s = torch.einsum("bqhd,bkhd->bhqk", q, k) * (1.0 / math.sqrt(D))
            keep = torch.tril(torch.ones(t, t, dtype=torch.bool, device=x.device))
            s = s.masked_fill(~keep, float("-inf"))
            return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v).reshape(b, t, H * D)
        if kind == "heads_dim2_scale_no_mask":
            s = torch.einsum("bqhd,bkhd->bhqk", q, k) * 0.3
            return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v).reshape(b, t, H * D)
        if kind == "heads_dim2_prescaled_q_additive_triu":  # is_causal-like: -inf above the diagonal
            s = torch.einsum("bqhd,bkhd->bhqk", q * D ** -0.5, k)
            s = s + torch.full((t, t), float("-inf"), device=x.device).triu(1)
            return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v).reshape(b, t, H * D)
        if kind == "heads_dim1_where_finfo":
            q, k, v = (y.transpose(1, 2) for y in (q, k, v))
            s = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(D)
            upper = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), diagonal=1)
            s = torch.where(upper, torch.finfo(s.dtype).min, s)
            y = torch.einsum("bhij,bhjd->bihd", F.softmax(s, dim=-1), v)  # out with heads in dim 2
            return y.reshape(b, t, H * D)
        raise ValueError(kind)


# spelling -> the fused attention's causal attribute
SPELLINGS = {
    "heads_dim1_div_masked_fill_buffer": True,
    "heads_dim1_no_mask_mul": False,
    "heads_dim2_tril_masked_fill": True,
    "heads_dim2_scale_no_mask": False,
    "heads_dim2_prescaled_q_additive_triu": True,
    "heads_dim1_where_finfo": True,
}


def qkv(b, t):
    return (torch.randn(b, t, 3 * H * D),)


def einsum_calls(fast):
    return [n for n in fast.graph.nodes if n.op == "torch_call" and "einsum" in n.attrs["target"]]


@pytest.mark.parametrize("kind", SPELLINGS)
def test_einsum_spelling_fuses_to_one_attention(kind):
    model = EinsumSpelling(kind).eval()
    fast = fxforge.optimize(model, qkv(2, 7))
    atts = [n for n in fast.graph.nodes if n.op == "attention"]
    assert len(atts) == 1, fast.ir
    assert atts[0].attrs["causal"] is SPELLINGS[kind], fast.ir
    assert not einsum_calls(fast) and fast.graph.count("softmax") == 0, fast.ir
    for b, t in [(1, 1), (2, 5), (3, 13), (1, 30)]:  # lengths optimize() never saw
        inputs = qkv(b, t)
        with torch.no_grad():
            ref = model(*inputs)
        assert_close_to_eager(ref, fast(*inputs))


# -- a tiny language model with einsum attention: kv_cache generate equals eager greedy ----
class EinsumLM(nn.Module):
    def __init__(self, vocab=64, dim=H * D, layers=2, heads_dim=2, einsum_frequencies=False):
        super().__init__()
        self.heads_dim, self.einsum_frequencies = heads_dim, einsum_frequencies
        self.register_buffer("inv_freq", 1.0 / 100.0 ** (torch.arange(0, D) / D))
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(64, dim)
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(layers))
        self.proj = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)
        self.register_buffer("bias", torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64))

    def forward(self, ids):
        b, t = ids.shape
        x = self.emb(ids) + self.pos(torch.arange(t, device=ids.device))
        for qkv, proj in zip(self.qkv, self.proj):
            q, k, v = (y.view(b, t, H, D) for y in qkv(x).chunk(3, dim=-1))
            if self.einsum_frequencies:  # lucidrains' / GPT-NeoX's spelling of rotary angles
                angles = torch.einsum("i , j -> i j", torch.arange(t, device=ids.device).float(), self.inv_freq)
                q, k = q * angles.cos()[:, None], k * angles.cos()[:, None]
            if self.heads_dim == 2:
                s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
            else:
                q, k, v = (y.transpose(1, 2) for y in (q, k, v))
                s = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(D)
            s = s.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
            p = s.softmax(-1)
            if self.heads_dim == 2:
                y = torch.einsum("bhqk,bkhd->bqhd", p, v)
            else:
                y = torch.einsum("bhqk,bhkd->bhqd", p, v).transpose(1, 2)
            x = x + proj(y.reshape(b, t, H * D))
        return self.head(self.norm(x))


@pytest.mark.parametrize("heads_dim,einsum_frequencies", [(1, False), (2, False), (2, True)])
def test_kv_cache_generate_equals_eager_greedy(heads_dim, einsum_frequencies):
    """(einsum_frequencies: angles from einsum('i,j->ij'), an outer product, which stayed an
    opaque call that kv_cache refused as one that may read other tokens)"""
    torch.manual_seed(0)
    model = EinsumLM(heads_dim=heads_dim, einsum_frequencies=einsum_frequencies).eval()
    fast = fxforge.optimize(model, (torch.randint(0, 64, (2, 7)),), kv_cache=True)
    assert fast.graph.count("attention") == 2 and not einsum_calls(fast), fast.ir
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(5))
    ref = ids
    with torch.no_grad():
        for _ in range(8):
            ref = torch.cat([ref, model(ref)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(fast.generate(ids, 8, eos_token_id=None), ref)


# -- other einsums: lowered exactly when one batched matmul or a product that sums nothing,
# else the opaque call ---------------------------------------------------------------------
class Einsum(nn.Module):
    def __init__(self, equation):
        super().__init__()
        self.equation = equation

    def forward(self, *xs):
        return torch.einsum(self.equation, *xs)


# equation, operand shapes as functions of (b, n) (optimize() makes dims 0 and 1 dynamic;
# the others stay fixed), lowered to a matmul?
EQUATIONS = [
    ("bij,bjk->bik", lambda b, n: [(b, n, 3), (b, 3, 5)], True),
    ("bij,bkj->bik", lambda b, n: [(b, n, 3), (b, 5, 3)], True),
    ("bqd,bkd->bkq", lambda b, n: [(b, n, 4), (b, n, 4)], True),
    ("bqhd,bkd->bhqk", lambda b, n: [(b, n, 2, 4), (b, n, 4)], True),  # two free indices in a
    ("ij,jk", lambda b, n: [(b, 3), (3, 5)], True),  # implicit output
    ("bi,bi->b", lambda b, n: [(b, n), (b, n)], True),  # a batched dot: no row, no column
    ("bij,bj->bi", lambda b, n: [(b, n, 3), (b, 3)], True),  # matrix-vector
    ("ii->i", lambda b, n: [(4, 4)], False),  # a diagonal
    ("ii->", lambda b, n: [(4, 4)], False),  # a trace
    ("bij,bjk,bkl->bil", lambda b, n: [(b, n, 3), (b, 3, 4), (b, 4, 2)], False),  # three operands
    ("i,j->ij", lambda b, n: [(b,), (3,)], "product"),  # an outer product: nothing contracted
    ("i , j -> i j", lambda b, n: [(b,), (3,)], "product"),  # (rotary frequencies, spelled with spaces)
    ("bi,j->bji", lambda b, n: [(b, n), (3,)], "product"),  # permuted into the output's order
    ("bij,bjk->bk", lambda b, n: [(b, n, 3), (b, 3, 5)], False),  # two contracted indices
    ("bij,bjk->ik", lambda b, n: [(b, n, 3), (b, 3, 5)], False),  # b summed too
    ("bij,bjj->bi", lambda b, n: [(b, n, 3), (b, 3, 3)], False),  # repeated within an operand
    ("bj,jk->bjk", lambda b, n: [(b, 3), (3, 5)], "product"),  # j kept: nothing contracted
    ("...ij,...jk->...ik", lambda b, n: [(b, n, 3), (b, 3, 5)], False),  # ellipsis
    ("bij,bjk->bik", lambda b, n: [(b, n, 3), (1, 3, 5)], False),  # size-1 batch broadcast
]


@pytest.mark.parametrize("equation,shapes,lowered", EQUATIONS, ids=[e[0] for e in EQUATIONS])
def test_other_einsums_equal_eager(equation, shapes, lowered):
    model = Einsum(equation)
    gen = torch.Generator().manual_seed(0)
    example = tuple(torch.randn(s, generator=gen) for s in shapes(2, 6))
    static = shapes(2, 6) == shapes(3, 9)  # ('ii': two dynamic sizes export cannot prove equal)
    fast = fxforge.optimize(model, example, dynamic=not static)
    assert (not einsum_calls(fast)) is bool(lowered), fast.ir
    if lowered is True:
        assert fast.graph.count("matmul") + fast.graph.count("linear") >= 1, fast.ir
    for b, n in [(2, 6), (3, 9), (1, 2)]:
        xs = tuple(torch.randn(s, generator=gen) for s in shapes(b, n))
        if lowered == "product":  # one multiplication per element, as einsum's: bit for bit
            assert torch.equal(torch.einsum(equation, *xs), fast(*xs))
        assert_close_to_eager(torch.einsum(equation, *xs), fast(*xs))


def _run_plan(p, a, b):
    """The plan with torch's own ops, as the IR runs it."""
    xs = []
    for x, o in ((a, p.a), (b, p.b)):
        for _ in range(o.unsqueeze):
            x = x.unsqueeze(-1)
        xs.append(x.permute(o.dims))
    out = torch.matmul(*xs)
    if p.squeeze:
        out = out.squeeze(p.squeeze)
    return out.permute(p.out_dims)


@pytest.mark.parametrize("equation,shapes", [
    ("bhqd,bhkd->bhqk", [(2, 3, 5, 4), (2, 3, 6, 4)]),
    ("bhqk,bhkd->bhqd", [(2, 3, 5, 6), (2, 3, 6, 4)]),
    ("bqhd,bkhd->bhqk", [(2, 5, 3, 4), (2, 6, 3, 4)]),
    ("bhqk,bkhd->bqhd", [(2, 3, 5, 6), (2, 6, 3, 4)]),
    ("xaybc,cyzw->wzbyxa", [(2, 3, 4, 5, 6), (6, 4, 2, 3)]),
    (" i j , j -> i ", [(3, 4), (4,)]),
    ("i,i->", [(5,), (5,)]),
    ("Bj,jA", [(3, 4), (4, 2)]),
])
def test_plan_equals_einsum(equation, shapes):
    a, b = (torch.randn(s, dtype=torch.float64) for s in shapes)
    p = plan(equation, shapes)
    assert p is not None
    torch.testing.assert_close(_run_plan(p, a, b), torch.einsum(equation, a, b))
