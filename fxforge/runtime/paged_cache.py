"""The buffers of a paged KV cache and the inputs that address them.

A graph whose state buffers have layout `paged` (passes/kv_paged.py) stores K and V of
every layer in one pool of blocks, [num_blocks, block_size, Hkv, D]. A call addresses a
set of rows, each a list of block ids (`use_rows`); from those and the step's position
this module builds the graph's block table, row starts and slot mapping (`paged_inputs`).

Two ways to use it:
  - generate() and plain calls lease a cache for (batch, capacity) from the model's pool,
    as with a dense cache; `claim` gives every row ceil(capacity / block_size) blocks;
  - the serving engine keeps one cache, hands blocks to requests with `allocator` as they
    grow, and calls `use_rows` before each step (runtime/engine_paged.py).
"""
from __future__ import annotations

import math

import torch

from ..ir import roles
from ..ir.graph import Graph
from .block_allocator import BlockAllocator, blocks_for


def block_size_of(graph: Graph) -> int:
    return int(graph.state_values[0].shape[1])


def paged_buffer_shapes(graph: Graph, num_blocks: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
    out = []
    for v in graph.state_values:
        if (v.attrs or {}).get("layout") != "paged":
            raise ValueError(f"state {v.state!r} is not paged; a graph's KV cache is all dense or all paged")
        out.append(((num_blocks, int(v.shape[1]), int(v.shape[2]), int(v.shape[3])), v.type.dtype))
    return out


def _check_pool_memory(shapes, num_blocks: int, block_size: int, new_buffer):
    """A pool larger than the device's memory is refused before any allocation, as
    generate() refuses such a cache (the Engine's num_blocks is the caller's to change).
    The device is the one new_buffer allocates on (an empty buffer says which)."""
    from .generate import check_cache_memory, device_memory_bytes

    need = sum(math.prod(shape) * dtype.itemsize for shape, dtype in shapes)
    memory = device_memory_bytes(new_buffer((0,), shapes[0][1]).device)
    per_block = need // num_blocks
    check_cache_memory(need, memory, f"a paged pool of num_blocks={num_blocks} blocks of {block_size} tokens",
                       f"({per_block / 2**10:.4g} KiB a block)",
                       f"pass fxforge.Engine a smaller num_blocks (at most {(memory or 0) // per_block} fit in all; "
                       "the pool needs the blocks of the requests served at once)")


class PagedKVCache:
    def __init__(self, graph: Graph, num_blocks: int, new_buffer):
        """new_buffer(shape, dtype): a zeroed tensor, from the backend that runs the graph."""
        self.block_size = block_size_of(graph)
        self.num_blocks = num_blocks
        shapes = paged_buffer_shapes(graph, num_blocks)
        _check_pool_memory(shapes, num_blocks, self.block_size, new_buffer)
        self.allocator = BlockAllocator(num_blocks)
        self.buffers = [new_buffer(shape, dtype) for shape, dtype in shapes]
        self.batch = self.capacity = 0  # what claim() sized the rows for
        self._owned: list[list[int]] = []  # the rows claim() allocated (an engine's rows are its own)
        self._table = self._counts = None  # tensors of the rows in use, built once per use_rows
        self._host_counts: list[int] = []  # blocks per row in use, on the host
        # the most tokens a row may address: a static step's table width (claim() sets it,
        # the engine sets its max_seq_len); static steps per batch size (static_paged.py)
        self.row_capacity = 0
        self.static_steps: dict = {}

    # -- rows ----------------------------------------------------------------------------
    def claim(self, batch: int, capacity: int):
        """Every row gets the blocks for `capacity` tokens (a generate() call's)."""
        self.release_rows()
        per_row = blocks_for(capacity, self.block_size)
        if batch * per_row > self.num_blocks:
            raise ValueError(f"{batch} row(s) of {capacity} tokens need {batch * per_row} KV cache blocks of "
                             f"{self.block_size}; this cache has {self.num_blocks}")
        self.batch, self.capacity = batch, capacity
        self.row_capacity = max(self.row_capacity, per_row * self.block_size)
        self._owned = [self.allocator.allocate(per_row) for _ in range(batch)]
        self.use_rows(self._owned)

    def release_rows(self):
        """Give back the blocks claim() took."""
        for blocks in self._owned:
            self.allocator.release(blocks)
        self._owned, self._table = [], None

    def use_rows(self, rows: list[list[int]]):
        """The block lists of the rows the next calls run on (row i of the batch is rows[i]).
        The lists are the caller's; the cache keeps only tensors built from them."""
        device = self.buffers[0].device
        width = max([len(r) for r in rows] + [1])
        table = torch.zeros(len(rows), width, dtype=torch.int32)
        for i, blocks in enumerate(rows):
            table[i, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        self._table = table.to(device)
        self._host_counts = [len(r) for r in rows]
        self._counts = torch.tensor(self._host_counts, device=device)

    def rows_table(self) -> tuple[torch.Tensor, list[int]]:
        """The block table of the rows in use [B, width] (int32, on the device) and each
        row's block count (on the host)."""
        if self._table is None:
            raise ValueError("the paged KV cache addresses no rows: call use_rows (or claim) first")
        return self._table, self._host_counts

    def paged_inputs(self, pad: torch.Tensor, start: int, new: int) -> dict:
        """block_table, row_start and slot_mapping for tokens start..start+new-1 of every row
        (row b's token j - pad[b] is at key j; keys before pad[b] are its padding, not stored)."""
        if self._table is None or self._table.shape[0] != pad.shape[0]:
            raise ValueError(f"the paged KV cache addresses {0 if self._table is None else self._table.shape[0]} "
                             f"row(s) but the step has {pad.shape[0]}: call use_rows (or claim) first")
        rel = torch.arange(start, start + new, device=pad.device)[None, :] - pad[:, None]  # [B, T] token index
        valid = rel >= 0
        rel = rel.clamp(min=0)
        index = rel // self.block_size
        short = valid & (index >= self._counts[:, None])
        if bool(short.any()):
            row = int(short.any(dim=1).nonzero()[0])
            raise ValueError(f"row {row} writes token {int(rel[row].max())} but holds "
                             f"{int(self._counts[row])} block(s) of {self.block_size}: allocate its blocks first")
        blocks = torch.gather(self._table, 1, index.clamp(max=self._table.shape[1] - 1)).long()
        slots = torch.where(valid, blocks * self.block_size + rel % self.block_size, -1)
        return {roles.BLOCK_TABLE: self._table, roles.ROW_START: pad.to(torch.int32), roles.SLOT_MAPPING: slots}

    # -- what generate() and the cache pool call (as on a dense KVCache) ------------------
    def prepare(self, pad: torch.Tensor, dtype: torch.dtype):
        pass  # the key bias is small next to the step; built per step

    def inputs_at(self, pad: torch.Tensor, start: int, new: int, dtype: torch.dtype, make=None):
        from .state import step_inputs

        return (make or step_inputs)(pad, start, new, dtype)

    def release_tables(self):
        self.release_rows()

    def fits(self, batch: int, capacity: int) -> bool:
        return batch * blocks_for(capacity, self.block_size) <= self.num_blocks

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)

    def reorder_rows(self, rows: torch.Tensor, length: int):
        """Row i takes the keys and values of row rows[i] (beam search): their blocks' contents
        are copied (every row has blocks of its own)."""
        used = blocks_for(length, self.block_size)
        table = self._table[:, :used].long()
        src, dst = table[rows.to(table.device)].flatten(), table.flatten()
        for buf in self.buffers:
            buf[dst] = buf[src]
