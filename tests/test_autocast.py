"""Under torch.autocast eager computes in autocast's dtype. The torch backend runs PyTorch
ops, which follow it as eager's do; the Triton backends' kernels compute in the dtypes of
optimize() time, so they refuse a call under autocast by name (they used to return float32
logits where eager returned bfloat16 ones, 2e-3 apart, with no word)."""
import pytest
import torch

import fxforge
import zoo


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    model, _ = zoo.llama(attn="sdpa", n_layer=1)
    return model, torch.randint(0, 128, (2, 9))


def test_the_torch_backend_follows_autocast_as_eager(llama):
    model, ids = llama
    fast = fxforge.optimize(model, (ids,), backend="torch", verbose=False)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        got, want = fast(ids).logits, model(ids).logits
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)


def test_the_triton_kernels_refuse_a_call_under_autocast(llama):
    model, ids = llama
    fast = fxforge.optimize(model, (ids,), backend="interpret", kv_cache=True, verbose=False)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        with pytest.raises(RuntimeError, match=r"under torch.autocast\('cpu', dtype=torch.bfloat16\).*backend='torch'"):
            fast(ids)
        with pytest.raises(RuntimeError, match="autocast"):
            fast.generate(ids, 2, eos_token_id=None)
    # outside autocast it runs as before
    with torch.no_grad():
        torch.testing.assert_close(fast(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
