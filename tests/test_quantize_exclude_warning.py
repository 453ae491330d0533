"""An exclude pattern of the user's that names no weight of the graph warns, naming the
graph's weights: a typo, or a weight shared by two modules (b.weight = a.weight), which the
graph knows by one name only, used to exclude nothing without a word."""
import warnings

import pytest
import torch
from torch import nn

import fxforge
from fxforge.passes.quantize import DEFAULT_EXCLUDE


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 8)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.head(self.a(x) + torch.relu(self.b(x * 2)))


def test_an_exclude_naming_no_graph_weight_warns_with_the_graphs_names():
    torch.manual_seed(0)
    model, x = _Shared().eval(), torch.randn(2, 6, 64)
    for pattern in ("a.weight", "no_such_layer.weight"):
        with pytest.warns(UserWarning, match=rf"exclude pattern '{pattern}' matches no weight.*b\.weight"):
            fxforge.optimize(model, (x,), verbose=False,
                             quantize=fxforge.QuantConfig("int8", exclude=(*DEFAULT_EXCLUDE, pattern)))
    with warnings.catch_warnings(record=True) as seen:  # the name the graph uses: excluded, no such warning
        warnings.simplefilter("always")
        fast = fxforge.optimize(model, (x,), verbose=False,
                                quantize=fxforge.QuantConfig("int8", exclude=(*DEFAULT_EXCLUDE, "b.weight")))
    assert "excluded by 'b.weight'" in fast.report()
    assert not [w for w in seen if "matches no weight" in str(w.message)]
