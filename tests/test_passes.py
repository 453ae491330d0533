"""The pattern DSL, the rewrite driver, cleanup's rules (IR text before/after), and the
pass manager (registry, order, report, dumps)."""
from collections import Counter

import pytest
import torch

import fxforge
from fxforge.ir import parse, typecheck
from fxforge.passes import PassError, PassInfo, default_registry
from fxforge.ir.edit import dead_code_elimination
from fxforge.passes.cleanup import cleanup, common_subexpression_elimination
from fxforge.passes.manager import PassContext, run_pipeline
from fxforge.passes.pattern import Rule, apply_rules, attr, const, either, op, var

import zoo


def body(graph) -> list[str]:
    return [ln.strip() for ln in str(graph).splitlines()[1:-1]]


def test_cleanup_rules_before_after():
    # (x + -0.0 is x for every float x; x + 0.0 is not at x = -0.0: tests/test_signed_zero.py)
    before = parse("""graph(%x: f32[B, T, 4]) {
  %1: f32[] = const() {value=-0.0, dtype=f32}
  %2: f32[B, T, 4] = add(%x, %1)
  %3: f32[] = const() {value=1, dtype=f32}
  %4: f32[B, T, 4] = mul(%3, %2)
  %5: f32[B, 4, T] = permute(%4) {dims=(0, 2, 1)}
  %6: f32[B, T, 4] = permute(%5) {dims=(0, 2, 1)}
  %7: f32[B, T, 4] = view(%6) {shape=(B, T, 4)}
  %8: f32[B, T, 4] = cast(%7) {dtype=f32}
  %9: f32[B, T, 4] = exp(%8)
  %10: f32[B, T, 4] = exp(%8)
  %11: f32[B, T, 4] = add(%9, %10)
  %12: f32[] = const() {value=2.0, dtype=f32}
  %13: f32[] = const() {value=3.0, dtype=f32}
  %14: f32[] = mul(%12, %13)
  %15: f32[B, T, 4] = mul(%11, %14)
  %16: f32[B, T, 4] = tanh(%x)
  return (%15)
}""")
    ctx = PassContext()
    after = cleanup(before, ctx)
    typecheck(after)
    assert body(after) == [
        "%1: f32[B, T, 4] = exp(%x)",
        "%2: f32[B, T, 4] = add(%1, %1)",
        "%3: f32[] = const() {value=6.0, dtype=f32}",
        "%4: f32[B, T, 4] = mul(%2, %3)",
        "return (%4)",
    ]
    for rule in ("add_zero", "mul_one", "permute_of_permute", "cse", "fold_constant"):
        assert ctx.rules[rule] >= 1, rule


def test_canonical_forms_are_one_spelling_and_bit_exact():
    from fxforge.ir.evaluate import evaluate

    before = parse("""graph(%x: f32[B, 8], %m: bool[B, 8], %h: f16[B, 8]) {
  %1: f32[] = const() {value=0.125, dtype=f32}
  %2: f32[B, 8] = mul(%1, %x)
  %3: f32[] = const() {value=4, dtype=f32}
  %4: f32[B, 8] = div(%2, %3)
  %5: f32[] = const() {value=3.0, dtype=f32}
  %6: f32[B, 8] = div(%4, %5)
  %7: f32[] = const() {value=1.5, dtype=f32}
  %8: f32[B, 8] = sub(%6, %7)
  %9: f32[B, 8] = add(%7, %8)
  %10: bool[B, 8] = logical_not(%m)
  %11: f32[B, 8] = where(%10, %9, %x)
  %12: f16[B, 8] = div(%h, %3)
  return (%11, %12)
}""")
    ctx = PassContext()
    after = cleanup(before, ctx)
    typecheck(after)
    text = "\n".join(body(after))
    # x / 3 keeps its division: x * (1/3) can differ in the last bit
    assert "div(" in text and text.count("div(") == 1 and "value=3.0" in text
    assert "sub(" not in text and "logical_not" not in text
    assert "value=0.25" in text and "value=-1.5" in text
    for line in body(after):  # constants last: no mul/add whose first operand is a const
        if " = mul(" in line or " = add(" in line:
            first = line.split("(")[1].split(",")[0]
            assert not any(ln.startswith(first + ":") and "const()" in ln for ln in body(after)), line
    for rule in ("mul_const_last", "add_const_last", "div_power_of_two", "sub_const", "where_of_not"):
        assert ctx.rules[rule] >= 1, rule
    torch.manual_seed(0)
    inputs = [torch.randn(5, 8) * 1e3, torch.rand(5, 8) > 0.5, (torch.randn(5, 8) * 100).half()]
    inputs[0][0, :4] = torch.tensor([0.0, -0.0, float("inf"), 1e-40])  # signed zero, inf, subnormal
    for want, got in zip(evaluate(before, inputs), evaluate(after, inputs)):
        assert want.dtype == got.dtype and torch.equal(want, got)  # bit-exact, not close


def test_cleanup_keeps_type_changing_noops_and_impure_calls():
    before = parse("""graph(%x: f16[B, 4]) {
  %1: f32[] = const() {value=-0.0, dtype=f32}
  %2: f16[B, 4] = add(%x, %1)
  %3: f32[B, 4] = cast(%x) {dtype=f32}
  %4: f32[B, 4] = add(%3, %1)
  %5: f16[B, 4] = torch_call(%x) {target="aten.bernoulli.p", args=($0, 0.5), kwargs=()}
  return (%2, %4)
}""")
    after = cleanup(before)
    # add(f16, 0-dim f32 zero) stays f16 -> removable; the random op has effects -> kept
    assert "aten.bernoulli.p" in str(after)
    assert "add" not in str(after)
    assert "%1: f32[B, 4] = cast(%x) {dtype=f32}" in str(after)


def test_dce_and_cse_directly():
    g = parse("""graph(%x: f32[4]) {
  %1: f32[4] = exp(%x)
  %2: f32[4] = exp(%x)
  %3: f32[4] = sin(%x)
  %4: f32[4] = add(%1, %2)
  return (%4)
}""")
    g2 = dead_code_elimination(g)
    assert "sin" not in str(g2)
    stats = Counter()
    g3 = common_subexpression_elimination(g2, stats)
    assert stats["cse"] == 1 and str(g3).count("exp(") == 1


def test_pattern_dsl_binds_vars_attrs_and_declines():
    g = parse("""graph(%x: f32[4, 8], %y: f32[4, 8]) {
  %1: f32[8, 4] = permute(%x) {dims=(1, 0)}
  %2: f32[4, 8] = mul(%x, %x)
  %3: f32[4, 8] = mul(%x, %y)
  %4: f32[4, 8] = add(%2, %3)
  return (%1, %4)
}""")
    seen = {}

    def square(m, b):
        seen["square"] = m["x"]
        return b.emit("pow", m["x"], b.const(2.0))

    def never(m, b):
        seen["declined"] = True
        return None

    rules = [
        Rule("decline", op("add", var(), var()), never),
        Rule("square", op("mul", var("x"), var("x")), square),  # the same value twice
        Rule("perm", op("permute", var("x"), dims=attr("d"), name="p"),
             lambda m, b: None if m.attr("d") != (1, 0) or seen.setdefault("perm", m.node("p").op) else None),
    ]
    stats = Counter()
    out = apply_rules(g, rules, stats)
    typecheck(out)
    assert stats == Counter({"square": 1})
    assert seen["declined"] and seen["perm"] == "permute"
    assert "pow(%x, %2)" in str(out) and "mul(%x, %y)" in str(out)


def test_either_and_commutative_and_const_patterns():
    g = parse("""graph(%x: f32[4]) {
  %1: f32[] = const() {value=2.0, dtype=f32}
  %2: f32[4] = mul(%1, %x)
  %3: f32[4] = div(%2, %1)
  return (%3)
}""")
    pat = either(op("div", op("mul", var("x"), const("c"), commutative=True), const("d")))
    rule = Rule("mul_div_same", pat, lambda m, b: m["x"] if m.attr("c") == m.attr("d") else None)
    out = apply_rules(g, [rule])
    assert body(out) == ["return (%x)"]


def test_rules_are_tried_only_at_their_root_op_and_wildcards_everywhere():
    assert Rule("r", op("mul", var(), var()), None).root_ops == {"mul"}
    assert Rule("r", op(("add", "sub"), var(), var()), None).root_ops == {"add", "sub"}
    assert Rule("r", either(op("exp", var()), const()), None).root_ops == {"exp", "const"}
    assert Rule("r", either(op("exp", var()), var("x")), None).root_ops is None
    assert Rule("r", var("x"), None).root_ops is None
    g = parse("""graph(%x: f32[4]) {
  %1: f32[4] = exp(%x)
  %2: f32[4] = neg(%1)
  return (%2)
}""")
    tried = []

    def record(name):
        def replace(m, b):
            tried.append((name, m.root.op))
            return None
        return replace

    rules = [Rule("on_neg", op("neg", var()), record("on_neg")),
             Rule("anywhere", var("x"), record("anywhere")),
             Rule("on_exp", op("exp", var()), record("on_exp"))]
    apply_rules(g, rules)
    # in table order at each node, and never at a node of another op
    assert tried == [("anywhere", "exp"), ("on_exp", "exp"), ("on_neg", "neg"), ("anywhere", "neg")]


def test_rule_that_changes_the_type_is_a_bug_reported_by_name():
    g = parse("""graph(%x: f32[4]) {
  %1: f32[4] = exp(%x)
  return (%1)
}""")
    bad = Rule("bad", op("exp", var("x")), lambda m, b: b.cast(m["x"], torch.float16))
    with pytest.raises(RuntimeError, match="rule bad replaced a f32\\[4\\] with a f16\\[4\\]"):
        apply_rules(g, [bad])


def test_pipeline_order_unknown_names_and_user_positions():
    reg = default_registry()
    assert reg.order == ["cleanup", "fuse_attention", "gqa", "shard", "kv_cache", "quantize", "fuse_linear",
                         "fuse_rope_attention", "fuse_elementwise", "fuse_linear_pointwise", "cleanup_final"]
    reg.add(PassInfo("mine", lambda g: g), before="cleanup_final")
    assert reg.order == ["cleanup", "fuse_attention", "gqa", "shard", "kv_cache", "quantize", "fuse_linear",
                         "fuse_rope_attention", "fuse_elementwise", "fuse_linear_pointwise", "mine", "cleanup_final"]
    reg.add(PassInfo("default_place", lambda g: g))
    assert reg.order.index("default_place") == reg.order.index("fuse_elementwise") - 1
    with pytest.raises(ValueError, match="unknown pass 'nope'; known passes: cleanup, cleanup_final, default_place, fuse_attention, fuse_elementwise, fuse_linear, fuse_linear_pointwise, fuse_rope_attention, gqa, kv_cache, mine, quantize, shard"):
        reg.pipeline({}, passes=["nope"])
    with pytest.raises(ValueError, match="relative to unknown pass"):
        reg.add(PassInfo("x", lambda g: g), after="nope")


def _relu_to_clamp(graph, ctx):
    """A user pass written with the built-in pattern DSL: relu(x) -> clamp(x, min=0.5)
    (deliberately not equivalent, so the test can see that it ran)."""
    rules = [Rule("relu_to_clamp", op("relu", var("x")), lambda m, b: b.emit("clamp", m["x"], min=0.5, max=None))]
    return apply_rules(graph, rules, ctx.rules, pass_name="relu_to_clamp")


class ReluNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.fc(x)) * 2


def test_user_pass_runs_at_its_position_and_shows_in_report_and_dumps(tmp_path):
    reg = default_registry()
    fxforge.register_pass("relu_to_clamp", after="cleanup", registry=reg)(_relu_to_clamp)
    model = ReluNet().eval()
    x = torch.randn(2, 3, 8)
    fast = fxforge.optimize(model, (x,), registry=reg, dump_dir=str(tmp_path))
    assert [s.name for s in fast.stats] == ["cleanup", "relu_to_clamp", "fuse_attention", "fuse_linear",
                                            "fuse_elementwise", "fuse_linear_pointwise", "cleanup_final"]
    assert fast.stats[1].rules["relu_to_clamp"] == 1
    report = fast.report()
    assert "relu_to_clamp" in report and "relu_to_clamp=1" in report
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files[:8] == ["00_capture.ir", "01_cleanup.ir", "02_relu_to_clamp.ir", "03_fuse_attention.ir",
                         "04_fuse_linear.ir", "05_fuse_elementwise.ir", "06_fuse_linear_pointwise.ir",
                         "07_cleanup_final.ir"]
    assert "relu(" in (tmp_path / "01_cleanup.ir").read_text()
    assert "clamp(" in (tmp_path / "02_relu_to_clamp.ir").read_text()
    assert "program.py" in files and "report.txt" in files
    # the rewrite changed the result the way it should: relu -> clamp(min=0.5)
    expected = torch.clamp(model.fc(x), min=0.5) * 2
    torch.testing.assert_close(fast(x), expected)


def test_global_register_pass_and_unregister():
    try:
        fxforge.register_pass("noop_user_pass")(lambda g: g)
        fast = fxforge.optimize(ReluNet().eval(), (torch.randn(2, 8),))
        assert "noop_user_pass" in [s.name for s in fast.stats]
    finally:
        fxforge.unregister_pass("noop_user_pass")
    fast = fxforge.optimize(ReluNet().eval(), (torch.randn(2, 8),))
    assert "noop_user_pass" not in [s.name for s in fast.stats]


def test_run_pipeline_typechecks_after_each_pass():
    g = parse("""graph(%x: f32[4]) {
  %1: f32[4] = exp(%x)
  return (%1)
}""")

    def breaks_types(graph):
        graph.nodes[0].outputs[0].type = graph.nodes[0].outputs[0].type.__class__((5,), torch.float32)
        return graph

    with pytest.raises(fxforge.IRCheckError, match="after pass 'breaks'"):
        run_pipeline(g, [PassInfo("breaks", breaks_types)], check=True)


def test_dump_env_var_and_passes_list(tmp_path, monkeypatch):
    monkeypatch.setenv("FXFORGE_DUMP", str(tmp_path))
    model, vocab = zoo.gpt2()
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 5)),), passes=["cleanup"])
    assert [s.name for s in fast.stats] == ["cleanup"]
    assert (tmp_path / "01_cleanup.ir").exists()
    # the dump parses back
    parse((tmp_path / "01_cleanup.ir").read_text())


def test_constant_folding_of_concrete_shape_only_subgraphs():
    g = parse("""graph(%x: f32[B, 3]) {
  %1: i64[3] = arange() {start=0, end=3, step=1, dtype=i64}
  %2: i64[1, 3] = unsqueeze(%1) {dim=0}
  %3: f32[1, 3] = cast(%2) {dtype=f32}
  %4: f32[B, 3] = add(%x, %3)
  %5: i64[T] = arange() {start=0, end=T, step=1, dtype=i64}
  %6: i64[1, T] = unsqueeze(%5) {dim=0}
  %7: f32[] = sum(%3) {dims=(0, 1), keepdim=false, dtype=none}
  %8: f32[B, 3] = mul(%4, %7)
  return (%8, %6)
}""")
    stats = Counter()
    from fxforge.passes.cleanup import fold_constants

    out = fold_constants(g, stats)
    typecheck(out)
    text = str(out)
    # the concrete chain became one constant tensor and the sum a scalar const;
    # the symbolic arange(T) stays a computation
    assert '%p0: param "_folded.1" f32[1, 3]' in text
    assert "const() {value=3.0, dtype=f32}" in text
    assert "arange() {start=0, end=T" in text and "start=0, end=3" not in text
    folded = out.params["_folded.1"]
    torch.testing.assert_close(folded, torch.arange(3.0).unsqueeze(0))
    assert stats["fold_constant"] >= 3


def test_registering_a_name_twice_says_how_and_replace_swaps_in_place():
    reg = default_registry()
    fxforge.register_pass("relu_to_clamp", after="cleanup", registry=reg)(_relu_to_clamp)
    # a notebook cell run twice: the error says what to do
    with pytest.raises(ValueError, match=r"'relu_to_clamp' is already registered; pass replace=True .*"
                                         r"unregister_pass\('relu_to_clamp'\)"):
        fxforge.register_pass("relu_to_clamp", after="cleanup", registry=reg)(_relu_to_clamp)

    def edited(graph):
        return graph  # the user's new version of the pass: no rewrite

    order = list(reg.order)
    fxforge.register_pass("relu_to_clamp", registry=reg, replace=True)(edited)
    assert reg.order == order and reg.passes["relu_to_clamp"].fn is edited
    model, x = ReluNet().eval(), torch.randn(2, 8)
    fast = fxforge.optimize(model, (x,), registry=reg)
    assert [s.name for s in fast.stats].count("relu_to_clamp") == 1
    # the edited pass ran, not the old one (which turns relu into clamp(min=0.5))
    torch.testing.assert_close(fast(x), torch.relu(model.fc(x)) * 2)
    # with a position, replace also moves it
    fxforge.register_pass("relu_to_clamp", before="cleanup_final", registry=reg, replace=True)(edited)
    assert reg.order.count("relu_to_clamp") == 1
    assert reg.order.index("relu_to_clamp") == reg.order.index("cleanup_final") - 1


class _RsqrtNet(torch.nn.Module):
    def forward(self, x):
        return torch.rsqrt(x.abs() + 1) * 3


def _cast_typed_as_f32(graph):
    """Breaks the IR: a cast to f16 whose result is typed f32 (the program would compute in f16)."""
    from fxforge.ir.graph import Node, Value

    nodes = list(graph.nodes)
    i = next(i for i, n in enumerate(nodes) if n.op == "rsqrt")
    n = nodes[i]
    v = Value(n.outputs[0].type)
    nodes[i] = Node(n.op, n.inputs, n.attrs, (v,), n.meta)
    nodes.insert(i + 1, Node("cast", (v,), {"dtype": torch.float16}, n.outputs, {}))
    return graph.with_nodes(nodes)


def _dangling(graph):
    """Breaks the IR: a node reads a value no node defines."""
    from fxforge.ir.graph import Node, Value

    n = next(n for n in graph.nodes if n.op == "rsqrt")
    orphan = Value(n.inputs[0].type)
    return graph.with_nodes([Node(m.op, (orphan,), m.attrs, m.outputs, m.meta) if m is n else m for m in graph.nodes])


def _raises(graph):
    return {}["no such key"]


def _output_cast_to_f16(graph):
    """Well typed, but fast(...) would return float16 where the model returns float32."""
    from fxforge.ir.builder import Builder

    b = Builder()
    new = b.emit("cast", graph.outputs[0], dtype=torch.float16)
    return graph.with_nodes(list(graph.nodes) + b.nodes, [new])


def _output_sliced(graph):
    """Well typed, but fast(...) would return half of each row."""
    from fxforge.ir.builder import Builder

    b = Builder()
    new = b.emit("slice", graph.outputs[0], dim=-1, start=0, end=4, step=1)
    return graph.with_nodes(list(graph.nodes) + b.nodes, [new])


@pytest.mark.parametrize("fn, error, says", [
    (_cast_typed_as_f32, fxforge.IRCheckError, r"after pass 'mine': .*cast gives f16"),
    (_dangling, fxforge.IRCheckError, r"after pass 'mine': "),
    (_raises, PassError, r"pass 'mine' raised KeyError: 'no such key'"),
    (_output_cast_to_f16, fxforge.IRCheckError, r"after pass 'mine': output 0 is f16\[B, T, 8\] where it was "
                                                r"f32\[B, T, 8\]; a pass must keep each output's dtype and shape"),
    (_output_sliced, fxforge.IRCheckError, r"after pass 'mine': output 0 is f32\[B, T, 4\] where it was f32\[B, T, 8\]"),
], ids=["wrong dtype", "dangling value", "raises", "output dtype changed", "output shape changed"])
def test_a_user_pass_is_typechecked_and_named_without_fxforge_check(fn, error, says, monkeypatch):
    monkeypatch.delenv("FXFORGE_CHECK", raising=False)  # the default: built-in passes unchecked
    reg = default_registry()
    fxforge.register_pass("mine", after="cleanup", registry=reg)(fn)
    with pytest.raises(error, match=says) as info:
        fxforge.optimize(_RsqrtNet(), (torch.randn(2, 4, 8),), registry=reg)
    if error is PassError:
        assert isinstance(info.value.__cause__, KeyError) and info.value.pass_name == "mine"


def test_a_deliberate_error_of_a_builtin_pass_keeps_its_type():
    from fxforge.passes.kv_cache import KVCacheError

    with pytest.raises(KVCacheError):  # a user may catch it by type: not wrapped in a PassError
        fxforge.optimize(_RsqrtNet(), (torch.randn(2, 4, 8),), kv_cache=True)


def test_registering_or_unregistering_what_cannot_be_a_pass_fails_at_once():
    reg = default_registry()
    with pytest.raises(TypeError, match="a pass name is a non-empty str, got 42"):
        fxforge.register_pass(42, registry=reg)
    with pytest.raises(TypeError, match="expected a function"):
        fxforge.register_pass("n", registry=reg)(42)
    with pytest.raises(TypeError, match=r"cannot be called as fn\(graph\) or fn\(graph, ctx\)"):
        fxforge.register_pass("n", registry=reg)(lambda graph, ctx, extra: graph)
    with pytest.raises(TypeError, match=r"cannot be called as fn\(graph\)"):
        fxforge.register_pass("n", registry=reg)(lambda: None)
    assert "n" not in reg.passes
    fxforge.register_pass("ok", registry=reg)(lambda graph, ctx=None, *, extra=1: graph)
    assert reg.passes["ok"].wants_ctx()
    with pytest.raises(ValueError, match="no pass named 'nope' is registered; known passes: cleanup"):
        fxforge.unregister_pass("nope", registry=reg)


@pytest.mark.parametrize("kwargs, says", [
    (dict(kv_cache=True, disable=["kv_cache"]),
     r"option kv_cache= asks for pass 'kv_cache', but disable=\['kv_cache'\] leaves it out: the option would be "
     r"ignored"),
    (dict(kv_cache=True, passes=["cleanup"]), r"option kv_cache= .* passes=\['cleanup'\] does not include it"),
    (dict(quantize="int8", disable=["quantize"]), r"option quantize= asks for pass 'quantize'"),
])
def test_an_option_whose_pass_is_left_out_is_a_conflict(kwargs, says):
    with pytest.raises(ValueError, match=says):
        fxforge.optimize(ReluNet().eval(), (torch.randn(2, 8),), **kwargs)


def test_report_shows_the_backends_planning_that_dump_writes(tmp_path):
    model, vocab = zoo.llama("sdpa")
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 6)),), kv_cache=True, dump_dir=str(tmp_path))
    dumped = sorted(p.name for p in tmp_path.glob("*_prepare_torch.ir"))
    rows = {line.split()[0]: line for line in fast.report().splitlines()[2:] if line.strip()}
    assert dumped and "prepare_torch" in rows  # was dumped, but missing from the report
    # the node counts chain: cleanup_final's count -> prepare's -> cpu_linear's
    final = fast.stats[-1].nodes_after
    prepare = fast.prepare_stats
    assert prepare.name == "prepare_torch"
    assert prepare.nodes_before == final and prepare.nodes_after == fast.runtime_stats[0].nodes_before
    assert f"{final} -> {prepare.nodes_after}" in rows["prepare_torch"]


def test_a_builtin_pass_keeps_its_deliberate_errors_and_names_its_bugs():
    g = parse("""graph(%x: f32[4]) {
  %1: f32[4] = exp(%x)
  return (%1)
}""")

    def refuses(graph):
        raise ValueError("this model cannot be converted")

    def buggy(graph):
        return graph.nodes[7]

    with pytest.raises(ValueError, match="cannot be converted") as info:
        run_pipeline(g, [PassInfo("refuses", refuses, builtin=True)])
    assert "(in pass 'refuses')" in getattr(info.value, "__notes__", [])
    with pytest.raises(PassError, match=r"pass 'buggy' raised IndexError") as info:
        run_pipeline(g, [PassInfo("buggy", buggy, builtin=True)])
    assert isinstance(info.value.__cause__, IndexError)
