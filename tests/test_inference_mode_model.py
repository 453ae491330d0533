"""A model built under torch.inference_mode() runs in eager, but torch.export cannot trace
its inference tensors: the error says that, names a tensor, and gives a fix that works
(it said "simplify the code at the location above, or pass dynamic=False")."""
import pytest
import torch

import fxforge
from fxforge.ir.capture import CaptureError


def test_inference_mode_parameters_get_an_error_naming_them_and_a_working_fix():
    with torch.inference_mode():
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()).eval()
    x = torch.randn(2, 4, 8)
    with pytest.raises(CaptureError, match=r"made under torch.inference_mode\(\) \(0.weight, \.\.\.\)"):
        fxforge.optimize(model, (x,), verbose=False)
    # the fix the message gives
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    fast = fxforge.optimize(model, (x,), verbose=False)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))
