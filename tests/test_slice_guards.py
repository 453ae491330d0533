"""Guards from a slice's index clamp and contiguity test are exact: torch.export records
`T < 5` for `x[:, :5]` traced at T = 3, though at T = 5 eager takes the same 5 rows; fxforge
traces again at the size refused and widens the guard where that trace is the same graph
(capture._widened_by_probes), never where the model's own code branches there. Every
boundary is checked on both sides against eager."""
import pytest
import sympy
import torch
import torch.nn as nn

import fxforge
from fxforge.ir.guards import GuardError, format_guard, union
from fxforge.ir.types import symbol

from helpers import assert_close_to_eager

T = symbol("T")


class Head(nn.Module):
    def forward(self, x):
        return x[:, :5] * 2


class Tail(nn.Module):
    def forward(self, x):
        return x[:, -5:] * 2


class HeadOfMin(nn.Module):
    def forward(self, x):
        return x[:, :min(x.shape[1], 5)] * 2


class OwnBranch(nn.Module):
    """The model's own code records `T < 5` as the slice does: another graph at T = 5."""

    def forward(self, x):
        y = x[:, :5] * 2
        if x.shape[1] < 5:
            return y
        return y + 1


def _answers(model, fast, sizes) -> dict:
    """{T: True where fast gives eager's answer, False where it refuses}; a different answer fails."""
    out = {}
    for t in sizes:
        x = torch.randn(2, t, 8)
        try:
            got = fast(x)
        except GuardError:
            out[t] = False
            continue
        with torch.no_grad():
            assert_close_to_eager(model(x), got)
        out[t] = True
    return out


def _guards(fast) -> list:
    return [line.strip() for line in fast.ir.splitlines() if line.strip().startswith("guard")]


@pytest.mark.parametrize("model_class", [Head, Tail])
def test_a_clamped_slice_traced_short_runs_up_to_its_length(model_class):
    model = model_class().eval()
    fast = fxforge.optimize(model, (torch.randn(2, 3, 8),), cpu_linear=False)
    assert _guards(fast) == ["guard T <= 5"]
    assert _answers(model, fast, range(1, 9)) == {t: t <= 5 for t in range(1, 9)}


@pytest.mark.parametrize("model_class", [Head, Tail])
def test_a_slice_traced_long_runs_from_its_length(model_class):
    model = model_class().eval()
    fast = fxforge.optimize(model, (torch.randn(2, 8, 8),), cpu_linear=False)
    assert _answers(model, fast, range(1, 13)) == {t: t >= 5 for t in range(1, 13)}


@pytest.mark.parametrize("example", [3, 8])
def test_a_slice_to_min_of_the_length_runs_at_every_length(example):
    model = HeadOfMin().eval()
    fast = fxforge.optimize(model, (torch.randn(2, example, 8),), cpu_linear=False)
    assert all(_answers(model, fast, range(1, 13)).values())


def test_the_models_own_branch_on_the_same_bound_is_not_widened():
    model = OwnBranch().eval()
    fast = fxforge.optimize(model, (torch.randn(2, 3, 8),), cpu_linear=False)
    assert _answers(model, fast, range(1, 8)) == {t: t <= 4 for t in range(1, 8)}


def test_union_of_guards():
    assert [format_guard(g) for g in union([sympy.Le(T, 4)], [sympy.Eq(T, 5)])] == ["T <= 5"]
    assert [format_guard(g) for g in union([sympy.Ge(T, 5), sympy.Ne(8 * T, 40)], [sympy.Eq(T, 5)])] == ["T >= 5"]
    assert union([sympy.Ne(T, sympy.Min(5, T))], [sympy.Eq(T, sympy.Min(5, T))]) == []
    # not one interval, or not one size: no list of relations says it (the caller keeps its own)
    assert union([sympy.Le(T, 3)], [sympy.Eq(T, 5)]) is None
    assert union([sympy.Le(T, 4)], [sympy.Eq(symbol("B"), 5)]) is None


class FlatThird(nn.Module):
    def forward(self, x):
        b, t = x.shape[:2]
        return x.reshape(b * t, -1)[:b * t // 3] * 2


def test_a_contiguity_test_of_a_flat_slice_refuses_no_size():
    # export records whether the slice is one row (Ne(floor(B*T/3), 1)): no other graph there
    model = FlatThird().eval()
    fast = fxforge.optimize(model, (torch.randn(2, 6, 8),), cpu_linear=False)
    for b, t in ((1, 3), (1, 4), (2, 2), (2, 3), (3, 5), (2, 7)):
        x = torch.randn(b, t, 8)
        with torch.no_grad():
            assert_close_to_eager(model(x), fast(x))
