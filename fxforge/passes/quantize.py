"""quantize: linear layers whose weight is a model parameter -> `quant_linear` with a packed
int8 / int4 / nf4 / w8a8 weight (formats in ir/quant_formats.py, kernels in
codegen/kernels/quant_matmul.py).

Matched by what the graph computes, not by module class:
  linear(x, W[out, in] param, [b])  -> quant_linear(x, packed(W), [b])
  matmul(x, W[in, out] param)       -> quant_linear(x, packed(W^T))   (GPT-2's Conv1D/addmm)
(x @ W.T, falcon's FalconLinear, is a linear by then: cleanup's matmul_as_linear.)
A weight read both ways (a tied autoencoder) gets a packing per orientation; one that
another op also reads in float stays float (a packed copy would only add memory).
A layer is skipped, with the reason in report(), when its name is excluded (lm_head and
embeddings by default, including weights tied to an embedding; and the output head whatever
its name, OUTPUT_HEAD) or its shape does not fit
the scheme. int4 / nf4 pick a group size per layer: the one asked for if it divides
in_features, else the largest supported one below it that does (SmolLM2's K=576 at the
default 128 -> 64), so asking for int4 gives an int4 model; each layer's size is in its
qattrs and report() names the layers that got a smaller one. strict_group_size=True
skips those layers instead.

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
import math
import re
from collections import Counter
from dataclasses import dataclass, field

import torch

from ..ir import roles
from ..ir.graph import readers_through
from ..ir.quant_formats import (ACTIVATION_DTYPES, SCHEME_OPTIONS, SCHEMES, SUPPORTED_GROUP_SIZES,
                                NonFiniteWeightError, check_quantizable, fitting_group_size, quantize_weight)
from .cleanup import common_subexpression_elimination
from .gqa import source_param_name
from .pattern import Match, Rule, apply_rules, op, var
from .routers import router_weights

# In `exclude`, this entry names the output head whatever its weight is called: the linear
# whose result reaches a graph output through no other product and feeds no further one
# (Meta's and llama2.c's `output`, a value head; not a K/V projection whose result is also
# returned as the cache): kept float by default as `lm_head*` is, since it sets the logits
OUTPUT_HEAD = "<output head>"
DEFAULT_EXCLUDE = ("lm_head*", "*embed*", "*wte*", "*wpe*", OUTPUT_HEAD)
COMPUTE_DTYPES = (None, torch.float32, torch.float16, torch.bfloat16)
DEFAULT_THRESHOLD = SCHEME_OPTIONS["w8a8"]["threshold"]
GROUPED_SCHEMES = ("int4", "nf4")  # the schemes with a group_size


@dataclass
class QuantConfig:
    """What to quantize and how. Every field is checked here, so a config that would do
    nothing (a group size no layer can use, a threshold int8 never reads) fails at once,
    naming the field, instead of quietly skipping layers.

    group_size (int4 / nf4; default 128 / 64) is the largest group wanted: a layer whose
    in_features it does not divide gets the largest supported size below it that does
    (K=576 at 128 -> 64), and report() says which layers and why. strict_group_size=True
    skips such layers instead (with the reason in report())."""

    scheme: str = "int8"
    group_size: int | None = None  # int4 / nf4 (default 128 / 64)
    double_quant: bool | None = None  # nf4
    threshold: float | None = DEFAULT_THRESHOLD  # w8a8 outlier threshold
    zero_point: str = "int"  # int4: "int" (uint8, the range includes 0) or "float" (the group's own range)
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    compute_dtype: torch.dtype | None = None  # None: the model's dtype; else the products run in it
    strict_group_size: bool = False  # True: skip a layer group_size does not divide (no smaller group)
    # True: also quantize a linear whose weight an embedding reads too (a tied lm_head): the
    # linear gets a quantized copy and the embedding keeps the float weight, so memory grows
    # by the copy; for a draft model, whose largest product is often that lm_head.
    include_tied: bool = False
    # True: also quantize mixture-of-experts routers (passes/routers.py), kept float by
    # default: rounding their scores changes which experts run
    include_routers: bool = False

    def __post_init__(self):
        if self.scheme not in SCHEMES:  # first: the other checks name the scheme
            raise ValueError(f"unknown quantization scheme {self.scheme!r}; known schemes: {', '.join(SCHEMES)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {', '.join(map(str, COMPUTE_DTYPES))}, "
                             f"got {self.compute_dtype!r}")
        self._check_group_size()
        self._check_scheme_only_fields()
        self.include = _patterns("include", self.include)
        self.exclude = _patterns("exclude", self.exclude)
        if not self.include:
            raise ValueError("QuantConfig.include=() matches no layer, so nothing would be quantized; "
                             "use ('*',) (every layer) or glob patterns such as ('*mlp*',)")
        if not isinstance(self.strict_group_size, bool):
            raise TypeError(f"QuantConfig.strict_group_size must be True or False, got {self.strict_group_size!r}")
        if not isinstance(self.include_tied, bool):
            raise TypeError(f"QuantConfig.include_tied must be True or False, got {self.include_tied!r}")
        if not isinstance(self.include_routers, bool):
            raise TypeError(f"QuantConfig.include_routers must be True or False, got {self.include_routers!r}")

    def _check_group_size(self):
        g = self.group_size
        if g is None:
            return
        if self.scheme not in GROUPED_SCHEMES:
            raise ValueError(f"QuantConfig: group_size applies to {' and '.join(GROUPED_SCHEMES)} only; "
                             f"{self.scheme} scales each output channel as a whole. Leave group_size=None")
        if not isinstance(g, int) or isinstance(g, bool) or g not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"QuantConfig: {self.scheme} group_size must be one of {SUPPORTED_GROUP_SIZES} "
                             f"(the sizes every kernel runs, PyTorch's int4 CPU kernel included), got {g!r}")

    def _check_scheme_only_fields(self):
        if self.double_quant is not None:
            if self.scheme != "nf4":
                raise ValueError(f"QuantConfig: double_quant applies to nf4 only (it quantizes nf4's group "
                                 f"scales), not {self.scheme}. Leave double_quant=None")
            if not isinstance(self.double_quant, bool):
                raise TypeError(f"QuantConfig.double_quant must be True, False or None, got {self.double_quant!r}")
        t = self.threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0):
            raise ValueError(f"QuantConfig.threshold must be a positive number (w8a8's outlier cut-off, default "
                             f"{DEFAULT_THRESHOLD}) or None (no outlier columns), got {t!r}")
        if self.scheme != "w8a8" and t != DEFAULT_THRESHOLD:
            raise ValueError(f"QuantConfig: threshold applies to w8a8 only (the activation outlier cut-off), "
                             f"not {self.scheme}; leave it at its default")
        if self.zero_point not in ("int", "float"):
            raise ValueError(f"zero_point must be 'int' or 'float', got {self.zero_point!r}")
        if self.zero_point != "int" and self.scheme != "int4":
            raise ValueError(f"QuantConfig: zero_point applies to int4 only, not {self.scheme}; leave it at 'int'")

    def requested_group_size(self) -> int | None:
        """The group size asked for (the scheme's default when None); None without groups."""
        if self.scheme not in GROUPED_SCHEMES:
            return None
        return self.group_size if self.group_size is not None else SCHEME_OPTIONS[self.scheme]["group_size"]

    def options(self, group_size: int | None = None) -> dict:
        """quantize_weight's options; `group_size` overrides the requested one (per layer)."""
        opts = {}
        if self.scheme in GROUPED_SCHEMES:
            opts["group_size"] = group_size or self.requested_group_size()
        if self.scheme == "int4":
            opts["zero_point"] = self.zero_point
        if self.scheme == "nf4" and self.double_quant is not None:
            opts["double_quant"] = self.double_quant
        if self.scheme == "w8a8":
            opts["threshold"] = self.threshold
        return opts


def _patterns(field_name: str, value) -> tuple[str, ...]:
    # a bare string would be iterated as one-character globs: "*mlp*" would match every layer
    if isinstance(value, str) or not isinstance(value, (tuple, list)) or \
            not all(isinstance(p, str) for p in value):
        raise TypeError(f"QuantConfig.{field_name} must be a tuple of glob patterns over weight names, "
                        f"e.g. ('*mlp*',), got {value!r}")
    return tuple(value)


def as_config(option) -> QuantConfig:
    if isinstance(option, QuantConfig):
        return option
    if isinstance(option, str):
        return QuantConfig(option)
    if isinstance(option, dict):
        try:
            return QuantConfig(**option)
        except TypeError as e:  # an unknown field
            raise TypeError(f"quantize={option!r}: {e}") from None
    raise TypeError(f"quantize= takes a scheme name ({', '.join(SCHEMES)}), a QuantConfig or a dict of its "
                    f"fields, or None to leave the model as it is; got {option!r}")


def parse_option(option) -> QuantConfig | None:
    """optimize(quantize=...): None leaves the pass out; anything else must name a scheme."""
    return None if option is None else as_config(option)


@dataclass
class _Plan:
    config: QuantConfig
    tied: set  # params also read by an embedding: excluded like the embedding itself
    routers: dict  # router weight name -> the selection op its scores reach (kept float unless asked)
    heads: set = field(default_factory=set)  # weights of output heads (OUTPUT_HEAD)
    uses: dict = field(default_factory=dict)  # weight name -> _Uses (_weight_uses)
    layers: list = field(default_factory=list)  # (name, bytes before, bytes after)
    skipped: list = field(default_factory=list)  # (name, reason)
    group_sizes: dict = field(default_factory=dict)  # layer label -> (group size used, in_features): int4 / nf4
    decided: dict = field(default_factory=dict)  # weight name -> skip reason (None: quantized)
    packed: dict = field(default_factory=dict)  # (weight name, transposed) -> (parts, qattrs, values), made once


@dataclass
class _Uses:
    """How the graph reads one 2-D weight: the orientations its products read it in
    (False: linear(x, W[out, in]); True: matmul(x, W[in, out])) and the other ops."""
    orientations: set = field(default_factory=set)
    others: set = field(default_factory=set)


def _weight_uses(graph) -> dict[str, _Uses]:
    uses: dict[str, _Uses] = {}
    for node in graph.nodes:
        for i, v in enumerate(node.inputs):
            if v.param is None or v.rank != 2:
                continue
            use = uses.setdefault(v.param, _Uses())
            if i == 1 and node.op == "linear":
                use.orientations.add(False)
            elif i == 1 and node.op == "matmul" and len(node.inputs) == 2:
                use.orientations.add(True)
            else:
                use.others.add(node.attrs["target"] if node.op == "torch_call" else node.op)
    return uses


_ORIENTATION = {False: "linear(x, W)", True: "matmul(x, W)"}


def _label(plan: _Plan, name: str, transposed: bool) -> str:
    """The layer's name in report(): the weight's, and for a weight read in both
    orientations (a tied autoencoder), the matmul(x, W) packing's says so."""
    both = name in plan.uses and len(plan.uses[name].orientations) == 2
    return f"{name} (as {_ORIENTATION[True]})" if both and transposed else name


def _rewrite(plan: _Plan, transposed: bool):
    def replace(m: Match, b):
        w = m["w"]
        name = w.param
        if name is None or w.rank != 2:
            return None
        if name not in plan.decided:
            plan.decided[name] = reason = _decide(plan, name, w)
            if reason:
                plan.skipped.append((name, reason))
        if plan.decided[name]:
            return None
        parts, qattrs, values = _packed(plan, m.graph, name, transposed)
        bias = [m["b"]] if "b" in m else []
        x = m["x"]
        compute = plan.config.compute_dtype or x.dtype
        _check_activation_dtype(plan.config, name, compute)
        y = b.emit("quant_linear", b.cast(x, compute), *values, *bias, parts=parts, qattrs=qattrs, bias=bool(bias))
        return b.cast(y, x.dtype)
    return replace


def _packed(plan: _Plan, graph, name: str, transposed: bool):
    """The weight packed for this orientation, made once per (weight, orientation): a
    weight read both as linear(x, W) and matmul(x, W) needs W and W^T packed, each its
    own [out, in]; one packing for both would multiply by the wrong matrix."""
    key = (name, transposed)
    if key not in plan.packed:
        label = _label(plan, name, transposed)
        weight = graph.params[name]
        weight = weight.t().contiguous() if transposed else weight
        group_size = plan.group_sizes.get(label, (None,))[0]
        try:
            packed = quantize_weight(weight.detach(), plan.config.scheme, **plan.config.options(group_size))
        except NonFiniteWeightError as error:  # (shape and index in the model's own orientation)
            raise _non_finite(plan.config, name, error, transposed) from None
        # bytes the packing frees: none for a second orientation's packing (the float weight
        # went with the first), nor where an embedding keeps the float weight (include_tied)
        kept = any(k[0] == name for k in plan.packed) or bool(plan.uses.get(name, _Uses()).others)
        before = 0 if kept else weight.numel() * weight.element_size()
        plan.layers.append((label, before, packed.nbytes()))
        prefix = name if label == name else f"{name}.T"
        values = [graph.add_param(f"{prefix}.{part}", t) for part, t in packed.tensors().items()]
        plan.packed[key] = (tuple(packed.tensors()), tuple(packed.attrs().items()), values)
    return plan.packed[key]


def _check_activation_dtype(cfg: QuantConfig, name: str, compute: torch.dtype):
    """A model whose products would run in a dtype the scheme's kernels do not take
    (float64 for int8 / int4 / nf4) is refused here, at optimize(), not at its first
    call from inside the program."""
    allowed = ACTIVATION_DTYPES[cfg.scheme]
    if allowed is None or compute in allowed:
        return
    names = "/".join(str(d).replace("torch.", "") for d in allowed)
    dtype = str(compute).replace("torch.", "")
    raise ValueError(
        f"quantize {cfg.scheme!r}: the model computes in {dtype} (at {source_param_name(name)}), but {cfg.scheme} "
        f"kernels take {names} activations only. Pass QuantConfig({cfg.scheme!r}, compute_dtype=torch.float32) to "
        f"run the quantized products in float32 (a cast to and from {dtype} around each; the rest of the model stays "
        f"{dtype}), or convert the model (model.float()) before optimize(); w8a8 runs in {dtype} as it is")


def _non_finite(cfg: QuantConfig, name: str, error: NonFiniteWeightError, transposed: bool) -> ValueError:
    """A weight with inf or nan has no scale; the error names it (the model's parameter
    name, which `exclude` matches) and says how to go on."""
    shape, first = (error.shape[::-1], error.first[::-1]) if transposed else (error.shape, error.first)
    numel = math.prod(shape)
    source = source_param_name(name)
    return ValueError(
        f"quantize {cfg.scheme!r}: weight {source!r} (shape {shape}) has {error.count} non-finite "
        f"element{'s' if error.count > 1 else ''} (inf or nan; the first at {first}) of {numel}, so it has no "
        f"{cfg.scheme} scale. Fix the weight, or keep this layer float: QuantConfig({cfg.scheme!r}, "
        f"exclude=(*DEFAULT_EXCLUDE, {source!r})) (DEFAULT_EXCLUDE from fxforge.passes.quantize: `exclude` "
        f"replaces the default list)")


def _decide(plan: _Plan, name: str, w) -> str | None:
    """Why this weight stays float for all its uses (None: every product that reads it
    gets a packing). A weight that some other op reads in float stays float: the packing
    would be a copy next to it, more memory, not less."""
    reason = _name_reason(plan, name)
    if reason:
        return reason
    if (w.attrs or {}).get(roles.BUFFER):
        return ("a buffer (register_buffer or a constant tensor), not a parameter: its values are the model's "
                "own constants (a rotation, a table), which quantize leaves as they are")
    use = plan.uses.get(name, _Uses({False}))
    others = use.others - {"embedding"} if plan.config.include_tied else use.others
    if others:
        return (f"also read by {', '.join(sorted(others))}, which needs the float weight: a quantized copy for "
                "its products would add memory, not save it")
    for transposed in sorted(use.orientations):
        reason = _shape_reason(plan, _label(plan, name, transposed), w, transposed)
        if reason and len(use.orientations) == 2:
            return (f"as {_ORIENTATION[transposed]}: {reason}; it is also read as "
                    f"{_ORIENTATION[not transposed]}, and a packing for that use alone would sit next to the "
                    "float weight")
        if reason:
            return reason
    return None


def _name_reason(plan: _Plan, name: str) -> str | None:
    cfg = plan.config
    source = source_param_name(name)  # gqa's rewritten weights answer to the model's names
    if not any(fnmatch.fnmatch(source, p) for p in cfg.include):
        return "not in include"
    for pattern in cfg.exclude:
        if pattern == OUTPUT_HEAD and name in plan.heads:
            return _head_reason(plan, name)
        if pattern != OUTPUT_HEAD and fnmatch.fnmatch(source, pattern):
            return f"excluded by {pattern!r}"
    if name in plan.tied:
        return "weight shared with an embedding (excluded like embeddings)"
    if name in plan.routers:
        return (f"a mixture-of-experts router (its scores reach {plan.routers[name]}): rounding them changes "
                "which experts run; QuantConfig(include_routers=True) quantizes it too")
    return None


def _head_reason(plan: _Plan, name: str) -> str:
    reason = (f"the output head (its result is a model output and feeds no further layer; excluded by "
              f"{OUTPUT_HEAD!r}, as lm_head)")
    if len(plan.uses.get(name, _Uses()).orientations) < 2:
        return reason
    # a tied autoencoder: the head is one of the weight's two products, and a packing for
    # the other alone would sit next to the float weight the head keeps
    return (f"read as {_ORIENTATION[False]} and as {_ORIENTATION[True]}, and one of the two is {reason}; "
            "a packing for the other use alone would sit next to the float weight, so both stay float")


def _shape_reason(plan: _Plan, label: str, w, transposed: bool) -> str | None:
    """Why the scheme cannot pack this orientation of the weight (None: it can; for int4 /
    nf4 its group size is then in plan.group_sizes[label])."""
    cfg = plan.config
    shape = tuple(int(d) for d in (w.shape[::-1] if transposed else w.shape))
    group_size = _layer_group_size(cfg, shape)
    if group_size is None and len(shape) == 2 and cfg.requested_group_size() is not None:
        smaller = [g for g in SUPPORTED_GROUP_SIZES if g < cfg.requested_group_size()]
        return (f"{cfg.scheme}: in_features K={shape[1]} is not divisible by group_size={cfg.requested_group_size()}"
                f" nor by a smaller supported group size ({', '.join(map(str, smaller)) or 'none'})")
    reason = check_quantizable(cfg.scheme, shape, **cfg.options(group_size))
    if reason is None and group_size is not None:
        plan.group_sizes[label] = (group_size, shape[1])
    fallback = fitting_group_size(shape[1], group_size) if reason and cfg.strict_group_size else None
    if fallback is not None:
        reason += f"; strict_group_size=True: without it this layer would use group_size {fallback}"
    return reason


# ops a weight passes through on its way to the product that reads it
_WEIGHT_VIEWS = ("permute", "view", "reshape", "slice", "select", "expand", "unsqueeze", "squeeze", "cast")


def _unhandled_weights(graph) -> list[tuple[str, str]]:
    """(name, reason) for each weight of 3 or more dimensions the graph still reads in
    float: mixture-of-experts layers stack their experts' weights into one 3-D parameter
    read by a grouped or batched product, which this pass does not pack; listed so that
    report() and the byte counts do not pass them over in silence."""
    users = graph.users()
    out = []
    for v in graph.param_values:
        if v.rank < 3 or not v.dtype.is_floating_point:
            continue
        # through the views to the op that computes with it
        readers = {n.attrs["target"] if n.op == "torch_call" else n.op
                   for n in readers_through(users, [v], lambda n: n.op in _WEIGHT_VIEWS, 4)}
        shape = "x".join(str(d) for d in v.shape)
        nbytes = graph.params[v.param].nbytes
        out.append((v.param, f"a {v.rank}-D weight ({shape}, {nbytes / 2**20:.2f} MiB, read by "
                             f"{', '.join(sorted(readers)) or '(views)'}): quantize packs 2-D linear weights only, so it stays "
                             f"{str(v.dtype).replace('torch.', '')} (stacked expert weights, say)"))
    return out


def _unmatched_products(graph, decided: dict) -> list[tuple[str, str]]:
    """(name, reason) for each 2-D float weight a linear or matmul reads only through
    views (`F.linear(x, Wt.t())`, an einsum's permuted operand): no rule matched it, so
    it stays float; listed so that report() does not pass it over."""
    users = graph.users()
    out = []
    for v in graph.param_values:
        if v.rank != 2 or not v.dtype.is_floating_point or v.param in decided:
            continue
        products = {n.op for n in readers_through(users, [v], lambda n: n.op in _WEIGHT_VIEWS, 4)
                    if n.op in ("linear", "matmul")}
        if products:
            views = sorted({n.op for n in users.get(v, ()) if n.op in _WEIGHT_VIEWS})
            out.append((v.param, f"read by {', '.join(sorted(products))} through {', '.join(views)}: quantize "
                                 "packs a weight that linear(x, W) or matmul(x, W) reads as it is stored"))
        elif _computes_a_linear_weight(users, v):
            out.append((v.param, "a linear reads a weight computed from it (torch.nn.utils.parametrize, "
                                 "weight_norm, W * scale in forward): quantize packs a weight that the linear "
                                 "reads as it is stored"))
    return out


def _computes_a_linear_weight(users, weight, depth: int = 6) -> bool:
    """`weight` reaches the weight operand of a linear through other ops (not as the
    activations it multiplies): a weight computed in forward."""
    reached, frontier = {weight}, [weight]
    for _ in range(depth):
        following = []
        for value in frontier:
            for node in users.get(value, ()):
                if node.op in ("linear", "matmul", "embedding"):
                    if node.op == "linear" and len(node.inputs) > 1 and node.inputs[1] in reached \
                            and node.inputs[0] not in reached:
                        return True
                    continue
                for o in node.outputs:
                    if o not in reached:
                        reached.add(o)
                        following.append(o)
        frontier = following
    return False


# the skip reasons (_decide, _unhandled_weights) that one report line may cover for
# many weights: the words before the per-weight details in brackets
_GROUPED_REASON = re.compile(r"(a mixture-of-experts router|a \d+-D weight) \(")


def _skipped_notes(skipped: list[tuple[str, str]]) -> list[str]:
    """One report line per skipped weight, or one per kind where a kind repeats (a
    mixture-of-experts model has a router and stacked expert weights in every layer)."""
    kinds: dict[str, list[tuple[str, str]]] = {}
    for name, reason in skipped:
        grouped = _GROUPED_REASON.match(reason)
        kinds.setdefault(grouped.group(1) if grouped else name, []).append((name, reason))
    notes = []
    for kind, entries in kinds.items():
        if len(entries) <= 2:
            notes += [f"skipped {name}: {reason}" for name, reason in entries]
        else:
            names = ", ".join(n for n, _ in entries[:2])
            notes.append(f"skipped {len(entries)} weights ({names}, ...; each in details['quantize']['skipped']), "
                         f"e.g. {entries[0][1]}")
    return notes


def _layer_group_size(cfg: QuantConfig, shape) -> int | None:
    """The group size this layer uses: the requested one if it divides in_features, else
    (unless strict) the largest supported one below it that does; None when no group
    fits, or when the scheme has no groups."""
    requested = cfg.requested_group_size()
    if requested is None or len(shape) != 2:
        return None
    if cfg.strict_group_size:
        return requested  # check_quantizable then gives the reason for a K it does not divide
    return fitting_group_size(shape[1], requested)


def _copy_notes(plan: _Plan) -> list[str]:
    """The packings that free no float bytes, which the totals count as 0 before: a
    second orientation's, and a tied weight's copy (include_tied)."""
    notes = []
    for label, before, after in plan.layers:
        name = label.split(" (as ")[0]
        if before:
            continue
        if len(plan.uses[name].orientations) == 2:
            notes.append(f"{name}: read as linear(x, W) and as matmul(x, W): packed once for each "
                         f"(+{after / 2**20:.2f} MiB)")
        else:
            notes.append(f"{name}: a packed copy, {', '.join(sorted(plan.uses[name].others))} keeps the float "
                         f"weight (+{after / 2**20:.2f} MiB, include_tied=True)")
    return notes


def _requested_group_note(plan: _Plan) -> str:
    requested = plan.config.requested_group_size()
    if requested is None:
        return ""
    at_requested = sum(1 for g, _ in plan.group_sizes.values() if g == requested)
    if at_requested == len(plan.layers):
        return f", group_size {requested}"
    return f", {at_requested} at group_size {requested}"


def _group_size_notes(plan: _Plan) -> list[str]:
    """One line per group size smaller than asked for: which layers, and why."""
    requested = plan.config.requested_group_size()
    by_size: dict[int, list[int]] = {}
    for g, k in plan.group_sizes.values():
        if g != requested:
            by_size.setdefault(g, []).append(k)
    notes = []
    for g, ks in sorted(by_size.items(), reverse=True):
        k_list = ", ".join(str(k) for k in sorted(set(ks)))
        notes.append(f"{plan.config.scheme}: {len(ks)} layers at group_size {g} (in_features {k_list} not a "
                     f"multiple of {requested}; strict_group_size=True skips them instead)")
    return notes


# torch_call targets that compute products (a model's attention or matmul that no IR op
# models): a value read by one goes on into another layer
_PRODUCT_TARGETS = re.compile(r"aten\.(mm|bmm|addmm|baddbmm|addbmm|matmul|linear|einsum|convolution|conv\w*|"
                              r"_?scaled_dot_product\w*|_flash_attention\w*|_efficient_attention\w*)\.")


def _feeds_a_product(graph) -> set:
    """The values from which some product (a linear, matmul, attention ...) is reachable,
    through any ops: they feed another layer. One walk in reverse topological order."""
    from .routers import PRODUCTS

    feeding: set = set()
    for node in reversed(graph.nodes):
        product = node.op in PRODUCTS or node.op == "paged_attention" or \
            (node.op == "torch_call" and bool(_PRODUCT_TARGETS.match(str(node.attrs.get("target", "")))))
        if product or any(out in feeding for out in node.outputs):
            feeding.update(node.inputs)
    return feeding


def output_head_weights(graph) -> set:
    """Names of the 2-D weights of the output heads: linears (matmuls on a weight) whose
    result reaches a graph output through views, casts and pointwise ops only, and feeds
    no further product -- the final projections that make the model's outputs (the
    logits), whatever they are called. A K or V projection whose result the graph also
    returns (a KV cache, `use_cache=True` under torch.compile) feeds attention, and a
    layer whose hidden states are returned (output_hidden_states) feeds the next layer:
    neither is the head."""
    from .routers import PRODUCTS

    outputs, users, heads = set(graph.outputs), graph.users(), set()
    feeding = _feeds_a_product(graph)
    for node in graph.nodes:
        if node.op not in ("linear", "matmul") or len(node.inputs) < 2:
            continue
        w = node.inputs[1]
        if w.param is None or w.rank != 2 or w.param in heads or node.outputs[0] in feeding:
            continue
        frontier, seen = [node.outputs[0]], {node.outputs[0]}
        for _ in range(8):
            if outputs & set(frontier):
                heads.add(w.param)
                break
            frontier = [out for v in frontier for n in users.get(v, ()) if n.op not in PRODUCTS
                        and n.op != "torch_call" for out in n.outputs if out not in seen and not seen.add(out)]
    return heads


def quantize(graph, ctx):
    cfg = as_config(ctx.options.get("quantize"))
    tied = set() if cfg.include_tied else \
        {n.inputs[0].param for n in graph.nodes if n.op == "embedding" and n.inputs[0].param}
    plan = _Plan(cfg, tied, {} if cfg.include_routers else router_weights(graph),
                 output_head_weights(graph) if OUTPUT_HEAD in cfg.exclude else set(), _weight_uses(graph))
    # before -> after
    rules = [
        # linear(x, W, b) -> quant_linear(x, packed(W), b)
        Rule("linear_bias", op("linear", var("x"), var("w"), var("b")), _rewrite(plan, transposed=False)),
        # linear(x, W) -> quant_linear(x, packed(W))
        Rule("linear", op("linear", var("x"), var("w")), _rewrite(plan, transposed=False)),
        # matmul(x, W[in, out]) -> quant_linear(x, packed(W^T))
        Rule("matmul_param", op("matmul", var("x"), var("w")), _rewrite(plan, transposed=True)),
    ]
    if ctx is not None:
        ctx.status(f"quantize: packing linear weights as {cfg.scheme}")
    out = apply_rules(graph, rules, ctx.rules if ctx is not None else Counter(), pass_name="quantize")
    if cfg.compute_dtype is not None:  # q/k/v (and gate/up) each cast the same input: one cast will do
        out = common_subexpression_elimination(out, ctx.rules if ctx is not None else None)
    out = out.prune_params()
    if cfg.compute_dtype is not None and plan.layers:
        # the products' dtype was asked for: to(another dtype) must keep it or refuse, but
        # where the model computes in it already the cast to it is a no-op and leaves no
        # node to say so (a float32 model asked for float32 products, then to(bfloat16))
        where = (f"QuantConfig(compute_dtype={cfg.compute_dtype}): the {len(plan.layers)} quantized products "
                 "run in it, as asked")
        pin = (cfg.compute_dtype, roles.FIXED_COMPUTE_DTYPE, where)
        out.signature = {**out.signature, "fixed_dtypes": tuple(out.signature.get("fixed_dtypes", ())) + (pin,)}
    plan.skipped += _unhandled_weights(out) + _unmatched_products(out, plan.decided)
    before = sum(x for _, x, _ in plan.layers)
    after = sum(y for _, _, y in plan.layers)
    group_sizes = {name: g for name, (g, _) in plan.group_sizes.items()}
    ctx.details["quantize"] = {"scheme": cfg.scheme, "layers": plan.layers, "skipped": plan.skipped,
                               "bytes_before": before, "bytes_after": after, "compute_dtype": cfg.compute_dtype,
                               "group_sizes": group_sizes}
    if plan.layers:
        compute = "" if cfg.compute_dtype is None else f", products in {str(cfg.compute_dtype).replace('torch.', '')}"
        groups = _requested_group_note(plan)
        ratio = f" ({after / before:.3f}x)" if before else ""
        ctx.note(f"{cfg.scheme}: {len(plan.layers)} layers{groups}, weights {before / 2**20:.1f} MiB -> "
                 f"{after / 2**20:.1f} MiB{ratio}{compute}")
    for note in _copy_notes(plan):
        ctx.note(note)
    for note in _group_size_notes(plan):
        ctx.note(note)
    for note in _skipped_notes(plan.skipped):
        ctx.note(note)
    _warn_unmatched_patterns(cfg, graph)
    _warn_no_linear_weights(cfg, plan)
    return out


def _warn_no_linear_weights(cfg: QuantConfig, plan: _Plan) -> None:
    """quantize= asked for smaller weights, but no linear or matmul of the graph reads a
    2-D weight (none quantized, none skipped with a reason): the model keeps its size, and
    optimize()'s 'quantized none of the model's N linear weight(s)' warning, which lists
    the skipped ones, has none to list."""
    import warnings

    if plan.layers or plan.skipped:
        return
    warnings.warn(f"quantize={cfg.scheme!r} found no linear weights to quantize: no linear(x, W) or matmul(x, W) "
                  "of the captured graph reads a 2-D weight parameter, so the model keeps its size",
                  stacklevel=2)


def _warn_unmatched_patterns(cfg: QuantConfig, graph) -> None:
    """Warn about each include or exclude pattern of the user's (not a default) that names no
    weight the graph reads: a typo, or a weight shared by two modules, which the graph knows
    by one of its names only (b.weight where a.weight is the same tensor); excluding nothing
    silently would quantize what the user meant to keep, including nothing would keep float
    what the user meant to quantize."""
    import warnings

    names = sorted({source_param_name(v.param) for n in graph.nodes for v in n.inputs if v.param is not None})
    for field_name, patterns, default, effect in (("include", cfg.include, ("*",), "includes"),
                                                  ("exclude", cfg.exclude, DEFAULT_EXCLUDE, "excludes")):
        for pattern in patterns:
            if pattern in default or any(fnmatch.fnmatch(name, pattern) for name in names):
                continue
            near = [n for n in names if n.endswith(pattern.rsplit(".", 1)[-1])][:6] if "." in pattern else names[:6]
            warnings.warn(f"quantize: {field_name} pattern {pattern!r} matches no weight of the captured graph, so "
                          f"it {effect} nothing. The graph's weight names are the model's parameter names, and a "
                          f"weight shared by several modules goes by one of them; e.g. {', '.join(near)}",
                          stacklevel=2)
