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
