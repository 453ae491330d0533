"""CPU int4 products: PyTorch's packed 4-bit matmul for the graph's int4 `quant_linear`s.

Why: without it the torch backend dequantizes an int4 weight at every call (unpack the
nibbles, subtract the zero points, scale) and then multiplies, which costs far more than
the product itself (tens of ms for one SmolLM2 weight at one token). PyTorch's CPU build
has a kernel that multiplies straight from 4-bit weights with per-group scales and zeros,
`aten._weight_int4pack_mm_for_cpu` (what torchao's int4 CPU layout calls). It reads its own
weight layout, made once here by `aten._convert_weight_to_int4pack_for_cpu`, and a table of
[K // group, N, 2] (scale, zero) pairs in the activation dtype.

Its dequantization is `(q - 8) * scale + zero`; ours (ir/quant_formats.py) is
`(q - z) * scale`, integer or float `z`. The two agree for `zero = (8 - z) * scale`, so the
values are the IR's (up to float rounding; in bfloat16 the table is rounded to bfloat16,
as for the int8 path's scales). The IR does not change: the plan holds the repacked
copies, and runtime/cpu_quant.py sends a call to the kernel when it is short enough; the
copies cost half a byte per weight (the report says how much). A copy follows its weight:
after an in-place edit of the int4 weight, its scales or zeros (`fast.state_dict()`,
`fast.load_state_dict`), its first use repacks it (runtime/derived.py); scales edited below
what the activation dtype's table holds send that weight's products to the dequantizing path.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from ..ir.graph import Graph
from ..ir.quant_formats import Int4Packed, unpack_nibbles
from ..passes.manager import PassStats
from .derived import Versions

# The kernel's own limit: its packed layout interleaves blocks of 16 output rows.
N_MULTIPLE = 16
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Above this many activation rows, dequantizing the weight once and calling the float
# matmul is faster: the packed kernel costs the same per row at any row count (it is a
# matrix-vector loop), vectorized only for bfloat16. Measured on this 2-core CPU for
# SmolLM2's 576x1536 and 1536x576 weights at group 64 (docs/benchmarks.md, issue 20):
# float32 0.7 ms per row against 3.6 ms for dequantize + matmul at 1 row, 4.7 ms at 64;
# float16 1.1 ms per row; bfloat16 0.011 ms per row, even with dequantize+matmul near 1024.
# A fixed rule, not a timing at optimize(), so the program is the same on every run
# (runtime/cpu_quant.py applies it; with AMX, bfloat16 switches much earlier).
DEQUANTIZE_ABOVE_ROWS = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 768}


@dataclass
class _Int4Weight:
    qweight: Tensor   # the graph's own packed weight: identifies the call (and keeps its id alive)
    packed: Tensor    # the kernel's layout
    scale_zero: Tensor  # [K // group, N, 2] in the activation dtype
    group_size: int
    out_features: int
    # the kernel's OpOverload, looked up once: calling it skips the op packet's overload
    # resolution, a few microseconds of each of a decode step's ~120 int4 products
    mm: Callable
    source: Int4Packed | None = None  # the graph's weight (its tensors), repacked after an edit
    watch: Versions | None = None  # their versions when this was packed
    dequantize: bool = False  # edited scales the kernel's table cannot hold: dequantize instead


def refresh_int4(weight: _Int4Weight):
    """Repack `weight` from its source, whose tensors changed in place since it was packed."""
    dtype = weight.scale_zero.dtype
    weight.dequantize = not _scales_hold_in(weight.source.scales, dtype)
    if not weight.dequantize:
        fresh = prepare_int4(weight.source, dtype)
        weight.packed, weight.scale_zero = fresh.packed, fresh.scale_zero
    weight.watch.renew()


@dataclass
class CpuInt4Plan:
    """The int4 weights of one graph in PyTorch's packed int4 CPU layout."""
    weights: dict[int, _Int4Weight] = field(default_factory=dict)  # id(qweight) -> its kernel data


def int4pack_linear(x: Tensor, weight: _Int4Weight, bias: Tensor | None = None) -> Tensor:
    """y = x @ W.T (+ bias) in x's dtype, W read from the packed int4 layout."""
    if weight.watch is not None and weight.watch.changed():
        refresh_int4(weight)
    if weight.dequantize:
        from .torch_kernels import quant_linear_torch

        return quant_linear_torch(x, weight.source, bias)
    k = x.shape[-1]
    rows = x.view(-1, k) if x.is_contiguous() else x.reshape(-1, k).contiguous()
    y = weight.mm(rows, weight.packed, weight.group_size, weight.scale_zero)
    if bias is not None:
        y = (y.float() + bias.float()).to(x.dtype)
    return y.view(x.shape[:-1] + (weight.out_features,))


def prepare_int4(packed: Int4Packed, dtype: torch.dtype) -> _Int4Weight:
    """Repack one int4 weight for the kernel, for activations of `dtype`."""
    n, _ = packed.shape
    q = unpack_nibbles(packed.qweight).to(torch.int32)
    kernel_layout = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    scales = packed.scales.float()
    zeros = (8.0 - packed.zeros.float()) * scales
    scale_zero = torch.stack([scales.t(), zeros.t()], dim=-1).contiguous().to(dtype)
    return _Int4Weight(packed.qweight, kernel_layout, scale_zero, packed.group_size, n,
                       torch.ops.aten._weight_int4pack_mm_for_cpu.default, packed,
                       Versions(packed.qweight, packed.scales, packed.zeros))


def _scales_hold_in(scales: Tensor, dtype: torch.dtype) -> bool:
    """Whether every nonzero group scale is a normal number of `dtype`: the kernel reads its
    (scale, zero) table in the activations' dtype, and a float16 table flushes scales under
    6.1e-5 to subnormals or zero (a row of weights near 1e-6 came out 9% off at one row,
    exact on the dequantizing path that longer inputs take)."""
    tiny = torch.finfo(dtype).tiny
    nonzero = scales[scales != 0].abs()
    return nonzero.numel() == 0 or bool(nonzero.min() >= tiny)


def int4pack_available() -> bool:
    """The kernel is an internal op of PyTorch's CPU build: check it is there and agrees."""
    ops = torch.ops.aten
    if not (hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")):
        return False
    from ..ir.quant_formats import dequantize_weight, quantize_weight

    try:
        gen = torch.Generator().manual_seed(0)
        packed = quantize_weight(torch.randn(16, 64, generator=gen, device="cpu"), "int4", group_size=32)
        x = torch.randn(2, 64, generator=gen, device="cpu")
        y = int4pack_linear(x, prepare_int4(packed, torch.float32))
        return torch.allclose(y, x @ dequantize_weight(packed).t(), rtol=1e-4, atol=1e-4)
    except (RuntimeError, NotImplementedError):
        return False


def plan_cpu_int4(graph: Graph) -> tuple[CpuInt4Plan, PassStats | None]:
    """Repack every int4 weight of the graph's `quant_linear`s the kernel can take; the plan
    and a report line (None when the graph has no int4 weight)."""
    start = time.perf_counter()
    nodes = [n for n in graph.nodes if n.op == "quant_linear" and dict(n.attrs["qattrs"]).get("scheme") == "int4"]
    if not nodes:
        return CpuInt4Plan(), None
    plan, skipped, nbytes = CpuInt4Plan(), Counter(), 0
    available = int4pack_available()
    for node in nodes:
        attrs = dict(node.attrs["qattrs"])
        n_out = attrs["shape"][0]
        dtype = node.inputs[0].type.dtype
        if not available:
            skipped["PyTorch's int4 CPU kernel is missing or disagrees"] += 1
        elif n_out % N_MULTIPLE:
            skipped[f"out_features not a multiple of {N_MULTIPLE}"] += 1
        elif dtype not in DTYPES:
            skipped[f"activations in {dtype}"] += 1
        else:
            parts = node.attrs["parts"]
            tensors = {p: graph.params[v.param] for p, v in zip(parts, node.inputs[1:])}
            if not _scales_hold_in(tensors["scales"], dtype):
                skipped[f"group scales below {dtype}'s normal range (the kernel's {dtype} scale table would "
                        f"lose them)"] += 1
            elif id(tensors["qweight"]) not in plan.weights:
                weight = prepare_int4(Int4Packed.from_parts(tensors, attrs), dtype)
                plan.weights[id(tensors["qweight"])] = weight
                nbytes += sum(t.numel() * t.element_size() for t in (weight.packed, weight.scale_zero))
    notes = []
    if plan.weights:
        notes.append(f"{len(plan.weights)} int4 weights multiply on PyTorch's packed int4 CPU kernel "
                     f"({nbytes / 2**20:.1f} MiB of repacked copies)")
    notes += [f"{count} int4 products dequantize at each call: {why}" for why, count in sorted(skipped.items())]
    stats = PassStats("cpu_int4", time.perf_counter() - start, len(graph.nodes), len(graph.nodes),
                      rules=Counter({"int4pack": len(plan.weights)}) if plan.weights else Counter(), notes=notes,
                      details={"cpu_int4": {"weights": len(plan.weights), "bytes": nbytes, "skipped": dict(skipped)}})
    return plan, stats
