"""Capture of one torch.compile subgraph: torch.export of its SubgraphModule on the real
example tensors, with exactly the dims dynamo made dynamic marked dynamic, then fxforge's
ordinary lowering (ir/capture.py).

Why not capture_with_spec(): it guesses the dynamic dims (batch and sequence of every
input) and grows the example to trace them, which is right for a model's forward but not
for a dynamo graph that hard-codes the sizes it specialised (a view(1, s0, 4, 16) breaks on
a batch of 2). Dynamo already knows which dims are dynamic: use those.

A dynamo graph may write its inputs and buffers in place (`x[:, 1].mul_(3)`, a cache
row). fxforge's IR has no aliasing, so such writes are made functional by torch first, as
optimize() does, and each written input or buffer gets its final value copied back in
one whole-tensor `copy_` at the end (writeback.py): the IR stays SSA, the caller's tensors
change as in eager, and an output is a new tensor where eager's is. Direct writes to a
whole input (a cache's index_copy_) stay in-place calls.
"""
from __future__ import annotations

import contextlib
import logging

import torch

from ..ir.capture import CaptureError, _lower_exported, _trace_settings, _without_partial_graph_dump
from .subgraph import SubgraphModule, dynamic_dims
from .writeback import functional_with_writeback, writes_only_whole_inputs


def capture_subgraph(module: SubgraphModule, example_inputs):
    """(graph, call spec) of `module`, called with the user tensors among `example_inputs`."""
    from torch.export import Dim

    layout = module.layout
    dims = dynamic_dims(module.dynamo_graph, layout)
    tensors = tuple(_real(example_inputs[pos]) for pos in layout.user)
    # a dynamic dim at 0 or 1 is captured at that size: export traces dynamic sizes as >= 2
    # (a squeeze(1) would vanish); the backend keeps this model for calls at that size only
    shapes = tuple({d: Dim.DYNAMIC for d in dims[pos] if t.shape[d] >= 2} or None
                   for pos, t in zip(layout.user, tensors))
    # forward(*tensors): export wants one entry for the whole varargs tuple
    dynamic_shapes = (shapes,) if any(s is not None for s in shapes) else None
    try:
        # the user's backed_size_oblivious (which torch.compile honours) would trace a dim
        # captured at 1 as if it were >= 2
        # a failed trace's partial graph (torch prints it, a hundred lines) goes: the fallback
        # warning says what failed, in one line
        with torch.no_grad(), _trace_settings(stack_traces=False), _without_partial_graph_dump(), \
                _quiet_shape_log(), torch.fx.experimental._config.patch(backed_size_oblivious=False):
            ep = torch.export.export(module, tensors, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:  # export raises many kinds; the backend falls back on any
        raise CaptureError(f"torch.export could not capture the subgraph: {type(e).__name__}: "
                           f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
    if not writes_only_whole_inputs(ep):  # (one scan: it holds where nothing needs functionalizing)
        ep = functional_with_writeback(ep)
    return _lower_exported(ep, {}, module)


@contextlib.contextmanager
def _quiet_shape_log():
    """torch's shape solver logs warnings about a failing trace ("Unable to find user code
    corresponding to {zuf3}") that the fallback's one line already covers."""
    logger = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _real(x: torch.Tensor) -> torch.Tensor:
    """A real tensor for a (possibly fake) example: only its shape, dtype and device matter
    to the trace. Dynamo's size hints give the concrete sizes."""
    if not isinstance(x, torch._subclasses.FakeTensor):
        return x
    shape = [s.node.hint if isinstance(s, torch.SymInt) else int(s) for s in x.shape]
    if any(s is None for s in shape):
        raise CaptureError("a fake example input has a size with no hint")
    return torch.zeros(shape, dtype=x.dtype, device=x.device)
