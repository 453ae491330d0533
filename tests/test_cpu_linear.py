"""The CPU torch backend's linear: the kernel and weight layout timed fastest per shape.
Values never change, only strides and which library computes the product."""
import pytest
import torch
import torch.nn.functional as F

import fxforge
from fxforge.runtime import cpu_linear
from fxforge.runtime.cpu_linear import CpuLinearPlan, onednn_available

import zoo
from helpers import assert_matches_eager

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN linear")


@needs_onednn
@pytest.mark.parametrize("layout", ["row", "column", "strided"])
@pytest.mark.parametrize("x_shape", [(1, 96), (3, 7, 96), (96,), (0, 96)])
def test_onednn_linear_equals_f_linear(layout, x_shape):
    torch.manual_seed(0)
    w = {"row": torch.randn(40, 96), "column": torch.randn(96, 40).t(), "strided": torch.randn(40, 200)[:, 7:103]}[layout]
    b = torch.randn(40)
    x = torch.randn(x_shape)
    for bias in (None, b):
        torch.testing.assert_close(cpu_linear.onednn_linear(x, w, bias), F.linear(x, w, bias), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_plan_runs_the_chosen_kernel_and_stores_the_chosen_layout():
    model, vocab = zoo.llama("sdpa")
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),), cpu_linear=False)
    plan = CpuLinearPlan(choices={(64, 64): ("onednn", "column"), (128, 64): ("onednn", "row")})
    graph, moved, nbytes = plan.apply(fast.graph)
    assert moved and all(n.endswith("o_proj.weight") for n in moved)  # the [64, 64] weights
    assert nbytes == len(moved) * 64 * 64 * 4
    for name in moved:
        w = graph.params[name]
        assert w.stride() == (1, 64) and torch.equal(w, fast.graph.params[name])
    unchanged = [n for n in graph.params if n not in moved]
    assert all(graph.params[n] is fast.graph.params[n] for n in unchanged)
    x = torch.randn(2, 3, 64)
    for w in (torch.randn(64, 64), torch.randn(128, 64), torch.randn(32, 64)):  # onednn, onednn, F.linear
        torch.testing.assert_close(plan.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    half = torch.randn(2, 64, dtype=torch.bfloat16)  # not float32: F.linear whatever the plan says
    torch.testing.assert_close(plan.linear(half, torch.randn(64, 64, dtype=torch.bfloat16)).float().shape,
                               torch.Size([2, 64]))


def test_big_enough_weights_are_timed_and_the_model_stays_exact(monkeypatch):
    # timing only looks at weights of 256 KiB or more: a 256-wide model has them
    monkeypatch.setattr(cpu_linear, "COLD_BYTES", 4 << 20)  # keep the timing short in tests
    model, vocab = zoo.llama("sdpa", hidden=256, heads=4)
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),))
    stats = next(s for s in fast.runtime_stats if s.name == "cpu_linear")
    timed = [s for s in {tuple(w.shape) for w in fast.graph.params.values() if w.dim() == 2}
             if s[0] * s[1] * 4 >= cpu_linear.MIN_TIMED_BYTES]
    assert timed and stats.notes
    for shape, choice in stats.details["cpu_linear"]["choices"].items():
        assert shape in timed and choice != cpu_linear.BASELINE
    assert_matches_eager(model, fast, vocab, [(1, 1), (2, 9)])
    assert "cpu_linear" in fast.report()


def test_off_or_not_float32_keeps_f_linear():
    model, vocab = zoo.llama("sdpa", hidden=256, heads=4)
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),), cpu_linear=False)
    assert fast.runtime_stats == []
    model16 = model.to(torch.bfloat16)
    fast16 = fxforge.optimize(model16, (torch.randint(0, vocab, (2, 7)),))
    stats16 = next(s for s in fast16.runtime_stats if s.name == "cpu_linear")
    assert not stats16.rules and stats16.notes == []  # no float32 weights to consider
