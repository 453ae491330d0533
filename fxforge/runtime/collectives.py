"""Collective ops through torch.distributed, on a backend's process group (tensor
parallelism: the shard pass inserts `all_reduce` and `all_gather` nodes).

gloo runs them on CPU tensors and nccl on CUDA tensors; the process group is made by
`torch.distributed.init_process_group` (torchrun sets the rendezvous variables it reads).
A backend's `process_group` of None means torch.distributed's default group.
"""
from __future__ import annotations

from functools import partial

import torch

from ..ir.graph import Graph
from ..ir.ops import OPS


def group_size(group=None) -> int:
    """Ranks in `group` (the default group when None); 1 when torch.distributed is not
    initialized (a single process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def world_sizes(graph: Graph) -> set[int]:
    """The world sizes the graph's collectives were sharded for."""
    return {int(n.attrs["world_size"]) for n in graph.nodes if n.op in OPS and OPS[n.op].has("collective")}


def check_collectives(graph: Graph, group=None):
    """A graph sharded for N ranks runs only in a process group of N ranks."""
    sizes = world_sizes(graph)
    if not sizes:
        return
    if len(sizes) > 1:
        raise ValueError(f"the graph's collectives disagree on the world size: {sorted(sizes)}")
    (n,) = sizes
    have = group_size(group)
    if n != have:
        where = "a process group of" if have > 1 else "one process, without torch.distributed: world size"
        raise ValueError(f"this graph is sharded for {n} ranks (tensor_parallel={n}) but runs in {where} {have}; "
                         f"launch it with `torchrun --nproc-per-node {n} ...` and call "
                         "torch.distributed.init_process_group() before optimize(), or pass the process group "
                         "(ShardConfig(process_group=...)) whose size it was sharded for")


def all_reduce(x: torch.Tensor, *, world_size: int, group=None) -> torch.Tensor:
    """The sum of `x` over the group's ranks, as a new tensor (x may be read elsewhere)."""
    if world_size == 1:
        return x
    import torch.distributed as dist

    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


def all_gather(x: torch.Tensor, *, dim: int, world_size: int, group=None) -> torch.Tensor:
    """The ranks' `x` concatenated along `dim`, in rank order."""
    if world_size == 1:
        return x
    import torch.distributed as dist

    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim)


def collective_ops(group=None) -> dict:
    """Op table entries running the collectives on `group`."""
    return {"all_reduce": partial(all_reduce, group=group), "all_gather": partial(all_gather, group=group)}


def end_process(group=None, code: int = 0):
    """End a torchrun rank whose work is done: wait for every rank (a barrier), tear the
    process group down, flush, and leave without the interpreter's own teardown. gloo's
    threads can abort the process while Python exits ("terminate called without an active
    exception", SIGABRT) after every result was already right, which torchrun then reports
    as a failed launch; call this only after the rank's work succeeded."""
    import os
    import sys

    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier(group)
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
