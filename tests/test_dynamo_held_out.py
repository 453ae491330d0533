"""torch.compile(backend=fxforge) on what a held-out tester found: each case gives eager's
answer (outputs, and the inputs and buffers the model writes) or a clear error."""
import pytest
import torch
import torch.nn as nn

from fxforge.dynamo import FxforgeBackend


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # compiled frames of one test must not serve the next
    yield
    torch._dynamo.reset()


def run_both(fn, *inputs, backend=None):
    """(eager result, eager inputs after, compiled result, compiled inputs after)."""
    eager_in = [x.clone() for x in inputs]
    fast_in = [x.clone() for x in inputs]
    fx = backend or FxforgeBackend()
    with torch.no_grad():
        expected = fn(*eager_in)
        got = torch.compile(fn, backend=fx)(*fast_in)
    assert not fx.fallbacks, [f.reason for f in fx.fallbacks]
    return expected, eager_in, got, fast_in


# -- in-place ops through views -----------------------------------------------------------

VIEW_WRITES = {
    "view_mul": lambda x: (x.view(-1).mul_(3), x.sum(-1))[1],
    "column_mul": lambda x: (x[:, 1].mul_(3), x.sum(-1))[1],
    "strided_rows_mul": lambda x: (x[::2].mul_(3), x.sum(-1))[1],
    "transposed_row_mul": lambda x: (x.t()[0].mul_(3), x.sum(-1))[1],
    "diagonal_mul": lambda x: (x.diagonal().mul_(3), x.sum(-1))[1],
    "column_div": lambda x: (x.t()[1].div_(4), x.sum(-1))[1],
    "view_mul_result_unread": lambda x: (x.view(-1).mul_(3.0), torch.ones(1))[1],
    "whole_mul_result_unread": lambda x: (x.mul_(3), torch.ones(1))[1],
    "column_add": lambda x: (x[:, 1].add_(1), x.sum(-1))[1],
    "column_copy": lambda x: (x[:, 1].copy_(x[:, 0]), x.sum(-1))[1],
}


@pytest.mark.parametrize("name", VIEW_WRITES)
def test_in_place_write_through_a_view_of_an_input_reaches_the_input(name):
    """A mul_/div_ by a number on a view was kept as an opaque in-place call that
    fuse_attention's in-place-scale rule read as out-of-place (its view is read by nothing
    else) and dropped: the output missed it and the input stayed unchanged."""
    x = torch.arange(12.).reshape(4, 3)
    expected, (eager_x,), got, (fast_x,) = run_both(VIEW_WRITES[name], x)
    assert torch.equal(fast_x, eager_x)
    assert torch.equal(got, expected)


class DecayedBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(8, 8)
        self.register_buffer("ema", torch.ones(4, 8))

    def forward(self, x):
        self.ema[0].mul_(0.9)  # one row of a buffer
        h = self.l(x)
        h[:, 0].mul_(2)  # one column of an intermediate
        return h + self.ema.sum(0)


def test_in_place_scale_of_a_buffer_row_and_an_intermediate_column():
    torch.manual_seed(0)
    eager, model = DecayedBuffer().eval(), DecayedBuffer().eval()
    model.load_state_dict(eager.state_dict())
    fx = FxforgeBackend()
    fast = torch.compile(model, backend=fx)
    x = torch.randn(3, 8)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(fast(x), eager(x))
            torch.testing.assert_close(model.ema, eager.ema)
    assert not fx.fallbacks, [f.reason for f in fx.fallbacks]


def test_output_after_a_strided_write_is_a_new_tensor_as_in_eager():
    def f(x):
        x.view(-1)[::2].mul_(3)
        return x * 1

    x = torch.arange(12.).reshape(4, 3)
    expected, (eager_x,), got, (fast_x,) = run_both(f, x)
    assert torch.equal(fast_x, eager_x) and torch.equal(got, expected)
    assert got.data_ptr() != fast_x.data_ptr()


def test_an_input_written_and_returned_is_returned_itself_as_in_eager():
    x = torch.arange(12.).reshape(4, 3)
    expected, (eager_x,), got, (fast_x,) = run_both(lambda x: x.mul_(3), x)
    assert torch.equal(fast_x, eager_x) and torch.equal(got, expected)
    assert got is fast_x
