"""Capture makes two sizes one symbol where a guard says they are equal (ir/capture.py
_equal_symbols): Eq(32*B1*T1, 32*B*T1) is B1 == B, as every size is >= 1. Only a guard
that says exactly that: no other equation is read as one."""
import sympy

from fxforge.ir.capture import _equal_symbols

B, B1, T, T1, D = sympy.symbols("B B1 T T1 D", integer=True, positive=True)


def test_a_product_with_a_difference_of_two_sizes_unifies_them():
    assert _equal_symbols([sympy.Eq(32 * B1 * T1, 32 * B * T1)]) == {B1: B}
    assert _equal_symbols([sympy.Eq(B1 + 1, B + 1)]) == {B1: B}
    assert _equal_symbols([sympy.Eq(T1**2 * (B - B1), 0)]) == {B1: B}


def test_chains_map_to_the_first_name():
    assert _equal_symbols([sympy.Eq(B1, B), sympy.Eq(D, B1)]) == {B1: B, D: B}


def test_other_equations_unify_nothing():
    for rel in (sympy.Eq(B * T, 64), sympy.Eq(B1 * T, B * T1), sympy.Eq(2 * B1, B),
                sympy.Eq((B - B1) * (T - T1), 0), sympy.Eq((B - B1) * (T - 3), 0), sympy.Ne(B, B1),
                sympy.Eq(sympy.floor(8 * B1 / B), 8)):
        assert _equal_symbols([rel]) == {}, rel
