"""quantize: linear layers whose weight is a model parameter -> `quant_linear` with a packed
int8 / int4 / nf4 / w8a8 weight (formats in ir/quant_formats.py, kernels in
codegen/kernels/quant_matmul.py).

Matched by what the graph computes, not by module class:
  linear(x, W[out, in] param, [b])  -> quant_linear(x, packed(W), [b])
  matmul(x, W[in, out] param)       -> quant_linear(x, packed(W^T))   (GPT-2's Conv1D/addmm)
A layer is skipped, with the reason in report(), when its name is excluded (lm_head and
embeddings by default, including weights tied to an embedding) or its shape does not fit
the scheme (e.g. in_features not divisible by the group size).

`compute_dtype` (None: the model's) runs each quantized product in another float dtype:
  quant_linear(x) -> cast(quant_linear(cast(x, compute_dtype)), x.dtype)
The casts are in the IR, so the rounding of the activations and results is visible and
happens on every backend (kernels still accumulate in float32). On CPU, int8 with
bfloat16 compute (K a multiple of 64) reaches PyTorch's vectorized `_weight_int8pack_mm`,
several times faster at one token than a float32 linear; the CPU paths of the other
schemes compute in float32 between the casts, so there bf16 only adds rounding. float16
compute on a float32 model overflows activations above 65504: prefer bfloat16.
"""
from __future__ import annotations

import fnmatch
from collections import Counter
from dataclasses import dataclass, field

import torch

from ..ir.quant_formats import SCHEMES, check_quantizable, quantize_weight
from .cleanup import common_subexpression_elimination
from .pattern import Match, Rule, apply_rules, op, var

DEFAULT_EXCLUDE = ("lm_head*", "*embed*", "*wte*", "*wpe*")
COMPUTE_DTYPES = (None, torch.float32, torch.float16, torch.bfloat16)


@dataclass
class QuantConfig:
    scheme: str = "int8"
    group_size: int | None = None  # int4 / nf4 (default 128 / 64)
    double_quant: bool | None = None  # nf4
    threshold: float | None = 6.0  # w8a8 outlier threshold
    zero_point: str = "int"  # int4: "int" (uint8, the range includes 0) or "float" (the group's own range)
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    compute_dtype: torch.dtype | None = None  # None: the model's dtype; else the products run in it

    def __post_init__(self):
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {', '.join(map(str, COMPUTE_DTYPES))}, "
                             f"got {self.compute_dtype!r}")
        if self.zero_point not in ("int", "float"):
            raise ValueError(f"zero_point must be 'int' or 'float', got {self.zero_point!r}")
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {self.scheme!r}; known schemes: {', '.join(SCHEMES)}")

    def options(self) -> dict:
        opts = {}
        if self.scheme in ("int4", "nf4") and self.group_size is not None:
            opts["group_size"] = self.group_size
        if self.scheme == "int4":
            opts["zero_point"] = self.zero_point
        if self.scheme == "nf4" and self.double_quant is not None:
            opts["double_quant"] = self.double_quant
        if self.scheme == "w8a8":
            opts["threshold"] = self.threshold
        return opts


def as_config(option) -> QuantConfig:
    if isinstance(option, QuantConfig):
        return option
    if isinstance(option, str):
        return QuantConfig(option)
    raise TypeError(f"quantize= takes a scheme name ({', '.join(SCHEMES)}) or a QuantConfig, got {option!r}")


@dataclass
class _Plan:
    config: QuantConfig
    tied: set  # params also read by an embedding: excluded like the embedding itself
    layers: list = field(default_factory=list)  # (name, bytes before, bytes after)
    skipped: list = field(default_factory=list)  # (name, reason)
    seen: set = field(default_factory=set)
    packed: dict = field(default_factory=dict)  # weight name -> (parts, qattrs, values), made once


def _rewrite(plan: _Plan, transposed: bool):
    def replace(m: Match, b):
        w = m["w"]
        name = w.param
        if name is None or w.rank != 2:
            return None
        if name not in plan.seen:
            plan.seen.add(name)
            reason = _skip_reason(plan, name, w, transposed)
            if reason:
                plan.skipped.append((name, reason))
        if any(n == name for n, _ in plan.skipped):
            return None
        if name not in plan.packed:
            weight = m.graph.params[name]
            weight = weight.t().contiguous() if transposed else weight
            packed = quantize_weight(weight.detach(), plan.config.scheme, **plan.config.options())
            plan.layers.append((name, weight.numel() * weight.element_size(), packed.nbytes()))
            values = [m.graph.add_param(f"{name}.{part}", t) for part, t in packed.tensors().items()]
            plan.packed[name] = (tuple(packed.tensors()), tuple(packed.attrs().items()), values)
        parts, qattrs, values = plan.packed[name]
        bias = [m["b"]] if "b" in m else []
        x = m["x"]
        compute = plan.config.compute_dtype or x.dtype
        y = b.emit("quant_linear", b.cast(x, compute), *values, *bias, parts=parts, qattrs=qattrs, bias=bool(bias))
        return b.cast(y, x.dtype)
    return replace


def _skip_reason(plan: _Plan, name: str, w, transposed: bool) -> str | None:
    cfg = plan.config
    if not any(fnmatch.fnmatch(name, p) for p in cfg.include):
        return "not in include"
    for pattern in cfg.exclude:
        if fnmatch.fnmatch(name, pattern):
            return f"excluded by {pattern!r}"
    if name in plan.tied:
        return "weight shared with an embedding (excluded like embeddings)"
    shape = tuple(int(d) for d in (w.shape[::-1] if transposed else w.shape))
    return check_quantizable(cfg.scheme, shape, **cfg.options())


def quantize(graph, ctx):
    cfg = as_config(ctx.options.get("quantize"))
    tied = {n.inputs[0].param for n in graph.nodes if n.op == "embedding" and n.inputs[0].param}
    plan = _Plan(cfg, tied)
    # before -> after
    rules = [
        # linear(x, W, b) -> quant_linear(x, packed(W), b)
        Rule("linear_bias", op("linear", var("x"), var("w"), var("b")), _rewrite(plan, transposed=False)),
        # linear(x, W) -> quant_linear(x, packed(W))
        Rule("linear", op("linear", var("x"), var("w")), _rewrite(plan, transposed=False)),
        # matmul(x, W[in, out]) -> quant_linear(x, packed(W^T))
        Rule("matmul_param", op("matmul", var("x"), var("w")), _rewrite(plan, transposed=True)),
    ]
    out = apply_rules(graph, rules, ctx.rules if ctx is not None else Counter(), pass_name="quantize")
    if cfg.compute_dtype is not None:  # q/k/v (and gate/up) each cast the same input: one cast will do
        out = common_subexpression_elimination(out, ctx.rules if ctx is not None else None)
    out = out.prune_params()
    before = sum(x for _, x, _ in plan.layers)
    after = sum(y for _, _, y in plan.layers)
    ctx.details["quantize"] = {"scheme": cfg.scheme, "layers": plan.layers, "skipped": plan.skipped,
                               "bytes_before": before, "bytes_after": after, "compute_dtype": cfg.compute_dtype}
    if plan.layers:
        compute = "" if cfg.compute_dtype is None else f", products in {str(cfg.compute_dtype).replace('torch.', '')}"
        ctx.note(f"{cfg.scheme}: {len(plan.layers)} layers, weights {before / 2**20:.1f} MiB -> "
                 f"{after / 2**20:.1f} MiB ({after / before:.3f}x){compute}")
    for name, reason in plan.skipped:
        ctx.note(f"skipped {name}: {reason}")
    return out
