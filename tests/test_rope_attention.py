"""fuse_rope_attention (passes/fuse_rope_attention.py) and the rope_attention op: the
rotate-half rotary of q and k, the K/V appends and the attention of a cached layer become one
op that round-trips and typechecks, the rule fires only where it is provably the same
computation, models decode the same tokens with and without it (eager and static steps),
and the torch backend runs its composition."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fxforge  # noqa: E402
from fxforge.ir import parse, typecheck  # noqa: E402
from fxforge.passes.fuse_rope_attention import fuse_rope_attention, unfuse  # noqa: E402
from fxforge.passes.manager import PassContext  # noqa: E402
from fxforge.runtime.backends import op_table  # noqa: E402
from fxforge.runtime.program import build_program  # noqa: E402

import zoo  # noqa: E402
from helpers import prompts  # noqa: E402

# a layer as kv_cache leaves it: rotary on q (4 heads) and k (2), both appended, attention
LAYER = """graph(%q: f32[B, 4, T, 16], %k: f32[B, 2, T, 16], %v: f32[B, 2, T, 16], %cos: f32[B, 1, T, 16], \
%sin: f32[B, 1, T, 16], %L: int {role="cache_len"}, %kv_bias: f32[B, 1, 1, L + T] {role="key_bias"}, \
%s0: state "layer0.k_cache" f32[B, 2, S, 16] {layer=0, kind="k", layout="dense"}, \
%s1: state "layer0.v_cache" f32[B, 2, S, 16] {layer=0, kind="v", layout="dense"}) {
  %1: f32[B, 2, T, 8] = slice(%k) {dim=3, start=0, end=8, step=1}
  %2: f32[B, 2, T, 8] = slice(%k) {dim=3, start=8, end=16, step=1}
  %3: f32[B, 2, T, 8] = neg(%2)
  %4: f32[B, 2, T, 16] = cat(%3, %1) {dim=3}
  %5: f32[B, 2, T, 16] = mul(%cos, %k)
  %6: f32[B, 2, T, 16] = mul(%sin, %4)
  %7: f32[B, 2, T, 16] = add(%6, %5)
  %8: f32[B, 2, L + T, 16] = kv_append(%s0, %7) {start=L}
  %9: f32[B, 2, L + T, 16] = kv_append(%s1, %v) {start=L}
  %20: f32[B, 4, T, 8] = slice(%q) {dim=3, start=0, end=8, step=1}
  %21: f32[B, 4, T, 8] = slice(%q) {dim=3, start=8, end=16, step=1}
  %22: f32[B, 4, T, 8] = neg(%21)
  %23: f32[B, 4, T, 16] = cat(%22, %20) {dim=3}
  %24: f32[B, 4, T, 16] = mul(%q, %cos)
  %25: f32[B, 4, T, 16] = mul(%23, %sin)
  %26: f32[B, 4, T, 16] = add(%24, %25)
  %10: f32[B, 4, T, 16] = attention(%26, %8, %9, %kv_bias) {causal=true, scale=0.25}
  return (%10)
}"""


def _inputs(b=2, t=1, start=5, capacity=12):
    torch.manual_seed(0)
    q = torch.randn(b, 4, t, 16)
    k, v = (torch.randn(b, 2, t, 16) for _ in range(2))
    angles = torch.randn(b, 1, t, 8)
    cat = torch.cat([angles, angles], -1)
    bias = torch.zeros(b, 1, 1, start + t)
    bias[1, ..., :2] = torch.finfo(torch.float32).min  # row 1 left-padded
    caches = [torch.randn(b, 2, capacity, 16) for _ in range(2)]
    return (q, k, v, cat.cos(), cat.sin(), start, bias), caches


def _run(graph, backend, args, caches):
    return build_program(graph, op_table(backend))(*args, *caches)


def _fused(text=LAYER):
    ctx = PassContext()
    out = fuse_rope_attention(parse(text), ctx)
    typecheck(out)
    return out, ctx


@pytest.mark.parametrize("t", [1, 3])
def test_the_layer_becomes_one_op_that_round_trips_and_computes_the_same(t):
    g = parse(LAYER)
    out, ctx = _fused()
    assert ctx.rules["rope_attention"] == 1
    assert [n.op for n in out.nodes] == ["rope_attention"]  # the rotary and both appends are gone
    assert str(parse(str(out))) == str(out)
    args, caches = _inputs(t=t)
    want_caches = [c.clone() for c in caches]
    (want,) = _run(g, "torch", args, want_caches)
    for backend in ("torch", "interpret"):
        got_caches = [c.clone() for c in caches]
        (got,) = _run(out, backend, args, got_caches)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for c, w in zip(got_caches, want_caches):
            torch.testing.assert_close(c, w, rtol=1e-6, atol=1e-6)
    # the torch backend's form: the rotary-and-store group and attention, as before the pass
    back = unfuse(out)
    typecheck(back)
    assert sorted(n.op for n in back.nodes) == ["attention", "fused_pointwise", "slice", "slice", "slice", "slice"]


# each edit breaks one side condition: the rule must decline and leave the graph as it was
DECLINES = {
    "partial_rotary": ("%20: f32[B, 4, T, 8] = slice(%q) {dim=3, start=0, end=8, step=1}",
                       "%20: f32[B, 4, T, 8] = slice(%q) {dim=3, start=1, end=9, step=1}"),
    "not_negated": ("%22: f32[B, 4, T, 8] = neg(%21)", "%22: f32[B, 4, T, 8] = relu(%21)"),
    "other_cos_for_q": ("%24: f32[B, 4, T, 16] = mul(%q, %cos)", "%24: f32[B, 4, T, 16] = mul(%q, %sin)"),
    "softcap": ("{causal=true, scale=0.25}", "{causal=true, scale=0.25, softcap=30.0}"),
    "append_read_elsewhere": ("return (%10)", "return (%10, %8)"),
    "other_starts": ("kv_append(%s1, %v) {start=L}", "kv_append(%s1, %v) {start=L + 1}"),
    # q of one row, broadcast over the batch by cos/sin: the rotary is not q's shape
    "q_broadcast": ("%q: f32[B, 4, T, 16]", "%q: f32[1, 4, T, 16]"),
}


@pytest.mark.parametrize("name", DECLINES)
def test_the_rule_declines_what_it_cannot_prove(name):
    old, new = DECLINES[name]
    assert old in LAYER
    text = LAYER.replace(old, new)
    if name == "other_starts":
        # V appended one position later, read from its second position on: well typed (K
        # and V of L + T keys each), but not the appends the fused op makes
        text = text.replace("%9: f32[B, 2, L + T, 16]", "%9: f32[B, 2, L + T + 1, 16]").replace(
            "  %20:", "  %27: f32[B, 2, L + T, 16] = slice(%9) {dim=2, start=1, end=L + T + 1, step=1}\n  %20:").replace(
            "attention(%26, %8, %9, %kv_bias)", "attention(%26, %8, %27, %kv_bias)")
    if name == "q_broadcast":
        for i in (20, 21, 22):
            text = text.replace(f"%{i}: f32[B, 4, T, 8]", f"%{i}: f32[1, 4, T, 8]")
        text = text.replace("%23: f32[B, 4, T, 16]", "%23: f32[1, 4, T, 16]")
    g = parse(text)
    out, ctx = _fused(text)
    assert ctx.rules["rope_attention"] == 0 and out.count("rope_attention") == 0 and str(out) == str(g)


def _llama():
    torch.manual_seed(0)
    return zoo.llama("sdpa")


def test_llama_decodes_the_same_tokens_with_one_kernel_per_layer():
    model, vocab = _llama()
    ids, mask = prompts(vocab, True)  # a left-padded batch
    fast = fxforge.optimize(model, (ids,), kv_cache=True, backend="interpret")
    assert fast.graph.count("rope_attention") == 2 and fast.graph.count("attention") == 0
    assert fast.graph.count("kv_append") == 0 and not any(n.attrs.get("into") for n in fast.graph.nodes)
    assert fast.static_decode_problem is None
    kw = dict(attention_mask=mask, max_new_tokens=3, eos_token_id=None, pad_token_id=0)
    # the torch backend runs the composition (no rope_attention left in its program): the
    # tokens of the graph without the pass
    slow = fxforge.optimize(model, (ids,), kv_cache=True, backend="torch")
    ref = fxforge.optimize(model, (ids,), kv_cache=True, backend="torch", disable=("fuse_rope_attention",))
    want = ref.generate(ids, **kw)
    assert "op_rope_attention" not in slow.code and torch.equal(slow.generate(ids, **kw), want)
    for static in (False, True):
        fast.static_decode = static
        assert torch.equal(fast.generate(ids, **kw), want)


def test_gpt2_without_rotary_is_untouched():
    torch.manual_seed(0)
    model, vocab = zoo.gpt2("eager", n_layer=1)
    ids = torch.randint(0, vocab, (1, 5))
    a = fxforge.optimize(model, (ids,), kv_cache=True, backend="torch")
    b = fxforge.optimize(model, (ids,), kv_cache=True, backend="torch", disable=("fuse_rope_attention",))
    assert a.graph.count("rope_attention") == 0 and str(a.graph) == str(b.graph)
