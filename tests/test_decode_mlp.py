"""A decode layer's whole MLP as one kernel: linear_fused with its down projection
(down=true, made by fuse_linear_pointwise) and codegen/kernels/decode_mlp.py. The kernel
against the op's composition (float32) and against a plain-torch reference that rounds
where the unfused kernels stored (bfloat16), at 1..16 rows with and without biases, SwiGLU
and GELU epilogues, an add + RMSNorm prologue with its residual output; bitwise repeatable
with its counters left at zero; more rows run the composition; the IR text round trip;
where the down fusion must not fire. (The zoo models with and without the fusion, at
decode and prefill rows and in greedy decoding: tests/test_fuse_linear_pointwise.py.)"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fxforge  # noqa: E402
import zoo  # noqa: E402
from fxforge.codegen.kernels import arrival, decode_gemv, decode_mlp  # noqa: E402
from fxforge.codegen.kernels.decode_gemv import GemvKernels  # noqa: E402
from fxforge.codegen.pointwise import PointwiseKernels  # noqa: E402
from fxforge.ir.parser import parse  # noqa: E402
from fxforge.ir.printer import print_graph  # noqa: E402
from fxforge.ir.typecheck import typecheck  # noqa: E402
from fxforge.passes.fuse_linear_pointwise import unfuse  # noqa: E402
from fxforge.runtime.backends.triton_backend import TritonBackend  # noqa: E402

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}
SWIGLU = (("silu", ("in0",), ()), ("mul", ("t0", "in1"), ()))
GELU = (("gelu", ("in0",), (("approximate", "tanh"),)),)
RMS_ADD = (("add", ("in0", "in1"), ()), ("mul", ("t0", "t0"), ()),
           ("mean", ("t1",), (("dims", (-1,)), ("keepdim", True), ("dtype", None))),
           ("const", (), (("value", 1e-5), ("dtype", torch.float32))), ("add", ("t2", "t3"), ()),
           ("rsqrt", ("t4",), ()), ("mul", ("t0", "t5"), ()), ("mul", ("in2", "t6"), ()))


def _attrs(i, k, swiglu=True, prologue=False, bias=False, down_bias=False):
    return dict(n_x=3 if prologue else 1, bias=bias, prologue=RMS_ADD if prologue else (),
                prologue_outputs=("t7", "t0") if prologue else (), row=k if prologue else None,
                columns=((0, i), (i, 2 * i)) if swiglu else ((0, i),), epilogue=SWIGLU if swiglu else GELU,
                epilogue_outputs=("t1",) if swiglu else ("t0",), down=True, down_bias=down_bias)


def _problem(rows, dtype, k=40, i=72, h=36, swiglu=True, prologue=False, bias=False, down_bias=False, seed=0):
    """(tensors, attrs): K, I, H not multiples of any block."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    xs = [rand(*rows, k), rand(*rows, k), (torch.rand(k, generator=g) + 0.5).to(dtype)] if prologue else [rand(*rows, k)]
    ws = [rand((2 if swiglu else 1) * i, k, scale=k ** -0.5)] + ([rand((2 if swiglu else 1) * i)] if bias else [])
    down = [rand(h, i, scale=i ** -0.5)] + ([rand(h)] if down_bias else [])
    return xs + ws + down, _attrs(i, k, swiglu, prologue, bias, down_bias)


def _run(tensors, attrs):
    out = GemvKernels(PointwiseKernels()).run(*tensors, **attrs)
    assert out is not None, "the MLP kernel declined a decode shape"
    return out


def _plain_reference(tensors, attrs):
    """Plain torch, in float32, rounding to the dtype where the unfused kernels stored:
    the normed row, the gate/up product, the activation, the result."""
    dtype = tensors[0].dtype
    t = list(tensors)
    residual = None
    if attrs["prologue"]:
        r, a, gain = (x.float() for x in t[:3])
        s = r + a
        x = (gain * (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5))).to(dtype)
        residual = s.to(dtype)
        t = [x] + t[3:]
    x, w = t[0], t[1]
    b = t[2] if attrs["bias"] else None
    dw, db = t[2 + attrs["bias"]], (t[3 + attrs["bias"]] if attrs["down_bias"] else None)
    y = F.linear(x.float(), w.float(), None if b is None else b.float()).to(dtype).float()
    if len(attrs["columns"]) == 2:
        i = attrs["columns"][0][1]
        act = F.silu(y[..., :i]) * y[..., i:]
    else:
        act = F.gelu(y, approximate="tanh")
    out = F.linear(act.to(dtype).float(), dw.float(), None if db is None else db.float()).to(dtype)
    return out if residual is None else (out, residual)


@pytest.mark.parametrize("rows", [(1,), (2, 3), (16,)])
@pytest.mark.parametrize("swiglu,bias,down_bias", [(True, False, False), (True, False, True), (False, True, True)],
                         ids=["swiglu", "swiglu_down_bias", "gelu_biases"])
def test_kernel_matches_the_composition_fp32(rows, swiglu, bias, down_bias, blocks):
    tensors, attrs = _problem(rows, torch.float32, swiglu=swiglu, bias=bias, down_bias=down_bias)
    out = _run(tensors, attrs)
    ref = decode_mlp.decode_mlp_reference(*tensors, **attrs)
    assert out.shape == ref.shape == (*rows, 36)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    torch.testing.assert_close(out, _plain_reference(tensors, attrs), **TOL[torch.float32])


@pytest.mark.parametrize("rows", [(1,), (5,), (16,)])
def test_bf16_with_norm_prologue_matches_a_plain_torch_reference(rows, blocks):
    tensors, attrs = _problem(rows, torch.bfloat16, k=48, prologue=True, down_bias=True, seed=1)
    out, residual = _run(tensors, attrs)
    want, want_residual = _plain_reference(tensors, attrs)
    assert out.dtype == torch.bfloat16 and residual.dtype == torch.bfloat16
    # the residual sum still comes out (within an ulp: the interpreter's bf16 rounding is not torch's)
    torch.testing.assert_close(residual, want_residual, rtol=8e-3, atol=8e-3)
    torch.testing.assert_close(out, want, **TOL[torch.bfloat16])


def test_bitwise_repeatable_and_counters_left_at_zero(monkeypatch):
    monkeypatch.setattr(decode_gemv, "interpreted", lambda: False)
    tensors, attrs = _problem((3,), torch.float32, i=200, prologue=True)  # 25 programs: 5 groups of 5
    kernels = GemvKernels(PointwiseKernels())
    first = kernels.run(*tensors, **attrs)
    assert int(arrival.SCRATCH[torch.device("cpu")][decode_mlp.COUNTERS].abs().sum()) == 0
    again = kernels.run(*tensors, **attrs)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    torch.testing.assert_close(first[0], decode_mlp.decode_mlp_reference(*tensors, **attrs)[0], **TOL[torch.float32])


def test_more_than_16_rows_run_the_composition():
    tensors, attrs = _problem((17,), torch.float32, prologue=True, down_bias=True)
    assert GemvKernels(PointwiseKernels()).run(*tensors, **attrs) is None
    out = TritonBackend("cpu", interpret=True).linear_fused(*tensors, **attrs)
    for got, want in zip(out, decode_mlp.decode_mlp_reference(*tensors, **attrs)):
        torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_a_declined_mlp_runs_the_up_gemv_then_the_down_matmul(monkeypatch):
    """A decode shape the MLP kernel declines (scratch offsets past 32 bits) still gets the
    GEMV of steps 1-3, then the down projection as a torch matmul."""
    monkeypatch.setattr(decode_mlp, "fits", lambda *args: False)
    tensors, attrs = _problem((2,), torch.float32, prologue=True, down_bias=True)
    backend = TritonBackend("cpu", interpret=True)
    out, residual = backend.linear_fused(*tensors, **attrs)
    want, want_residual = decode_mlp.decode_mlp_reference(*tensors, **attrs)
    torch.testing.assert_close(out, want, **TOL[torch.float32])
    torch.testing.assert_close(residual, want_residual, **TOL[torch.float32])
    assert len(backend.kernel_sources()) == 1  # the up GEMV's kernel, no pointwise kernels around it


def test_blocks_and_groups_at_smollm2_widths():
    # SmolLM2's MLP (I = 1536, K = H = 576) at one row: ~100 programs reading >= 32-byte
    # rows of W_down, combined in ~10 groups of ~10
    blocks = decode_mlp.launch_blocks(1, 1536, 576, 576, 2, itemsize=2)
    programs = 1536 // blocks["BLOCK_N"]
    assert blocks["BLOCK_N"] * 2 >= 32 and 64 <= programs <= 256
    group, groups = decode_mlp.grouping(programs)
    assert group * groups >= programs and max(group, groups) <= 12
    assert decode_mlp.grouping(1) == (1, 1) and decode_mlp.grouping(25) == (5, 5)


# --------------------------------------------------------------------------- the pass on models
def _mlp_nodes(graph):
    return [n for n in graph.nodes if n.op == "linear_fused" and n.attrs.get("down")]


# (the zoo models at decode and prefill rows and llama's greedy decode with and without the
# fusion: tests/test_fuse_linear_pointwise.py, whose graphs now carry the down projections)


def test_ir_prints_parses_back_typechecks_and_unfuses():
    model, vocab = zoo.llama()
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (1, 4)),), backend="interpret")
    assert any(s.rules.get("linear_down") == 2 for s in fast.stats)
    text = print_graph(fast.graph)
    assert text.count("down=true") == 2
    again = parse(text)
    assert print_graph(again) == text
    again.params = fast.graph.params
    typecheck(again)
    plain = unfuse(fast.graph)  # the torch backend's composition: two linears per MLP again
    typecheck(plain)
    # per layer q/k/v, o, gate/up and down; the lm_head
    assert "linear_fused" not in plain.op_counts() and plain.op_counts()["linear"] == 4 * 2 + 1


# --------------------------------------------------------------------------- where it must not fire
class _MLP(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.norm = nn.RMSNorm(16, eps=1e-6)
        self.up, self.down = nn.Linear(16, 32, bias=False), nn.Linear(32, 16)
        self.mode = mode

    def forward(self, x):
        a = F.gelu(self.up(self.norm(x)))
        if self.mode == "returned":
            return self.down(a), a
        if self.mode == "read_twice":
            return self.down(a) + a[..., :16]
        return self.down(a)


@pytest.mark.parametrize("mode,downs", [("alone", 1), ("returned", 0), ("read_twice", 0)])
def test_down_is_taken_only_when_it_alone_reads_the_activation(mode, downs):
    torch.manual_seed(0)
    x = torch.randn(1, 2, 16)
    model = _MLP(mode).eval()
    fast = fxforge.optimize(model, (x,), backend="interpret")
    assert len(_mlp_nodes(fast.graph)) == downs
    with torch.no_grad():
        got, want = fast(x), model(x)
    for g, w in zip(got if mode == "returned" else [got], want if mode == "returned" else [want]):
        torch.testing.assert_close(g, w, **TOL[torch.float32])


def test_quantized_down_projections_are_left_alone():
    model, vocab = zoo.llama()
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (1, 4)),), quantize="int8", backend="interpret")
    assert not _mlp_nodes(fast.graph) and fast.graph.op_counts().get("quant_linear", 0) >= 4
