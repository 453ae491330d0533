"""CPU linear kernels: for each float32 weight shape, the library kernel and weight layout
that run a one-token matrix-vector product fastest, chosen by timing them.

Why: decoding one token is a chain of matrix-vector products bound by reading weights.
PyTorch's `F.linear` on the CPU calls the BLAS (MKL), which on our 2-core AMD EPYC reads a
row-major weight at about 15 GB/s; oneDNN's linear (`torch.ops.mkldnn._linear_pointwise`,
the kernel torch.compile's CPU freezing path uses) reads the same weight stored column-major
at 30-40 GB/s, the machine's memory bandwidth, and is 2-3x faster at prefill sizes too.
Which kernel and layout win depends on the CPU, the shape and the libraries, so nothing is
assumed: each distinct shape is timed with the weights coming from memory, as in decoding,
and F.linear on the weight as given stays unless another candidate is clearly faster.

The values never change, only strides and the kernel, so the IR and its text do not.
Column-major weights are copies: the program no longer reads the model's own weights
(the report gives the bytes). Half precision is left to F.linear.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..ir.graph import Graph
from ..passes.manager import PassStats

# A candidate must beat F.linear on the row-major weight by this much: a near tie is noise.
MIN_SPEEDUP = 1.05
# Bytes of weights each candidate is timed over: more than a server CPU's last-level cache,
# so that the timing sees memory, not cache hits (it picks the wrong layout otherwise).
COLD_BYTES = 40 << 20
MAX_COPIES = 128
# Weights smaller than this are not timed (F.linear stays): they sit in cache, a call costs
# more than the read, and timing hundreds of tiny copies would cost more than it finds.
MIN_TIMED_BYTES = 256 << 10
BASELINE = ("aten", "row")


def onednn_linear(x, w, b=None):
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


KERNELS = {"aten": F.linear, "onednn": onednn_linear}


@dataclass
class CpuLinearPlan:
    """(out, in) -> (kernel, layout) for the float32 linear weights of one graph."""
    choices: dict[tuple[int, int], tuple[str, str]] = field(default_factory=dict)
    speedups: dict[tuple[int, int], float] = field(default_factory=dict)

    def linear(self, x, w, b=None):
        """The torch backend's `linear`: the chosen kernel for this weight shape."""
        choice = self.choices.get(tuple(w.shape)) if x.dtype == torch.float32 and x.device.type == "cpu" else None
        if choice is None:
            return F.linear(x, w, b)
        return KERNELS[choice[0]](x, w, b)

    def apply(self, graph: Graph) -> tuple[Graph, list[str], int]:
        """The graph with column-major copies of the weights whose shape chose that layout."""
        params = dict(graph.params)
        moved, nbytes = [], 0
        for name in _linear_weights(graph):
            w = params[name]
            if self.choices.get(tuple(w.shape), BASELINE)[1] == "column" and w.is_contiguous():
                with torch.no_grad():
                    params[name] = w.detach().t().contiguous().t()
                moved.append(name)
                nbytes += w.numel() * w.element_size()
        out = graph.with_nodes(graph.nodes)
        out.params = params
        return out, moved, nbytes


def plan_cpu_linears(graph: Graph) -> tuple[Graph, CpuLinearPlan, PassStats]:
    """Time the candidates for every float32 weight shape of the graph's linears; return
    the graph with weights in their chosen layout, the plan, and a report line."""
    start = time.perf_counter()
    names = _linear_weights(graph)
    plan = CpuLinearPlan()
    kernels = [k for k in KERNELS if k != "onednn" or onednn_available()]
    for shape in sorted({tuple(graph.params[n].shape) for n in names}):
        if shape[0] * shape[1] * 4 < MIN_TIMED_BYTES:
            continue
        times = {(k, layout): _cold_time(KERNELS[k], shape, layout) for k in kernels for layout in ("row", "column")}
        best = min(times, key=times.get)
        speedup = times[BASELINE] / times[best]
        if best != BASELINE and speedup >= MIN_SPEEDUP:
            plan.choices[shape] = best
            plan.speedups[shape] = speedup
    out, moved, nbytes = plan.apply(graph)
    picked = Counter("_".join(plan.choices[shape]) for shape in (tuple(graph.params[n].shape) for n in names)
                     if shape in plan.choices)
    notes = []
    for shape, (k, layout) in sorted(plan.choices.items()):
        notes.append(f"[{shape[0]}, {shape[1]}]: {k} on {layout}-major weights, "
                     f"{plan.speedups[shape]:.2f}x faster than F.linear at one token")
    if picked:
        notes.append(f"{sum(picked.values())} of {len(names)} float32 linear weights on a faster kernel; "
                     f"{len(moved)} stored column-major ({nbytes / 2**20:.1f} MiB of copies)")
    elif names:
        notes.append(f"F.linear kept for all {len(names)} float32 linear weights (none faster, or under "
                     f"{MIN_TIMED_BYTES >> 10} KiB)")
    stats = PassStats("cpu_linear", time.perf_counter() - start, len(graph.nodes), len(out.nodes), rules=picked,
                      notes=notes, details={"cpu_linear": {"choices": dict(plan.choices), "column_major": moved,
                                                           "bytes": nbytes}})
    return out, plan, stats


def onednn_available() -> bool:
    """oneDNN's linear is an internal op of PyTorch's CPU build: check it runs and agrees."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    try:
        x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
        return torch.allclose(onednn_linear(x, w, b), F.linear(x, w, b), atol=1e-5)
    except (RuntimeError, NotImplementedError):
        return False


def _linear_weights(graph: Graph) -> list[str]:
    seen: dict[str, None] = {}
    for node in graph.nodes:
        if node.op == "linear":
            name = node.inputs[1].param
            w = graph.params.get(name) if name else None
            if w is not None and w.dim() == 2 and w.dtype == torch.float32 and w.device.type == "cpu":
                seen[name] = None
    return list(seen)


def _cold_time(kernel, shape: tuple[int, int], layout: str, repeat: int = 2) -> float:
    """Seconds per call of `kernel` on one row, over enough weight copies to overflow the
    last-level cache (every weight is read once per token from memory when decoding)."""
    out_features, in_features = shape
    copies = min(MAX_COPIES, max(1, COLD_BYTES // (out_features * in_features * 4)))
    if layout == "row":
        weights = [torch.zeros(out_features, in_features) for _ in range(copies)]
    else:
        weights = [torch.zeros(in_features, out_features).t() for _ in range(copies)]
    x = torch.randn(1, in_features)

    def sweep():
        for w in weights:
            kernel(x, w)

    sweep()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        sweep()
        best = min(best, time.perf_counter() - start)
    return best / copies
