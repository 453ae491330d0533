"""Dequantizing a weight for one float GEMM on the CPU, in as few passes over it as we can,
and (opt-in) keeping some dequantized weights so that later calls skip the work.

Why: over a long input (a prompt) a quantized product is cheapest as "dequantize the
weight once, then one float GEMM" (runtime/cpu_quant.py says when). The GEMM is the float
model's own, so what a quantized model pays on top is the dequantization: for SmolLM2's
1536x576 int4 weight about 0.7 ms on one core (2.5 with the table lookup before), against
1.3 ms for the GEMM itself at 128 tokens and 15 ms at 1024 (benchmarks/dequantize.py,
docs/benchmarks.md, issue 20).

The dequantization is `ir.quant_formats.dequantize_weight` itself, written for this: for
int4 the nibbles split with byte operations and `q - z` taken in int8, then two float32
passes (convert, scale), 1.3-3.6x faster than the (zero, byte) table lookup before.

The cache (`DequantizedWeights`) trades back the memory quantization saved, so it is off
unless asked for, with a byte budget. It keeps the *first* weights that fit, not the most
recently used: a forward visits every layer in the same order, and a least-recently-used
cache smaller than the model evicts each weight just before it is needed again (no hit at
all), where keeping a fixed set hits on budget / total of the weights.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..ir.quant_formats import Packed, dequantize_weight
from .derived import Versions


def dequantize_for_matmul(packed: Packed, dtype: torch.dtype) -> Tensor:
    """The float [N, K] weight in `dtype` for one GEMM (computed in float32, then cast)."""
    return dequantize_weight(packed, dtype)


class DequantizedWeights:
    """Dequantized weights kept between calls, up to `budget_bytes` (the first that fit).

    Keyed by the packed weight's own `qweight` tensor (its id, with the tensor kept to make
    the id safe) and the dtype the GEMM runs in. A kept weight whose packed tensors changed
    in place since (fast.state_dict() edits, fast.load_state_dict) is dropped at its next
    use and dequantized again (runtime/derived.py)."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self.misses = 0  # weights met that did not fit: dequantized at every call
        self._kept: dict[tuple[int, torch.dtype], tuple[Tensor, Tensor, Versions]] = {}
        self._refused: set[tuple[int, torch.dtype]] = set()

    def get(self, qweight: Tensor, dtype: torch.dtype) -> Tensor | None:
        key = (id(qweight), dtype)
        hit = self._kept.get(key)
        if hit is None or hit[0] is not qweight:
            return None
        if hit[2].changed():  # edited in place since: dequantized again by weight()
            del self._kept[key]
            self.used_bytes -= hit[1].numel() * hit[1].element_size()
            return None
        return hit[1]

    def weight(self, packed: Packed, dtype: torch.dtype) -> Tensor:
        """The dequantized weight: kept from an earlier call, kept now if it fits, or made
        for this call only."""
        kept = self.get(packed.qweight, dtype)
        if kept is not None:
            return kept
        w = dequantize_for_matmul(packed, dtype)
        key = (id(packed.qweight), dtype)
        size = w.numel() * w.element_size()
        if key not in self._refused:
            if self.used_bytes + size <= self.budget_bytes:
                self._kept[key] = (packed.qweight, w, Versions(*packed.tensors().values()))
                self.used_bytes += size
            else:
                self._refused.add(key)
                self.misses += 1
        return w

    def __len__(self) -> int:
        return len(self._kept)


def dequantized_cache_bytes(value, name: str = "keep_dequantized_mb") -> int:
    """The torch backend's `keep_dequantized_mb` option (or another MiB bound, `name`) as bytes (0: keep nothing)."""
    if value is None or value is False:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != value:
        if name != "keep_dequantized_mb":
            raise ValueError(f"{name}={value!r}: expected a number of MiB >= 0 (0 or None: none, the default)")
        raise ValueError(f"keep_dequantized_mb={value!r}: expected a number of MiB >= 0 of dequantized float "
                         f"weights to keep between calls (0 or None: none, the default; quantized weights "
                         f"then save their memory), e.g. 512")
    return int(value * 2**20)
