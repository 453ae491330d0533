"""OptimizedModel.to(dtype) where the graph holds something the model would not convert or
would compute differently in the new dtype: a float constant tensor that is not a parameter
or buffer, a number computed from torch.finfo(dtype) at capture. to() either gives eager
model.to(dtype)'s answer or refuses with DtypePinnedError; never another answer or a crash
at call time (runtime/retarget.py)."""
import pytest
import torch
import torch.nn.functional as F

import fxforge
from fxforge.runtime.retarget import DtypePinnedError


class _Scaled(torch.nn.Module):
    """A linear times a float32 constant: made in forward, a plain attribute, a buffer."""

    def __init__(self, how):
        super().__init__()
        self.how, self.l = how, torch.nn.Linear(8, 8)
        self.plain = torch.linspace(0.5, 2.0, 8)  # not a buffer: model.to() leaves it float32
        self.register_buffer("buf", torch.linspace(0.5, 2.0, 8))

    def forward(self, x):
        if self.how == "made_in_forward":
            return self.l(x) * torch.tensor([1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7])
        if self.how == "plain_attribute":
            return self.l(x) * self.plain
        if self.how == "finfo_min_0dim":  # GPT-Neo's mask value
            return torch.where(x > 0, self.l(x), torch.tensor(torch.finfo(x.dtype).min, dtype=x.dtype))
        if self.how == "scalar_0dim":
            return self.l(x) * torch.tensor(1.5)
        return self.l(x) * self.buf


def _optimized(model):
    torch.manual_seed(0)
    return fxforge.optimize(model.eval(), (torch.randn(2, 3, 8),))


@pytest.mark.parametrize("how,name", [("made_in_forward", "lifted_tensor"), ("plain_attribute", "plain"),
                                      ("finfo_min_0dim", "lifted_tensor")])
def test_a_float_constant_tensor_that_is_not_a_parameter_or_buffer_pins_the_dtype(how, name):
    # eager model.to(float16) keeps such a tensor float32 (the result promotes to float32);
    # to() used to make it float16: another dtype and ~7e-3 off, or finfo.min -> -inf
    model = _Scaled(how)
    fast = _optimized(model)
    with pytest.raises(DtypePinnedError, match=rf"(?s)constant tensor\(s\).*'{name}\w*' torch.float32"
                                               r".*optimize\(model.to\(torch.float16\)"):
        fast.to(torch.float16)
    assert fast.dtype == torch.float32
    x = torch.randn(2, 3, 8)
    assert torch.allclose(fast(x), model(x), atol=1e-5)


@pytest.mark.parametrize("how", ["scalar_0dim", "buffer"])
def test_a_buffer_or_a_0dim_constant_still_converts_as_eager(how):
    # a buffer is converted by model.to(); a 0-dim float32 constant does not promote
    model = _Scaled(how)
    fast = _optimized(model).to(torch.float16)
    x = torch.randn(3, 5, 8, dtype=torch.float16)
    expected, got = model.to(torch.float16)(x), fast(x)
    assert got.dtype == expected.dtype == torch.float16
    assert torch.allclose(got.float(), expected.float(), atol=2e-3)


class _Norm(torch.nn.Module):
    def __init__(self, eps):
        super().__init__()
        self.w, self.eps = torch.nn.Parameter(torch.ones(8)), eps

    def forward(self, x):
        if self.eps == "F.rms_norm":
            return F.rms_norm(x, (8,), self.w, eps=None)  # eps=None: finfo(x.dtype).eps at run time
        eps = torch.finfo(x.dtype).eps if self.eps == "finfo" else self.eps
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * self.w


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_an_epsilon_from_finfo_at_capture_pins_the_dtype(dtype):
    # was accepted, keeping float32's eps: 0.94 where the float16 model gives 0.032
    fast = _optimized(_Norm("finfo"))
    with pytest.raises(DtypePinnedError, match=r"(?s)1\.19\d*e-07 equals torch\.finfo\(torch\.float32\)\.eps"
                                               rf".*optimize\(model.to\({dtype}\)"):
        fast.to(dtype)
    assert fast.dtype == torch.float32


@pytest.mark.parametrize("eps", [1e-6, "F.rms_norm"])
def test_a_literal_epsilon_or_rms_norms_own_still_converts(eps):
    model = _Norm(eps)
    fast = _optimized(model).to(torch.float16)
    x = torch.full((1, 3, 8), 1e-3, dtype=torch.float16)
    assert torch.allclose(fast(x).float(), model.to(torch.float16)(x).float(), atol=2e-3)


class _Clamped(torch.nn.Module):
    def __init__(self, bound):
        super().__init__()
        self.l, self.bound = torch.nn.Linear(8, 8), bound

    def forward(self, x):
        h = self.l(x)
        if self.bound == "t5":
            c = torch.finfo(h.dtype).max - 1000  # T5's clamp: float32's max exactly
        elif self.bound == "half_min":
            c = -torch.finfo(h.dtype).min / 2  # no finfo value, but float16 cannot hold it
        else:
            c = self.bound
        return torch.clamp(h, min=-c, max=c)


@pytest.mark.parametrize("bound,why", [("t5", r"-3\.40\d*e\+38 equals torch\.finfo\(torch\.float32\)\.min, which in "
                                              r"torch\.float16 is -65504"),
                                       ("half_min", r"clamp's min=-1\.70\d*e\+38 does not fit in torch\.float16")],
                         ids=["t5", "half_min"])
def test_a_clamp_bound_from_finfo_is_refused_at_to_not_at_every_call(bound, why):
    # was accepted, then every call raised "value cannot be converted to type c10::Half"
    model = _Clamped(bound)
    fast = _optimized(model)
    with pytest.raises(DtypePinnedError, match=rf"(?s){why}.*optimize\(model.to\(torch.float16\)"):
        fast.to(torch.float16)
    x = torch.randn(2, 3, 8)
    assert torch.allclose(fast(x), model(x), atol=1e-5)


def test_a_clamp_bound_the_new_dtype_holds_still_converts():
    model = _Clamped(60000.0)
    fast = _optimized(model).to(torch.float16)
    x = torch.randn(2, 3, 8, dtype=torch.float16)
    assert torch.allclose(fast(x).float(), model.to(torch.float16)(x).float(), atol=2e-3)


def test_a_saved_model_keeps_its_constant_tensor_refusal(tmp_path):
    fast = _optimized(_Scaled("plain_attribute"))
    fast.save(str(tmp_path / "saved"))
    with pytest.raises(DtypePinnedError, match="'plain' torch.float32"):
        fxforge.load(str(tmp_path / "saved")).to(torch.bfloat16)


class _Filled(torch.nn.Module):
    def __init__(self, value):
        super().__init__()
        self.l = torch.nn.Linear(8, 8)
        self.value = value

    def forward(self, x):
        h = self.l(x)
        return h.masked_fill(h > 0.5, self.value).softmax(-1)


@pytest.mark.parametrize("value", [-1e9, -10 ** 9], ids=["float", "int"])
def test_a_masked_fill_value_the_new_dtype_cannot_hold_is_refused_at_to(value):
    # eager float16 raises "value cannot be converted to type c10::Half without overflow";
    # the retyped graph filled -inf instead (an answer where eager has none)
    model = _Filled(value)
    fast = _optimized(model)
    with pytest.raises(DtypePinnedError, match=r"masked_fill's value -1000000000\.0 does not fit in torch\.float16"):
        fast.to(torch.float16)
    with pytest.raises(RuntimeError, match="without overflow"):
        model.to(torch.float16)(torch.randn(2, 3, 8, dtype=torch.float16))


@pytest.mark.parametrize("value,dtype", [(-1e9, torch.bfloat16), (-60000.0, torch.float16)], ids=["bf16", "f16"])
def test_a_masked_fill_value_the_new_dtype_holds_still_converts(value, dtype):
    model = _Filled(value)
    fast = _optimized(model).to(dtype)
    x = torch.randn(2, 3, 8, dtype=dtype)
    assert torch.allclose(fast(x).float(), model.to(dtype)(x).float(), atol=1e-2)
