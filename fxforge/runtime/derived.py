"""Copies a backend derives from the graph's weights, kept in step with the weights.

The torch backend's CPU planners run some products from copies of their weights: a
column-major or oneDNN-packed copy of a float32 weight (cpu_linear.py), PyTorch's int4
layout and (scale, zero) table (cpu_int4.py), oneDNN's prepacked int8 weight (cpu_int8_digits.py),
a dequantized weight kept between calls (cpu_dequant.py, opt-in).

Why this module: `fast.state_dict()` hands out the graph's own tensors, sharing storage as
nn.Module's does, and `fast.load_state_dict()` writes into them. Code that edits weights in
place (merging a LoRA adapter, pruning, `sd[k].mul_(0.5)`) then changes what some paths read
and not others: a float32 Llama whose q/k/v weight was halved answered 0.87 off the edited
eager model (the one-row product read the old column-major copy), and an int4 model gave a
1-token call and the same token in an 8-token call answers 0.23 apart (packed copy against
dequantizing the live weight). So each copy remembers its sources' version counters
(`Tensor._version`, which every in-place op bumps, through any view or `detach()`) and is
made again at its first use after one changed: every path then reads the edited values,
and `fast.save()` (which writes the sources) saves what the model computes.

Cost: one counter read per source at each use of a copy, about 0.1 us (measured on a
loaded 2-core CPU: 0.15-0.25 us per read), against tens of microseconds or more for the
product itself. Handing out copies from state_dict() instead would cost nothing per call
but break what a torch user expects (that `state_dict()` shares storage); an edit would
silently not apply at all.

Not seen: tensors made under `torch.inference_mode()` (a model optimized inside it) keep
no version counter. Their copies follow the count of `load_state_dict` calls instead
(`EDITS`): load_state_dict always refreshes; an in-place edit of such a weight made inside
inference_mode is not seen (README.md says to use load_state_dict there). `.data` edits are not
seen either: `.data` is a tensor with a version counter of its own (torch's own autograd does
not see them).
"""
from __future__ import annotations

import torch


class _EditCount:
    """Stands in for the version counter of an inference tensor: load_state_dict bumps it."""
    __slots__ = ("_version",)

    def __init__(self):
        self._version = 0


EDITS = _EditCount()


def edited():
    """Say that weights changed by other means than an in-place op with a version counter
    (load_state_dict writing into inference tensors)."""
    EDITS._version += 1


def holder(tensor: torch.Tensor):
    """What to read `_version` from to see whether `tensor`'s values changed."""
    return EDITS if tensor.is_inference() else tensor


class Versions:
    """The version counters of a copy's sources, as they were when it was made."""
    __slots__ = ("holders", "seen")

    def __init__(self, *tensors: torch.Tensor):
        self.holders = tuple(holder(t) for t in tensors if t is not None)
        self.seen = [h._version for h in self.holders]

    def changed(self) -> bool:
        # (called at every use of a copy: the first three written out, half the time of a loop)
        h, seen = self.holders, self.seen
        n = len(h)
        if n == 0:
            return False
        if h[0]._version != seen[0] or (n > 1 and h[1]._version != seen[1]) or (n > 2 and h[2]._version != seen[2]):
            return True
        return n > 3 and any(x._version != v for x, v in zip(h[3:], seen[3:]))

    def renew(self):
        """Note the sources' versions now (after the copy was made again)."""
        self.seen = [h._version for h in self.holders]


def rewrite(target: torch.Tensor, source: torch.Tensor):
    """target[...] = source, in place (the program holds `target`): under inference_mode so
    that a copy made inside it, an inference tensor, can be written too."""
    with torch.inference_mode():
        target.copy_(source)
