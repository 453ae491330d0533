"""report() and quantize's warnings say what was measured and what was done: the error over
a logits output with masked (-inf) entries is a number, not nan; an include pattern that
matches nothing, or a model with no linear to quantize, warns; the error names the model's
own output position; a tied autoencoder's weight says why both its uses stay float."""
import warnings

import pytest
import torch
from torch import nn

import fxforge
from fxforge.evaluate import describe_error, output_error


def _error_line(fast):
    (line,) = [line.strip() for line in fast.report().splitlines() if "error vs the source model" in line]
    return line


def _quantize_details(fast):
    return next(s for s in fast.stats if s.name == "quantize").details


class _Masked(nn.Module):
    """A padded vocabulary masked to -inf, the same entries in eager and fast."""

    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        return self.o(torch.relu(self.a(x))).masked_fill(torch.arange(64) >= 60, float("-inf"))


def test_shared_infinities_do_not_make_the_error_nan():
    torch.manual_seed(0)
    model, x = _Masked().eval(), torch.randn(2, 5, 64)
    fast = fxforge.optimize(model, (x,), quantize="int8", verbose=False)
    error = _quantize_details(fast)["error"]
    with torch.no_grad():
        ref, out = model(x).double(), fast(x).double()
    finite = torch.isfinite(ref)
    assert error["rel_error"] == pytest.approx(float((out[finite] - ref[finite]).norm() / ref[finite].norm()))
    assert error["max_abs_error"] == pytest.approx(float((out[finite] - ref[finite]).abs().max()))
    assert 0 < error["rel_error"] < 0.05
    assert error["nonfinite_equal"] == 2 * 5 * 4 and error["nonfinite_mismatch"] == 0
    line = _error_line(fast)
    assert "relative nan" not in line and "max abs nan" not in line and f"relative {error['rel_error']:.3g}" in line
    assert "40 are the same inf or nan in both" in line


def test_an_inf_on_one_side_only_is_counted_not_a_nan():
    ref = torch.tensor([[1.0, 2.0, float("-inf")], [3.0, float("nan"), 4.0]])
    approx = torch.tensor([[1.0, float("inf"), float("-inf")], [3.0, float("nan"), 4.5]])
    error = output_error(ref, approx)
    assert error["nonfinite_mismatch"] == 1 and error["nonfinite_equal"] == 2
    assert error["max_abs_error"] == pytest.approx(0.5)
    assert error["rel_error"] == pytest.approx(0.5 / float(torch.tensor([1.0, 3.0, 4.0]).norm()))
    line = describe_error(error, "on x")
    assert "relative nan" not in line and "max abs nan" not in line
    assert "1 entries inf or nan on one side only" in line


class _Argmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        y = self.o(torch.relu(self.a(x)))
        return y.argmax(-1), y


def test_the_error_names_the_models_own_output_position():
    torch.manual_seed(0)
    fast = fxforge.optimize(_Argmax().eval(), (torch.randn(2, 5, 64),), quantize="int8", verbose=False)
    assert _quantize_details(fast)["error"]["output"] == 1
    assert "of output 1, shape [2, 5, 64]" in _error_line(fast)


class _AB(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.o = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        return self.o(torch.relu(self.b(torch.relu(self.a(x)))))


class _NoLinear(nn.Module):
    def forward(self, x):
        return torch.relu(x) * 2


def _warnings_of(model, quantize):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fast = fxforge.optimize(model, (torch.randn(2, 5, 64),), quantize=quantize, verbose=False)
    return fast, [str(w.message) for w in seen]


def test_an_include_pattern_that_matches_nothing_warns_even_when_another_matches():
    fast, seen = _warnings_of(_AB().eval(), fxforge.QuantConfig("int8", include=("a.*", "bb.*")))
    assert [m for m in seen if m.startswith("quantize: include pattern 'bb.*' matches no weight of the "
                                            "captured graph, so it includes nothing")], seen
    assert not [m for m in seen if "'a.*'" in m], seen
    assert _quantize_details(fast)["quantize"]["layers"]  # a.* still quantized
    _, seen = _warnings_of(_AB().eval(), fxforge.QuantConfig("int8", include=("a.*", "b.*")))
    assert not [m for m in seen if "matches no weight" in m], seen


def test_a_model_without_linears_warns_that_nothing_was_quantized():
    _, seen = _warnings_of(_NoLinear().eval(), "int8")
    assert [m for m in seen if m.startswith("quantize='int8' found no linear weights to quantize")], seen
    _, seen = _warnings_of(_AB().eval(), "int8")
    assert not [m for m in seen if "found no linear weights" in m], seen


class _Tied(nn.Module):
    """A tied autoencoder: enc reads W as linear(x, W), the decoder (the output head) as matmul(h, W)."""

    def __init__(self):
        super().__init__()
        self.enc, self.h = nn.Linear(64, 32, bias=False), nn.Linear(32, 32)

    def forward(self, x):
        return torch.matmul(torch.relu(self.h(self.enc(x))), self.enc.weight)


def test_a_tied_weight_whose_one_use_is_the_head_says_both_stay_float():
    torch.manual_seed(0)
    fast = fxforge.optimize(_Tied().eval(), (torch.randn(2, 5, 64),), quantize="int8", verbose=False)
    (reason,) = [r for name, r in _quantize_details(fast)["quantize"]["skipped"] if name == "enc.weight"]
    assert reason.startswith("read as linear(x, W) and as matmul(x, W), and one of the two is the output head")
    assert "so both stay float" in reason
    assert "skipped enc.weight: read as linear(x, W) and as matmul(x, W)" in fast.report()


class _TwoSubgraphs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        y = self.b(torch.relu(self.a(x)))
        torch._dynamo.graph_break()
        return torch.relu(y) * 2  # a subgraph without a linear: normal under torch.compile


def test_the_compile_backends_subgraphs_stay_quiet():
    """One subgraph holds some of the model's weights: an include pattern naming another
    subgraph's weight, or a subgraph with no linear, is no mistake of the user's."""
    from fxforge.dynamo import FxforgeBackend

    torch._dynamo.reset()
    fx = FxforgeBackend(quantize=fxforge.QuantConfig("int8", include=("a.*", "b.*")))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with torch.no_grad():
            torch.compile(_TwoSubgraphs().eval(), backend=fx)(torch.randn(2, 64))
    assert len(fx.models) == 2
    assert not [w for w in seen if str(w.message).startswith("quantize")], [str(w.message) for w in seen]
