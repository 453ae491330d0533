"""Device scratch for kernels whose programs combine partial results in one launch: the
arrival counters (and small tables) of the split-K quantized GEMV (quant_gemv.py) and of
the decode MLP (decode_mlp.py).

The pattern both kernels follow: every program stores its partial (float32) to a scratch
buffer, `tl.debug_barrier()`, then `tl.atomic_add(counter, 1, sem="acq_rel")`; the program
that sees the count of all but itself arrives last, sets the counter back to 0
(`tl.atomic_xchg`) and sums the partials in a fixed order (deterministic), reading them
with `cache_modifier=".cg"` (at L2, never a stale L1 line). So the counters are zero between
launches with no memset and no host state: what a CUDA-graph replay needs.

The buffers live in an explicit registry per device, made (zeroed) on first use outside a
CUDA-graph capture and kept; inside a capture a fresh buffer is made and captured with the
call, and not kept (its memory belongs to the graph's pool).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

# device -> name -> buffer. The one piece of module state: a cache of device memory.
SCRATCH: dict[torch.device, dict[str, Tensor]] = {}


def capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def device_buffer(device: torch.device, name: str, make: Callable[[torch.device], Tensor]) -> Tensor:
    """The buffer `name` of `device`, made by `make(device)` the first time."""
    found = SCRATCH.get(device, {}).get(name)
    if found is not None:
        return found
    made = make(device)
    if not capturing(device):
        SCRATCH.setdefault(device, {})[name] = made
    return made


def counters(device: torch.device, name: str, n: int) -> Tensor:
    """n int32 arrival counters, zero between launches (the kernels reset what they use).
    Each kernel family names its own, so two kinds of kernels never share a counter."""
    return device_buffer(device, name, lambda d: torch.zeros(n, dtype=torch.int32, device=d))
