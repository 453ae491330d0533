"""Slices and selects whose start counts from the end by a symbolic size (`x[..., -T:]`).

torch.export records such a start as `-T`; the IR's slice holds the index torch settles on
(here size - T), and its end follows from the result's length. Before, a symbolic negative
start was kept as is and the end computed from it came out as 0: `x[..., -T:0]`, empty at
every length (a Mamba-2 / gated-delta hybrid's short convolution, OLMo-hybrid, crashed
with a reshape of 0 elements at any length but the example's; a model returning the
slice would have been wrong)."""
import pytest
import torch
import torch.nn.functional as F

import fxforge


class LastTAfterPad(torch.nn.Module):
    """A causal short convolution's trim: pad the time axis, convolve, keep the last T."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(8, 8, 4, groups=8)

    def forward(self, x):  # [B, T, 8]
        T = x.shape[1]
        y = self.conv(F.pad(x.transpose(1, 2), (3, 3)))  # [B, 8, T + 3]
        return F.silu(y[..., -T:]).transpose(1, 2) * 2


class SelectFromTheEnd(torch.nn.Module):
    def forward(self, x):  # [B, T, 8]
        T = x.shape[1]
        y = F.pad(x, (0, 0, 2, 0))  # [B, T + 2, 8]: two zero rows in front
        return y[:, -T] + y[:, -T:].sum(1)


@pytest.mark.parametrize("model_class", [LastTAfterPad, SelectFromTheEnd])
def test_a_start_counted_from_the_end_by_a_size_holds_at_every_length(model_class):
    torch.manual_seed(0)
    model = model_class().eval()
    fast = fxforge.optimize(model, example_inputs=(torch.randn(2, 7, 8),))
    for shape in ((2, 7, 8), (2, 5, 8), (3, 12, 8), (1, 9, 8)):
        x = torch.randn(shape)
        with torch.no_grad():
            want = model(x)
        got = fast(x)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_the_typecheck_refuses_a_slice_with_a_negative_start():
    from fxforge.ir.ops import OPS, IRTypeError
    from fxforge.ir.types import TensorType, symbol

    T = symbol("T")
    x = TensorType((2, T + 3), torch.float32)
    assert OPS["slice"].infer([x], {"dim": 1, "start": 3, "end": T + 3, "step": 1})[0].shape == (2, T)
    with pytest.raises(IRTypeError, match="negative"):
        OPS["slice"].infer([x], {"dim": 1, "start": -T, "end": 0, "step": 1})
