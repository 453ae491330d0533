"""kv_cache refuses what a cache cannot serve, naming it, instead of generating other tokens
than eager: an op that reduces, normalizes or mixes values along the sequence (the cached
step sees only the new tokens), a value computed from the length T itself (T counts only
the new tokens then), positions counted from the end of the sequence, and a bidirectional
attention (said as such). What acts on each token by itself still gets a cache and
generates eager's greedy tokens."""
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxforge
from fxforge.passes.kv_cache import KVCacheError
from helpers import eager_greedy as _eager_greedy

# var/std over T meet one-token samples while the model is captured: torch's warning, not ours
pytestmark = pytest.mark.filterwarnings("ignore:.*degrees of freedom is <= 0")

VOCAB, DIM, HEADS = 32, 16, 2


class _Tiny(nn.Module):
    """One causal attention layer, with `feature(x, T, self)` added to the embeddings."""

    def __init__(self, feature):
        super().__init__()
        self.feature = feature
        self.emb, self.pos = nn.Embedding(VOCAB, DIM), nn.Embedding(64, DIM)
        self.qkv, self.head = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, VOCAB)

    def forward(self, ids):
        b, t = ids.shape
        x = self.emb(ids)
        x = x + self.feature(x, t, self)
        q, k, v = self.qkv(x).view(b, t, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, DIM)
        return self.head(x + y)


def _model(feature):
    torch.manual_seed(0)
    return _Tiny(feature).eval()


def _example():
    return (torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1)),)


def _assert_generates_like_eager(model):
    fast = fxforge.optimize(model, _example(), kv_cache=True)
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(2))
    assert torch.equal(fast.generate(prompt, 8), _eager_greedy(model, prompt, 8))


def _refusal(feature) -> str:
    with pytest.raises(KVCacheError) as caught:
        fxforge.optimize(_model(feature), _example(), kv_cache=True)
    return str(caught.value)


# name -> (what mixes values along the sequence (dim 1 of [B, T, D]), the op the message names)
ALONG_T = {
    "normalize": (lambda x, t, m: F.normalize(x, dim=1), "linalg_vector_norm"),
    "var": (lambda x, t, m: x.var(1, keepdim=True), r"aten\.var\."),
    "std": (lambda x, t, m: x.std(1, keepdim=True), r"aten\.std\."),
    "var_mean": (lambda x, t, m: torch.var_mean(x, 1, keepdim=True)[0], "var_mean"),
    "std_mean": (lambda x, t, m: torch.std_mean(x, 1, keepdim=True)[1], "std_mean"),
    "logsumexp": (lambda x, t, m: torch.logsumexp(x, 1, keepdim=True), "logsumexp"),
    "prod": (lambda x, t, m: x.sigmoid().prod(1, keepdim=True), r"aten\.prod\."),
    "vector_norm": (lambda x, t, m: torch.linalg.vector_norm(x, dim=1, keepdim=True), "linalg_vector_norm"),
    "layer_norm_T": (lambda x, t, m: F.layer_norm(x.transpose(1, 2), (t,)).transpose(1, 2), r"\(layer_norm\)"),
    "rms_norm_T": (lambda x, t, m: F.rms_norm(x.transpose(1, 2), (t,)).transpose(1, 2), r"\(rms_norm\)"),
    "instance_norm": (lambda x, t, m: F.instance_norm(x.transpose(1, 2)).transpose(1, 2), "instance_norm"),
    "any": (lambda x, t, m: (x > 2).any(1, keepdim=True).float(), r"aten\.any\."),
    "nansum": (lambda x, t, m: x.nansum(1, keepdim=True), "nansum"),
    "nanmean": (lambda x, t, m: x.nanmean(1, keepdim=True), "nanmean"),
    "count_nonzero": (lambda x, t, m: torch.count_nonzero(x > 0, 1)[:, None].float(), "count_nonzero"),
    "aminmax": (lambda x, t, m: torch.aminmax(x, dim=1, keepdim=True)[0], "aminmax"),
    "sum_all": (lambda x, t, m: x.sum() * 0.01, r"\(sum\)"),
    "adaptive_avg_pool": (lambda x, t, m: F.adaptive_avg_pool1d(x.transpose(1, 2), 1).transpose(1, 2),
                          "adaptive_avg_pool1d"),
    "adaptive_max_pool": (lambda x, t, m: F.adaptive_max_pool1d(x.transpose(1, 2), 1).transpose(1, 2),
                          "adaptive_max_pool1d"),
    "renorm": (lambda x, t, m: torch.renorm(x, 2, 2, 1.0), "renorm"),
    "fft_T": (lambda x, t, m: torch.fft.fft(x, dim=1).real / 10, "fft_fft"),
    "fft2": (lambda x, t, m: torch.fft.fft2(x).real / 10, "fft_fft2"),
    "trapezoid": (lambda x, t, m: torch.trapezoid(x, dim=1)[:, None], "trapezoid"),
    "interpolate": (lambda x, t, m: F.interpolate(x.transpose(1, 2), scale_factor=1.0).transpose(1, 2),
                    "upsample_nearest1d"),
    "reshape_across": (lambda x, t, m: x.reshape(x.shape[0], -1).softmax(-1).view_as(x), "reshapes across"),
}


@pytest.mark.parametrize("name", ALONG_T)
def test_an_op_over_the_sequence_is_refused_naming_it(name):
    """Each of these got through and generate() decoded other tokens than eager greedy."""
    feature, says = ALONG_T[name]
    message = _refusal(feature)
    assert "over the sequence" in message or "across the sequence" in message or "reduces" in message, message
    assert re.search(says, message), (says, message)
    assert "\n  at: " in message


# the same ops over each token's own features (the last dim): position-local, still cached
OVER_FEATURES = {
    "normalize": lambda x, t, m: F.normalize(x, dim=-1),
    "var": lambda x, t, m: x.var(-1, keepdim=True),
    "logsumexp": lambda x, t, m: torch.logsumexp(x, -1, keepdim=True),
    "layer_norm": lambda x, t, m: F.layer_norm(x, (DIM,)),
    "aminmax": lambda x, t, m: torch.aminmax(x, dim=-1, keepdim=True)[1],
    "heads_reshape": lambda x, t, m: x.view(x.shape[0], t, HEADS, -1).softmax(-1).reshape(x.shape),
}


@pytest.mark.parametrize("name", OVER_FEATURES)
def test_the_same_op_over_each_tokens_features_is_cached_exactly(name):
    _assert_generates_like_eager(_model(OVER_FEATURES[name]))


# values computed from the length T itself: with a cache T is the step's token count
FROM_THE_LENGTH = {
    "arange_over_T": lambda x, t, m: (torch.arange(t).float() / t)[None, :, None],
    "full_of_T_minus_1": lambda x, t, m: m.pos(torch.full((t,), t - 1)),
    "table_row_T_minus_1": lambda x, t, m: m.pos.weight[t - 1],
    "times_T": lambda x, t, m: x * t,
    "clamp_at_T": lambda x, t, m: x.clamp(max=t),
    "ones_times_T": lambda x, t, m: torch.ones(t, DIM) * (t - 1),
}


@pytest.mark.parametrize("name", FROM_THE_LENGTH)
def test_a_value_computed_from_the_length_is_refused(name):
    message = _refusal(FROM_THE_LENGTH[name])
    assert "computes a value from the sequence length" in message, message
    assert "kv_cache=False" in message and "\n  at: " in message


# positions counted from the end of the sequence: an earlier token's position changes as it grows
FROM_THE_END = {
    "arange_minus_T_plus_c": lambda x, t, m: m.pos(torch.arange(t) - t + 63),
    "T_minus_1_minus_arange": lambda x, t, m: m.pos(t - 1 - torch.arange(t)),
}


@pytest.mark.parametrize("name", FROM_THE_END)
def test_positions_counted_from_the_end_are_refused_at_optimize(name):
    """One inferred max_seq_len=1 and failed on the example itself; the other was accepted
    and generate() raised an IndexError from inside the program."""
    message = _refusal(FROM_THE_END[name])
    assert "depend on the total length" in message and "counted from the end" in message, message


def test_positions_counted_from_the_start_are_still_cached():
    _assert_generates_like_eager(_model(lambda x, t, m: m.pos(torch.arange(t) + 2)))


class _Bidirectional(nn.Module):
    """A [B, T, T] attention without heads or a mask: every token sees the later ones."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(VOCAB, DIM), nn.Linear(DIM, VOCAB)

    def forward(self, ids):
        x = self.emb(ids)
        x = x + (x @ x.transpose(1, 2)).softmax(-1) @ x
        return self.head(x)


def test_a_bidirectional_attention_is_refused_as_not_causal():
    """It used to be refused as 'heads folded with the batch', which it is not."""
    with pytest.raises(KVCacheError, match=r"not causal: it is bidirectional[\s\S]*at: ") as caught:
        fxforge.optimize(_Bidirectional().eval(), _example(), kv_cache=True)
    assert "folded" not in str(caught.value)


# ops whose dim is their third argument (topk(x, k, dim)): the dim, not k, says where they run
PICK_ALONG_T = {
    "topk": lambda x, t, m: x.topk(3, dim=1).values.mean(1, keepdim=True),
    "kthvalue": lambda x, t, m: x.kthvalue(2, dim=1, keepdim=True).values,
    "chunk": lambda x, t, m: x.chunk(2, dim=1)[0].sum(1, keepdim=True),
}


@pytest.mark.parametrize("name", PICK_ALONG_T)
def test_picking_or_splitting_along_the_sequence_is_refused_as_moving_values(name):
    """Their k (or chunk count) at args[1] was read as the dim: 3 or 2 named another dim than
    T, so they fell through to the generic 'runs over the sequence' message."""
    message = _refusal(PICK_ALONG_T[name])
    assert "moves values along the sequence" in message and "\n  at: " in message, message


# k = 1 at args[1] names dim 1, T, though these pick along each token's own features; and
# with the dim left out (export writes no default), the op's default, the last dim
PICK_OVER_FEATURES = {
    "topk": lambda x, t, m: x.topk(1, dim=2).values,
    "kthvalue": lambda x, t, m: x.kthvalue(1, dim=2, keepdim=True).values,
    "topk_default_dim": lambda x, t, m: x.topk(2).values.sum(-1, keepdim=True),
    "sort_default_dim": lambda x, t, m: x.sort().values[..., :1],
    "split_default_dim_of_a_token_first_view": lambda x, t, m: x.transpose(0, 2).split(8)[1].transpose(0, 2).repeat(1, 1, 2),
}


# ops that act on each token by itself but were not on the allow-list (Falcon's
# new_decoder_architecture broadcasts its K/V groups with broadcast_to; hidden_act="prelu")
PER_TOKEN = {
    "broadcast_to": lambda x, t, m: x.unsqueeze(2).broadcast_to(x.shape[0], t, 2, DIM).sum(2),
    "prelu_one_slope": lambda x, t, m: F.prelu(x, torch.tensor([0.25])),
}


@pytest.mark.parametrize("name", PER_TOKEN)
def test_per_token_ops_are_cached_exactly(name):
    _assert_generates_like_eager(_model(PER_TOKEN[name]))


@pytest.mark.parametrize("name", PICK_OVER_FEATURES)
def test_picking_over_each_tokens_features_is_cached_exactly(name):
    """They were refused as moving values along the sequence."""
    _assert_generates_like_eager(_model(PICK_OVER_FEATURES[name]))


class _ReluBeforeSoftmax(nn.Module):
    """Attention fuse_attention declines (a relu between the masked scores and the softmax)."""

    def __init__(self):
        super().__init__()
        self.emb, self.qkv, self.out = nn.Embedding(64, 32), nn.Linear(32, 96), nn.Linear(32, 64)

    def forward(self, ids):
        x = self.emb(ids)
        B, T, C = x.shape
        q, k, v = (t.view(B, T, 4, 8).transpose(1, 2) for t in self.qkv(x).split(32, -1))
        scores = (q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(),
                                                                   float("-inf"))
        y = (torch.relu(scores).softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
        return self.out(y)


@pytest.mark.parametrize("option", [dict(kv_cache=True), dict(gqa=2)], ids=["kv_cache", "gqa"])
def test_a_refusal_for_unfused_attention_carries_fuse_attentions_notes(option):
    """The refusal pointed at a report note, but optimize() raised: there was no report."""
    with pytest.raises(Exception, match=r"its notes \(below\) say why it declined") as info:
        fxforge.optimize(_ReluBeforeSoftmax().eval(), (torch.randint(0, 64, (1, 6)),), **option)
    (notes,) = [n for n in info.value.__notes__ if n.startswith("fuse_attention's notes: ")]
    assert "1 softmax ops whose probabilities feed a matmul (attention, by the look of it) were not fused" in notes
    assert "e.g. the one in the model's own forward(): its spelling" in notes  # ("the one: its spelling" before)


def test_a_refusal_says_when_fuse_attention_did_not_run():
    import zoo

    model, vocab = zoo.llama()
    with pytest.raises(KVCacheError) as info:
        fxforge.optimize(model, (torch.randint(0, vocab, (1, 6)),), kv_cache=True, disable=["fuse_attention"])
    assert "fuse_attention did not run before this pass (left out by passes= or disable=)" in info.value.__notes__


def test_a_model_in_training_mode_is_told_to_call_eval():
    # its dropout keeps attention unfused; the refusal pointed at fuse_attention's notes, which were empty
    class DropoutAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.qkv, self.drop = nn.Embedding(32, 16), nn.Linear(16, 48), nn.Dropout(0.1)

        def forward(self, ids):
            b, t = ids.shape
            q, k, v = (z.view(b, t, 2, 8).transpose(1, 2) for z in self.qkv(self.emb(ids)).chunk(3, -1))
            mask = torch.ones(t, t, dtype=torch.bool, device=ids.device).tril()
            att = self.drop(((q @ k.transpose(-1, -2)) / 8 ** 0.5).masked_fill(~mask, float("-inf")).softmax(-1))
            return att @ v

    with pytest.warns(UserWarning, match="training mode"), \
            pytest.raises(KVCacheError, match=r"training mode.*model\.eval\(\)"):
        fxforge.optimize(DropoutAttention().train(), (torch.randint(0, 32, (1, 8)),), kv_cache=True)


def test_an_unfused_softmax_reshaped_before_its_matmul_is_named_in_the_refusal():
    # Bloom in float64 (softmax in float32, cast, then viewed to (B * H, T, S) for a bmm)
    # was refused with "its notes (below) say why" and no note saying why
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    model = BloomForCausalLM(BloomConfig(vocab_size=96, hidden_size=64, n_layer=1, n_head=4)).eval().double()
    with pytest.raises(KVCacheError, match=r"(?s)1 softmax ops whose probabilities feed a matmul.*were not fused"):
        fxforge.optimize(model, (torch.randint(2, 96, (2, 7)),), kv_cache=True, verbose=False)
