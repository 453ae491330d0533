"""Decode steps of a paged KV cache on static buffers, replayed as CUDA graphs.

The dense static step (static_decode.py) needs a device-side cache length because a dense
graph's kv_append writes at `L`, a Python int. A paged graph does not: it writes through
its slot mapping and reads through its block table, both tensors already, and `L` only
sizes the key bias. So its static step runs the model's own program with

  - the key bias over a fixed width (the rows' block-table width x block size) and `L`
    fixed to that width minus one: keys past the new token, and each row's left padding,
    get the dtype's lowest value (exactly zero weight), as in the dense static step;
  - the block table in a buffer of that fixed width (copied in before each step: the
    engine's rows grow, join and leave), the row starts, and the slot mapping computed
    on the device from the table and the positions, with the positions and the bias (one
    launch on the Triton backends: codegen/kernels/step_inputs.py).

On CUDA the step is captured at its first call per (cache, batch size) and replayed
afterwards; elsewhere it runs uncaptured (tested on the CPU: the eager steps' tokens).

Refused (`paged_static_problem` says why), and decoded eagerly: a sliding window or ALiBi,
which the kernels measure from the last key, here the fixed width's end; graphs that read
the cache length anywhere but the key bias's width.
"""
from __future__ import annotations

import torch

from ..ir import roles
from ..ir.graph import Graph
from .block_allocator import blocks_for
from .static_decode import StaticDecodeStep, _symbols, step_inputs_problem

PAGED_ROLES = {roles.INPUT, roles.CACHE_LEN, roles.POSITIONS, roles.KEY_BIAS, roles.BLOCK_TABLE, roles.ROW_START,
               roles.SLOT_MAPPING}


def paged_static_problem(graph: Graph) -> str | None:
    """Why the decode step of a paged `graph` cannot run on static buffers; None: it can."""
    problem, cache_len = step_inputs_problem(graph, PAGED_ROLES)
    if problem:
        return problem
    for n in graph.nodes:
        if n.op == "paged_attention" and (n.attrs.get("window") is not None or n.attrs.get("alibi")):
            return "a paged attention with a sliding window or ALiBi (measured from the last key)"
        if cache_len in _symbols(n.attrs) or any(cache_len in _symbols(getattr(o, "shape", ())) for o in n.outputs):
            return f"{n.op} reads the cache length"
    return None


class StaticPagedStep(StaticDecodeStep):
    """One-token steps of `model` for `batch` rows of a paged `cache`, each row addressing
    at most `capacity` tokens (the width of its block table)."""

    def __init__(self, model, cache, batch: int, capacity: int):
        self.block_size = cache.block_size
        self.width = blocks_for(capacity, self.block_size)
        super().__init__(model, cache, batch, self.width * self.block_size)
        device = model.device
        self.table = torch.zeros(batch, self.width, dtype=torch.int32, device=device)
        self.row_start = torch.zeros(batch, dtype=torch.int32, device=device)
        self.slots = torch.zeros(batch, 1, dtype=torch.long, device=device)

    def _build_program(self):
        return self.model.program  # no overridden ops: the slots and table carry the position

    def __call__(self, ids: torch.Tensor, start: int, pad: torch.Tensor, host_pad: list[int] | None = None):
        """Logits [batch, 1, vocab] of `ids` [batch, 1] at key `start` (row b's token
        start - pad[b]), over the rows the cache was last given (`use_rows`/`claim`).
        `host_pad`: pad as Python ints, to check every row's blocks on the host (without
        it, the shortest row must hold token `start`)."""
        table, counts = self.cache.rows_table()
        if table.shape[0] != self.batch:
            raise ValueError(f"the paged KV cache addresses {table.shape[0]} row(s); this step runs {self.batch}")
        if table.shape[1] > self.width:
            raise ValueError(f"a row holds {table.shape[1]} blocks; this step's table has {self.width}")
        # a token past its row's blocks would be written through a zero table entry, into
        # another row's block: checked here, on the host, before any work
        tokens = [start - p for p in host_pad] if host_pad is not None else [start] * self.batch
        for row, (token, count) in enumerate(zip(tokens, counts)):
            if token >= count * self.block_size:
                raise ValueError(f"row {row} writes token {token} but holds {count} block(s) of "
                                 f"{self.block_size}: allocate its blocks first")
        self.table[:, table.shape[1]:].zero_()
        self.table[:, :table.shape[1]].copy_(table)
        return super().__call__(ids, start, pad)

    def _paged_buffers(self):
        """The row starts and this token's slot, made on the device from the table with the
        positions and bias (Backend.static_step_inputs: one launch on the Triton backends)."""
        return self.table, self.row_start, self.slots, self.block_size

    def _step_inputs(self) -> dict:
        """The dense step's inputs, `L` fixed to the bias's width, and the paged ones."""
        return {**super()._step_inputs(), roles.CACHE_LEN: self.capacity - 1, roles.BLOCK_TABLE: self.table,
                roles.ROW_START: self.row_start, roles.SLOT_MAPPING: self.slots}


def static_paged_step_for(model, cache, batch: int) -> StaticPagedStep:
    """The static step of `model` for `batch` rows of the paged `cache`, made at its first
    use and kept with the cache; rows address up to `cache.row_capacity` tokens."""
    step = cache.static_steps.get(batch)
    if step is None or step.model is not model or step.capacity < cache.row_capacity:
        step = cache.static_steps[batch] = StaticPagedStep(model, cache, batch, cache.row_capacity)
    return step
