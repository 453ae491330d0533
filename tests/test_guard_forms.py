"""Guards that join relations with Or, And, Not (export writes `Eq(n, 0) | (n <= m)` where
the model's code may take either path, BigBird's block-sparse attention): kept, printed
and read back as IR text, and checked on every call like any other guard."""
import itertools

import pytest
import sympy
import torch

import fxforge
from fxforge.ir.guards import GuardChecker, GuardError, _as_read_back, format_guard, holds, parse_guard
from fxforge.ir.printer import print_graph
from fxforge.ir.types import symbol

B, T = symbol("B"), symbol("T")


def _by_python(text: str, b: int, t: int) -> bool:
    """The guard's meaning, evaluated by Python on the sizes (| & ~ on bools as or, and, not)."""
    py = text.replace("|", " or ").replace("&", " and ").replace("~", " not ")
    return bool(eval(py, {"Eq": lambda x, y: x == y, "Ne": lambda x, y: x != y, "Mod": lambda x, y: x % y,
                          "floor": lambda x: x // 1, "Max": max, "Min": min}, {"B": b, "T": t}))


@pytest.mark.parametrize("text", [
    "Eq(Mod(T, 2), 0) | (T <= 8)",
    "(T < 5) | ((B <= 3) & Eq(Mod(T, 2), 0))",
    "~(T >= 5) | Eq(B, 2)",
    "Eq(B*Mod(floor(T/2), 2), 0) | Eq(B*(floor(T/2) - 4), 2*B)",
    "(B >= 2) & (T <= 12)",
])
def test_joined_relations_print_parse_back_and_are_checked(text):
    g = parse_guard(text)
    assert parse_guard(format_guard(g)) == g and format_guard(parse_guard(format_guard(g))) == format_guard(g)
    checker = GuardChecker([g])
    for b, t in itertools.product(range(1, 5), range(1, 16)):
        expected = _by_python(text, b, t)
        assert holds(g, {B: b, T: t}) == expected, (text, b, t)
        if expected:
            checker.check({B: b, T: t})
        else:
            with pytest.raises(GuardError):
                checker.check({B: b, T: t})


def test_an_or_guard_line_of_the_ir_text_reads_back():
    text = """graph(%x: f32[B, T]) {
  guard (T <= 8) | Eq(Mod(T, 2), 0)
  %1: f32[B, T] = neg(%x)
  return (%1)
}"""
    g = fxforge.parse(text)
    assert [format_guard(r) for r in g.guards] == ["(T <= 8) | Eq(Mod(T, 2), 0)"]
    assert "guard (T <= 8) | Eq(Mod(T, 2), 0)" in print_graph(g)


class PairsOfASlice(torch.nn.Module):
    """A reshape of a slice whose length depends on T: export's guard on it is an Or."""

    def forward(self, x):
        y = x[:, : x.shape[1] // 2 - 4]
        return y.reshape(x.shape[0], -1, 2).sum(-1)


def test_a_model_whose_guard_is_an_or_captures_and_enforces_it():
    m = PairsOfASlice()
    fast = fxforge.optimize(m, (torch.randn(2, 32),), verbose=False)
    assert any(isinstance(g, sympy.Or) for g in fast.graph.guards), [format_guard(g) for g in fast.graph.guards]
    for t in (32, 40):
        x = torch.randn(3, t)
        assert torch.equal(fast(x), m(x))
    with pytest.raises(GuardError, match="outside the sizes this model was captured for"):
        fast(torch.randn(2, 34))  # an odd slice: eager cannot pair it either


def test_a_condition_the_text_cannot_hold_says_what_to_do():
    with pytest.raises(ValueError, match="optimize with dynamic=False"):
        _as_read_back(sympy.sin(T) > 0)


class _BranchOnParity(torch.nn.Module):
    def forward(self, x):
        return x * 2 if x.shape[1] % 2 == 0 else x - 1


class _BranchOnEqualSizes(torch.nn.Module):
    def forward(self, x):
        return x * 2 if x.shape[1] - x.shape[0] == 0 else x - 1


@pytest.mark.parametrize("model, example, others", [
    (_BranchOnParity(), (2, 5, 4), [(2, 6, 4), (2, 7, 4), (3, 8, 4)]),
    (_BranchOnEqualSizes(), (2, 5, 4), [(3, 3, 4), (2, 6, 4)]),
], ids=["parity", "equal_sizes"])
def test_a_branch_on_an_expression_of_sizes_keeps_its_guard(model, example, others):
    """export records `Ne(Mod(T, 2), 0)` / `Ne(T - B, 0)`: a condition on an expression of
    sizes compared with 0 or 1, which was taken for export's own 0/1 specialization of a
    size and dropped, so the other branch's sizes got this branch's answer."""
    fast = fxforge.optimize(model, (torch.randn(*example),), verbose=False)
    for shape in others:
        x = torch.randn(*shape)
        try:
            got = fast(x)
        except GuardError:
            continue
        torch.testing.assert_close(got, model(x))
