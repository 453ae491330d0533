"""The positions/key-bias kernel (codegen/kernels/step_inputs.py): bit-equal to the torch
ops it replaces (runtime/state.py step_inputs for an eager step; the static step's own ops,
Backend.static_step_inputs, with the cache length a 0-d device tensor), left-padded
batches, start 0 and > 0, several new tokens, float32/bfloat16/float16 bias."""
import pytest
import torch

from fxforge.codegen.kernels.step_inputs import step_inputs_reference, step_inputs_triton
from fxforge.runtime.backends.base import Backend
from fxforge.runtime.state import step_inputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("start,new", [(0, 5), (7, 1), (4, 3)])
def test_eager_step_inputs_equal_step_inputs(start, new, dtype):
    pad = torch.tensor([0, 3, 6])  # row 2: padding past `start` for start=4
    positions, bias = step_inputs_triton(pad, start, new, start + new, dtype)
    want_positions, want_bias = step_inputs(pad, start, new, dtype)
    assert positions.dtype == want_positions.dtype and torch.equal(positions, want_positions)
    assert bias.dtype == dtype and torch.equal(bias, want_bias)
    ref_positions, ref_bias = step_inputs_reference(pad, start, new, start + new, dtype)
    assert torch.equal(ref_positions, want_positions) and torch.equal(ref_bias, want_bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("start", [0, 5, 1029])  # 1029: the bias spans two key blocks
def test_static_step_inputs_read_the_length_on_the_device(start, dtype):
    pad = torch.tensor([2, 0])
    capacity = 1100 if start > 1000 else 12
    length = torch.tensor(start)
    want_positions, want_bias = torch.full((2, 1), -7), torch.full((2, 1, 1, capacity), 3.0, dtype=dtype)
    Backend("cpu").static_step_inputs(length, pad, want_positions, want_bias)  # the torch ops
    positions, bias = torch.full((2, 1), -7), torch.full((2, 1, 1, capacity), 3.0, dtype=dtype)
    out = step_inputs_triton(pad, length, 1, capacity, dtype, positions=positions, bias=bias)
    assert out[0] is positions and out[1] is bias  # written in place: a CUDA graph's buffers
    assert torch.equal(positions, want_positions) and torch.equal(bias, want_bias)
    assert int((bias[0, 0, 0] == 0).sum()) == max(start + 1 - 2, 0)  # keys pad..start, the new one included


def test_wrong_buffers_are_refused():
    pad = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="key bias"):
        step_inputs_triton(pad, torch.tensor(3), 1, 8, torch.float32, positions=torch.zeros(2, 1, dtype=torch.long),
                           bias=torch.zeros(2, 1, 1, 8, dtype=torch.bfloat16))


@pytest.mark.parametrize("start", [0, 6, 13])
def test_paged_static_step_inputs_fill_row_starts_and_slots(start):
    """A paged static step's row starts and slot mapping come out of the same launch, equal
    to the torch ops (block = table[row, pos // block size])."""
    pad = torch.tensor([0, 3, 5])
    table = torch.tensor([[4, 9, 2, 0], [7, 1, 0, 0], [3, 8, 6, 5]], dtype=torch.int32)
    width, block = table.shape[1], 4

    def buffers():
        return (torch.full((3, 1), -1), torch.zeros(3, 1, 1, width * block), table.clone(),
                torch.full((3,), -1, dtype=torch.int32), torch.full((3, 1), -1))

    want, got = buffers(), buffers()
    Backend("cpu").static_step_inputs(torch.tensor(start), pad, *want[:2], paged=(*want[2:], block))
    step_inputs_triton(pad, torch.tensor(start), 1, width * block, torch.float32, positions=got[0], bias=got[1],
                       paged=(*got[2:], block))
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert got[3].tolist() == [0, 3, 5]
