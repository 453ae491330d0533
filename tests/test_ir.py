"""The IR: types, text form round trip, parse errors, typecheck, graph views."""
import pytest
import sympy
import torch

from fxforge.ir import Graph, IRCheckError, ParseError, TensorType, parse, structurally_equal, symbol, typecheck
from fxforge.ir.builder import Builder
from fxforge.ir.graph import Value
from fxforge.ir.types import broadcast_shapes, promote

B, T = symbol("B"), symbol("T")

TEXT = """graph(%x: f32[B, T, 8], %mask: bool[1, 1, T, T], %p0: param "w" f32[16, 8]) {
  %1: f32[B, T, 16] = linear(%x, %p0)
  %2: f32[] = const() {value=0.125, dtype=f32}
  %3: f32[B, T, 16] = mul(%1, %2)
  %4: f32[B, T, 2, 8] = view(%3) {shape=(B, T, 2, 8)}
  %5: f32[B, 2, T, 8] = permute(%4) {dims=(0, 2, 1, 3)}
  %6: f32[B, 2, T - 1, 8] = slice(%5) {dim=2, start=1, end=T, step=1}
  %7: f32[B, 2, 2*T - 1, 8] = cat(%5, %6) {dim=2}
  %8: f32[B, 2, T, T] = torch_call(%5, %5) {target="aten.matmul.default", args=($0, [$1]), kwargs=()}
  %9: f32[B, 2, T, T] = where(%mask, %8, %2)
  %10: f32[B, 2, T, T] = softmax(%9) {dim=-1, dtype=none}
  return (%7, %10)
}"""


def test_text_round_trip_is_exact():
    g = parse(TEXT)
    assert str(g) == TEXT
    assert structurally_equal(g, parse(str(g)))
    typecheck(g)


def test_structural_equality_sees_differences():
    g = parse(TEXT)
    other = parse(TEXT.replace("{dims=(0, 2, 1, 3)}", "{dims=(0, 1, 2, 3)}").replace(
        "%5: f32[B, 2, T, 8]", "%5: f32[B, T, 2, 8]"))
    assert not structurally_equal(g, other)


def test_symbolic_types_and_expressions():
    g = parse(TEXT)
    cat = g.nodes[6]
    assert cat.outputs[0].shape[2] == 2 * T - 1
    assert g.inputs[0].shape == (B, T, sympy.Integer(8))


@pytest.mark.parametrize("bad, why", [
    ("%3: f32[B, T, 16] = mul(%1, %99)", "used before it is defined"),
    ("%3: f32[B, T, 16] = mul(%1, %2)\n  %3: f32[B, T, 16] = mul(%1, %2)", "assigned twice"),
    ("%3: q7[B] = mul(%1, %2)", "not a type"),
])
def test_parse_errors_name_the_problem(bad, why):
    text = TEXT.replace("%3: f32[B, T, 16] = mul(%1, %2)", bad)
    with pytest.raises(ParseError, match=why):
        parse(text)


def test_typecheck_rejects_wrong_result_type():
    text = TEXT.replace("%3: f32[B, T, 16] = mul(%1, %2)", "%3: f16[B, T, 16] = mul(%1, %2)")
    with pytest.raises(IRCheckError, match=r"typed f16\[B, T, 16\] but mul gives f32\[B, T, 16\]"):
        typecheck(parse(text))


def test_typecheck_rejects_bad_view_and_use_before_def():
    text = TEXT.replace("{shape=(B, T, 2, 8)}", "{shape=(B, T, 3, 8)}")
    with pytest.raises(IRCheckError, match="element counts differ"):
        typecheck(parse(text))
    g = parse(TEXT)
    g.nodes[0], g.nodes[2] = g.nodes[2], g.nodes[0]
    with pytest.raises(IRCheckError, match="not defined before"):
        typecheck(g)


def test_typecheck_checks_param_tensors():
    g = parse(TEXT, params={"w": torch.zeros(16, 9)})
    with pytest.raises(IRCheckError, match="parameter 'w'"):
        typecheck(g)


def test_broadcast_and_promotion_follow_torch():
    assert broadcast_shapes((B, sympy.Integer(1)), (sympy.Integer(4),)) == (B, 4)
    with pytest.raises(TypeError, match="do not broadcast"):
        broadcast_shapes((B, sympy.Integer(3)), (sympy.Integer(4),))
    f16 = TensorType((B,), torch.float16)
    scalar_f32 = TensorType((), torch.float32)
    i64 = TensorType((B,), torch.int64)
    assert promote(f16, scalar_f32) == torch.float16  # 0-dim promotes like a scalar
    assert promote(i64, scalar_f32) == torch.float32
    assert promote(f16, TensorType((B,), torch.float32)) == torch.float32


def test_builder_infers_types_and_networkx_view():
    x = Value(TensorType((B, T), torch.float32), hint="x")
    b = Builder()
    y = b.emit("exp", x)
    z = b.emit("add", y, b.const(1.0))
    g = Graph(inputs=[x], nodes=b.nodes, outputs=[z])
    typecheck(g)
    dag = g.to_networkx()
    assert dag.number_of_nodes() == 3 and dag.number_of_edges() == 2
    dot = g.to_dot()
    assert dot.startswith("digraph") and "exp" in dot
    assert "%3: f32[B, T] = add(%1, %2)" in str(g)


def test_parse_errors_name_the_line_and_a_missing_weight():
    text = """graph(%x: f32[B, 4], %p0: param "w" f32[4]) {
  %1: f32[B, 4] = mul(%x, %p0)
  %2: f32[B, 4] = neg(%5)
  return (%2)
}"""
    with pytest.raises(ParseError, match=r"line 3: %5 is used before it is defined \(in '%2: f32\[B, 4\] = neg\(%5\)'\)"):
        parse(text)
    with pytest.raises(ParseError, match=r"params has no tensor for 1 parameter\(s\) the graph names, e.g. \['w'\]"):
        parse(text.replace("%5", "%1"), params={"v": torch.ones(4)})
    g = parse(text.replace("%5", "%1"), params={"w": torch.ones(4)})
    assert g.params["w"].shape == (4,)


def test_complex_constant_prints_parses_and_runs():
    """`z * 2j`: a Python complex constant had no text form (optimize raised TypeError),
    and the builder typed it float32, which would have dropped its imaginary part."""
    import fxforge

    b = Builder()
    c = b.const(2j)
    assert c.dtype == torch.complex64
    text = """graph(%z: c64[B, 4]) {
  %1: c64[] = const() {value=complex(-0.5, inf), dtype=c64}
  %2: c64[B, 4] = mul(%z, %1)
  return (%2)
}"""
    g = parse(text)
    assert g.nodes[0].attrs["value"] == complex(-0.5, float("inf")) and str(g) == text
    typecheck(g)

    class Mul(torch.nn.Module):
        def forward(self, z, x):
            return z * 2j, x * (1 - 3j)

    z, x = torch.randn(2, 6, 4, dtype=torch.complex64), torch.randn(2, 6, 4)
    fast = fxforge.optimize(Mul().eval(), (z, x), backend="torch", verbose=False)
    assert structurally_equal(fast.graph, parse(str(fast.graph)))
    for got, want in zip(fast(z, x), Mul()(z, x)):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want)


def test_clamp_bound_may_be_a_symbolic_size():
    """x.clamp(max=x.shape[1] / 10) runs; the IR check rejected the bound T/10."""
    import fxforge

    class Clamp(torch.nn.Module):
        def forward(self, x):
            return x.clamp(min=-x.shape[1], max=x.shape[1] / 10)

    fast = fxforge.optimize(Clamp().eval(), (torch.randn(2, 6, 8),), backend="torch", verbose=False)
    typecheck(fast.graph)
    assert structurally_equal(fast.graph, parse(str(fast.graph)))
    for t in (6, 9):
        x = torch.randn(2, t, 8) * 10
        assert torch.equal(fast(x), Clamp()(x))
