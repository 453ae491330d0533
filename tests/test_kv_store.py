"""KV appends stored by the kernels that compute K and V (fuse_elementwise.store_appends,
fused_pointwise's into/start, codegen/pointwise.py Stores): the IR form round-trips and
typechecks, the rules fire only where provably exact, and the kernels write the same cache
bytes and return what kv_append returns, at a host-int start and at a device-side one."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fxforge  # noqa: E402
from fxforge.codegen.pointwise import PointwiseKernels  # noqa: E402
from fxforge.ir import parse, typecheck  # noqa: E402
from fxforge.ir.ops import is_pure  # noqa: E402
from fxforge.passes.fuse_elementwise import fuse_elementwise  # noqa: E402
from fxforge.passes.manager import PassContext  # noqa: E402
from fxforge.runtime.backends import op_table  # noqa: E402
from fxforge.runtime.program import build_program  # noqa: E402
from fxforge.runtime.static_decode import static_decode_problem  # noqa: E402

import zoo  # noqa: E402

# one layer's K (rotary) and V (a view) appended to their caches, then attention
LAYER = """graph(%q: f32[B, 2, T, 16], %k: f32[B, 2, T, 16], %v: f32[B, 2, T, 16], %cos: f32[B, 1, T, 16], \
%sin: f32[B, 1, T, 16], %L: int {role="cache_len"}, \
%s0: state "layer0.k_cache" f32[B, 2, S, 16] {layer=0, kind="k", layout="dense"}, \
%s1: state "layer0.v_cache" f32[B, 2, S, 16] {layer=0, kind="v", layout="dense"}) {
  %1: f32[B, 2, T, 8] = slice(%k) {dim=3, start=0, end=8, step=1}
  %2: f32[B, 2, T, 8] = slice(%k) {dim=3, start=8, end=16, step=1}
  %3: f32[B, 2, T, 8] = neg(%2)
  %4: f32[B, 2, T, 16] = cat(%3, %1) {dim=3}
  %5: f32[B, 2, T, 16] = mul(%k, %cos)
  %6: f32[B, 2, T, 16] = mul(%4, %sin)
  %7: f32[B, 2, T, 16] = add(%5, %6)
  %8: f32[B, 2, L + T, 16] = kv_append(%s0, %7) {start=L}
  %9: f32[B, 2, L + T, 16] = kv_append(%s1, %v) {start=L}
  %10: f32[B, 2, T, 16] = attention(%q, %8, %9) {causal=true, scale=0.25}
  return (%10)
}"""


def _inputs(b=2, t=3, cap=4, start=5, capacity=12):
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, 2, t, 16) for _ in range(3))
    angles = torch.randn(b, 1, t, 8)
    cat = torch.cat([angles, angles], -1)
    caches = [torch.randn(cap, 2, capacity, 16) for _ in range(2)]
    return (q, k, v, cat.cos(), cat.sin(), start), caches


def _run(graph, backend, args, caches):
    kernels = {"kernels": PointwiseKernels()} if backend == "interpret" else {}
    program = build_program(graph, op_table(backend, **kernels))
    return program(*args, *caches)


def test_rotary_k_and_both_appends_become_one_node_that_round_trips():
    g = parse(LAYER)
    ctx = PassContext()
    out = fuse_elementwise(g, ctx)
    typecheck(out)
    assert out.count("kv_append") == 0 and out.count("fused_pointwise") == 1
    (node,) = [n for n in out.nodes if n.op == "fused_pointwise"]
    assert node.attrs["into"] == ((0, 6), (1, 7)) and str(node.attrs["start"]) == "L"
    assert [v.state for v in node.inputs[-2:]] == ["layer0.k_cache", "layer0.v_cache"]
    assert node.attrs["body"][-1] == ("cast", ("in5",), (("dtype", torch.float32),))  # V: a copy
    assert [str(v.type) for v in node.outputs] == ["f32[B, 2, L + T, 16]"] * 2
    assert ctx.rules["append_stored_by_kernel"] == 1 and ctx.rules["stores_merged"] == 1
    assert not is_pure(node)
    text = str(out)
    assert "into=((0, 6), (1, 7)), start=L}" in text
    assert str(parse(text)) == text
    assert static_decode_problem(out) is None or "cache_len" not in static_decode_problem(out)


@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_fused_stores_write_the_same_cache_and_results(backend):
    g = parse(LAYER)
    fused = fuse_elementwise(g, PassContext())
    args, caches = _inputs()
    want_caches = [c.clone() for c in caches]
    (want,) = _run(g, "torch", args, want_caches)
    (got,) = _run(fused, backend, args, caches)
    for c, w in zip(caches, want_caches):
        assert torch.equal(c, w)  # the appended slots, and nothing else, changed the same way
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("from_pointer", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_stores_into_the_cache_at_start(from_pointer, dtype):
    """A copy and a computed value stored at slot `start` of rows 0..B-1 of caches with
    more rows and slots than written; the result is kv_append's (a device-side start: the
    whole rows, as the static decode step's kv_append_at)."""
    x, v = torch.randn(2, 3, 2, 4).to(dtype), torch.randn(2, 3, 2, 4).to(dtype)
    caches = [torch.zeros(4, 3, 9, 4, dtype=dtype) for _ in range(2)]
    body = (("exp", ("in0",), ()), ("cast", ("in1",), (("dtype", torch.float32),)))
    start = torch.tensor(5) if from_pointer else 5
    kernels = PointwiseKernels()
    k_out, v_out = kernels.run(x, v, *caches, body=body, outputs=("t0", "t1"), into=((0, 2), (1, 3)), start=start)
    want = [torch.zeros(4, 3, 9, 4, dtype=dtype) for _ in range(2)]
    want[0][:2, :, 5:7] = torch.exp(x).to(dtype)
    want[1][:2, :, 5:7] = v.to(dtype)
    assert torch.equal(caches[1], want[1])  # a copy is exact in any dtype
    # exp computed in float32, rounded once to the cache's dtype (Triton's interpreter
    # truncates to bf16 where a GPU and eager round to nearest: one bf16 step apart)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(caches[0].float(), want[0].float(), rtol=tol, atol=tol)
    n = 9 if from_pointer else 7
    assert k_out.shape == v_out.shape == (2, 3, n, 4) and k_out.data_ptr() == caches[0].data_ptr()
    (source,) = kernels.sources.values()
    assert ("tl.load(start_ptr)" in source) == from_pointer
    assert "(start + idx2) * out0_stride2" in source and "in2" not in source  # the caches are never loaded
    if not from_pointer:
        with pytest.raises(ValueError, match="holds 4 rows of 9 positions"):
            kernels.run(x, v, *caches, body=body, outputs=("t0", "t1"), into=((0, 2), (1, 3)), start=8)


def _fused_text(**changes) -> str:
    g = fuse_elementwise(parse(LAYER), PassContext())
    text = str(g)
    for old, new in changes.items():
        text = text.replace(old.replace("_", " "), new)
    return text


@pytest.mark.parametrize("old,new,why", [
    ("into=((0, 6), (1, 7)), start=L", "into=((0, 6), (1, 7))", "into needs start"),
    ("into=((0, 6), (1, 7))", "into=((0, 5), (1, 7))", "must be the last 2 inputs"),
    ("into=((0, 6), (1, 7))", "into=((0, 6), (0, 7))", "not distinct outputs"),
    ('("cast", ("in5",)', '("cast", ("in6",)', "a body step reads a destination"),
])
def test_malformed_into_is_refused_by_typecheck(old, new, why):
    text = str(fuse_elementwise(parse(LAYER), PassContext()))
    assert old in text
    with pytest.raises(Exception, match=why):  # the type rule's IRTypeError, as typecheck reports it
        typecheck(parse(text.replace(old, new)))


def test_rules_decline_when_the_cache_or_the_value_is_read_elsewhere():
    # the K cache is also read by another node: nothing may move its write
    shared = LAYER.replace("  return (%10)", "  %11: f32[B, 2, S, 16] = exp(%s0)\n  return (%10, %11)")
    out = fuse_elementwise(parse(shared), PassContext())
    appends = [n for n in out.nodes if n.op == "kv_append"]
    # K's append stays; so does V's (a lone copy gains nothing from a kernel of its own)
    assert [n.inputs[0].state for n in appends] == ["layer0.k_cache", "layer0.v_cache"]
    assert not any(n.attrs.get("into") for n in out.nodes)
    # the rotated K is also returned: rule 1 declines; both appends still merge, as copies
    returned = LAYER.replace("  return (%10)", "  return (%10, %7)")
    out = fuse_elementwise(parse(returned), PassContext())
    typecheck(out)
    stores = [n for n in out.nodes if n.attrs.get("into")]
    assert out.count("kv_append") == 0 and len(stores) == 1
    assert [op for op, _, _ in stores[0].attrs["body"]] == ["cast", "cast"]
    args, caches = _inputs()
    want_caches = [c.clone() for c in caches]
    want = _run(parse(returned), "torch", args, want_caches)
    got = _run(out, "interpret", args, caches)
    assert all(torch.equal(c, w) for c, w in zip(caches, want_caches))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_a_value_computed_from_the_other_append_is_not_merged_with_it():
    # V reads K's cache view: the two stores depend on each other and stay apart
    dep = LAYER.replace("%9: f32[B, 2, L + T, 16] = kv_append(%s1, %v) {start=L}",
                        "%12: f32[B, 2, L + T, 16] = exp(%8)\n"
                        "  %13: f32[B, 2, T, 16] = slice(%12) {dim=2, start=0, end=T, step=1}\n"
                        "  %9: f32[B, 2, L + T, 16] = kv_append(%s1, %13) {start=L}")
    out = fuse_elementwise(parse(dep), PassContext())
    typecheck(out)
    stores = [n for n in out.nodes if n.attrs.get("into")]
    assert len(stores) == 1 and len(stores[0].attrs["into"]) == 1 and out.count("kv_append") == 1


def test_llama_layers_store_k_and_v_in_one_kernel_with_eager_tokens():
    torch.manual_seed(0)
    model, vocab = zoo.llama("sdpa")
    ids = torch.randint(3, vocab, (2, 6))
    # without fuse_rope_attention, which would take the rotary and both stores into its own op
    fast = fxforge.optimize(model, (ids,), kv_cache=True, backend="interpret", disable=("fuse_rope_attention",))
    stores = [n for n in fast.graph.nodes if n.attrs.get("into")]
    assert len(stores) == 2 and all(len(n.attrs["into"]) == 2 for n in stores) and fast.graph.count("kv_append") == 0
    assert fast.static_decode_problem is None
    ref = fxforge.optimize(model, (ids,), kv_cache=True, backend="torch")
    assert torch.equal(fast.generate(ids, 5), ref.generate(ids, 5))


# LAYER with rotary on q too: q has 4 heads, K/V 2, so q's group has another index space
WITH_Q = LAYER.replace("%q: f32[B, 2, T, 16]", "%q: f32[B, 4, T, 16]").replace(
    "  %10: f32[B, 2, T, 16] = attention(%q, %8, %9)",
    """  %20: f32[B, 4, T, 8] = slice(%q) {dim=3, start=0, end=8, step=1}
  %21: f32[B, 4, T, 8] = slice(%q) {dim=3, start=8, end=16, step=1}
  %22: f32[B, 4, T, 8] = neg(%21)
  %23: f32[B, 4, T, 16] = cat(%22, %20) {dim=3}
  %24: f32[B, 4, T, 16] = mul(%q, %cos)
  %25: f32[B, 4, T, 16] = mul(%23, %sin)
  %26: f32[B, 4, T, 16] = add(%24, %25)
  %10: f32[B, 4, T, 16] = attention(%26, %8, %9)""").replace("%10: f32[B, 2, T, 16]", "%10: f32[B, 4, T, 16]")


@pytest.mark.parametrize("start", [5, "device"])
def test_rotary_q_joins_the_kv_kernel_as_a_second_index_space(start):
    g = parse(WITH_Q)
    ctx = PassContext()
    out = fuse_elementwise(g, ctx)
    typecheck(out)
    assert str(parse(str(out))) == str(out)
    (node,) = [n for n in out.nodes if n.op == "fused_pointwise"]
    assert ctx.rules["siblings_joined"] == 1 and node.attrs["into"] == ((1, 9), (2, 10))
    assert [str(v.type) for v in node.outputs] == ["f32[B, 4, T, 16]"] + ["f32[B, 2, L + T, 16]"] * 2
    args, caches = _inputs()
    q = torch.randn(2, 4, 3, 16)
    args = (q,) + args[1:]
    want_caches = [c.clone() for c in caches]
    (want,) = _run(g, "torch", args, want_caches)
    kernels = PointwiseKernels()
    program = build_program(out, op_table("interpret", kernels=kernels))
    if start == "device":  # the static decode step's form: the cache length a 0-d tensor
        namespace = dict(program.fn.__globals__)
        exec(compile(program.source.replace("start=L", "start=torch.tensor(L)"), "<test>", "exec"), namespace)
        namespace["program"](*args, *caches)  # attention then reads whole rows (a static step masks them)
    else:
        (got,) = program(*args, *caches)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(c, w) for c, w in zip(caches, want_caches))
    (source,) = kernels.sources.values()
    assert "_part1(pid - end0" in source and "_part2" not in source  # two index spaces: q, and K with V


def test_a_sibling_read_elsewhere_does_not_join():
    returned = WITH_Q.replace("  return (%10)", "  return (%10, %26)")
    out = fuse_elementwise(parse(returned), PassContext())
    assert out.count("fused_pointwise") == 2 and sum(1 for n in out.nodes if n.attrs.get("into")) == 1
