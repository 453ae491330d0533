"""optimize() on a model that fails on its own example inputs, or on example inputs that
hold no values, says so by name. It used to succeed (torch.export traced the model
anyway), then guessed size guards from the failing probes ("B >= 2 does not hold") and
raised raw errors, or returned numbers where eager raises."""
import pytest
import torch

import fxforge
import zoo
from fxforge.ir.capture import CaptureError


class _MixedDtypes(torch.nn.Module):
    """float32 activations into a bfloat16 Linear: eager raises at every size."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(16)
        self.lin = torch.nn.Linear(16, 16).bfloat16()

    def forward(self, x):
        return self.lin(self.norm(x))


class _HalfOverflow(torch.nn.Module):
    """A float16 model filling with -1e9, which float16 cannot hold: eager raises."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8).half()

    def forward(self, x):
        y = self.lin(x)
        return y.masked_fill(y > 0, -1e9)


@pytest.mark.parametrize("model,x", [(_MixedDtypes(), torch.randn(2, 5, 16)),
                                     (_HalfOverflow(), torch.randn(2, 5, 8).half())], ids=["mixed", "overflow"])
def test_a_model_failing_on_its_example_is_refused_with_its_own_error(model, x):
    with pytest.raises(RuntimeError):
        model.eval()(x)
    with pytest.raises(CaptureError, match=r"the model itself fails on the example inputs in eager PyTorch "
                                           r"\(RuntimeError: .*\).*model\(\*example_inputs\) runs"):
        fxforge.optimize(model, (x,), verbose=False)


def test_example_inputs_on_the_meta_device_are_refused():
    torch.manual_seed(0)
    model, _ = zoo.llama(attn="sdpa", n_layer=1)
    with pytest.raises(ValueError, match="an example input is on the meta device"):
        fxforge.optimize(model, (torch.randint(0, 128, (2, 9)).to("meta"),), verbose=False)


class _ExportFailsToo(torch.nn.Module):
    def forward(self, x):
        w = x @ x.mT + torch.arange(x.shape[1]).float()  # float16 + a float32 tensor: float32
        return w.softmax(-1) @ x  # float32 @ float16: eager raises, and so does torch.export


def test_a_model_failing_in_export_as_in_eager_gets_the_eager_refusal():
    # was "torch.export could not capture ... fix: simplify the code ... or pass dynamic=False"
    x = torch.randn(2, 6, 8, dtype=torch.float16)
    with pytest.raises(CaptureError, match=r"the model itself fails on the example inputs in eager PyTorch "
                                           r"\(RuntimeError: expected scalar type.*torch.export failed on the same"):
        fxforge.optimize(_ExportFailsToo(), (x,), verbose=False)


class _CountsAndBranches(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        if x.sum() > 0:  # a branch on a value: torch.export cannot capture it, eager runs it
            return x * 2
        return x


def test_a_failed_optimize_leaves_the_models_buffers_as_they_were():
    # the eager run that tells "the model fails in eager" from "export cannot trace it"
    # updated the model's buffers (a train-mode BatchNorm's running statistics)
    model = _CountsAndBranches()
    with pytest.raises(CaptureError, match="torch.export could not capture"):
        fxforge.optimize(model, (torch.ones(2, 3),), verbose=False)
    assert model.calls.item() == 0
