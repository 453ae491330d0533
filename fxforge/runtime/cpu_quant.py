"""Which kernel each quantized product takes on the CPU, chosen per call by the number of
activation rows, and the report line that says which path each linear takes.

Paths (torch backend on the CPU):
- "int8digits": int8 weights with float32 (or float16) activations on a CPU with AMX: x split
  into three int8 digits, three exact int8 products on oneDNN's prepacked copy of the
  weight (runtime/cpu_int8_digits.py): float32's accuracy, faster than the float32 GEMM
  itself at every row count measured, so it replaces both int8 paths below there;
- "int4pack": PyTorch's packed int4 kernel on a repacked copy (runtime/cpu_int4.py);
- "int8pack" and the rest: the backend's own quant_linear (runtime/torch_kernels.py:
  torch._weight_int8pack_mm for int8 where it pays off, else dequantize + matmul);
- "dequantize": dequantize the weight in few passes (runtime/cpu_dequant.py), then one
  GEMM: in bfloat16 for bfloat16 activations (the dtype the user asked the products in),
  else in float32 like the IR's reference;
- "kept": a weight the opt-in cache holds dequantized: one GEMM, nothing to dequantize.

Why per call: the packed kernels are matrix-vector loops, costing the same per row at any
row count, so they win at decode (1-8 rows) and lose badly on a prompt, where one GEMM over
the dequantized weight wins (issue 20: a 1024-token int4 forward took 290 s through the
kernel). Where the switch lies is a fixed rule of the scheme, activation dtype and CPU
(`dequantize_above_rows`), not a timing, so that every run builds the same program.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ir.graph import Graph
from ..ir.quant_formats import Packed
from ..passes.manager import PassStats
from . import cpu_int4, cpu_int8_digits
from .cpu_dequant import DequantizedWeights, dequantize_for_matmul

SCHEMES = ("int8", "int4", "nf4")  # w8a8 quantizes its activations: its own path in torch_kernels
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# With AMX, a bfloat16 GEMM runs at several times float32's speed, so dequantize + GEMM
# beats the packed bfloat16 kernels from about this many rows on. Measured on a 2-core
# Sapphire Rapids for SmolLM2's 1536x576 and 576x1536 weights (one thread, ms): int4 kernel
# 0.15 at 1 row, 0.29 at 8, 2.8 at 128, 73 at 1024; dequantize + bfloat16 GEMM 2.1 to 2.8
# up to 128 rows, 17 at 1024; int8's kernel alike (docs/benchmarks.md, issue 20).
AMX_BF16_ABOVE_ROWS = 64
# Without AMX no bfloat16 GEMM is fast, and _weight_int8pack_mm in bfloat16 stays ahead at
# every row count (docs/benchmarks.md, issue 5); int8's float32/float16 kernel only at 1-2 rows.
NEVER = 1 << 62
INT8_ABOVE_ROWS = {torch.float32: 2, torch.float16: 2, torch.bfloat16: NEVER}
# int8 digits (runtime/cpu_int8_digits.py) with AMX, float32 activations (float16: upcast,
# exact): faster than both other paths from one row on, for weights with enough outputs to
# pay for splitting x. One thread, loaded 2-core machine, ms, SmolLM2's int8 weights as the
# graph has them (qkv 960x576, o 576x576, gate_up 3072x576, down 576x1536), digits against
# the better of _weight_int8pack_mm and dequantize + float32 GEMM: 0.18-0.50 vs 0.22-1.18
# at 1 row, 0.21-0.57 vs 0.33-1.92 at 8, 0.72-1.81 vs 0.88-4.46 at 128, 4.2-12.3 vs 5.4-36.7
# at 1024 (docs/benchmarks.md). Rows above this many take the digits.
DIGITS_ABOVE_ROWS = {torch.float32: 0, torch.float16: 0, torch.bfloat16: NEVER}
# Splitting x costs as much as a float32 GEMM with a few hundred outputs: a 192x576 weight
# (SmolLM2's k or v, where they are not fused) lost at every row count (0.14 against 0.08
# ms at 1 row, 2.6 against 1.8 at 1024); 576x576 wins at every row count measured.
DIGITS_MIN_OUT_FEATURES = 512


def amx_available() -> bool:
    """Whether this CPU has AMX tiles (bfloat16 GEMMs several times faster than float32)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def dequantize_above_rows(scheme: str, dtype: torch.dtype, amx: bool, on_int4_kernel: bool = True) -> int:
    """Above how many activation rows a product of `scheme` in `dtype` dequantizes and runs
    one GEMM instead of its packed kernel (0: always; it has no kernel)."""
    if scheme == "int4":
        if not on_int4_kernel:
            return 0
        if dtype == torch.bfloat16 and amx:
            return AMX_BF16_ABOVE_ROWS
        return cpu_int4.DEQUANTIZE_ABOVE_ROWS[dtype]
    if scheme == "int8":
        if dtype == torch.bfloat16 and amx:
            return AMX_BF16_ABOVE_ROWS
        return INT8_ABOVE_ROWS[dtype]
    return 0  # nf4: no packed kernel


def digits_above_rows(scheme: str, dtype: torch.dtype, amx: bool, shape: tuple[int, int]) -> int:
    """Above how many activation rows a product of `scheme` in `dtype` with a weight of
    `shape` (out, in features) runs on int8 digits (NEVER: not at all). Only int8 weights,
    only with AMX (exact int32 sums in hardware, and the speed measured), only rows short
    enough for exact int32 sums, only weights with enough outputs."""
    out_features, in_features = shape
    if scheme != "int8" or not amx or in_features > cpu_int8_digits.MAX_K \
            or out_features < DIGITS_MIN_OUT_FEATURES:
        return NEVER
    return DIGITS_ABOVE_ROWS[dtype]


@dataclass
class _Weight:
    qweight: Tensor  # identifies the call (and keeps the id alive)
    packed: Packed
    above_rows: dict  # activation dtype -> rows above which it dequantizes
    digits_above: dict = field(default_factory=dict)  # activation dtype -> rows above which it takes the digits
    digits: cpu_int8_digits.DigitWeight | None = None  # the prepacked copy, where some dtype takes them


@dataclass
class CpuQuantPlan:
    """The quantized weights of one graph, with how each one's products run."""
    weights: dict[int, _Weight] = field(default_factory=dict)  # id(qweight) -> weight
    int4: cpu_int4.CpuInt4Plan = field(default_factory=cpu_int4.CpuInt4Plan)
    kept: DequantizedWeights | None = None  # the opt-in cache of dequantized weights
    # id(qweight) -> (qweight, activation dtype, rows up to which, its kernel data): the int4
    # products `path` sends to the packed kernel at few rows, decided here once so that a
    # decode step's calls skip the per-call choice (filled by plan_cpu_quant; empty with
    # `kept`, whose contents change between calls)
    int4_direct: dict = field(default_factory=dict)

    def path(self, qweight: Tensor, dtype: torch.dtype, rows: int) -> str:
        """The path a call with `rows` activation rows in `dtype` takes (what wrap runs)."""
        weight = self.weights.get(id(qweight))
        if weight is None or weight.qweight is not qweight or dtype not in DTYPES:
            return "fallback"
        if weight.digits is not None and rows > weight.digits_above.get(dtype, NEVER):
            return "int8digits"  # (before "kept": faster than a float GEMM from a few rows on, at no memory)
        if self.kept is not None and self.kept.get(qweight, _gemm_dtype(dtype)) is not None \
                and (dtype != torch.bfloat16 or rows > weight.above_rows[dtype]):
            return "kept"  # (in float32 a kept weight's GEMV beats the packed kernels at any row count)
        if rows > weight.above_rows[dtype]:
            return "dequantize"
        on_kernel = self.int4.weights.get(id(qweight))
        return "int4pack" if on_kernel is not None and on_kernel.scale_zero.dtype == dtype else "fallback"

    def wrap(self, fallback: Callable) -> Callable:
        """The backend's `quant_linear`, choosing each call's path; anything this plan does
        not know goes to `fallback` (the backend's own)."""
        direct = self.int4_direct

        def quant_linear(x, *tensors, parts, qattrs, bias):
            qweight = tensors[parts.index("qweight")]  # every packed scheme has one
            known = direct.get(id(qweight))
            if known is not None and not bias and known[0] is qweight and x.dtype == known[1] and x.dim() \
                    and 0 < x.numel() <= known[2] * x.shape[-1]:  # what path() says, without asking it
                return cpu_int4.int4pack_linear(x, known[3])
            b = tensors[len(parts)] if bias else None
            rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
            path = self.path(qweight, x.dtype, rows) if rows else "fallback"
            if path == "int4pack":
                return cpu_int4.int4pack_linear(x, self.int4.weights[id(qweight)], b)
            if path == "int8digits":
                y = cpu_int8_digits.digit_linear(x, self.weights[id(qweight)].digits, b)
                if y is not None:
                    return y
                # a row with inf/NaN (or tiny): the float path gives the reference's inf/NaN
            if path == "fallback":
                return fallback(x, *tensors, parts=parts, qattrs=qattrs, bias=bias)
            packed = self.weights[id(qweight)].packed
            dtype = _gemm_dtype(x.dtype)
            w = self.kept.weight(packed, dtype) if self.kept is not None else dequantize_for_matmul(packed, dtype)
            return gemm(x, w, b)
        return quant_linear


def _gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    # bfloat16 activations: the user asked for bfloat16 products (QuantConfig.compute_dtype),
    # and a bfloat16 GEMM is fast on CPUs with bfloat16 units; float16 GEMMs are not, so
    # float16 runs in float32, as the reference does.
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def gemm(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    """y = x @ w.T (+ bias) in w's dtype, returned in x's dtype; the bias is added in float32."""
    y = F.linear(x.reshape(-1, x.shape[-1]).to(w.dtype), w)
    if bias is not None:
        y = y.float() + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])


def plan_cpu_quant(graph: Graph, int4_plan: cpu_int4.CpuInt4Plan,
                   keep_bytes: int = 0) -> tuple[CpuQuantPlan, PassStats | None]:
    """The plan for every int8 / int4 / nf4 `quant_linear` of the graph, and a report line
    per (scheme, activation dtype) saying which path its products take at which row counts
    (None when the graph has none)."""
    start = time.perf_counter()
    amx = amx_available()
    digits_ok = None  # checked once, at the first weight that would take the digits
    digit_bytes = 0
    plan = CpuQuantPlan(int4=int4_plan, kept=DequantizedWeights(keep_bytes) if keep_bytes else None)
    groups: Counter = Counter()
    per_weight = {}
    for node in graph.nodes:
        if node.op != "quant_linear":
            continue
        attrs = dict(node.attrs["qattrs"])
        scheme, dtype = attrs.get("scheme"), node.inputs[0].type.dtype
        if scheme not in SCHEMES or dtype not in DTYPES:
            continue
        parts = node.attrs["parts"]
        tensors = {p: graph.params[v.param] for p, v in zip(parts, node.inputs[1:])}
        qweight = tensors["qweight"]
        weight = plan.weights.get(id(qweight))
        if weight is None:
            on_kernel = id(qweight) in int4_plan.weights
            weight = _Weight(qweight, Packed.from_parts(tensors, attrs),
                             {d: dequantize_above_rows(scheme, d, amx, on_kernel) for d in DTYPES})
            plan.weights[id(qweight)] = weight
        digits_above = digits_above_rows(scheme, dtype, amx, tuple(weight.packed.shape))
        if digits_above < NEVER and digits_ok is None:
            digits_ok = cpu_int8_digits.digits_available()
        if digits_above < NEVER and digits_ok:
            if weight.digits is None:
                weight.digits = cpu_int8_digits.prepack(qweight, tensors["scale"])
                digit_bytes += qweight.numel()
            weight.digits_above[dtype] = digits_above
        above = weight.above_rows[dtype]
        short = "none" if above == 0 else ("int4pack" if id(qweight) in int4_plan.weights else
                                          "int8pack" if scheme == "int8" else "fallback")
        long_ = "never" if above >= NEVER else "dequantize"
        if dtype in weight.digits_above:  # (from one row on: neither of the others is taken)
            short, above, long_ = "none", weight.digits_above[dtype], "int8digits"
        groups[(scheme, str(dtype).removeprefix("torch."), short, min(above, NEVER), long_)] += 1
        per_weight[node.inputs[1].param] = {"scheme": scheme, "dtype": str(dtype).removeprefix("torch."),
                                            "kernel_up_to_rows": above if above < NEVER else None,
                                            "short": short, "long": long_}
    if not plan.weights:
        return plan, None
    if plan.kept is None:
        for key, weight in plan.weights.items():
            on_kernel = int4_plan.weights.get(key)
            if on_kernel is not None and weight.digits is None:
                dtype = on_kernel.scale_zero.dtype
                plan.int4_direct[key] = (weight.qweight, dtype, weight.above_rows[dtype], on_kernel)
    notes = [_group_note(*key, count) for key, count in sorted(groups.items())]
    if digit_bytes:
        notes.append(f"int8 digits: {digit_bytes / 2**20:.1f} MiB of int8 weights prepacked for oneDNN "
                     f"(a second copy, one byte per weight)")
    elif digits_ok is False:
        notes.append("int8 digits: not taken, oneDNN's quantized linear is missing or disagrees here")
    if plan.kept is not None:
        notes.append(f"keep_dequantized_mb: up to {keep_bytes / 2**20:.0f} MiB of dequantized weights kept "
                     f"between calls (the first that fit; costs the memory quantization saved)")
    stats = PassStats("cpu_quant", time.perf_counter() - start, len(graph.nodes), len(graph.nodes),
                      rules=Counter({f"{k[0]}_{k[1]}": c for k, c in groups.items()}), notes=notes,
                      details={"cpu_quant": {"amx": amx, "keep_bytes": keep_bytes, "digit_bytes": digit_bytes,
                                             "weights": per_weight}})
    return plan, stats


def _group_note(scheme, dtype, short, above, long_, count) -> str:
    gemm_in = "bfloat16" if dtype == "bfloat16" else "float32"
    if long_ == "int8digits":
        when = "at every call" if above == 0 else f"above {above} rows"
        return (f"{count} {scheme} products ({dtype} activations): int8 digits (x split into three int8 "
                f"digits, exact int8 products: torch._int_mm up to {cpu_int8_digits.FEW_ROWS} rows, oneDNN above) "
                f"{when}")
    if short == "none":
        return f"{count} {scheme} products ({dtype} activations): dequantize + one {gemm_in} GEMM at every call"
    kernel = {"int4pack": "PyTorch's packed int4 kernel", "int8pack": "torch._weight_int8pack_mm",
              "fallback": "the backend's quant_linear"}[short]
    if long_ == "never":
        return f"{count} {scheme} products ({dtype} activations): {kernel} at any row count"
    return (f"{count} {scheme} products ({dtype} activations): {kernel} up to {above} rows, "
            f"dequantize + one {gemm_in} GEMM above")
