"""Python-float constants keep the model's exact value: in a float64 model `x * 0.044715`
multiplies by the double 0.044715, as torch does (a Python scalar is a weak double that the
op converts to the dtype it computes in). fxforge typed such a constant float32, so a
float64 model was off by ~1e-9 (GPT-2) to ~1e-7 (Llama) while float64 rounding is ~1e-16.
The float16/bfloat16/float32 models stay bit-identical to eager, as they were."""
import math

import pytest
import torch

import fxforge
from fxforge.ir import parse, structurally_equal, typecheck
from helpers import assert_round_trips
from zoo import gpt2, logits_of


class Scalars(torch.nn.Module):
    """Python-float constants in mul, add, sub, div, pow, a comparison, the tanh GELU and an
    RMSNorm-style rsqrt eps."""

    def __init__(self, dim=16):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(dim, dim) / 4)
        self.eps = 1e-6

    def forward(self, x):
        h = x @ self.w
        g = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3.0))))
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        g = (g - 0.1) / 0.3 + 2.7182818 * g ** 2
        return torch.where(g > 0.123456789, g * 1.1, g - 0.7)


def _eager_and_fast(model, x, **kw):
    with torch.no_grad():
        ref = logits_of(model(x))
        fast = fxforge.optimize(model, example_inputs=(x,), verbose=False, **kw)
        return ref, logits_of(fast(x)), fast


def _rel_err(ref, out):
    return ((ref - out).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("passes", [None, []], ids=["default", "no_passes"])
def test_float64_scalars_exact(passes):
    model = Scalars().double().eval()
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    ref, out, fast = _eager_and_fast(model, x, passes=passes)
    assert out.dtype == torch.float64
    assert _rel_err(ref, out) < 1e-12
    ir = str(fast.graph)
    assert "dtype=f32" not in ir, ir  # no constant rounded to float32
    assert_round_trips(fast.graph)
    typecheck(fast.graph)


def test_float64_const_ir_round_trips():
    model = Scalars().double().eval()
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    graph = fxforge.capture(model, (x,))
    typecheck(graph)
    assert "value=0.044715, dtype=f64" in str(graph)
    assert structurally_equal(parse(str(graph)), graph)


def _llama_gelu_new():
    # a tiny Llama whose MLP is GPT-2's tanh GELU written out (0.044715, sqrt(2/pi) as
    # Python floats); sdpa attention: HF's eager attention takes the softmax through
    # float32, which fuse_attention leaves out (float32 rounding of its own, not a constant's)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=0, eos_token_id=0, hidden_act="gelu_new", attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval(), 128


@pytest.mark.parametrize("make", [gpt2, _llama_gelu_new], ids=["gpt2", "llama"])
def test_float64_transformers(make):
    torch.manual_seed(0)
    model, vocab = make()
    model = model.double()
    ids = torch.randint(0, vocab, (2, 12))
    ref, out, fast = _eager_and_fast(model, ids)
    assert out.dtype == torch.float64
    assert _rel_err(ref, out) < 1e-12
    assert_round_trips(fast.graph)


def test_float64_torch_compile():
    import fxforge.dynamo

    fxforge.dynamo.register()
    torch._dynamo.reset()
    model = Scalars().double().eval()
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, backend="fxforge", dynamic=False)(x)
    torch._dynamo.reset()
    assert _rel_err(ref, out) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
def test_lower_precision_still_bitwise(dtype):
    # these were bit-identical to eager before float64 constants, and stay so: their
    # constants are float32 as before (no float64 tensor in the op)
    model = Scalars().to(dtype).eval()
    x = torch.randn(2, 8, 16).to(dtype)
    ref, out, fast = _eager_and_fast(model, x)
    assert out.dtype == dtype
    assert torch.equal(ref, out)
    assert "f64" not in str(fast.graph)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_lower_precision_gpt2_constants_unchanged(dtype):
    # GPT-2's fused kernels are not bit-identical to eager in these dtypes (nor were they),
    # but its constants are float32, as before: no float64 enters the graph
    torch.manual_seed(0)
    model, vocab = gpt2()
    model = model.to(dtype)
    ids = torch.randint(0, vocab, (2, 12))
    ref, out, fast = _eager_and_fast(model, ids)
    assert out.dtype == dtype
    assert "f64" not in str(fast.graph)
    assert _rel_err(ref.float(), out.float()) < 2e-2


def test_weak_scalar_does_not_promote():
    # a Python float with an f32 tensor and an int tensor keeps torch's result dtypes
    class M(torch.nn.Module):
        def forward(self, x, i):
            return x * 0.5 + 0.25, i * 0.5, (x.double() * 0.1).float()

    x, i = torch.randn(3, 4), torch.arange(12).reshape(3, 4)
    fast = fxforge.optimize(M().eval(), example_inputs=(x, i), verbose=False)
    ref, out = M()(x, i), fast(x, i)
    for r, o in zip(ref, out):
        assert r.dtype == o.dtype
        assert torch.equal(r, o)


def test_float64_save_load(tmp_path):
    model = Scalars().double().eval()
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    ref, out, fast = _eager_and_fast(model, x)
    fast.save(str(tmp_path / "saved"))
    again = fxforge.load(str(tmp_path / "saved"))
    assert str(again.graph) == str(fast.graph)
    with torch.no_grad():
        assert torch.equal(again(x), out)
    assert _rel_err(ref, out) < 1e-12


def test_float64_on_the_triton_backend_is_eager_float64():
    """Our Triton kernels compute in float32: given float64 operands (or a group that casts
    to float64) the triton backend runs PyTorch's float64 steps instead. The generated
    kernel had computed `(a + 1e10) - 1e10 + 1` as 1.0, and attention refused float64."""
    torch.manual_seed(0)

    class Cancels(torch.nn.Module):
        def forward(self, a):
            return ((a + 1e10) - 1e10 + 1) * torch.sigmoid(a), (a + 1e8).sum(-1, keepdim=True) - 8e8

    a = torch.randn(3, 8, dtype=torch.float64)
    ref, got = Cancels()(a), fxforge.optimize(Cancels(), example_inputs=(a,), backend="interpret")(a)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)

    model, vocab = _llama_gelu_new()
    model = model.double()
    ids = torch.randint(0, vocab, (2, 9))
    ref, got, fast = _eager_and_fast(model, ids, backend="interpret")
    assert any(n.op == "fused_pointwise" for n in fast.graph.nodes)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    cached = fxforge.optimize(model, example_inputs=(ids,), backend="interpret", kv_cache=True, verbose=False)
    want = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
    assert torch.equal(cached.generate(ids[:1], max_new_tokens=4, do_sample=False), want)
