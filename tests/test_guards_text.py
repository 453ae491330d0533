"""Guards export records on sizes read through `//`, `%` and math.ceil: every guard line
prints, parses and prints the same, holds at the example and is checked exactly."""
import math

import pytest
import sympy
import torch

import fxforge
from fxforge.ir.guards import GuardChecker, GuardError, format_guard, holds, parse_guard
from fxforge.ir.types import symbol


class HalfSplit(torch.nn.Module):
    def forward(self, x):
        h = x.shape[1] // 2
        return x[:, :h] - x[:, h:2 * h]


class PadTo4(torch.nn.Module):
    def forward(self, x):
        pad = (-x.shape[1]) % 4
        return torch.nn.functional.pad(x, (0, 0, 0, pad)).reshape(x.shape[0], -1, 4, x.shape[2]).sum(2)


class Ceil(torch.nn.Module):
    def forward(self, x):
        return x[:, : math.ceil(x.shape[1] / 3)] * 2


class Floor(torch.nn.Module):
    def forward(self, x):
        return x[:, : math.floor(x.shape[1] / 4)] * 2


@pytest.mark.parametrize("model", [HalfSplit(), PadTo4(), Ceil(), Floor()], ids=lambda m: type(m).__name__)
def test_every_guard_line_parses_back_and_the_model_runs(model, tmp_path):
    fast = fxforge.optimize(model, (torch.randn(2, 6, 4),))
    for g in fast.graph.guards:
        text = format_guard(g)
        assert isinstance(g, sympy.core.relational.Relational), text  # one relation a line, no `&`
        assert format_guard(parse_guard(text)) == text
    assert str(fxforge.parse(fast.ir, params=fast.graph.params)) == fast.ir
    fast.save(str(tmp_path / "saved"))
    loaded = fxforge.load(str(tmp_path / "saved"))
    T = symbol("T")
    ran = []
    for t in range(1, 14):  # the example (T = 6) and other lengths: as eager, or refused by a guard
        x = torch.randn(3, t, 4)
        if not all(holds(g, {symbol("B"): 3, T: t}) for g in fast.graph.guards):
            with pytest.raises(GuardError):
                fast(x)
            with pytest.raises(GuardError):
                loaded(x)
            continue
        assert torch.equal(fast(x), model(x)), t
        assert torch.equal(loaded(x), model(x)), t
        ran.append(t)
    assert 6 in ran and (len(ran) > 5 or isinstance(model, Floor)), ran  # (math.floor of a float specializes)


def test_math_ceil_of_a_size_guards_without_refusing_the_example():
    model = Ceil()
    fast = fxforge.optimize(model, (torch.randn(2, 6, 4),))
    text = [format_guard(g) for g in fast.graph.guards]
    assert not any("CeilToInt" in t for t in text) and "ceiling" in fast.ir, text
    x = torch.randn(2, 6, 4)
    assert torch.equal(fast(x), model(x))
    # ceil(1/3) == 1: the trace's Ne(T, ceiling(T/3)) excludes T = 1, where the slice is the
    # whole length; probed there (size_one._drop_points_that_hold), the graph is eager's answer
    assert not any(t.startswith("Ne(") for t in text), text
    x = torch.randn(2, 1, 4)
    assert torch.equal(fast(x), model(x))


def test_guards_are_checked_in_integer_arithmetic():
    # lambdify's floats made floor(T/49) at T=49 `math.floor((1/49)*49)` = 0
    T = symbol("T")
    for rel in [sympy.Eq(sympy.floor(T / 49), 1), sympy.Eq(sympy.ceiling(T / 49) * 49, T), sympy.Le(T / 3, 7)]:
        checker = GuardChecker([rel])
        for t in (1, 2, 21, 22, 49, 98, 147, 490):
            expected = holds(rel, {T: t})
            try:
                checker.check({T: t})
                assert expected, (format_guard(rel), t)
            except GuardError:
                assert not expected, (format_guard(rel), t)


def test_guard_lines_of_older_saves_and_bad_ones():
    text = """graph(%x: f32[B, T, 4]) {
  guard floor(T/2) <= T
  guard 2*floor(T/2) <= T
  %1: f32[B, T, 4] = neg(%x)
  return (%1)
}"""
    g = fxforge.parse(text)  # the first always holds: older fxforge wrote it, nothing to check
    assert [format_guard(r) for r in g.guards] == ["2*floor(T/2) <= T"]
    with pytest.raises(fxforge.ir.parser.ParseError, match="CeilToInt is not one of the functions"):
        fxforge.parse(text.replace("guard floor(T/2) <= T", "guard CeilToInt(T/3) <= T"))
    with pytest.raises(fxforge.ir.parser.ParseError, match="holds for no sizes"):
        fxforge.parse(text.replace("guard floor(T/2) <= T", "guard floor(T/2) > T"))


class ScaleByLength(torch.nn.Module):
    def forward(self, x):  # export specializes the float scale: Eq(1/T, 0.16666666666666666)
        q = x[:, None]
        return torch.nn.functional.scaled_dot_product_attention(q, q, q, scale=1 / x.shape[1])[:, 0]


class HalfSteps(torch.nn.Module):
    def forward(self, x):  # a guard with torch's ToFloat and FloatTrueDiv
        return x + torch.arange(0, x.shape[1] * 0.5, 0.5)[:, None]


def test_a_guard_on_floats_is_decided_in_floats_as_torch_does(tmp_path):
    model = ScaleByLength()
    with pytest.warns(UserWarning, match=r"holds at T = 6 only"):  # said at optimize(), not at the next call
        fast = fxforge.optimize(model, (torch.randn(2, 6, 8),), verbose=False)  # was a CaptureError
    assert fast.ir.count("guard Eq(1/T, 0.16666666666666666)") == 1  # every digit: it holds at T = 6
    assert str(fxforge.parse(fast.ir, params=fast.graph.params)) == fast.ir
    fast.save(str(tmp_path / "saved"))
    loaded = fxforge.load(str(tmp_path / "saved"))
    x = torch.randn(3, 6, 8)
    for f in (fast, loaded):
        torch.testing.assert_close(f(x), model(x))
        with pytest.raises(GuardError, match="T=9"):  # the scale there is another one
            f(torch.randn(3, 9, 8))
    model = HalfSteps()
    fast = fxforge.optimize(model, (torch.randn(2, 6, 8),), verbose=False)
    for t in (6, 9, 1):
        x = torch.randn(2, t, 8)
        torch.testing.assert_close(fast(x), model(x))


class ScaledBranch(torch.nn.Module):
    def forward(self, x):
        return x * 2 if 2 * x.shape[1] <= 13 else x - 1


def test_a_scaled_bound_on_one_size_is_kept_as_the_bound_it_is():
    fast = fxforge.optimize(ScaledBranch(), (torch.randn(2, 6, 8),), verbose=False)
    assert [format_guard(g) for g in fast.graph.guards] == ["T <= 6"]
    with pytest.raises(GuardError, match="T=7"):
        fast(torch.randn(2, 7, 8))
