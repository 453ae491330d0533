"""Where optimize() runs a model: its parameters' device, else its buffers', else (a model
with neither, e.g. a pure function of its inputs) the example inputs' device. A model with no
weights whose inputs are on the GPU used to be taken for a CPU model (backend 'triton'
refused it, 'auto' picked the torch backend)."""
import torch

from fxforge.api import _model_device


class _NoWeights(torch.nn.Module):
    def forward(self, x):
        return x.softmax(-1)


def test_a_model_without_weights_runs_where_its_inputs_are():
    x = torch.empty(2, 3, device="meta")
    assert _model_device(_NoWeights(), ((x,), {})) == torch.device("meta")
    assert _model_device(_NoWeights(), ((), {"x": x})) == torch.device("meta")
    assert _model_device(_NoWeights()) == torch.device("cpu")


def test_weights_decide_before_inputs():
    lin = torch.nn.Linear(3, 3)
    assert _model_device(lin, ((torch.empty(2, 3, device="meta"),), {})) == torch.device("cpu")
    buf = torch.nn.Module()
    buf.register_buffer("b", torch.empty(1, device="meta"))
    assert _model_device(buf, ((torch.ones(1),), {})) == torch.device("meta")
