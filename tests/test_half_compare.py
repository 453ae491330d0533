"""A float16/bfloat16 value compared with a Python float compares half values, as eager's
comparison rounds the scalar to the tensor's dtype: the generated kernels held the constant
in float32, so `y == 0.2` was False, and `y >= 1.4` / `y > 4.4` flipped, at a y equal to the
constant's half value."""
import pytest
import torch

import fxforge


class _Compares(torch.nn.Module):
    def forward(self, x):
        y = x * 2
        return (y == 0.2), y.masked_fill(y >= 1.4, 0), torch.where(y > 4.4, y, -y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_half_comparisons_with_float_constants_give_eagers_answer(dtype, backend):
    at = [torch.tensor(c, dtype=dtype).item() / 2 for c in (0.2, 1.4, 4.4)]  # y hits each half constant
    x = torch.tensor(at + [3.0], dtype=dtype)
    fast = fxforge.optimize(_Compares(), (x,), backend=backend, verbose=False)
    assert "fused_pointwise=1" in fast.report()
    for got, want in zip(fast(x), _Compares()(x)):
        assert torch.equal(got, want), (got, want)
