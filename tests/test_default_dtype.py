"""torch.set_default_dtype does not change what a float32 model computes in eager: a Python
float meets a float tensor as a weak scalar, in the tensor's dtype. fxforge typed the
graph's float constants (`x * 0.1`, RMSNorm's eps) with the default dtype, so a float16 or
bfloat16 default rounded them first: 2.4e-4 relative error on `lin(x) * 0.1` under float16,
or a capture refusal under bfloat16 (the graph no longer computed what the model did)."""
import pytest
import torch

import fxforge
import zoo


@pytest.fixture
def default_dtype():
    before = torch.get_default_dtype()
    yield torch.set_default_dtype
    torch.set_default_dtype(before)


class _Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.lin(x) * 0.1 + 1e-3


@pytest.mark.parametrize("default", [torch.float16, torch.bfloat16], ids=str)
def test_float_constants_keep_the_models_precision_under_a_half_default(default, default_dtype):
    torch.manual_seed(0)
    model, x = _Scaled().eval(), torch.randn(2, 5, 16)
    default_dtype(default)
    fast = fxforge.optimize(model, (x,), verbose=False)
    default_dtype(torch.float32)
    assert "dtype=f16" not in fast.ir and "dtype=bf16" not in fast.ir
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=0, atol=0)


def test_a_llama_optimized_under_a_float16_default_gives_the_float32_logits(default_dtype):
    torch.manual_seed(0)
    model, vocab = zoo.llama(n_layer=1)
    ids = torch.randint(0, vocab, (2, 6))
    default_dtype(torch.float16)
    fast = fxforge.optimize(model, (ids,), verbose=False)
    default_dtype(torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(fast(ids).logits, model(ids).logits, rtol=1e-6, atol=1e-6)
