"""attention's type rule checks every size its operands share (batch, kv heads and key
count between K and V, head dim between Q and K) and that a bias broadcasts to the scores
[B, H, Tq, Tk], comparing symbolic sizes by proof. IR that breaks one of these (hand-edited
and loaded with fxforge.load_ir, or made by a user's pass) once typechecked, and then ran:
PyTorch's CPU SDPA with enable_gqa read past a shorter V and returned garbage, a head dim
mismatch raised a raw torch error at the first call."""
import re

import pytest
import torch

import fxforge
from fxforge.ir import IRCheckError, parse, typecheck

import zoo


def _graph(inputs: str, line: str) -> str:
    return f"graph({inputs}) {{\n  {line}\n  return (%1)\n}}"


Q = "%q: f32[B, 4, T, 16]"
K = "%k: f32[B, 2, T, 16]"
V = "%v: f32[B, 2, T, 16]"


@pytest.mark.parametrize("inputs, args, out, why", [
    (f"{Q}, {K}, %v: f32[B, 4, T, 16]", "%q, %k, %v", "f32[B, 4, T, 16]", "k and v differ in kv heads \\(2 vs 4\\)"),
    (f"{Q}, {K}, %v: f32[B, 2, T - 1, 16]", "%q, %k, %v", "f32[B, 4, T, 16]", "k and v differ in key count"),
    (f"{Q}, %k: f32[B, 2, T, 8], {V}", "%q, %k, %v", "f32[B, 4, T, 16]", "q and k differ in head dim \\(16 vs 8\\)"),
    (f"{Q}, %k: f32[1, 2, T, 16], %v: f32[1, 2, T, 16]", "%q, %k, %v", "f32[B, 4, T, 16]",
     "q and k differ in batch size \\(B vs 1\\)"),
    (f"{Q}, {K}, %v: f32[2, 2, T, 16]", "%q, %k, %v", "f32[B, 4, T, 16]", "k and v differ in batch size"),
    (f"{Q}, %k: f32[B, 3, T, 16], %v: f32[B, 3, T, 16]", "%q, %k, %v", "f32[B, 4, T, 16]",
     "4 query heads is not a multiple of 3 kv heads"),
    # a bias that does not broadcast to [B, 4, T, T]
    (f"{Q}, {K}, {V}, %m: f32[B, 1, T, T - 1]", "%q, %k, %v, %m", "f32[B, 4, T, 16]", "bias .* does not broadcast"),
    (f"{Q}, {K}, {V}, %m: f32[B, 2, T, T]", "%q, %k, %v, %m", "f32[B, 4, T, 16]", "bias .* does not broadcast"),
    (f"{Q}, {K}, {V}, %m: f32[2, 1, T, T]", "%q, %k, %v, %m", "f32[B, 4, T, 16]", "bias .* does not broadcast"),
    (f"{Q}, {K}, {V}, %m: f32[1, B, 1, T, T]", "%q, %k, %v, %m", "f32[B, 4, T, 16]", "bias .* does not broadcast"),
    # ... also with slopes and sinks after it
    (f"{Q}, {K}, {V}, %m: f32[B, 1, 1, S], %s: f32[4]", "%q, %k, %v, %m, %s", "f32[B, 4, T, 16]",
     "bias .* does not broadcast"),
])
def test_ill_typed_attention_is_refused_with_its_line(inputs, args, out, why):
    line = f"%1: {out} = attention({args}) {{causal=false, scale=0.25{', sinks=true' if '%s' in args else ''}}}"
    with pytest.raises(IRCheckError, match=why) as info:
        typecheck(parse(_graph(inputs, line)))
    assert f"at: {line}" in str(info.value)


@pytest.mark.parametrize("inputs, args, attrs, out", [
    # GQA, MHA
    (f"{Q}, {K}, {V}", "%q, %k, %v", "", "f32[B, 4, T, 16]"),
    ("%q: f32[B, 4, T, 16], %k: f32[B, 4, T, 16], %v: f32[B, 4, T, 16]", "%q, %k, %v", "", "f32[B, 4, T, 16]"),
    # MLA: the values' head dim differs from the queries' and keys'
    (f"{Q}, {K}, %v: f32[B, 2, T, 8]", "%q, %k, %v", "", "f32[B, 4, T, 8]"),
    # decode over a cache: one query, S + T keys, sizes equal by proof, not by spelling
    ("%q: f32[B, 4, T, 16], %k: f32[B, 2, S + T, 16], %v: f32[B, 2, T + S, 16], %m: f32[B, 1, T, T + S]",
     "%q, %k, %v, %m", "", "f32[B, 4, T, 16]"),
    ("%q: f32[B, 4, 1, 16], %k: f32[B, 2, 2*S, 16], %v: f32[B, 2, S + S, 16]", "%q, %k, %v", "",
     "f32[B, 4, 1, 16]"),
    # biases that broadcast: per row, per head, per query, lower rank
    (f"{Q}, {K}, {V}, %m: f32[B, 1, 1, T]", "%q, %k, %v, %m", "", "f32[B, 4, T, 16]"),
    (f"{Q}, {K}, {V}, %m: f32[1, 4, T, T]", "%q, %k, %v, %m", "", "f32[B, 4, T, 16]"),
    (f"{Q}, {K}, {V}, %m: f32[T, T]", "%q, %k, %v, %m", "", "f32[B, 4, T, 16]"),
    (f"{Q}, {K}, {V}, %m: f32[B, 4, T, T], %a: f32[4], %s: f32[4]", "%q, %k, %v, %m, %a, %s",
     ", alibi=true, sinks=true", "f32[B, 4, T, 16]"),
])
def test_legitimate_attention_still_typechecks(inputs, args, attrs, out):
    typecheck(parse(_graph(inputs, f"%1: {out} = attention({args}) {{causal=true, scale=0.25{attrs}}}")))


@pytest.fixture(scope="module")
def llama_ir():
    torch.manual_seed(0)
    model, vocab = zoo.llama(attn="sdpa", n_layer=1)
    ids = torch.randint(0, vocab, (2, 8))
    fast = fxforge.optimize(model, (ids,))
    return fast, ids


def test_load_ir_refuses_a_hand_edited_attention_over_a_shorter_v(llama_ir):
    """The reproduction: V sliced one key short of K. The CPU torch backend's SDPA with
    enable_gqa read past its end (no error, a finite wrong answer); now load_ir refuses it,
    quoting the line."""
    fast, ids = llama_ir
    text = fast.ir
    line = next(ln for ln in text.splitlines() if " = attention(" in ln)
    m = re.search(r"attention\((%\w+), (%\w+), (%\w+)", line)
    v_name = m.group(3)
    v_type = re.search(rf"{re.escape(v_name)}: (\w+)\[B, (\d+), T, (\d+)\]", text)
    assert v_type, f"no dense V [B, Hkv, T, D] for {line}"
    dtype, heads, d = v_type.groups()
    short = f"  %999: {dtype}[B, {heads}, T - 1, {d}] = slice({v_name}) {{dim=2, start=1, end=T, step=1}}"
    edited = text.replace(line, short + "\n" + line.replace(f", {v_name})", ", %999)").replace(
        f", {v_name}, ", ", %999, "))
    assert edited != text
    with pytest.raises(IRCheckError, match="k and v differ in key count") as info:
        fxforge.load_ir(edited, fast.graph.params)
    assert "attention(" in str(info.value).splitlines()[-1]
    loaded = fxforge.load_ir(text, fast.graph.params)  # the unedited IR runs
    torch.testing.assert_close(zoo.logits_of(loaded(ids)), zoo.logits_of(fast(ids)))
