"""Floats and ints computed from dynamic sizes (`x / x.shape[1] ** 0.5`, a size returned
as an output): export writes them with torch's own sympy functions (ToFloat, FloatPow,
IntTrueDiv...), which the program must compute as eager does at each call's sizes."""
import pytest
import torch

import fxforge
from helpers import FunctionModule


FLOATS = {
    "sqrt_scale": lambda x: x / x.shape[1] ** 0.5,
    "full_value": lambda x: torch.full((x.shape[0], x.shape[1]), x.shape[1] * 1.5) + x.sum(-1),
    "float_mul": lambda x: x * (x.shape[1] * 0.5),
    "masked_fill": lambda x: x.masked_fill(x > 0, x.shape[1] * 1.0),
    "neg_pow": lambda x: x * x.shape[1] ** -1,
    "pow_of_size": lambda x: x * 0.5 ** x.shape[1],
    "thirds": lambda x: x * (x.shape[1] / 3.0),
}


@pytest.mark.parametrize("backend", ["torch", "interpret"])
@pytest.mark.parametrize("name", sorted(FLOATS))
def test_a_float_of_a_size_is_computed_at_each_call(name, backend):
    model = FunctionModule(FLOATS[name])
    fast = fxforge.optimize(model, (torch.randn(2, 6, 8),), backend=backend, verbose=False)
    for shape in [(2, 6, 8), (3, 9, 8), (1, 7, 8)]:
        x = torch.randn(shape)
        torch.testing.assert_close(fast(x), model(x), atol=0, rtol=0)


class ReturnsSizes(torch.nn.Module):
    def forward(self, x):
        return [x + 1, x.shape[1], x.shape[0] * x.shape[1], x.size(), x.numel(), x.shape[1] ** 0.5,
                {"len": x.shape[1], "third": x.shape[1] / 3}, x.shape[2], x.shape[1] > 7]


@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_sizes_returned_are_the_calls_ints_and_floats_and_survive_save_load(backend, tmp_path):
    model = ReturnsSizes()
    fast = fxforge.optimize(model, (torch.randn(2, 6, 8),), backend=backend, verbose=False)
    fast.save(str(tmp_path / "saved"))
    loaded = fxforge.load(str(tmp_path / "saved"), backend=backend)
    for shape in [(2, 6, 8), (3, 9, 8)]:
        x = torch.randn(shape)
        want = model(x)
        for got in (fast(x), loaded(x)):
            torch.testing.assert_close(got[0], want[0])
            assert got[1:] == want[1:]
            assert [type(v) for v in got[1:]] == [type(v) for v in want[1:]]  # ints, a float, a torch.Size
            assert [type(v) for v in got[6].values()] == [int, float]
            assert type(got[8]) is bool  # a comparison of sizes: eager's bool


@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_a_clamp_bound_computed_from_a_size_is_the_calls(backend):
    model = FunctionModule(lambda x: x.clamp(min=-x.shape[1] / 10, max=x.shape[1] / 10))
    fast = fxforge.optimize(model, (torch.randn(2, 6, 8),), backend=backend, verbose=False)  # was an IRCheckError
    for shape in [(2, 6, 8), (3, 9, 8)]:
        x = torch.randn(shape) * 3
        assert torch.equal(fast(x), model(x)), shape


@pytest.mark.parametrize("name", sorted(FLOATS))
def test_a_float_of_a_size_survives_the_ir_text_and_save_load(name, tmp_path):
    """The IR prints torch's float functions of sizes (ToFloat, FloatPow...) with every
    digit, and the parser reads them back: save/load (which re-reads the IR) gives the
    same answers at every size."""
    model = FunctionModule(FLOATS[name])
    fast = fxforge.optimize(model, (torch.randn(2, 6, 8),), verbose=False)
    assert str(fxforge.parse(fast.ir)) == fast.ir
    fast.save(str(tmp_path / "saved"))
    loaded = fxforge.load(str(tmp_path / "saved"))
    for shape in [(2, 6, 8), (3, 9, 8)]:
        x = torch.randn(shape)
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
