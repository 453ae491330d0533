"""Outputs alias what eager's alias, and nothing else: `x.clone()`, `x * 1` and `x + 0` are x
to the IR (lowering and cleanup drop them), and CSE makes `(x * 2, x * 2)` one value, so the
graph's output was the caller's input, the model's own weight or another output, and a
write into it changed those. A returned input, or a view of one, stays shared as in eager."""
import torch

import fxforge


class Returns(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("buf", torch.ones(3))
        self.w = torch.nn.Parameter(torch.full((3,), 2.0))

    def forward(self, x):
        return {"clone": x.clone(), "times_one": x * 1, "plus_zero": x + 0, "twice": (x * 2, x * 2),
                "itself": x, "view": x[:, 1:], "view_of_clone": x.clone()[:, 1:], "buffer": self.buf.clone(),
                "weight": self.w * 1}


def _shares(a, b):
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _check(fast, model, x):
    with torch.no_grad():
        eager, ours = model(x), fast(x)
    for name in eager:
        for a, b in zip(*(torch.utils._pytree.tree_leaves(o[name]) for o in (eager, ours))):
            assert torch.equal(a, b), name
            assert (a is x) == (b is x) and _shares(a, x) == _shares(b, x), name
    assert ours["twice"][0] is not ours["twice"][1]
    before = x.clone()
    for name in ("clone", "times_one", "plus_zero", "view_of_clone"):
        ours[name].fill_(-7)
    assert torch.equal(x, before)  # the caller's input is untouched
    ours["buffer"].fill_(-7)
    ours["weight"].fill_(-7)
    ours["twice"][0].fill_(-7)
    assert torch.equal(ours["twice"][1], x * 2)
    with torch.no_grad():
        again = fast(x)
    assert torch.equal(again["buffer"], torch.ones(3)) and torch.equal(again["weight"], torch.full((3,), 2.0))
    ours["view"].fill_(5)  # eager's view writes into x, and so does ours
    assert (x[:, 1:] == 5).all()


def test_outputs_are_tensors_of_their_own_where_eager_s_are(tmp_path):
    model = Returns().eval()
    x = torch.randn(2, 3)
    fast = fxforge.optimize(model, (x.clone(),), verbose=False)
    _check(fast, model, torch.randn(2, 3))
    fast.save(str(tmp_path / "m"))
    _check(fxforge.load(str(tmp_path / "m")), model, torch.randn(2, 3))
