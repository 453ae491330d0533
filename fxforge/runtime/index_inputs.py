"""Integer inputs the graph uses only as indices: those may come in a narrower integer dtype.

Token ids captured as int64 and passed as int32 (a tokenizer's or numpy's choice) pick the
same embedding rows: eager's embedding takes either. fxforge widens such an input to the
captured dtype, but only where the graph does nothing else with it: an input that enters
arithmetic (`ids * 1000003`, `ids + 1` returned) would overflow or come back in another
dtype in eager at int32, so there the dtype stays checked.
"""
from __future__ import annotations

import torch

# op -> the input positions it reads as indices (the result does not depend on their dtype)
_INDEX_POSITIONS = {"embedding": (1,)}


def widens_losslessly(given: torch.dtype, captured: torch.dtype) -> bool:
    """An integer dtype (not bool) whose every value the captured integer dtype holds."""
    if given in (torch.bool, captured) or captured == torch.bool:
        return False
    if given.is_floating_point or given.is_complex or captured.is_floating_point or captured.is_complex:
        return False
    a, b = torch.iinfo(given), torch.iinfo(captured)
    return b.min <= a.min and a.max <= b.max


def only_indexes(graph, value) -> bool:
    """Whether the graph reads `value` only as indices (and does not return it)."""
    if any(out is value for out in graph.outputs):
        return False
    used = False
    for node in graph.nodes:
        for pos, x in enumerate(node.inputs):
            if x is value:
                if pos not in _INDEX_POSITIONS.get(node.op, ()):
                    return False
                used = True
    return used
