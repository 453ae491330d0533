"""fast.to(torch.float64) retypes the graph's float constants too: `h * 0.1 + 0.3` kept its
constants float32 inside the fused kernel, so the float64 answer was the float32-rounded
0.1's (1.4e-8 off eager float64; GPT-2 1.8e-9 relative), where optimize() of the float64
model gives eager's exactly."""
import copy

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import fxforge


class _Affine(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.lin(x) * 0.1 + 0.3


def test_to_float64_gives_the_float64_models_answer():
    torch.manual_seed(0)
    model, x = _Affine().eval(), torch.randn(2, 5, 16)
    fast = fxforge.optimize(model, (x,), verbose=False).to(torch.float64)
    assert "dtype=f32" not in fast.ir
    with torch.no_grad():
        torch.testing.assert_close(fast(x.double()), copy.deepcopy(model).double()(x.double()), rtol=0, atol=0)
    # and back: a float32 model again, its constants float32 (as optimize() gives them)
    fast.to(torch.float32)
    assert "dtype=f64" not in fast.ir
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=0, atol=0)


def test_gpt2_to_float64_matches_eager_float64():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    model, ids = GPT2LMHeadModel(cfg).eval(), torch.randint(0, 64, (2, 7))
    fast = fxforge.optimize(model, (ids,), verbose=False).to(torch.float64)
    with torch.no_grad():
        want = copy.deepcopy(model).double()(ids).logits
        got = fast(ids).logits
    assert got.dtype == torch.float64
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-13
