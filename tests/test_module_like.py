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
