"""Pause Python's cyclic garbage collector while capture or the pass pipeline runs.

Both stages allocate hundreds of thousands of small objects (fx nodes, fake tensors,
sympy expressions, IR nodes), which sets off many collections, the full ones walking the
whole heap, the model's modules and tensors included: on SmolLM2-135M that was about a
quarter of optimize()'s time. Inside the block reference counting still frees what is not
on a cycle; at its end one young-generation collection frees the cycles the block left
behind (torch.export's traced program, for one), walking only what the block allocated.
"""
from __future__ import annotations

import gc
from contextlib import contextmanager


@contextmanager
def paused_gc():
    """No automatic collection inside the block. Call the work in a function, so that its
    locals are gone (and their cycles collectable) when the block ends. Nested blocks,
    and callers that disabled the collector themselves, keep their setting."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
            gc.collect(0)  # everything allocated inside is still in the young generation
