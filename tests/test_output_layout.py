"""Outputs have eager's layout and aliasing where `contiguous()` decides them: the IR has no
layout (`contiguous` is x to it), so `y.transpose(1, 2).contiguous()` came back as a
transposed view (`.view(2, -1)` raised where eager's works), and `x.contiguous()` of a
non-contiguous input came back as the input's own memory (eager: a fresh copy)."""
import pytest
import torch

import fxforge


def _shares(a, b):
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class Producers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, x):
        y = self.lin(x)
        return {"transposed_contiguous": y.transpose(1, 2).contiguous(),
                "clone_contiguous": y.transpose(1, 2).clone(memory_format=torch.contiguous_format),
                "reshape_of_transposed": y.transpose(1, 2).reshape(y.shape[0], -1),
                "linear": y, "pointwise": torch.relu(y) * 2, "transposed": y.transpose(1, 2),
                "input_contiguous": x.contiguous(), "input": x, "input_view": x[:, 1:],
                "slice_contiguous": x[:, :, :4].contiguous(), "view_after_contiguous": x.contiguous()[:, 1]}


@pytest.fixture(scope="module", params=["torch", "interpret"])
def fast(request):
    model = Producers().eval()
    return model, fxforge.optimize(model, (torch.randn(2, 8, 16),), backend=request.param, verbose=False)


@pytest.mark.parametrize("strided", [False, True])
def test_contiguous_outputs_have_eager_s_strides_and_memory(fast, strided):
    model, fast = fast
    x = torch.randn(8, 2, 16).transpose(0, 1) if strided else torch.randn(2, 8, 16)
    with torch.no_grad():
        eager, ours = model(x), fast(x)
    for name, e in eager.items():
        o = ours[name]
        assert torch.allclose(e, o, atol=1e-6), name
        assert o.is_contiguous() or not e.is_contiguous(), (name, e.stride(), o.stride())
        if e.is_contiguous():
            assert o.stride() == e.stride(), name
        assert _shares(o, x) == _shares(e, x), name  # a view of the input exactly where eager's is
    assert ours["input"] is x or ours["input"].stride() == x.stride()
    ours["transposed_contiguous"].view(2, -1)  # eager's is contiguous: a view of it works


def test_a_returned_contiguous_input_is_a_copy_only_where_eager_copies():
    model = Producers().eval()
    fast = fxforge.optimize(model, (torch.randn(2, 8, 16),), verbose=False)
    x = torch.randn(8, 2, 16).transpose(0, 1)
    with torch.no_grad():
        out = fast(x)["input_contiguous"]
    expected = x.clone()
    x.zero_()  # the caller reuses its buffer: eager's x.contiguous() was a copy, so is ours
    assert torch.equal(out, expected)
    plain = torch.randn(2, 8, 16)
    with torch.no_grad():
        out = fast(plain)["input_contiguous"]
    out.fill_(3)  # eager's contiguous() of a contiguous input is the input itself
    assert (plain == 3).all()


def test_layouts_survive_a_repeated_output():
    class Twice(torch.nn.Module):
        def forward(self, x):
            t = (x * 2).transpose(0, 1).contiguous()
            return t, t

    fast = fxforge.optimize(Twice().eval(), (torch.randn(3, 4),), verbose=False)
    a, b = fast(torch.randn(3, 4))
    assert a is b and a.is_contiguous()


def test_a_saved_model_keeps_the_output_layouts(tmp_path):
    model = Producers().eval()
    fast = fxforge.optimize(model, (torch.randn(2, 8, 16),), verbose=False)
    fast.save(tmp_path / "saved")
    loaded = fxforge.load(tmp_path / "saved")
    x = torch.randn(8, 2, 16).transpose(0, 1)
    with torch.no_grad():
        want = model(x)
    got = loaded(x)
    assert got["transposed_contiguous"].stride() == want["transposed_contiguous"].stride()
    assert got["transposed_contiguous"].view(2, -1).shape == (2, 128)
    assert not _shares(got["input_contiguous"], x)
