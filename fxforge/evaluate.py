"""Quality measures for approximate rewrites (quantization, GQA): perplexity on a text."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, window: int = 1024) -> float:
    """exp(mean next-token NLL) over `input_ids` [1, N], in non-overlapping windows of
    `window` tokens (each window is scored on its own; the first token of a window is
    context only). `model(ids)` may return logits or an object with `.logits`."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"perplexity wants input_ids of shape [1, N], got {tuple(input_ids.shape)}")
    total, count = 0.0, 0
    for start in range(0, input_ids.shape[1] - 1, window):
        chunk = input_ids[:, start:start + window]
        if chunk.shape[1] < 2:
            break
        out = model(chunk)
        logits = out.logits if hasattr(out, "logits") else out
        nll = F.cross_entropy(logits[0, :-1].float(), chunk[0, 1:], reduction="sum")
        total += nll.item()
        count += chunk.shape[1] - 1
    return math.exp(total / count)


def _float_leaves(out) -> list[tuple[int, torch.Tensor]]:
    """(position among the output's leaves, tensor) for each floating-point output: the
    position is the model's, so that a report names the output the user knows (an integer
    argmax first puts the logits at 1)."""
    from torch.utils import _pytree as pytree

    if hasattr(out, "to_tuple"):  # a transformers ModelOutput
        out = out.to_tuple()
    return [(i, t) for i, t in enumerate(pytree.tree_leaves(out))
            if isinstance(t, torch.Tensor) and t.is_floating_point()]


@torch.no_grad()
def output_error(reference, approx) -> dict:
    """How far `approx`'s outputs are from `reference`'s (the same structure: a tensor, a
    tuple, a ModelOutput), on the first floating-point output of 2+ dims whose last dim has
    more than one entry (a language model's logits, after a loss when labels were given;
    else the first floating-point output): relative error ||a - r|| / ||r|| and max |a - r|
    over it, and for logits the share of rows whose argmax agrees. `output` is that
    output's position among the model's outputs (their pytree leaves). Raises ValueError
    where the structures differ.

    The norms are over the entries finite on both sides: an entry that is the same inf (or
    nan) on both sides agrees (a padded vocabulary masked to -inf) and is counted in
    `nonfinite_equal`; one that is inf / nan on one side only is counted in
    `nonfinite_mismatch`, which the report states, rather than a nan error."""
    ref, out = _float_leaves(reference), _float_leaves(approx)
    if not ref or len(ref) != len(out) or any(x.shape != y.shape or i != j for (i, x), (j, y) in zip(ref, out)):
        raise ValueError("the outputs have different structures")
    k = next((k for k, (_, t) in enumerate(ref) if t.dim() >= 2 and t.shape[-1] > 1), 0)
    r, a = ref[k][1].double(), out[k][1].double()
    finite = torch.isfinite(r) & torch.isfinite(a)
    # the same inf, or nan on both sides: equal, not an error
    same = ~finite & ((r == a) | (torch.isnan(r) & torch.isnan(a)))
    rf, af = r[finite], a[finite]
    norm = float(rf.norm())
    error = {"output": ref[k][0], "output_shape": tuple(r.shape),
             "rel_error": float((af - rf).norm()) / norm if norm else float("nan"),
             "max_abs_error": float((af - rf).abs().max()) if rf.numel() else 0.0,
             "nonfinite_equal": int(same.sum()), "nonfinite_mismatch": int((~finite & ~same).sum())}
    if r.dim() >= 2 and r.shape[-1] > 1 and r.numel():
        agree = r.argmax(-1) == a.argmax(-1)
        error.update(top1_agreement=float(agree.double().mean()), rows=agree.numel())
    return error


def describe_error(error: dict, where: str) -> str:
    """One report line for output_error's figures."""
    text = (f"error vs the source model {where}: relative {error['rel_error']:.3g} (||fast - eager|| / ||eager|| "
            f"of output {error['output']}, shape {list(error['output_shape'])}{_finite_note(error)}), "
            f"max abs {error['max_abs_error']:.3g}")
    if error.get("nonfinite_mismatch"):
        text += (f", {error['nonfinite_mismatch']} entries inf or nan on one side only (fast vs eager; "
                 "left out of the figures above)")
    if "top1_agreement" in error:
        agree = round(error["top1_agreement"] * error["rows"])
        text += f", top-1 agreement {100 * error['top1_agreement']:.1f}% ({agree} of {error['rows']} rows)"
    return text


def _finite_note(error: dict) -> str:
    """Where the norms leave entries out: which, so the figures are read as what they cover."""
    left_out = error.get("nonfinite_equal", 0) + error.get("nonfinite_mismatch", 0)
    if not left_out:
        return ""
    shared = error.get("nonfinite_equal", 0)
    return (f"; over its finite entries: {shared} are the same inf or nan in both" if shared
            else "; over its finite entries")
