"""A float16 int4 model whose group scales are below float16's normal range (weights near
1e-5): PyTorch's packed int4 CPU kernel (one or two rows) reads its scale table in float16,
which flushed them, so a row alone came out 1-9% off the same row in a batch. Such weights
now take the dequantizing path at every row count, and the report says why."""
import torch
from torch import nn

import fxforge
from fxforge.ir.quant_formats import quant_linear_reference, quantize_weight


def test_tiny_int4_scales_give_the_same_answer_alone_and_batched():
    torch.manual_seed(0)
    model = nn.Linear(64, 48, bias=False).eval()
    with torch.no_grad():
        model.weight.mul_(1e-6 / model.weight.std())
    model = model.half()
    fast = fxforge.optimize(model, (torch.randn(2, 3, 64).half(),), verbose=False,
                            quantize=fxforge.QuantConfig("int4", group_size=32, exclude=()))
    x = torch.randn(5, 1, 64).half()
    want = quant_linear_reference(x[:1], quantize_weight(model.weight.float(), "int4", group_size=32))
    torch.testing.assert_close(fast(x[:1]), want, rtol=1e-3, atol=0)
    torch.testing.assert_close(fast(x)[:1], want, rtol=1e-3, atol=0)
    assert "below torch.float16's normal range" in fast.report()
