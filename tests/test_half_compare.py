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


class _ComparesWithInts(torch.nn.Module):
    def forward(self, h):
        return torch.where(h * 2 > 0, h, 0.5), h * h * (h >= 3), (h * 2 == 2049)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_comparisons_with_int_constants_compile(dtype):
    # the rounded int constant became the literal `0.0`, to which the kernel then added
    # `.to(tl.float32)`: every call failed with a raw Triton error
    x = torch.tensor([-1.0, 0.0, 0.5, 3.0, 1024.5, 2.5], dtype=dtype)
    fast = fxforge.optimize(_ComparesWithInts(), (x,), backend="interpret", verbose=False)
    for got, want in zip(fast(x), _ComparesWithInts()(x)):
        assert torch.equal(got, want), (got, want)


class _BoolToHalf(torch.nn.Module):
    def forward(self, x):
        return (x > 0).to(torch.bfloat16) * 3, (x > 0.5).half() + 1


def test_a_bool_cast_to_a_half_dtype_runs_in_a_generated_kernel():
    # `(x > 0).to(torch.bfloat16)` failed inside Triton's interpreter (a raw error)
    x = torch.randn(4, 8)
    fast = fxforge.optimize(_BoolToHalf(), (x,), backend="interpret", verbose=False)
    for got, want in zip(fast(x), _BoolToHalf()(x)):
        assert got.dtype == want.dtype and torch.equal(got, want)
