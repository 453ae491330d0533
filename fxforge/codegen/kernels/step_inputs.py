"""The positions and the key bias of a cached step, in one launch.

A cached graph takes, besides the token ids, the positions of the new tokens (per row,
minus that row's left padding, clamped at 0 on padding) and a key bias (the dtype's lowest
value on keys that get no attention, 0 elsewhere). Built with torch ops they cost six
launches per eager step (arange, sub/clamp, arange, zeros, lt/masked_fill) and seven in a
static step's CUDA graph: more than the rest of the step outside the layers. This kernel
writes both, one program per row:

    positions[b, i] = max(start + i - pad[b], 0)                 i < new
    bias[b, 0, 0, k] = lowest if k < pad[b] or k >= start + new   k < keys
                       0      otherwise

`keys` is start + new for an eager step (the keys the step attends over; none is past the
new tokens) and the buffer's capacity for a static step, whose slots past the new token
are masked like padding. `start` is a Python int, or a 0-d device tensor (the static
step's cache length) that the kernel loads: no host read. A paged static step's row
starts and slot mapping (another seven torch launches) come out of the same launch.

`lowest` is stored through the bias's own type: torch.finfo(dtype).min of float16,
bfloat16 and float32 is exact in float32, the type of a Triton float scalar, so the value
written is exactly torch's. Other dtypes take the torch reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK_KEYS = 1024  # keys per loop iteration of a row's program


@triton.jit
def _step_inputs_kernel(
    pad_ptr, start_ptr, positions_ptr, bias_ptr, table_ptr, row_start_ptr, slots_ptr,
    start_arg, new, keys, lowest, block_size,
    stride_pb, stride_bb, stride_tb, stride_sb,
    START_IN_MEMORY: tl.constexpr, PAGED: tl.constexpr, BLOCK_NEW: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)
    pad = tl.load(pad_ptr + row)
    if START_IN_MEMORY:
        start = tl.load(start_ptr)
    else:
        start = start_arg
    i = tl.arange(0, BLOCK_NEW)
    pos = tl.maximum(start + i - pad, 0)
    tl.store(positions_ptr + row * stride_pb + i, pos.to(positions_ptr.dtype.element_ty), mask=i < new)
    if PAGED:  # the row's start and each new token's slot: table[row, pos // block] * block + pos % block
        tl.store(row_start_ptr + row, pad.to(row_start_ptr.dtype.element_ty))
        block = tl.load(table_ptr + row * stride_tb + pos // block_size, mask=i < new, other=0)
        slot = block.to(tl.int64) * block_size + pos % block_size
        tl.store(slots_ptr + row * stride_sb + i, slot.to(slots_ptr.dtype.element_ty), mask=i < new)
    end = start + new  # keys at and past `end` are not there yet
    for k0 in range(0, keys, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        hidden = (k < pad) | (k >= end)
        value = tl.where(hidden, lowest, 0.0)
        tl.store(bias_ptr + row * stride_bb + k, value.to(bias_ptr.dtype.element_ty), mask=k < keys)


def supports(pad: torch.Tensor, dtype: torch.dtype) -> bool:
    return dtype in DTYPES and pad.dim() == 1


def step_inputs_triton(pad: torch.Tensor, start, new: int, keys: int, dtype: torch.dtype,
                       positions: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                       paged: tuple | None = None):
    """(positions [B, new] long, bias [B, 1, 1, keys] of `dtype`), written into `positions`
    and `bias` when given (a static step's buffers). `start`: int or 0-d long tensor.
    `paged`: (block table [B, W] int32, row starts [B] int32, slots [B, new] long,
    block size), buffers the kernel also fills: the row starts (= pad) and the slot of each
    new token (its block's table entry x block size + its offset in the block); the caller
    guarantees each token's block is in the table (runtime/static_paged.py checks it)."""
    batch = pad.shape[0]
    if positions is None:
        positions = torch.empty(batch, new, dtype=torch.long, device=pad.device)
    if bias is None:
        bias = torch.empty(batch, 1, 1, keys, dtype=dtype, device=pad.device)
    if positions.shape != (batch, new) or positions.stride(1) != 1:
        raise ValueError(f"positions must be [{batch}, {new}] with unit stride, got {tuple(positions.shape)}")
    if bias.shape != (batch, 1, 1, keys) or bias.stride(3) != 1 or bias.dtype != dtype:
        raise ValueError(f"key bias must be [{batch}, 1, 1, {keys}] {dtype} with unit stride, got "
                         f"{tuple(bias.shape)} {bias.dtype}")
    in_memory = isinstance(start, torch.Tensor)
    table, row_start, slots, block_size = paged if paged is not None else (pad, pad, positions, 1)
    if paged is not None and (slots.shape != (batch, new) or slots.stride(1) != 1 or table.stride(1) != 1
                              or row_start.shape != (batch,)):
        raise ValueError(f"paged buffers must be a unit-stride table, [{batch}] row starts and "
                         f"[{batch}, {new}] slots, got {tuple(table.shape)}, {tuple(row_start.shape)}, "
                         f"{tuple(slots.shape)}")
    _step_inputs_kernel[(batch,)](
        pad, start if in_memory else pad, positions, bias, table, row_start, slots,
        0 if in_memory else int(start), new, keys, float(torch.finfo(dtype).min), block_size,
        positions.stride(0), bias.stride(0), table.stride(0), slots.stride(0),
        START_IN_MEMORY=in_memory, PAGED=paged is not None, BLOCK_NEW=triton.next_power_of_2(max(new, 1)),
        BLOCK_K=min(BLOCK_KEYS, triton.next_power_of_2(max(keys, 1))))
    return positions, bias


def step_inputs_reference(pad: torch.Tensor, start, new: int, keys: int, dtype: torch.dtype):
    """The same in plain torch (`start` an int or a 0-d tensor)."""
    steps = torch.arange(new, device=pad.device) + start
    positions = (steps[None, :] - pad[:, None]).clamp(min=0)
    k = torch.arange(keys, device=pad.device)
    hidden = (k[None, :] < pad[:, None]) | (k[None, :] >= start + new)
    bias = torch.zeros(pad.shape[0], 1, 1, keys, dtype=dtype, device=pad.device)
    return positions, bias.masked_fill_(hidden[:, None, None, :], torch.finfo(dtype).min)
