"""typecheck enforces each op's signature (arity, attribute names and types) from the
registry, and whatever is wrong with a node comes out as an IRCheckError quoting its line."""
import pytest

from fxforge.ir import IRCheckError, ParseError, parse, typecheck


def _graph(line: str, inputs: str = "%x: f32[B, 8]") -> str:
    return f"graph({inputs}) {{\n  {line}\n  return (%1)\n}}"


@pytest.mark.parametrize("line, why", [
    # the reproductions from issue 15
    ("%1: f32[B, 8] = relu(%x, %x, %x)", "relu takes 1 input, got 3"),
    ("%1: f32[B, 8] = silu()", "silu takes 1 input, got 0"),
    # arity
    ("%1: f32[B, 8] = add(%x)", "add takes 2 inputs, got 1"),
    ("%1: f32[B, 8] = linear(%x)", "linear takes 2 to 3 inputs, got 1"),
    ("%1: f32[B, 8] = cat() {dim=0}", "cat takes at least 1 input, got 0"),
    ("%1: f32[] = const(%x) {value=1.0, dtype=f32}", "const takes no inputs, got 1"),
    ("%1: f32[B, 8] = where(%x, %x)", "where takes 3 inputs, got 2"),
    ("%1: f32[B, 8] = attention(%x, %x) {causal=true, scale=0.5}", "attention takes 3 to 6 inputs, got 2"),
    # attribute names and types
    ("%1: f32[B, 8] = softmax(%x)", "softmax is missing attribute 'dim'"),
    ("%1: f32[B, 8] = softmax(%x) {dim=1.5}", "attribute 'dim' of softmax must be an int, got 1.5"),
    ("%1: f32[B, 8] = relu(%x) {foo=1}", "unknown attribute 'foo' for relu"),
    ("%1: f32[B, 8] = cast(%x) {dtype=1}", "attribute 'dtype' of cast must be a dtype, got 1"),
    ("%1: f32[B] = sum(%x) {dims=1, keepdim=false}", "attribute 'dims' of sum must be a tuple of ints, got 1"),
    ("%1: f32[B] = sum(%x) {dims=(1,), keepdim=1}", "attribute 'keepdim' of sum must be a bool, got 1"),
    ("%1: f32[B, 8] = gelu(%x) {approximate=tanh}", "attribute 'approximate' of gelu must be a string"),
    ("%1: f32[B - 1, 8] = slice(%x) {dim=0, start=1, end=B, step=1}", None),  # a size may be a symbol
    ("%1: f32[B, 8] = slice(%x) {dim=1, start=0, end=f32, step=1}",
     "attribute 'end' of slice must be a size \\(int or expression\\) or none, got torch.float32"),
    # flags that decide the operand count
    ("%1: f32[B, 8] = layer_norm(%x, %x) {shape=(8,), eps=1e-05, weight=false, bias=false}",
     "weight=false, bias=false means 1 inputs, got 2"),
    # a type rule that would have raised IndexError / TypeError
    ("%1: f32[B, 8] = softmax(%x) {dim=5}", "dim 5 out of range"),
    ("%1: f32[B, 8] = torch_call(%x) {target=\"aten.relu.default\", args=($3,), kwargs=()}",
     "\\$3 names an input the call does not have"),
    ("%1: f32[B, 8] = torch_call(%x) {target=\"aten.relu.default; import os\", args=($0,), kwargs=()}",
     "is not an `aten.op.overload` name"),
    ("%1: f32[B, 8] = fused_pointwise(%x) {body=((\"exp\", (\"in3\",), ()),), outputs=(\"t0\",)}",
     "step t0: in3 is not one of the 1 inputs"),
    ("%1: f32[B, 8] = fused_pointwise(%x) {body=((\"exp\", (\"in0\", \"in0\"), ()),), outputs=(\"t0\",)}",
     "step t0: exp takes 1 input, got 2"),
    ("%1: f32[B, 8] = fused_pointwise(%x) {body=((\"exp\", (\"in0\",), ()),), outputs=(\"t4\",)}",
     "output 't4' is not one of the 1 steps"),
])
def test_malformed_nodes_name_the_problem_and_the_line(line, why):
    g = parse(_graph(line))
    if why is None:
        typecheck(g)
        return
    with pytest.raises(IRCheckError, match=why) as info:
        typecheck(g)
    assert f"at: {line}" in str(info.value)  # the message quotes the IR line


def test_a_type_rule_crash_becomes_an_ircheckerror():
    # cat's rule compares shapes only; a rank-0 operand makes it index past the end
    g = parse(_graph("%1: f32[] = cat(%s) {dim=0}", "%s: f32[]"))
    with pytest.raises(IRCheckError, match="type error in cat"):
        typecheck(g)


@pytest.mark.parametrize("text, why", [
    ("", "a graph starts with"),
    ("graph(%x: f32[4]) {\n  return %x\n}", "expected `return"),
    (_graph("%1: f32[B, 8] = torch_call(%x) {target=\"aten.relu.default\", args=($,), kwargs=()}"),
     "expected \\$<input index>"),
    (_graph("%1: f32[B, 8] = relu(%x) {foo=\"unterminated}"), "bad quoted string"),
    (_graph("%1: f32[B, 8] = relu(%x) {foo=torch.nn}"), "not a torch layout"),
    (_graph("%1: f32[B, 8] = relu(%x) {foo=device(\"nowhere\")}"), "bad device"),
    ("graph(%x: f32[().__class__]) {\n  return (%x)\n}", "only names, numbers"),
    ("graph(%x: f32[(1, 2)]) {\n  return (%x)\n}", "not a number"),
])
def test_malformed_text_raises_parse_error(text, why):
    with pytest.raises(ParseError, match=why):
        parse(text)


@pytest.mark.parametrize("inputs, line, why", [
    # a f32 input to a bf16 linear: what the lowering of a Python scalar made of transformers'
    # eager attention mask (tests/test_lowering_promotion.py); torch refuses to run it
    ("%x: f32[B, 8], %w: bf16[4, 8]", "%1: f32[B, 4] = linear(%x, %w)",
     "linear needs one dtype for its input, weight, got input f32\\[B, 8\\], weight bf16\\[4, 8\\]"),
    ("%x: bf16[B, 8], %w: bf16[4, 8], %b: f32[4]", "%1: f32[B, 4] = linear(%x, %w, %b)",
     "linear needs one dtype for its input, weight, bias"),
    ("%x: f16[B, 8], %w: f32[8, 4]", "%1: f32[B, 4] = matmul(%x, %w)", "matmul needs one dtype for its left, right"),
    ("%x: bf16[B, 2, 8, 4], %w: f32[B, 2, 8, 4]", "%1: bf16[B, 2, 8, 4] = sdpa(%x, %w, %x) {causal=false, scale=0.5}",
     "sdpa needs one dtype for its query, key, value"),
    ("%x: bf16[B, 2, 8, 4], %w: f16[B, 1, 8, 8]",
     "%1: bf16[B, 2, 8, 4] = sdpa(%x, %x, %x, %w) {causal=false, scale=0.5}", "sdpa's mask f16\\[B, 1, 8, 8\\] must be"),
    # what torch runs
    ("%x: bf16[B, 8], %w: bf16[4, 8]", "%1: bf16[B, 4] = linear(%x, %w)", None),
    ("%x: bf16[B, 2, 8, 4], %w: f32[B, 1, 8, 8]",
     "%1: bf16[B, 2, 8, 4] = sdpa(%x, %x, %x, %w) {causal=false, scale=0.5}", None),
    ("%x: bf16[B, 2, 8, 4], %w: bool[B, 1, 8, 8]",
     "%1: bf16[B, 2, 8, 4] = sdpa(%x, %x, %x, %w) {causal=false, scale=0.5}", None),
])
def test_ops_torch_runs_in_one_dtype_refuse_mixed_operands(inputs, line, why):
    g = parse(_graph(line, inputs))
    if why is None:
        typecheck(g)
        return
    with pytest.raises(IRCheckError, match=why) as info:
        typecheck(g)
    assert f"at: {line}" in str(info.value)
