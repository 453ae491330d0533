"""Floats and ints computed from dynamic sizes (`x / x.shape[1] ** 0.5`, a size returned
as an output): export writes them with torch's own sympy functions (ToFloat, FloatPow,
IntTrueDiv...), which the program must compute as eager does at each call's sizes."""
import pytest
import torch

import fxforge


class Lambda(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


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
    model = Lambda(FLOATS[name])
    fast = fxforge.optimize(model, (torch.randn(2, 6, 8),), backend=backend, verbose=False)
    for shape in [(2, 6, 8), (3, 9, 8), (1, 7, 8)]:
        x = torch.randn(shape)
        torch.testing.assert_close(fast(x), model(x), atol=0, rtol=0)
