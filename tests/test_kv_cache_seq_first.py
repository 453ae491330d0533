"""kv_cache over sequence-first layouts and folded heads.

nn.MultiheadAttention (inside nn.TransformerEncoderLayer) works on [T, B, D] and flattens
it to [T*B, D] rows for its output projection: one token per row, in sequence-first order.
Such a decoder-only LM gets a cache and generates eager's greedy tokens; a reshape that
really puts tokens of different positions together (or reads [T*B] rows back as [B, T]) is
still refused, naming the reshape."""
import pytest
import torch
import torch.nn as nn

import fxforge
from fxforge.passes.kv_cache import KVCacheError
from helpers import eager_greedy as _eager_greedy

VOCAB, DIM, HEADS = 40, 32, 4


class _EncoderLM(nn.Module):
    """A decoder-only LM made of nn.TransformerEncoder with a causal mask."""

    def __init__(self, batch_first: bool, norm_first: bool = True):
        super().__init__()
        self.batch_first = batch_first
        self.emb, self.pos = nn.Embedding(VOCAB, DIM), nn.Embedding(64, DIM)
        layer = nn.TransformerEncoderLayer(DIM, HEADS, 64, dropout=0.0, batch_first=batch_first,
                                           norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, ids):
        T = ids.shape[1]
        h = self.emb(ids) + self.pos(torch.arange(T))
        mask = nn.Transformer.generate_square_subsequent_mask(T)
        if self.batch_first:
            h = self.enc(h, mask=mask, is_causal=True)
        else:
            h = self.enc(h.transpose(0, 1), mask=mask, is_causal=True).transpose(0, 1)
        return self.head(h)


def _model(module) -> nn.Module:
    torch.manual_seed(0)
    return module.eval()


def _example():
    return (torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1)),)


def _assert_generates_like_eager(model):
    fast = fxforge.optimize(model, _example(), kv_cache=True)
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    assert torch.equal(fast.generate(prompt, 8), _eager_greedy(model, prompt, 8))


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_lm_gets_a_cache(batch_first):
    # MultiheadAttention reshapes [T, B, H, D] to [B*T, H*D] (sequence-first rows) around its
    # out_proj: one token per row, which the cache serves
    _assert_generates_like_eager(_model(_EncoderLM(batch_first)))


def test_post_norm_encoder_lm_gets_a_cache():
    _assert_generates_like_eager(_model(_EncoderLM(batch_first=False, norm_first=False)))


class _Rows(nn.Module):
    """One causal attention layer; `rows(x)` runs a linear over x [B, T, D] as flat rows."""

    def __init__(self, rows):
        super().__init__()
        self.rows = rows
        self.emb, self.pos = nn.Embedding(VOCAB, DIM), nn.Embedding(64, DIM)
        self.qkv, self.mid, self.head = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, VOCAB)

    def forward(self, ids):
        B, T = ids.shape
        x = self.emb(ids) + self.pos(torch.arange(T))
        q, k, v = (t.view(B, T, HEADS, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + y.transpose(1, 2).reshape(B, T, DIM)
        return self.head(x + self.rows(x, self.mid))


def _seq_first_rows(x, lin):
    B, T, D = x.shape
    return lin(x.transpose(0, 1).reshape(T * B, D)).view(T, B, D).transpose(0, 1)


def test_sequence_first_rows_read_back_in_their_order():
    _assert_generates_like_eager(_model(_Rows(_seq_first_rows)))


# rows of tokens read back in another order than they were flattened in, or split across tokens:
# over the whole sequence each position then holds another position's token, which a cached step
# (that holds only the new tokens) cannot reproduce
WRONG_ORDER = {
    "seq-first rows read batch-major": lambda x, lin: lin(x.transpose(0, 1).reshape(-1, x.shape[2])).view(x.shape),
    "batch-major rows read seq-first": lambda x, lin: lin(x.reshape(-1, x.shape[2])).view(
        x.shape[1], x.shape[0], x.shape[2]).transpose(0, 1),
    "[T, B, D] read as [B, T, D]": lambda x, lin: lin(x.transpose(0, 1).reshape(x.shape)),
}


@pytest.mark.parametrize("name", WRONG_ORDER)
def test_rows_read_in_another_order_are_refused(name):
    model = _model(_Rows(WRONG_ORDER[name]))
    with pytest.raises(KVCacheError, match=r"reshapes across the sequence"):
        fxforge.optimize(model, _example(), kv_cache=True)


class _FoldedHeads(nn.Module):
    """Attention as torch.bmm on [B*H, T, D] (fairseq / Megatron style) with a causal mask,
    the heads folded batch-major (row b*H + h) or, with `heads_major`, head-major (h*B + b)."""

    def __init__(self, heads_major: bool = False, additive: bool = False):
        super().__init__()
        self.heads_major, self.additive = heads_major, additive
        self.emb, self.pos = nn.Embedding(VOCAB, DIM), nn.Embedding(64, DIM)
        self.qkv, self.head = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, VOCAB)
        self.register_buffer("mask", torch.tril(torch.ones(64, 64, dtype=torch.bool)))

    def _fold(self, t, B, T):
        t = t.reshape(B, T, HEADS, -1)
        return t.permute(2, 0, 1, 3).reshape(HEADS * B, T, -1) if self.heads_major else \
            t.transpose(1, 2).reshape(B * HEADS, T, -1)

    def forward(self, ids):
        B, T = ids.shape
        x = self.emb(ids) + self.pos(torch.arange(T))
        q, k, v = (self._fold(t, B, T) for t in self.qkv(x).chunk(3, -1))
        scores = torch.bmm(q, k.transpose(1, 2)) * q.shape[-1] ** -0.5
        if self.additive:  # a float mask added to the folded [B*H, T, T] scores
            scores = scores + torch.zeros(T, T).masked_fill(~self.mask[:T, :T], float("-inf"))
        else:
            scores = scores.masked_fill(~self.mask[:T, :T], float("-inf"))
        y = torch.bmm(scores.softmax(-1), v)
        y = y.view(HEADS, B, T, -1).permute(1, 2, 0, 3) if self.heads_major else \
            y.view(B, HEADS, T, -1).transpose(1, 2)
        return self.head(x + y.reshape(B, T, DIM))


@pytest.mark.parametrize("additive", [False, True], ids=["masked_fill", "added-mask"])
def test_bmm_attention_with_heads_folded_into_the_batch_gets_a_cache(additive):
    # q, k, v are views of [B, H, T, D]: attention runs on those, and the cache keeps them
    # (a causal mask on the folded scores is causal all the same: fuse_attention proves it)
    _assert_generates_like_eager(_model(_FoldedHeads(additive=additive)))


def test_a_fold_not_traced_to_batch_and_heads_says_so():
    # heads folded head-major: not a view of [B, H, T, D]; no mask is involved, and the message
    # says what is (the fold) and how to write it
    with pytest.raises(KVCacheError) as caught:
        fxforge.optimize(_model(_FoldedHeads(heads_major=True)), _example(), kv_cache=True)
    message = str(caught.value)
    assert "heads folded into the batch" in message and "view of [B, H, T, D]" in message
    assert "Add the mask" not in message
