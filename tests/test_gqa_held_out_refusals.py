"""gqa on attention layers whose K/V (or Q) projections do more than feed the attention:
read elsewhere too, scaled per head, shared between roles. gqa must give the eager answer
or refuse with a GQAError naming what is in the way, never a wrong answer or a raw
TypeError / IRTypeError from deep inside the rewrite (a held-out tester's findings)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxforge
from fxforge.passes.gqa import GQAConfig, GQAError

from helpers import assert_close_to_eager

V, D, H = 97, 64, 4


def _rope(x, T):
    """Rotate-half rotary over whole heads (Llama's)."""
    hd = x.shape[-1]
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    fr = torch.outer(torch.arange(T).float(), inv)
    emb = torch.cat([fr, fr], -1)
    x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
    return x * emb.cos() + torch.cat([-x2, x1], -1) * emb.sin()


class Attn(nn.Module):
    """One attention block, 4 heads of 16; `mode` adds one twist to Q, K or V."""

    def __init__(self, mode="plain"):
        super().__init__()
        self.mode = mode
        self.e = nn.Embedding(V, D)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.out = nn.Linear(D, V)
        self.per_channel = nn.Parameter(torch.rand(D) + 0.5)  # one per feature of K: per head too
        self.per_head = nn.Parameter(torch.rand(H, 1, 1) + 0.5)
        self.per_dim = nn.Parameter(torch.rand(D // H) + 0.5)  # one per dim of a head, alike for every head
        if mode == "shared_kv":
            self.v = self.k

    def forward(self, ids):
        x = self.e(ids)
        B, T, _ = x.shape
        m = self.mode

        def heads(t):
            return t.view(B, T, H, -1).transpose(1, 2)

        qp, kp, vp = self.q(x), self.k(x), self.v(x)
        if m == "k_scale":
            kp = kp * self.per_channel
        if m == "k_bias":
            kp = kp + self.per_channel
        q, k, v = heads(qp), heads(kp), heads(vp)
        if m == "k_head_scale":
            k = k * self.per_head
        if m == "q_head_scale":
            q = q * self.per_head
        if m == "k_dim_scale":
            k = k * self.per_dim
        if m in ("rope", "rope_k_read"):
            q, k = _rope(q, T), _rope(k, T)
        if m == "k_is_q":
            k = q
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = x + self.o(y.transpose(1, 2).reshape(B, T, D))
        if m == "k_feature":  # k_proj(x) also a feature: must stay the model's 64-wide K
            h = h + kp.pow(2).mean(-1, keepdim=True)
        if m == "v_residual":  # value residual: h + v_proj(x)
            h = h + vp
        if m == "k_headwise":  # K after the head split reused
            h = h + k.transpose(1, 2).reshape(B, T, D) * 0.5
        if m == "rope_k_read":  # K after rotary reused
            h = h + k.transpose(1, 2).reshape(B, T, D).mean(-1, keepdim=True)
        if m == "q_feature":
            h = h + qp.pow(2).mean(-1, keepdim=True)
        return self.out(h)


IDS = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(0, V, (4, 32), generator=torch.Generator().manual_seed(2))


def _model(mode):
    torch.manual_seed(0)
    return Attn(mode).eval()


def _option(method, G=2):
    return G if method == "mean" else GQAConfig(G, "aligned", calibration=CALIB)


def _refused(mode, method, says):
    with pytest.raises(GQAError, match=says):
        fxforge.optimize(_model(mode), (IDS,), gqa=_option(method))


@pytest.mark.parametrize("method", ["mean", "aligned"])
@pytest.mark.parametrize("mode, says", [
    # the merged 32-wide K would reach the feature (a wrong answer, rel error 0.15, before)
    ("k_feature", r"the op pow also reads K \(the output of k.weight"),
    # the V residual met the merged V: a raw TypeError "shapes ... do not broadcast", before
    ("v_residual", r"the op add also reads V \(the output of v.weight"),
    ("k_headwise", r"also reads K \(the output of k.weight, or a value between it and the attention\)"),
    ("rope_k_read", r"also reads K \(the output of k.weight, or a value between it and the attention\)"),
])
def test_other_readers_of_k_or_v_are_refused_naming_them(mode, method, says):
    _refused(mode, method, says + r".*not only the attention")


@pytest.mark.parametrize("method", ["mean", "aligned"])
@pytest.mark.parametrize("mode, param", [
    ("k_scale", r"'per_channel' f32\[64\]"),  # k_proj(x) * p[64]
    ("k_bias", r"'per_channel' f32\[64\]"),  # k_proj(x) + p[64]
    ("k_head_scale", r"'per_head' f32\[4, 1, 1\]"),  # per-head k * s[H, 1, 1]
])
def test_a_per_head_scale_or_bias_on_k_is_refused(mode, method, param):
    # a raw TypeError / IRTypeError before: the merged K met the 64-wide (or 4-head) parameter
    _refused(mode, method, r"the op (mul|add) between the K projection and the attention is a learned scale or bias "
                           rf"that differs per K head or channel \(parameter {param}\), not a head reshape or a "
                           "rotary embedding")


@pytest.mark.parametrize("mode", ["k_dim_scale", "rope"])
def test_maps_alike_for_every_head_still_convert(mode):
    # a scale over head_dim shared by all heads, and rotary's cos/sin tables, commute with
    # merging heads: not refused; with G = the model's heads nothing merges, so exact
    model = _model(mode)
    with torch.no_grad():
        ref = model(IDS)
    for method in ("mean", "aligned"):
        same = fxforge.optimize(model, (IDS,), gqa=_option(method, G=H))
        with torch.no_grad():
            assert_close_to_eager(ref, same(IDS), rel=1e-5)
        merged = fxforge.optimize(model, (IDS,), gqa=_option(method))
        assert [int(n.inputs[1].shape[1]) for n in merged.graph.nodes if n.op == "attention"] == [2]


@pytest.mark.parametrize("method", ["mean", "aligned"])
def test_k_that_is_the_query_projection_is_refused(method):
    # attention(q, q, v): a raw IRTypeError ("cannot view f32[B, T, 2, 16] as [B, T, 64]") before
    _refused("k_is_q", method, r"K reads the same projection as Q \(q.weight: the keys are the queries\)")


@pytest.mark.parametrize("method", ["mean", "aligned"])
def test_k_and_v_of_one_projection_are_refused(method):
    # v_proj = k_proj: 'aligned' built K from the V-aligned weight and blamed a partial rotary
    _refused("shared_kv", method, r"V reads the same projection as K \(.*: K and V are one projection\)")


def test_other_readers_of_q_are_refused_only_where_q_changes():
    # 'mean' leaves Q's values as they are: the feature read from it is the model's
    model = _model("q_feature")
    with torch.no_grad():
        ref = model(IDS)
    same = fxforge.optimize(model, (IDS,), gqa=_option("mean", G=H))
    with torch.no_grad():
        assert_close_to_eager(ref, same(IDS), rel=1e-5)
    fxforge.optimize(model, (IDS,), gqa=2)
    # 'aligned' permutes and rotates the query heads
    _refused("q_feature", "aligned", r"the op pow also reads Q \(the output of q.weight.*heads permuted and rotated")


def test_a_per_head_scale_on_q_is_refused_by_aligned():
    # 'aligned' moves query heads; a per-head scale would stay with the position, not the head
    _refused("q_head_scale", "aligned", r"between the Q projection and the attention is a learned scale or bias that "
                                        r"differs per Q head.*'aligned' permutes and rotates the query heads")
    fxforge.optimize(_model("q_head_scale"), (IDS,), gqa=2)  # 'mean' leaves Q alone
