"""What the guards of a call rest on (runtime/module.py, ir/size_one.py): constants of the
call compared as the model's code can tell them apart, guards dropped only where the graph
and the model agree on more than the example's own data, the graph checked against the
model at the example itself, and eval()/train() that say what the capture holds."""
import math

import pytest
import torch

import fxforge
from fxforge.runtime.module import _same_constant


# -- constants of the call ------------------------------------------------------------------
class Scaled(torch.nn.Module):
    def forward(self, x, k=1, flag=False):
        y = x.long() * k  # int64 at k=1, float32 at k=1.0
        if flag is True:
            y = y + 100
        return y


@pytest.mark.parametrize("a, b", [(1, 1.0), (1, True), (1.0, True), (0, False), (0.0, -0.0),
                                  ((1, 2), (1.0, 2)), ([True], [1]), ({"a": 1}, {"a": 1.0})])
def test_constants_of_another_type_or_sign_differ(a, b):
    assert not _same_constant(a, b) and not _same_constant(b, a)


@pytest.mark.parametrize("a", [1, True, 1.5, float("nan"), float("inf"), -0.0, "s", None, (1, float("nan")),
                               {"k": [1, 2.0]}, torch.float16])
def test_constants_equal_to_themselves(a):
    again = type(a)(a) if isinstance(a, (tuple, dict)) else a
    assert _same_constant(again, a)
    if isinstance(a, float) and math.isnan(a):
        assert _same_constant(float("nan"), a)  # another NaN object


def test_int_constant_refuses_float_and_bool_calls():
    m, x = Scaled(), torch.randn(2, 6, 8) * 10
    fast = fxforge.optimize(m, (x,), example_kwargs=dict(k=1, flag=1))
    assert torch.equal(fast(x, k=1, flag=1), m(x, k=1, flag=1))
    for k, flag in ((1.0, 1), (1, True), (True, 1)):
        with pytest.raises(ValueError, match="captured as the constant"):
            fast(x, k=k, flag=flag)


def test_nan_constant_runs_and_survives_save_load(tmp_path):
    class Times(torch.nn.Module):
        def forward(self, x, s=0.0):
            return x * s

    x = torch.randn(2, 6, 8)
    fast = fxforge.optimize(Times(), (x,), example_kwargs=dict(s=float("nan")))
    assert fast(x, s=float("nan")).isnan().all()
    fast.save(str(tmp_path / "nan"))
    assert fxforge.load(str(tmp_path / "nan"))(x, s=float("nan")).isnan().all()

    fast = fxforge.optimize(Scaled(), (x,), example_kwargs=dict(k=True))
    fast.save(str(tmp_path / "bool"))
    loaded = fxforge.load(str(tmp_path / "bool"))
    assert torch.equal(loaded(x, k=True), Scaled()(x, k=True))
    for k in (1, 1.0):
        with pytest.raises(ValueError, match="captured as the constant"):
            loaded(x, k=k)
