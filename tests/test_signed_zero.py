"""Signed zeros, where IEEE makes them differ: `x + 0.0` is not x at x = -0.0 (cleanup's
add_zero folded it), and a fused body with `* -0.0` is not one with `* 0.0` (the kernel
cache keyed bodies by value, and -0.0 == 0.0 in Python, so one took the other's kernel)."""
import pytest
import torch

import fxforge


class _AddZero(torch.nn.Module):
    def forward(self, x):
        return 1.0 / (x + 0.0), torch.atan2(x - -0.0, -torch.ones_like(x)), 1.0 / (x + -0.0)


class _BothZeros(torch.nn.Module):
    def forward(self, x):
        return 1.0 / (x * 0.0), 1.0 / (x * -0.0)


def _same(got, want):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
        assert torch.equal(torch.signbit(g), torch.signbit(w))


@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_adding_zero_keeps_ieee_signed_zeros(backend):
    x = torch.tensor([-0.0, 0.0, 2.0])
    fast = fxforge.optimize(_AddZero(), (x,), backend=backend, verbose=False)
    _same(fast(x), _AddZero()(x))
    # x + (-0.0) is x exactly: that one still folds
    assert fast.report().count("add_zero=1") == 1


def test_a_kernel_for_times_minus_zero_is_not_the_one_for_times_zero():
    x = torch.tensor([1.0, -1.0])
    fast = fxforge.optimize(_BothZeros(), (x,), backend="interpret", verbose=False)
    _same(fast(x), _BothZeros()(x))
