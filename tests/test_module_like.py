"""OptimizedModel where code around a model expects an nn.Module: to(), eval(), device,
dtype, config, state_dict(), parameters(); its weights are its own copies."""
import pytest
import torch

import fxforge
from fxforge.runtime.retarget import DtypePinnedError

import zoo


@pytest.fixture(scope="module")
def llama_pair():
    model, vocab = zoo.llama("sdpa")
    ids = torch.randint(0, vocab, (2, 6))
    return model, fxforge.optimize(model, (ids,), kv_cache=True), ids


def test_module_attributes(llama_pair):
    model, fast, ids = llama_pair
    assert fast.eval() is fast
    assert fast.device == torch.device("cpu") and fast.dtype == torch.float32
    assert fast.config is model.config
    state = fast.state_dict()
    assert state and all(isinstance(t, torch.Tensor) for t in state.values())
    assert sum(p.numel() for p in fast.parameters()) <= sum(t.numel() for t in state.values())
    with pytest.raises(RuntimeError, match="inference only"):
        fast.train()


def test_weights_are_copied_at_optimize_time():
    model, vocab = zoo.llama("sdpa")
    ids = torch.randint(0, vocab, (2, 6))
    fast = fxforge.optimize(model, (ids,))
    before = fast(ids).logits.clone()
    model_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert not any(t.untyped_storage().data_ptr() in model_storages for t in fast.state_dict().values())
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)  # fine-tuning, load_state_dict ... in place
    assert torch.equal(fast(ids).logits, before)


def test_calls_run_without_autograd():
    model = torch.nn.Linear(4, 3).eval()
    fast = fxforge.optimize(model, (torch.randn(2, 4),))
    out = fast(torch.randn(2, 4, requires_grad=True))
    assert not out.requires_grad


def test_to_the_same_device_or_dtype_is_a_no_op(llama_pair):
    _, fast, ids = llama_pair
    program = fast.program
    assert fast.to("cpu") is fast and fast.to(torch.float32) is fast and fast.cpu() is fast
    assert fast.program is program


def test_to_dtype_retypes_a_graph_that_does_not_pin_its_dtype():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).eval()
    fast = fxforge.optimize(model, (torch.randn(2, 8),))
    assert fast.to(torch.bfloat16) is fast  # in place, as nn.Module.to
    assert fast.dtype == torch.bfloat16 and "bf16" in fast.ir
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    assert torch.equal(fast(x), model.to(torch.bfloat16)(x))
    # nn.Module's shorthands (AttributeError before): each is to(dtype)
    for shorthand, dtype in (("half", torch.float16), ("double", torch.float64), ("float", torch.float32),
                             ("bfloat16", torch.bfloat16)):
        assert getattr(fast, shorthand)() is fast and fast.dtype == dtype
        x = torch.randn(3, 8, dtype=dtype)
        assert torch.equal(fast(x), getattr(model, shorthand)()(x))


def test_to_dtype_refuses_where_the_ir_pins_the_dtype(llama_pair):
    _, fast, ids = llama_pair
    # the pinning cast is quoted as an IR line: a cast node, or (rotary's, since cat fuses)
    # a fused_pointwise whose body holds ("cast", ..., (("dtype", f32),))
    with pytest.raises(DtypePinnedError, match=r"(?s)cast\W.*dtype\W{0,4}f32.*optimize\(model.to\(torch.bfloat16\)"):
        fast.to(torch.bfloat16)
    assert fast.dtype == torch.float32  # unchanged after the refusal
    assert fast(ids).logits.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_to_cuda_and_back(llama_pair):
    model, _, ids = llama_pair
    fast = fxforge.optimize(model, (ids,), kv_cache=True)
    expected = fast(ids).logits
    fast.to("cuda")
    assert fast.device.type == "cuda" and fast.backend.name == "triton"
    assert torch.allclose(fast(ids.cuda()).logits.cpu(), expected, atol=1e-4)
    fast.to("cpu")
    assert torch.allclose(fast(ids).logits, expected, atol=1e-5)


class _UpcastNorm(torch.nn.Module):
    """An RMSNorm that squares in float32 whatever its input's dtype (`x.float()`): captured
    in float32 the upcast is a no-op, so no IR node shows it."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(8))

    def forward(self, x):
        dt = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.w * h.to(dt)


def test_to_dtype_refuses_a_model_whose_code_casts_to_a_fixed_dtype_a_no_op_at_capture():
    model = _UpcastNorm().eval()
    fast = fxforge.optimize(model, (torch.randn(2, 4, 8),))
    assert "fixed_dtypes" in fast.ir  # recorded in the graph, so a saved model keeps it
    with pytest.raises(DtypePinnedError, match=r"(?s)casts to torch.float32.*x\.float\(\) in the model \(_UpcastNorm\)"
                                               r".*optimize\(model.to\(torch.float16\)"):
        fast.to(torch.float16)  # was accepted, then squared in float16: 0 where eager gives 0.64
    assert fast.dtype == torch.float32
    x = torch.randn(2, 4, 8) * 400
    assert torch.allclose(fast(x), model(x), atol=1e-5)


@pytest.mark.parametrize("make", [lambda: zoo.gpt2("eager"), lambda: (zoo.NanoGPT().eval(), 96)], ids=["gpt2", "nanogpt"])
def test_to_dtype_still_converts_models_that_follow_their_inputs_dtype(make):
    model, vocab = make()  # GPT-2's `attn_weights.type(value.dtype)` is no fixed dtype
    ids = torch.randint(0, vocab, (2, 6))
    fast = fxforge.optimize(model, (ids,)).to(torch.bfloat16)
    expected = zoo.logits_of(model.to(torch.bfloat16)(ids)).float()
    assert torch.allclose(zoo.logits_of(fast(ids)).float(), expected, atol=2e-2)


def test_to_a_dtype_the_quantized_kernels_do_not_take_is_refused_at_to():
    model, vocab = zoo.gpt2()
    ids = torch.randint(1, vocab, (2, 8))
    fast = fxforge.optimize(model, (ids,), quantize="int8")
    expected = fast(ids).logits
    with pytest.raises(TypeError, match=r"(?s)to\(torch.float64\): the model is quantized.*float32.*without quantize="):
        fast.to(torch.float64)  # was accepted; then every call failed inside the kernel
    assert fast.dtype == torch.float32 and torch.equal(fast(ids).logits, expected)
