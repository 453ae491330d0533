"""A custom operator that exists once this module is imported (torch.library.custom_op),
and a module that calls it: a saved program that calls it must load in a process that
never imported this module (tests/test_save_load.py)."""
import torch


@torch.library.custom_op("fxforge_test::scaled_tanh", mutates_args=())
def scaled_tanh(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.tanh(x) * scale


@scaled_tanh.register_fake
def _scaled_tanh_shape(x, scale):
    return torch.empty_like(x)


class UsesCustomOp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.ops.fxforge_test.scaled_tanh(self.lin(x), 2.0)
