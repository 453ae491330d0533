"""A masked_fill value that fuse_attention folds away still refuses a dtype that cannot hold it.

`scores.masked_fill(triu(ones(T, T), 1), -1e9)` folds into attention {causal=true}: the
fill constant leaves the graph. Eager's masked_fill raises in float16 ("value cannot be
converted to type at::Half without overflow"), so `fast.to(torch.float16)` must refuse as it
does for an unfused masked_fill constant, not answer. bfloat16 holds -1e9: that answers (the
causal form, and the bias form of a mask from the inputs, whose float32 bias is the fused
op's own, not a dtype the model fixed)."""
import pytest
import torch

import fxforge
from fxforge.ir import roles
from fxforge.runtime.retarget import DtypePinnedError

from helpers import assert_round_trips


class _Attn(torch.nn.Module):
    """One hand-written attention: a causal mask built from triu, or (from_inputs) a
    padding mask [B, T] passed in, filled with `fill` after the scale."""

    def __init__(self, fill, from_inputs=False):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)
        self.fill, self.from_inputs = fill, from_inputs

    def forward(self, x, pad=None):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 2, 8).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-1, -2) / 8 ** 0.5
        mask = pad[:, None, None, :] if self.from_inputs else \
            torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), 1)
        return (s.masked_fill(mask, self.fill).softmax(-1) @ v).transpose(1, 2).reshape(b, t, 16)


def _inputs(from_inputs):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    return (x, torch.tensor([[False] * 5, [True, True, False, False, False]])) if from_inputs else (x,)


def _optimized(model, args):
    torch.manual_seed(0)
    fast = fxforge.optimize(model.eval(), args, verbose=False)
    assert fast.graph.count("attention") == 1, fast.ir  # (the fill went into the fused op)
    return fast


def _in(dtype, args):
    return tuple(a.to(dtype) if a.is_floating_point() else a for a in args)


@pytest.mark.parametrize("from_inputs", [False, True], ids=["causal", "bias"])
@pytest.mark.parametrize("fill", [-1e9, -10 ** 9, -1e5], ids=["float", "int", "1e5"])
def test_to_float16_refuses_a_fill_float16_cannot_hold_as_eager_raises(fill, from_inputs):
    model, args = _Attn(fill, from_inputs), _inputs(from_inputs)
    fast = _optimized(model, args)
    with pytest.raises(DtypePinnedError, match=rf"masked_fill's value {float(fill)!r} does not fit in torch\.float16"):
        fast.to(torch.float16)
    with pytest.raises(RuntimeError, match="without overflow"):
        model.to(torch.float16)(*_in(torch.float16, args))


@pytest.mark.parametrize("from_inputs", [False, True], ids=["causal", "bias"])
def test_to_bfloat16_holds_minus_1e9_and_answers_as_optimizing_the_bfloat16_model(from_inputs):
    model, args = _Attn(-1e9, from_inputs), _inputs(from_inputs)
    fast = _optimized(model, args).to(torch.bfloat16)
    args16 = _in(torch.bfloat16, args)
    model.to(torch.bfloat16)
    afresh = _optimized(model, args16)
    with torch.no_grad():
        got, want = fast(*args16), model(*args16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=0)
    torch.testing.assert_close(got, afresh(*args16), rtol=0, atol=0)


def test_a_fill_every_dtype_holds_records_nothing_and_converts():
    # -65504 (float16's min, written as a number) fits everywhere: to(float16) answers
    model, args = _Attn(-65504.0), _inputs(False)
    fast = _optimized(model, args)
    assert not any(e[1] == roles.FIXED_FILL for e in fast.graph.signature.get("fixed_dtypes", ()))
    fast.to(torch.float16)
    with torch.no_grad():
        torch.testing.assert_close(fast(*_in(torch.float16, args)).float(),
                                   model.to(torch.float16)(*_in(torch.float16, args)).float(), atol=2e-3, rtol=0)


def test_a_finfo_min_fill_of_the_models_dtype_still_converts():
    # torch.finfo(x.dtype).min, as most models write it: in float16 eager fills float16's min,
    # a key dropped all the same, so the folded causal mask is still the model's
    class _FinfoFill(_Attn):
        def forward(self, x, pad=None):
            self.fill = torch.finfo(x.dtype).min
            return super().forward(x, pad)

    model, args = _FinfoFill(None), _inputs(False)
    fast = _optimized(model, args).to(torch.float16)
    with torch.no_grad():
        torch.testing.assert_close(fast(*_in(torch.float16, args)).float(),
                                   model.to(torch.float16)(*_in(torch.float16, args)).float(), atol=2e-3, rtol=0)


def test_the_refusal_survives_the_ir_text_and_save(tmp_path):
    fast = _optimized(_Attn(-1e9), _inputs(False))
    assert_round_trips(fast.graph)
    fast.save(str(tmp_path / "saved"))
    with pytest.raises(DtypePinnedError, match=r"masked_fill's value -1000000000\.0 does not fit in torch\.float16"):
        fxforge.load(str(tmp_path / "saved")).to(torch.float16)


def test_optimizing_the_float16_model_refuses_as_eager_raises():
    model, args = _Attn(-1e9).to(torch.float16), _in(torch.float16, _inputs(False))
    with pytest.raises(Exception, match="without overflow"):
        fxforge.optimize(model.eval(), args, verbose=False)


def test_the_refusal_survives_kv_cache():
    # kv_cache rebuilds the graph's signature: the fill entry stays with fixed_dtypes
    class _LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.att, self.head = torch.nn.Embedding(32, 16), _Attn(-1e9), torch.nn.Linear(16, 32)

        def forward(self, ids):
            return self.head(self.att(self.emb(ids)))

    torch.manual_seed(0)
    fast = fxforge.optimize(_LM().eval(), (torch.randint(0, 32, (2, 5)),), kv_cache=True, verbose=False)
    with pytest.raises(DtypePinnedError, match=r"masked_fill's value -1000000000\.0 does not fit in torch\.float16"):
        fast.to(torch.float16)
    fast.to(torch.bfloat16)  # (holds it)


class _UpcastAttn(torch.nn.Module):
    """Attention that fills scores it upcast to float32 first (`s.float().masked_fill(m,
    -1e9)`, as many HF models do): the fill happens in float32 whatever the model's dtype."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 2, 8).permute(2, 0, 3, 1, 4)
        s = (q @ k.transpose(-1, -2) / 8 ** 0.5).float()
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), 1)
        p = s.masked_fill(mask, -1e9).softmax(-1).to(v.dtype)
        return (p @ v).transpose(1, 2).reshape(b, t, 16)


def test_a_fill_into_upcast_scores_records_nothing_and_float16_answers_as_eager():
    # the bfloat16 model fills float32 scores: eager model.to(float16) answers, so must fast
    torch.manual_seed(0)
    model = _UpcastAttn().to(torch.bfloat16)
    args = _in(torch.bfloat16, _inputs(False))
    fast = _optimized(model, args)
    assert not any(e[1] == roles.FIXED_FILL for e in fast.graph.signature.get("fixed_dtypes", ())), fast.ir
    args16 = _in(torch.float16, args)
    with torch.no_grad():
        got, want = fast.to(torch.float16)(*args16), model.to(torch.float16)(*args16)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want.float(), atol=2e-3, rtol=0)


def test_a_fill_into_the_models_own_bfloat16_scores_still_refuses_float16():
    class _Bf16Fill(_UpcastAttn):
        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.qkv(x).view(b, t, 3, 2, 8).permute(2, 0, 3, 1, 4)
            s = q @ k.transpose(-1, -2) / 8 ** 0.5
            mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), 1)
            return (s.masked_fill(mask, -1e9).softmax(-1) @ v).transpose(1, 2).reshape(b, t, 16)

    torch.manual_seed(0)
    model = _Bf16Fill().to(torch.bfloat16)
    fast = _optimized(model, _in(torch.bfloat16, _inputs(False)))
    with pytest.raises(DtypePinnedError, match=r"masked_fill's value -1000000000\.0 does not fit in torch\.float16"):
        fast.to(torch.float16)


class _PadAttn(torch.nn.Module):
    """Padding filled on the scores: `keep` 0/1 ints (HF's attention_mask: the bool cast and
    the where of the fill fuse into one fused_pointwise, the bias fuse_attention reads) or
    a bool `pad`; the fill a number or "finfo" (`torch.finfo(s.dtype).min`, HF's idiom);
    spelled with masked_fill or where."""

    def __init__(self, fill=-1e9, spelled="masked_fill", int_keep=True):
        super().__init__()
        self.qkv, self.fill, self.spelled, self.int_keep = torch.nn.Linear(16, 48), fill, spelled, int_keep

    def forward(self, x, mask):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 2, 8).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-1, -2) / 8 ** 0.5
        pad = (~mask.bool() if self.int_keep else mask)[:, None, None, :]
        fill = torch.finfo(s.dtype).min if self.fill == "finfo" else self.fill
        s = s.masked_fill(pad, fill) if self.spelled == "masked_fill" else torch.where(~pad, s, fill)
        return (s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, 16)


@pytest.mark.parametrize("spelled", ["masked_fill", "where"])
def test_an_int_padding_mask_bias_converts_to_bfloat16_and_float16_refuses_the_fill(spelled):
    torch.manual_seed(0)
    model = _PadAttn(spelled=spelled)
    args = (torch.randn(2, 5, 16), torch.tensor([[1] * 5, [1, 1, 1, 0, 0]]))
    fast = _optimized(model, args)
    assert fast.graph.count("fused_pointwise") >= 1, fast.ir  # (the form this test is about)
    if spelled == "masked_fill":
        with pytest.raises(DtypePinnedError, match=r"masked_fill's value -1000000000\.0 does not fit"):
            fast.to(torch.float16)
    args16 = _in(torch.bfloat16, args)
    got = fast.to(torch.bfloat16)
    model.to(torch.bfloat16)
    with torch.no_grad():
        out, want = got(*args16), model(*args16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=0)
    torch.testing.assert_close(out, _optimized(model, args16)(*args16), rtol=0, atol=0)


@pytest.mark.parametrize("keep", [False, True], ids=["bool_pad", "int_keep"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_a_finfo_min_fill_in_a_bias_converts_as_optimizing_the_converted_model(dtype, keep):
    # the bias holds torch.finfo(float32).min: in `dtype` the model fills that dtype's own
    # min, which the retyped bias holds as fuse_attention builds it from the converted model
    torch.manual_seed(0)
    model = _PadAttn("finfo", int_keep=keep)
    x = torch.randn(2, 5, 16)
    pad = torch.tensor([[1] * 5, [1, 1, 1, 0, 0]]) if keep else torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    fast = _optimized(model, (x, pad)).to(dtype)
    args = (x.to(dtype), pad)
    model.to(dtype)
    with torch.no_grad():
        got, want = fast(*args), model(*args)
        afresh = _optimized(model, args)(*args)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want.double(), atol=2e-2 if dtype.itemsize == 2 else 1e-12, rtol=0)
    torch.testing.assert_close(got, afresh, rtol=0, atol=0)
