"""The Backend interface: what runs an optimized graph on a device.

A backend owns everything that depends on where and how the graph runs, and nothing else:
  - `check(graph)`: device and dtype checks, with errors that say what to change;
  - `prepare(graph)`: its own planning after the passes (the CPU planners cpu_linear and
    cpu_int4 live in the torch backend), returning the graph, op implementations that
    replace the table's, and report lines;
  - `op_table()`: IR op name -> callable(*tensors, **attrs); ops without a kernel of
    their own run their registry reference, so any graph runs on any backend;
  - kernel compilation (`kernel_sources()` shows what it generated);
  - allocation of state buffers (`new_buffer`): a KV cache today, static CUDA-graph or
    paged buffers later.
  - the process group of a tensor-parallel graph (`process_group`, None: torch.distributed's
    default group): its op table runs the collectives (all_reduce, all_gather) on it
    through torch.distributed (runtime/collectives.py), and `check` refuses a graph
    sharded for another number of ranks.
Later work plugs in here: CUDA-graph capture of the decode step (`TritonBackend`), a paged
KV layout (`new_buffer` and an op table that reads block tables).

A backend is an object made per optimize() call by a factory registered under a name
(`fxforge.register_backend`), so two models never share a backend's caches by accident.
"""
from __future__ import annotations

import torch

from ...ir.graph import Graph
from ...ir.ops import OPS


class Backend:
    name = "?"
    # True when fused_pointwise groups have no kernel here: the program then writes their
    # steps as lines of their own (runtime/program.py), which costs what the unfused ops cost.
    inlines_fused_pointwise = True

    def __init__(self, device: torch.device, process_group=None, **options):
        if options:
            raise TypeError(f"backend {self.name!r} takes no option(s) {sorted(options)}")
        self.device = torch.device(device)
        # the torch.distributed group the graph's collectives run on (None: the default group)
        self.process_group = process_group

    # -- checks and planning ---------------------------------------------------------------
    def check(self, graph: Graph):
        """Raise ValueError if this backend cannot run `graph` on its device (a subclass
        that overrides it calls this one too: it checks the process group)."""
        from ..collectives import check_collectives

        check_collectives(graph, self.process_group)

    def prepare(self, graph: Graph) -> tuple[Graph, dict, list]:
        """(graph, op overrides, report stats) after this backend's own planning."""
        return self.composed(graph), {}, []

    def build(self, graph: Graph, device, filename: str):
        """(program, planned graph, op table, report stats): this backend's planning of
        `graph`, then the program that runs it (what optimize() and the last-token prefill
        program both need)."""
        from ..program import build_program

        planned, overrides, stats = self.prepare(graph)
        ops = {**self.op_table(), **overrides}
        program = build_program(planned, ops, device=device, filename=filename,
                                inline_fused=self.inlines_fused_pointwise)
        return program, planned, ops, stats

    def composed(self, graph: Graph) -> Graph:
        """`graph` with each linear_fused node written as its steps (pointwise groups, linear,
        slices) unless this backend has a kernel for it: then its own linear and pointwise
        implementations run them, as they did before fuse_linear_pointwise. The same for
        rope_attention (passes/fuse_rope_attention.py)."""
        from ...passes import fuse_rope_attention

        ops = self.kernel_ops()
        if "rope_attention" not in ops:  # likewise the rotary + K/V stores + attention op
            graph = fuse_rope_attention.unfuse(graph)
        if "linear_fused" in ops:
            return graph
        from ...passes.fuse_linear_pointwise import unfuse

        return unfuse(graph)

    # -- running -----------------------------------------------------------------------------
    def kernel_ops(self) -> dict:
        """The ops this backend runs with implementations of its own."""
        return {}

    def op_table(self, registry=None) -> dict:
        registry = OPS if registry is None else registry
        from ..collectives import collective_ops

        table = {name: op.reference for name, op in registry.items()}
        table.update(collective_ops(self.process_group))
        table.update(self.kernel_ops())
        return table

    def kernel_sources(self) -> dict[str, str]:
        """name -> source of the kernels generated so far (filled as shapes are first seen)."""
        return {}

    def step_inputs(self, pad: torch.Tensor, start: int, new: int, dtype: torch.dtype):
        """(positions, key bias) of an eager cached step (runtime/state.py step_inputs)."""
        from ..state import step_inputs

        return step_inputs(pad, start, new, dtype, pad.device)

    def static_step_inputs(self, length: torch.Tensor, pad: torch.Tensor, positions: torch.Tensor,
                           bias: torch.Tensor, paged: tuple | None = None):
        """Write a one-token static step's positions [B, 1] and key bias [B, 1, 1, capacity]
        into its buffers, from the cache length (a 0-d device tensor: no host read) and the
        left padding: slots past the new token are masked like padding. `paged`: (block
        table [B, W], row starts [B], slots [B, 1], block size) of a paged step, whose row
        starts (the padding) and slots (from the table and the positions) are written too."""
        torch.clamp(length - pad, min=0, out=positions[:, 0])
        keys = torch.arange(bias.shape[-1], device=bias.device)
        hidden = (keys[None, :] < pad[:, None]) | (keys[None, :] > length)
        bias.zero_()
        bias.masked_fill_(hidden[:, None, None, :], torch.finfo(bias.dtype).min)
        if paged is not None:
            table, row_start, slots, block_size = paged
            row_start.copy_(pad)
            block = torch.gather(table, 1, torch.div(positions, block_size, rounding_mode="floor"))
            torch.add(block.long() * block_size, positions % block_size, out=slots)

    def new_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A zeroed state buffer (KV cache) on this backend's device."""
        return torch.zeros(shape, dtype=dtype, device=self.device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.device})"
