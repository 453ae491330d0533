"""A scalar built from a size (`torch.ones(1).mul(T).rsqrt()`) is no constant: folding must
leave it a computation (its value differs per call). And `.item()` used as a number gets an
error that says so, not the data-dependent-size (mixture of experts) advice."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import fxforge
from fxforge import CaptureError
from fxforge.ir import parse, typecheck
from fxforge.ir.evaluate import evaluate
from fxforge.passes.cleanup import fold_constants


def test_fold_leaves_a_fused_body_that_reads_a_size():
    # fuse_elementwise puts the `const T` inside the fused node's body: folding it at
    # no size raised KeyError 'no size given for {T}' (and would be wrong at other T)
    g = parse("""graph(%x: f32[B, T, 4]) {
  %1: f32[1] = full() {shape=(1,), value=1, dtype=f32}
  %2: f32[1] = fused_pointwise(%1) {body=(("const", (), (("value", T), ("dtype", i64))), ("mul", ("in0", "t0"), ()), ("rsqrt", ("t1",), ())), outputs=("t2",)}
  %3: f32[B, T, 4] = mul(%x, %2)
  return (%3)
}""")
    out = fold_constants(g)
    typecheck(out)
    assert "fused_pointwise" in str(out)
    for b, t in [(2, 5), (1, 3), (3, 11)]:
        x = torch.randn(b, t, 4)
        torch.testing.assert_close(evaluate(out, [x])[0], x * torch.ones(1).mul(t).rsqrt(), rtol=0, atol=0)


class _Scaled(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return x * self.scale(x)


@pytest.mark.parametrize("scale", [
    lambda x: torch.ones(1).mul(x.shape[1]).rsqrt(),       # 1 / sqrt(seq len)
    lambda x: x.new_ones(()).mul(x.shape[1]).sqrt(),
    lambda x: torch.ones(1).mul(x.shape[0]).neg().exp(),   # the batch size
    lambda x: torch.zeros(()).add(x.shape[1]).sigmoid(),
], ids=["rsqrt_T", "sqrt_T_0d", "exp_B", "sigmoid_T"])
@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_a_scalar_from_a_size_through_a_unary_op_matches_eager_at_other_sizes(scale, backend):
    # interpret (the Triton backends): a group of constants alone was fused into a
    # fused_pointwise with no tensor input, whose launch raised IndexError
    model = _Scaled(scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = fxforge.optimize(model, (torch.randn(2, 5, 4),), verbose=False, backend=backend)
    for b, t in [(2, 5), (1, 3), (3, 11)]:
        x = torch.randn(b, t, 4)
        torch.testing.assert_close(fast(x), model(x), rtol=1e-6, atol=1e-6)


def _capture_error_text(model) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CaptureError) as info:
            fxforge.optimize(model, (torch.randn(2, 5, 4),), verbose=False)
    return str(info.value)


class _ItemScale(nn.Module):
    def forward(self, x):
        return x / x.abs().max().item()  # a Python float, not a size


def test_item_used_as_a_number_says_so_and_how_to_keep_a_tensor():
    text = _capture_error_text(_ItemScale())
    assert "read into Python" in text and ".item()" in text, text
    assert "x / x.abs().max()" in text, text
    assert "a size depends on tensor data" not in text and "mixture of experts" not in text, text


class _ItemSize(nn.Module):
    def forward(self, x):
        return x.sum() + torch.zeros(x.gt(0).sum().item()).sum()  # .item() sets a size


def test_item_used_as_a_size_keeps_the_size_advice():
    text = _capture_error_text(_ItemSize())
    assert "a size depends on tensor data" in text and "fixed shapes" in text, text


class _FloatScale(nn.Module):
    def forward(self, x):
        return x / float(x.abs().max())  # torch.export itself refuses this one


def test_float_of_a_tensor_is_not_called_a_branch():
    text = _capture_error_text(_FloatScale())
    assert "reads a tensor's value into Python" in text and "x / x.abs().max()" in text, text
    assert "branches on tensor" not in text, text
