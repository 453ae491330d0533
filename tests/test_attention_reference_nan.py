"""attention's reference (ir/ops.py) and the torch backend's kernels (runtime/torch_kernels.py)
keep a NaN from the inputs, as eager's softmax does: only a row whose every score is -inf
(masked out entirely: SDPA's rule) gives zeros. They once ended in softmax(...).nan_to_num(0),
which also turned a NaN in q or k, or q.k overflowing to inf - inf, into a finite answer."""
import math

import pytest
import torch
import torch.nn as nn

import fxforge
from fxforge.ir.ops import attention_reference
from fxforge.runtime.torch_kernels import attention_sdpa

NAN = float("nan")
IMPLS = {"reference": attention_reference, "torch": attention_sdpa}

# each variant's attrs and optional inputs (bias, slopes, sinks in the op's order)
VARIANTS = {
    "plain": {},
    "causal": dict(causal=True),
    "window": dict(causal=True, window=3),
    "softcap": dict(softcap=5.0),
    "alibi": dict(alibi=True),
    "sinks": dict(sinks=True),
    "softcap_sinks": dict(softcap=5.0, sinks=True),
    "bias": dict(bias=True),
    "causal_bias_alibi_window": dict(causal=True, bias=True, alibi=True, window=4),
}


def _call(fn, q, k, v, variant, seed=0):
    """fn(q, k, v, [bias], [slopes], [sinks]) with the variant's attrs and inputs (one
    seed, so every implementation sees the same bias, slopes and sinks)."""
    kw = dict(VARIANTS[variant])
    causal = kw.pop("causal", False)
    g = torch.Generator().manual_seed(seed)
    b, h, tq, tk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    extra = []
    if kw.pop("bias", False):
        extra.append(torch.randn(b, 1, tq, tk, generator=g))
    if kw.get("alibi"):
        extra.append(torch.rand(h, generator=g))
    if kw.get("sinks"):
        extra.append(torch.randn(h, generator=g))
    return fn(q, k, v, *extra, causal=causal, scale=0.3, **kw)


def _qkv(tq, tk, heads=4, kv_heads=2, d=8):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, heads, tq, d, generator=g), torch.randn(2, kv_heads, tk, d, generator=g),
            torch.randn(2, kv_heads, tk, d, generator=g))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tq,tk", [(5, 5), (1, 6), (3, 20)])
def test_nan_in_a_query_row_is_nan_there_only(impl, variant, tq, tk):
    """A NaN in one query row: every score of that row is NaN, so its output is NaN (GQA:
    query head 3 shares kv head 1); every other row is what it is without the NaN."""
    q, k, v = _qkv(tq, tk)
    clean = _call(IMPLS[impl], q, k, v, variant)
    q[1, 3, tq - 1, 2] = NAN
    out = _call(IMPLS[impl], q, k, v, variant)
    assert out[1, 3, tq - 1].isnan().all(), "a NaN in q was turned into a finite answer"
    out[1, 3, tq - 1] = clean[1, 3, tq - 1]
    torch.testing.assert_close(out, clean)


def _rows_seeing(key, tq, tk, variant):
    """The query rows that see `key` (bottom-right aligned causal and window)."""
    attrs = VARIANTS[variant]
    rows = []
    for i in range(tq):
        pos = i + tk - tq
        if (not attrs.get("causal") or key <= pos) and ("window" not in attrs or key > pos - attrs["window"]):
            rows.append(i)
    return rows


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tq,tk", [(5, 5), (1, 6), (3, 20)])
def test_nan_in_a_visible_key_makes_its_rows_nan(impl, variant, tq, tk):
    """A NaN in a key: the rows that see it, in the query heads that share its kv head
    (2 and 3), are NaN; the other kv head's rows are untouched. (Rows that do not see it
    are not checked: eager's spellings differ there, masked_fill keeps them finite, an
    additive -inf mask makes NaN + -inf = NaN.)"""
    q, k, v = _qkv(tq, tk)
    clean = _call(IMPLS[impl], q, k, v, variant)
    key = tk - tq
    k[0, 1, key, 5] = NAN
    out = _call(IMPLS[impl], q, k, v, variant)
    rows = _rows_seeing(key, tq, tk, variant)
    assert rows and out[0, 2:, rows].isnan().all(), "a NaN in k was turned into a finite answer"
    torch.testing.assert_close(out[:, :2], clean[:, :2])
    torch.testing.assert_close(out[1], clean[1])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", ["plain", "sinks", "softcap", "softcap_sinks", "alibi"])
def test_a_row_with_every_key_masked_gives_zeros(impl, variant):
    """SDPA's rule stays: a row whose bias is -inf at every key sees no key and gives zeros
    (with sinks, the sink alone gets the weight, and its value is zero)."""
    q, k, v = _qkv(4, 6)
    bias = torch.zeros(2, 4, 4, 6)
    bias[1, 2, 0] = float("-inf")
    kw = dict(VARIANTS[variant])
    extra = [bias] + ([torch.rand(4)] if kw.get("alibi") else []) + ([torch.randn(4)] if kw.get("sinks") else [])
    out = IMPLS[impl](q, k, v, *extra, causal=False, scale=0.3, **kw)
    assert not out.isnan().any()
    assert (out[1, 2, 0] == 0).all()


def _eager_softcap(q, k, v, cap=30.0):
    s = torch.tanh(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) / cap) * cap
    return s.softmax(-1) @ v


@pytest.mark.parametrize("impl", IMPLS)
def test_softcapped_scores_that_overflow_are_nan_as_in_eager(impl):
    """q.k past float32's range sums to inf - inf = NaN before the cap: eager's softmax
    gives NaN; so must the op (the torch backend runs soft-capped attention through the
    reference)."""
    q, k, v = (x[:1] for x in _qkv(4, 4, heads=2, kv_heads=2))
    q, k = q * 1e20, k * 1e20
    eager = _eager_softcap(q, k, v)
    assert eager.isnan().any()
    out = IMPLS[impl](q, k, v, causal=False, scale=1 / math.sqrt(q.shape[-1]), softcap=30.0)
    torch.testing.assert_close(out, eager, equal_nan=True)


class _Sinks(nn.Module):
    """gpt-oss's attention sinks, spelled out."""

    def __init__(self):
        super().__init__()
        self.sinks = nn.Parameter(torch.randn(2))

    def forward(self, q, k, v):
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        b, h, t, _ = s.shape
        s = torch.cat([s, self.sinks.view(1, h, 1, 1).expand(b, h, t, 1)], -1)
        s = s - s.amax(-1, keepdim=True)
        return s.softmax(-1)[..., :-1] @ v


class _SoftCap(nn.Module):
    """Gemma2's soft-capped scores, spelled out."""

    def forward(self, q, k, v):
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        return _eager_softcap(q, k, v)


@pytest.mark.parametrize("model", [_Sinks, _SoftCap])
def test_optimized_model_keeps_eager_nan(model):
    """End to end on the CPU torch backend: NaN in q or in k gives NaN where eager does."""
    torch.manual_seed(0)
    m = model()
    q, k, v = (torch.randn(1, 4, 2, 8) for _ in range(3))
    fast = fxforge.optimize(m, example_inputs=(q, k, v))
    assert "attention(" in fast.ir
    for which in ("q", "k"):
        qq, kk = q.clone(), k.clone()
        (qq if which == "q" else kk)[0, 1, 0, 3] = NAN
        with torch.no_grad():
            eager = m(qq, kk, v)
        assert eager.isnan().any()
        torch.testing.assert_close(fast(qq, kk, v), eager, equal_nan=True)


@pytest.mark.parametrize("variant", ["plain", "causal", "sinks", "bias"])
def test_an_inf_in_q_over_few_keys_is_what_the_reference_says(variant):
    """An inf in a query times keys of both signs makes scores of +-inf (softmax: NaN). Over
    fewer keys than its vector width, SDPA's CPU kernel gave zeros there; the torch backend
    computes such a call with the reference."""
    q, k, v = _qkv(2, 6)
    q[0, 1, 0, 4] = float("inf")
    want = _call(attention_reference, q, k, v, variant)
    assert want[0, 1, 0].isnan().all()
    torch.testing.assert_close(_call(attention_sdpa, q, k, v, variant), want, equal_nan=True)


class _PlainSoftmax(torch.nn.Module):
    def forward(self, q, k, v):
        return (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1) @ v


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("keys", [16, 64])
def test_an_inf_in_half_precision_is_nan_at_any_number_of_keys(dtype, keys):
    """SDPA's CPU kernel drops the NaN in float16/bfloat16 whatever the number of keys."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, keys, 8, dtype=dtype) for _ in range(3))
    model = _PlainSoftmax().eval()
    fast = fxforge.optimize(model, (q, k, v), verbose=False)
    q[0, 0, 3, 0] = float("inf")
    out, ref = fast(q, k, v), model(q, k, v)
    assert torch.equal(out.isnan(), ref.isnan()) and bool(ref[0, 0, 3].isnan().all())
