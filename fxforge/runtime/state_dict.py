"""OptimizedModel.load_state_dict: new values for the graph's weights, checked, then written
into the tensors the program reads.

Why in place: the program, the last-token program, a static decode step (a CUDA graph on a
GPU) and the backend's derived copies all hold the graph's weight tensors. Writing into them
(`copy_`) reaches every one of them at once, as nn.Module.load_state_dict does; each derived
copy (column-major, packed int4, prepacked int8) sees its source's version move and is made
again at its first use (runtime/derived.py). Nothing is written unless every value passed
the checks, so a refused call leaves the model as it was.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.nn.modules.module import _IncompatibleKeys

from .derived import edited

_SHOWN = 5  # names listed in an error, at most


def load_state_dict(params: dict[str, torch.Tensor], state_dict, strict: bool = True,
                    model_name: str = "model") -> _IncompatibleKeys:
    """Write `state_dict`'s values into `params` (the graph's weights, by IR name) in place.
    The checks: a mapping of tensors; with `strict`, exactly the names of `params`; every
    value of its weight's shape; a dtype that casts without changing what the weight means
    (floating to floating, as nn.Module casts; an integer, bool or quantized weight takes its
    own dtype only); names of one tied tensor given one value."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"load_state_dict() expects a mapping of name -> tensor (what fast.state_dict() returns), "
                        f"got {type(state_dict).__name__}")
    missing = [name for name in params if name not in state_dict]
    unexpected = [name for name in state_dict if name not in params]
    if strict and (missing or unexpected):
        raise RuntimeError(_keys_error(model_name, missing, unexpected, params))
    writes = [(name, params[name], state_dict[name]) for name in params if name in state_dict]
    problems = [p for p in (_value_problem(name, target, value) for name, target, value in writes) if p]
    problems += _tied_problems(writes)
    if problems:
        raise RuntimeError(f"Error(s) in loading state_dict for the optimized {model_name}; nothing was loaded:\n  "
                           + "\n  ".join(problems))
    written = set()
    for _, target, value in writes:
        if id(target) not in written:  # (a tied tensor once: its names' values are equal)
            written.add(id(target))
            _write(target, value)
    edited()  # derived copies of inference tensors (no version counter) follow this count
    return _IncompatibleKeys(missing, unexpected)


def _write(target: torch.Tensor, value: torch.Tensor):
    if value is target:
        return
    # (a weight made under torch.inference_mode is an inference tensor: writable only inside it)
    with torch.inference_mode() if target.is_inference() else torch.no_grad():
        target.copy_(value)


def _value_problem(name: str, target: torch.Tensor, value) -> str | None:
    if not isinstance(value, torch.Tensor):
        return f"{name}: expected a tensor, got {type(value).__name__}"
    if tuple(value.shape) != tuple(target.shape):
        return (f"size mismatch for {name}: copying a param with shape {tuple(value.shape)} from checkpoint, the "
                f"shape in the optimized model is {tuple(target.shape)}")
    if value.dtype != target.dtype and not (value.dtype.is_floating_point and target.dtype.is_floating_point):
        return (f"dtype mismatch for {name}: the optimized model's weight is {target.dtype}, the value is "
                f"{value.dtype}; a {target.dtype} weight (quantized, an index table, a mask) takes {target.dtype} "
                f"values only (floating weights cast between floating dtypes, as nn.Module does)")
    if value.device.type == "meta":
        return f"{name}: the value is on the meta device (it holds no data)"
    return None


def _tied_problems(writes) -> list[str]:
    """Names the graph shares one tensor under (tied embeddings) must get equal values:
    one tensor cannot hold two, and nn.Module would keep whichever came last."""
    first: dict[int, tuple[str, torch.Tensor]] = {}
    problems = []
    for name, target, value in writes:
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(target.shape):
            continue
        seen = first.setdefault(id(target), (name, value))
        if seen[0] != name and seen[1] is not value and not torch.equal(seen[1].to(value.device, value.dtype), value):
            problems.append(f"{seen[0]} and {name} are one tied tensor in the optimized model, but the values given "
                            f"differ: give both names the same value")
    return problems


def _keys_error(model_name: str, missing: list[str], unexpected: list[str], params) -> str:
    lines = [f"Error(s) in loading state_dict for the optimized {model_name}; nothing was loaded:"]
    if missing:
        lines.append(f"  Missing key(s) ({len(missing)}): {_names(missing)}")
    if unexpected:
        lines.append(f"  Unexpected key(s) ({len(unexpected)}): {_names(unexpected)}")
    if unexpected and any(_fused_holds(p, u) for p in missing for u in unexpected[:50]):
        lines.append("  The optimized graph fuses and renames weights (e.g. 'a.{q_proj,k_proj,v_proj}.weight' holds "
                     "q_proj, k_proj and v_proj): its keys are fast.state_dict().keys(), not the source model's. To "
                     "load the source model's weights, load them into the source model and fxforge.optimize it "
                     "again, or edit fast.state_dict()'s tensors.")
    else:
        lines.append("  The keys are the optimized graph's weight names (fused and quantized ones): see "
                     "fast.state_dict().keys(); strict=False loads the names that match and returns the rest.")
    return "\n".join(lines)


def _fused_holds(fused: str, name: str) -> bool:
    """Whether the graph's name `fused` ('x.{q_proj,k_proj}.weight', 'x.weight.qweight') stands
    for (part of) the source model's `name`."""
    if "{" in fused:
        head, rest = fused.split("{", 1)
        parts, tail = rest.split("}", 1)
        return any(name == f"{head}{p}{tail}" for p in parts.split(","))
    return fused.startswith(name + ".")


def _names(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_SHOWN])
    return shown + (f", ... ({len(names) - _SHOWN} more)" if len(names) > _SHOWN else "")
