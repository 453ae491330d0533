"""fuse_linear_pointwise and the decode GEMV (codegen/kernels/decode_gemv.py): a float linear
with the pointwise groups around it as one `linear_fused` node (an MLP's with its down
projection too: the decode MLP kernel, tests/test_decode_mlp.py); the same outputs as the
unfused program at decode rows (the GEMV) and prefill rows (the composition), the IR text
round trip, and the cases where the rewrite must not fire."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fxforge  # noqa: E402
import zoo  # noqa: E402
from helpers import run_gemv  # noqa: E402
from fxforge.codegen.kernels.decode_gemv import GemvKernels, decode_gemv_reference, launch_blocks  # noqa: E402
from fxforge.codegen.pointwise import PointwiseKernels  # noqa: E402
from fxforge.ir.parser import parse  # noqa: E402
from fxforge.ir.printer import print_graph  # noqa: E402
from fxforge.ir.typecheck import typecheck  # noqa: E402
from fxforge.passes.fuse_linear_pointwise import unfuse  # noqa: E402

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
       torch.float16: dict(rtol=1e-2, atol=1e-2)}

SWIGLU = (("silu", ("in0",), ()), ("mul", ("t0", "in1"), ()))
RMS_ADD = (("add", ("in0", "in1"), ()), ("const", (), (("value", 2), ("dtype", torch.int64))),
           ("pow", ("t0", "t1"), ()), ("mean", ("t2",), (("dims", (-1,)), ("keepdim", True), ("dtype", None))),
           ("const", (), (("value", 1e-6), ("dtype", torch.float32))), ("add", ("t3", "t4"), ()),
           ("rsqrt", ("t5",), ()), ("mul", ("t0", "t6"), ()), ("mul", ("in2", "t7"), ()))


def _attrs(prologue=(), prologue_outputs=(), row=None, n_x=1, bias=False, columns=((0, 8),), epilogue=(),
           epilogue_outputs=()):
    return dict(n_x=n_x, bias=bias, prologue=prologue, prologue_outputs=prologue_outputs, row=row, columns=columns,
                epilogue=epilogue, epilogue_outputs=epilogue_outputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [(1, 1), (2, 3), (16,)])
def test_swiglu_epilogue_kernel_matches_the_composition(dtype, rows, blocks):
    torch.manual_seed(0)
    k, i = 40, 24  # K not a multiple of the chunk, I not of the column block
    x, w = torch.randn(*rows, k, dtype=dtype), torch.randn(2 * i, k, dtype=dtype) / 6
    attrs = _attrs(columns=((0, i), (i, 2 * i)), epilogue=SWIGLU, epilogue_outputs=("t1",))
    torch.testing.assert_close(run_gemv((x, w), attrs), decode_gemv_reference(x, w, **attrs), **TOL[dtype])
    torch.testing.assert_close(decode_gemv_reference(x, w, **attrs), F.silu(x @ w[:i].T) * (x @ w[i:].T))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_gelu_and_residual_epilogues(dtype, blocks):
    torch.manual_seed(1)
    x, w, b, r = (torch.randn(1, 3, 32, dtype=dtype), torch.randn(20, 32, dtype=dtype) / 5,
                  torch.randn(20, dtype=dtype), torch.randn(1, 3, 20, dtype=dtype))
    gelu = _attrs(bias=True, columns=((0, 20),), epilogue=(("gelu", ("in0",), (("approximate", "none"),)),),
                  epilogue_outputs=("t0",))
    torch.testing.assert_close(run_gemv((x, w, b), gelu), F.gelu(F.linear(x, w, b)), **TOL[dtype])
    residual = _attrs(columns=((0, 20),), epilogue=(("add", ("in1", "in0"), ()),), epilogue_outputs=("t0",))
    torch.testing.assert_close(run_gemv((x, w, r), residual), r + F.linear(x, w), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [(1, 1), (2, 5)])
def test_rmsnorm_prologue_with_residual_output_and_swiglu_epilogue(dtype, rows, blocks):
    torch.manual_seed(2)
    k, i = 300, 12  # K over several chunks
    r, a = torch.randn(*rows, k, dtype=dtype), torch.randn(*rows, k, dtype=dtype)
    g, w = torch.rand(k, dtype=dtype) + 0.5, torch.randn(2 * i, k, dtype=dtype) / 17
    attrs = _attrs(RMS_ADD, ("t8", "t0"), row=k, n_x=3, columns=((0, i), (i, 2 * i)), epilogue=SWIGLU,
                   epilogue_outputs=("t1",))
    out, residual = run_gemv((r, a, g, w), attrs)
    want_out, want_residual = decode_gemv_reference(r, a, g, w, **attrs)
    # the same add, stored once, as the row kernel of the unfused program stores it
    row_kernel = PointwiseKernels().run(r, a, g, body=RMS_ADD, outputs=("t0",), row=k)
    torch.testing.assert_close(residual, row_kernel, rtol=0, atol=0)
    torch.testing.assert_close(residual, want_residual, **TOL[dtype])
    torch.testing.assert_close(out, want_out, **TOL[dtype])
    s = (r + a).float()
    normed = (g.float() * (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6))).to(dtype)
    torch.testing.assert_close(want_out, F.silu(normed @ w[:i].T) * (normed @ w[i:].T), **TOL[dtype])


def test_a_prefill_is_not_a_gemv():
    x, w = torch.randn(17, 8), torch.randn(8, 8)
    assert GemvKernels(PointwiseKernels()).run(x, w, **_attrs()) is None


def test_launch_fills_a_gpu_at_one_row():
    # SmolLM2's merged q/k/v (960 x 576) and gate/up (2 x 1536): hundreds of programs
    assert 960 // launch_blocks(1, 960, 576)["BLOCK_N"] >= 200
    blocks = launch_blocks(1, 1536, 576, parts=2)
    assert 1536 // blocks["BLOCK_N"] >= 200 and blocks["BLOCK_N"] * blocks["BLOCK_K"] * 2 <= 4096


# --------------------------------------------------------------------------- the pass on models
def _nanogpt():
    return zoo.NanoGPT().eval(), 96


MODELS = {"llama": zoo.llama, "nanogpt_gelu": _nanogpt}


def _pair(name, dtype, **opts):
    torch.manual_seed(0)
    model, vocab = MODELS[name]()
    model = model.to(dtype)
    ids = torch.randint(0, vocab, (1, 5))
    fast = fxforge.optimize(model, (ids,), backend="interpret", **opts)
    plain = fxforge.optimize(model, (ids,), backend="interpret", disable=["fuse_linear_pointwise"], **opts)
    return fast, plain, vocab


def _logits(out):
    return zoo.logits_of(out).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(MODELS))
def test_models_match_the_unfused_program_at_decode_and_prefill_rows(name, dtype):
    fast, plain, vocab = _pair(name, dtype)
    # per layer q/k/v (norm prologue) and the MLP's up (norm prologue, activation epilogue);
    # the lm_head (final norm prologue)
    fused = [n for n in fast.graph.nodes if n.op == "linear_fused"]
    assert len(fused) == 2 * 2 + 1 and all(n.attrs["prologue"] for n in fused)
    # the MLP's up takes its down projection too (one kernel at decode: decode_mlp.py)
    downs = [n for n in fused if n.attrs.get("down")]
    assert len(downs) == 2 and all(n.attrs.get("down_bias", False) == (name == "nanogpt_gelu") for n in downs)
    with torch.no_grad():
        for shape in ((1, 1), (2, 3), (2, 12)):  # 1 and 6 rows: the GEMV; 24: the composition
            ids = torch.randint(0, vocab, shape)
            torch.testing.assert_close(_logits(fast(ids)), _logits(plain(ids)), **TOL[dtype])


def test_decode_steps_with_a_kv_cache_match_the_unfused_program():
    fast, plain, vocab = _pair("llama", torch.float32, kv_cache=True)
    assert sum(bool(n.attrs.get("down")) for n in fast.graph.nodes if n.op == "linear_fused") == 2  # whole MLPs
    ids = torch.randint(0, vocab, (2, 6))
    outs = [m.generate(ids, max_new_tokens=5, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True,
                       output_logits=True) for m in (fast, plain)]
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    torch.testing.assert_close(torch.stack(outs[0].logits), torch.stack(outs[1].logits), **TOL[torch.float32])


def test_ir_prints_parses_back_and_typechecks():
    fast, _, _ = _pair("llama", torch.float32)
    text = print_graph(fast.graph)
    assert "linear_fused(" in text
    again = parse(text)
    assert print_graph(again) == text
    again.params = fast.graph.params
    typecheck(again)


def test_torch_backend_runs_the_composition():
    torch.manual_seed(0)
    model, vocab = zoo.llama()
    ids = torch.randint(0, vocab, (1, 4))
    fast = fxforge.optimize(model, (ids,), backend="torch")
    assert "linear_fused" not in fast.graph.op_counts()  # prepare() unfused it for the CPU planners
    assert any(s.name == "fuse_linear_pointwise" and s.rules for s in fast.stats)
    with torch.no_grad():
        torch.testing.assert_close(_logits(fast(ids)), _logits(model(ids)), **TOL[torch.float32])
    assert unfuse(fast.graph) is fast.graph


# --------------------------------------------------------------------------- where it must not fire
class _MLP(nn.Module):
    def __init__(self, share=False):
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)
        self.share = share

    def forward(self, x):
        h = self.up(x)
        a = F.gelu(h)
        # (not `+ 0` when not shared: adding +0 to a float is not a no-op at -0.0, so it stays)
        return self.down(a) + h.sum(-1, keepdim=True) if self.share else self.down(a)


def test_declines_when_the_linear_output_is_read_elsewhere():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 16)
    model = _MLP(share=True).eval()
    shared = fxforge.optimize(model, (x,), backend="interpret")
    fused = [n for n in shared.graph.nodes if n.op == "linear_fused"]
    # up's output also feeds the sum: it stays a linear; down + the broadcast add fuses
    assert [n.inputs[1].param for n in fused] == ["down.weight"]
    with torch.no_grad():
        torch.testing.assert_close(shared(x), model(x), **TOL[torch.float32])
    model.share = False
    alone = fxforge.optimize(model, (x,), backend="interpret")
    assert alone.graph.op_counts().get("linear_fused") == 1  # bias + GELU on up
    with torch.no_grad():
        torch.testing.assert_close(alone(x), model(x), **TOL[torch.float32])


class _NormLinear(nn.Module):
    def __init__(self, return_norm):
        super().__init__()
        self.norm, self.lin, self.return_norm = nn.RMSNorm(16, eps=1e-6), nn.Linear(16, 8, bias=False), return_norm

    def forward(self, x, y):
        h = self.norm(x + y)
        return (self.lin(h), h) if self.return_norm else self.lin(h)


def test_prologue_declines_when_the_normed_row_is_read_elsewhere():
    torch.manual_seed(0)
    x, y = torch.randn(1, 2, 16), torch.randn(1, 2, 16)
    for return_norm, fused in ((True, 0), (False, 1)):
        model = _NormLinear(return_norm).eval()
        fast = fxforge.optimize(model, (x, y), backend="interpret")
        assert fast.graph.op_counts().get("linear_fused", 0) == fused
        with torch.no_grad():
            got, want = fast(x, y), model(x, y)
        for g, w in zip(got if return_norm else [got], want if return_norm else [want]):
            torch.testing.assert_close(g, w, **TOL[torch.float32])


def test_quantized_linears_of_other_formats_are_left_alone():
    """int4 has no decode GEMV with neighbours (w8a8 and int8 do: tests/test_quant_linear_fused.py)."""
    torch.manual_seed(0)
    model, vocab = zoo.llama()
    ids = torch.randint(0, vocab, (1, 4))
    fast = fxforge.optimize(model, (ids,), quantize="int4", backend="interpret")
    plain = fxforge.optimize(model, (ids,), quantize="int4", backend="interpret", disable=["fuse_linear_pointwise"])
    assert fast.graph.op_counts()["quant_linear"] == plain.graph.op_counts()["quant_linear"]
    # only the float lm_head (not quantized) takes its final norm
    assert [n.inputs[-1].param for n in fast.graph.nodes if n.op == "linear_fused"] == ["lm_head.weight"]
    with torch.no_grad():
        torch.testing.assert_close(_logits(fast(ids[:, :1])), _logits(plain(ids[:, :1])), **TOL[torch.float32])
