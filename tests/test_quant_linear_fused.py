"""A quantized linear as a `linear_fused` node (parts + qattrs, ir/linear_fused.py): the
decode GEMV (codegen/kernels/decode_gemv.py) loads the int8 weight and, for w8a8, splits and
quantizes x per token inside, after the node's prologue (add + RMSNorm) and before its
epilogue (SwiGLU). Checked against the op's composition through the torch references
(quant_formats: interpreter-independent), on a w8a8 llama decoded greedily with and without
the fusion (eager and static steps), the IR round trip, and where it must not fire."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fxforge  # noqa: E402
import zoo  # noqa: E402
from helpers import run_gemv  # noqa: E402
from fxforge.codegen.kernels.decode_gemv import GemvKernels, decode_gemv_reference  # noqa: E402
from fxforge.codegen.pointwise import PointwiseKernels  # noqa: E402
from fxforge.ir.parser import parse  # noqa: E402
from fxforge.ir.printer import print_graph  # noqa: E402
from fxforge.ir.quant_formats import quantize_weight  # noqa: E402
from fxforge.ir.typecheck import typecheck  # noqa: E402
from fxforge.passes.fuse_linear_pointwise import unfuse  # noqa: E402

SWIGLU = (("silu", ("in0",), ()), ("mul", ("t0", "in1"), ()))
RMS_ADD = (("add", ("in0", "in1"), ()), ("const", (), (("value", 2), ("dtype", torch.int64))),
           ("pow", ("t0", "t1"), ()), ("mean", ("t2",), (("dims", (-1,)), ("keepdim", True), ("dtype", None))),
           ("const", (), (("value", 1e-6), ("dtype", torch.float32))), ("add", ("t3", "t4"), ()),
           ("rsqrt", ("t5",), ()), ("mul", ("t0", "t6"), ()), ("mul", ("in2", "t7"), ()))
# the quantized tests' tolerances (tests/kernels/test_quant_gemv.py): the float parts (the
# prologue's statistics, the outlier columns) are summed in another order
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def _packed(n, k, scheme, threshold=6.0, seed=0):
    torch.manual_seed(seed)
    opts = {"threshold": threshold} if scheme == "w8a8" else {}
    p = quantize_weight(torch.randn(n, k) / 4, scheme, **opts)
    return [p.qweight, p.scale], {"parts": ("qweight", "scale"), "qattrs": tuple(p.attrs().items())}


def _attrs(q, prologue=(), prologue_outputs=(), row=None, n_x=1, columns=((0, 8),), epilogue=(), epilogue_outputs=()):
    return dict(n_x=n_x, bias=False, prologue=prologue, prologue_outputs=prologue_outputs, row=row, columns=columns,
                epilogue=epilogue, epilogue_outputs=epilogue_outputs, **q)


@pytest.mark.parametrize("scheme,threshold", [("w8a8", None), ("w8a8", 6.0), ("int8", None)])
def test_plain_quantized_gemv_is_the_reference(scheme, threshold, blocks):
    """No prologue: x reaches the kernel as the reference sees it, so w8a8 without outliers
    is bitwise the reference (the same integer sum, then the same float steps)."""
    torch.manual_seed(2)
    k, n = 72, 20
    parts, q = _packed(n, k, scheme, threshold)
    x = torch.randn(3, k)
    if threshold is not None:
        x[1, 5], x[2, 40] = 9.0, -7.5  # two outlier columns
    attrs = _attrs(q, columns=((0, n),))
    got, want = run_gemv((x, *parts), attrs), decode_gemv_reference(x, *parts, **attrs)
    if scheme == "w8a8" and threshold is None:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("dtype,rows,scheme,threshold", [
    (torch.float32, 1, "w8a8", 6.0), (torch.float32, 3, "w8a8", None), (torch.bfloat16, 3, "w8a8", 6.0),
    (torch.bfloat16, 16, "w8a8", 1.5), (torch.bfloat16, 2, "int8", None)])
def test_residual_norm_prologue_and_swiglu_epilogue(dtype, rows, scheme, threshold, blocks):
    """The gate/up linear of a w8a8 llama layer at decode: add + RMSNorm before, SwiGLU after
    (threshold 1.5: normalised rows have outlier columns in most chunks); int8 weight-only too."""
    torch.manual_seed(3)
    k, i = 40, 12
    parts, q = _packed(2 * i, k, scheme, threshold)
    r, a, g = torch.randn(rows, k, dtype=dtype), torch.randn(rows, k, dtype=dtype), torch.rand(k, dtype=dtype) + 0.5
    attrs = _attrs(q, prologue=RMS_ADD, prologue_outputs=("t8", "t0"), row=k, n_x=3, columns=((0, i), (i, 2 * i)),
                   epilogue=SWIGLU, epilogue_outputs=("t1",))
    got, want = run_gemv((r, a, g, *parts), attrs), decode_gemv_reference(r, a, g, *parts, **attrs)
    torch.testing.assert_close(got[1], want[1], **TOL[dtype])  # the residual sum
    torch.testing.assert_close(got[0], want[0], **TOL[dtype])


@pytest.mark.parametrize("prologue", [False, True])
def test_w8a8_row_result_does_not_depend_on_the_batch(prologue, blocks):
    """Outliers are per token: row 1's 5.5 in row 0's outlier column (40.0) is quantized
    with row 1, as when row 1 runs alone; so is every row's result (with the add + RMSNorm
    prologue too, a row's statistics being its own)."""
    torch.manual_seed(5)
    k, n = 72, 20
    parts, q = _packed(n, k, "w8a8", 6.0)
    x = torch.randn(3, k)
    x[0, 5], x[1, 5], x[2, 40], x[0, 40] = 40.0, 5.5, -7.5, 5.0
    if prologue:
        zeros, ones = torch.zeros(3, k), torch.ones(k)
        tensors = lambda rows: (x[rows], zeros[rows], ones, *parts)  # noqa: E731
        attrs = _attrs(q, prologue=RMS_ADD, prologue_outputs=("t8", "t0"), row=k, n_x=3, columns=((0, n),))
    else:
        tensors = lambda rows: (x[rows], *parts)  # noqa: E731
        attrs = _attrs(q, columns=((0, n),))
    pick = lambda out: out[0] if prologue else out  # noqa: E731
    got = pick(run_gemv(tensors(slice(None)), attrs))
    for i in range(3):
        alone = pick(decode_gemv_reference(*tensors(slice(i, i + 1)), **attrs))
        torch.testing.assert_close(got[i:i + 1], alone, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[i:i + 1], pick(run_gemv(tensors(slice(i, i + 1)), attrs)), rtol=1e-5, atol=1e-5)


def test_declines_a_format_it_does_not_implement():
    torch.manual_seed(4)
    p = quantize_weight(torch.randn(8, 64), "int4", group_size=32)
    q = {"parts": tuple(p.tensors()), "qattrs": tuple(p.attrs().items())}
    assert GemvKernels(PointwiseKernels()).run(torch.randn(1, 64), *p.tensors().values(),
                                               **_attrs(q, columns=((0, 8),))) is None


# --------------------------------------------------------------------------- whole models
def _llama(scheme="w8a8", **opts):
    torch.manual_seed(0)
    model, vocab = zoo.llama()
    ids = torch.randint(0, vocab, (2, 5))
    return (fxforge.optimize(model, (ids,), kv_cache=True, quantize=scheme, backend="interpret", **opts), vocab)


@pytest.fixture(scope="module")
def pair():
    """(the w8a8 llama, the same without fuse_linear_pointwise, vocab), built once."""
    fast, vocab = _llama()
    plain, _ = _llama(disable=["fuse_linear_pointwise"])
    return fast, plain, vocab


def _decode(fast, ids, static):
    fast.static_decode = static
    out = fast.generate(ids, max_new_tokens=3, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True,
                        output_logits=True)
    return out.sequences, torch.stack(out.logits)


def test_w8a8_llama_decodes_as_without_the_fusion(pair):
    fast, plain, vocab = pair
    fused = [n for n in fast.graph.nodes if n.op == "linear_fused" and n.attrs.get("parts")]
    assert len(fused) == 4 and sum(bool(n.attrs["epilogue"]) for n in fused) == 2  # q/k/v, gate/up + SwiGLU
    assert not any(n.attrs.get("down") for n in fused)
    ids = torch.randint(0, vocab, (2, 4))
    want = _decode(plain, ids, static=False)
    for static in (False, True):
        tokens, logits = _decode(fast, ids, static)
        assert torch.equal(tokens, want[0])
        torch.testing.assert_close(logits, want[1], **TOL[torch.float32])
    assert fast.static_decode_problem is None
    steps = [s for c in fast._caches.idle for s in c.static_steps.values()]
    assert len(steps) == 1 and steps[0].steps == 2  # the static step ran the fused nodes


def test_ir_prints_parses_back_and_the_torch_backend_gets_quant_linears(pair):
    fast, unfused, _ = pair
    text = print_graph(fast.graph)
    assert "parts=(" in text and "linear_fused(" in text
    again = parse(text)
    assert print_graph(again) == text
    again.params = fast.graph.params
    typecheck(again)
    plain = unfuse(again)
    typecheck(plain)
    # the composition: the quant_linear nodes the CPU planners pick kernels for, per call shape
    assert plain.op_counts()["quant_linear"] == unfused.graph.op_counts()["quant_linear"]
    assert "linear_fused" not in plain.op_counts() or all(
        not n.attrs.get("parts") for n in plain.nodes if n.op == "linear_fused")


def test_int4_is_left_alone():
    fast, _ = _llama("int4")
    assert not any(n.attrs.get("parts") for n in fast.graph.nodes if n.op == "linear_fused")
    assert fast.graph.op_counts()["quant_linear"] > 0
