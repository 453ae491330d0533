"""int4 with a float zero point on a group whose values are all equal (a constant row): its
scale was floored at float32's tiny, so w / scale overflowed and the row came out NaN (torch
backend) or inf (the Triton GEMV), with `relative nan` in the report."""
import pytest
import torch

import fxforge
from fxforge import QuantConfig
from fxforge.ir.quant_formats import dequantize_weight, quantize_weight


@pytest.mark.parametrize("c", [5.0, 1.0, -3.0, 1e-20])
def test_a_constant_group_dequantizes_to_its_value(c):
    w = torch.randn(4, 64) * 0.1
    w[1] = c
    packed = quantize_weight(w, "int4", group_size=32, zero_point="float")
    back = dequantize_weight(packed)
    assert torch.isfinite(back).all()
    torch.testing.assert_close(back[1], w[1], rtol=1e-5, atol=0)
    step = (w.amax(1) - w.amin(1)).max() / 15  # the widest row's level spacing bounds any group's
    assert (back - w).abs().max() <= step / 2 + 1e-6


@pytest.mark.parametrize("backend", ["torch", "interpret"])
@pytest.mark.parametrize("rows", [1, 5])
def test_a_constant_row_runs_finite_and_close(backend, rows):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32)).eval()
    with torch.no_grad():
        model[0].weight[3] = 5.0
    x = torch.randn(rows, 64)
    fast = fxforge.optimize(model, (torch.randn(2, 64),), backend=backend, verbose=False,
                            quantize=QuantConfig("int4", group_size=32, zero_point="float", exclude=()))
    with torch.no_grad():
        got, want = fast(x), model(x)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[:, 3], want[:, 3], rtol=1e-4, atol=1e-3)
    assert "nan" not in fast.report()
