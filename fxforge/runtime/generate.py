"""generate(): prefill the prompt into the KV cache, then decode one token per step.

Semantics follow transformers' `generate`: the result is the prompt followed by the new
tokens; greedy picks the argmax; sampling applies temperature, then top-k, then top-p
(the order of transformers' logits warpers); a row that produced EOS continues with the
pad token while other rows finish; left-padded batches come with an attention_mask.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from .frames import frame_of_its_own
from .state import left_padding


def check_generate_args(layout, batch: int, prompt_len: int, max_new_tokens: int, padded: bool,
                        cache_bytes=None, memory_bytes: int | None = None):
    """Every limit is checked before any work, not discovered mid-generation.
    cache_bytes(batch, positions): the KV cache's size; memory_bytes: what the device has."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    total = prompt_len + max_new_tokens
    if layout.max_seq_len is not None and total > layout.max_seq_len:
        raise ValueError(f"the prompt ({prompt_len} tokens) plus max_new_tokens ({max_new_tokens}) is {total} "
                         f"positions, more than max_seq_len={layout.max_seq_len}; shorten the prompt or ask for "
                         "fewer tokens")
    if layout.max_batch is not None and batch > layout.max_batch:
        raise ValueError(f"batch {batch} is larger than the KV cache's max_batch={layout.max_batch}; "
                         "optimize with KVCacheConfig(max_batch=...) or split the batch")
    if cache_bytes is not None and memory_bytes is not None:
        need = cache_bytes(batch, total)
        if need > memory_bytes:
            raise ValueError(f"the prompt ({prompt_len} tokens) plus max_new_tokens ({max_new_tokens}) needs a KV cache "
                             f"of {need / 2**30:.3g} GiB for batch {batch}, more than this device's memory "
                             f"({memory_bytes / 2**30:.3g} GiB); ask for fewer tokens or a smaller batch")
    if padded and not layout.per_row_positions:
        raise ValueError("this model's positions could not be made per row by the kv_cache pass (see its report "
                         "note), so left-padded batches would get shifted positions; generate prompts of equal "
                         "length, or one at a time")


def process_logits(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus), as transformers' warpers do."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - top_p)
        drop[..., -1:] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _check_sampling(do_sample, temperature, top_k, top_p):
    if do_sample:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
            raise ValueError(f"top_k must be an int >= 0 or None, got {top_k!r}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


@frame_of_its_own  # the per-token Python calls stay off data-stack chunk boundaries (frames.py)
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, attention_mask=None, do_sample=False,
             temperature=1.0, top_k=None, top_p=None, eos_token_id=None, pad_token_id=None,
             streamer=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """`model` is an OptimizedModel whose graph went through the kv_cache pass."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        got = f"a {input_ids.dtype} tensor of shape {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) \
            else type(input_ids).__name__
        raise ValueError(f"input_ids must be an int64 tensor [batch, length], got {got}")
    batch, prompt_len = input_ids.shape
    if prompt_len == 0:
        raise ValueError("input_ids is empty: generation needs at least one prompt token")
    device = model.device
    input_ids = input_ids.to(device)
    pad = left_padding(attention_mask, batch, prompt_len, device)
    check_generate_args(model.kv_layout, batch, prompt_len, max_new_tokens, bool((pad > 0).any()),
                        model.kv_cache_bytes, device_memory_bytes(device))
    model.check_step_sizes(batch, [prompt_len] + ([1] if max_new_tokens > 1 else []))
    _check_sampling(do_sample, temperature, top_k, top_p)
    eos = _as_list(eos_token_id)
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    emit = _stream_fn(streamer)
    if streamer is not None and hasattr(streamer, "put"):
        streamer.put(input_ids.cpu())
    if max_new_tokens == 0:
        _end(streamer)
        return input_ids

    # this call's own cache: concurrent and re-entrant calls never share buffers (state.py)
    with model.kv_cache_lease(batch, prompt_len + max_new_tokens) as cache:
        cache.prepare(pad, model.bias_dtype())
        eos_t = torch.tensor(eos, device=device) if eos else None
        unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        tokens = [input_ids]
        step_ids, start = input_ids, 0
        for _ in range(max_new_tokens):
            logits = model.run_cached(step_ids, start, pad, cache)[:, -1, :].float()
            start += step_ids.shape[1]
            if do_sample:
                probs = process_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                nxt = logits.argmax(dim=-1)
            nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad_token_id))
            tokens.append(nxt[:, None])
            emit(nxt)
            if eos_t is not None:
                unfinished &= ~torch.isin(nxt, eos_t)
                if not unfinished.any():
                    break
            step_ids = nxt[:, None]
    _end(streamer)
    return torch.cat(tokens, dim=1)


def device_memory_bytes(device) -> int | None:
    """The memory a KV cache can take at most: the GPU's, or the machine's RAM on CPU."""
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError, RuntimeError):
        return None


def _as_list(eos) -> list[int]:
    if eos is None:
        return []
    if isinstance(eos, torch.Tensor):
        return [int(x) for x in eos.flatten().tolist()]
    if isinstance(eos, int):
        return [eos]
    return [int(x) for x in eos]


def _stream_fn(streamer) -> Callable:
    if streamer is None:
        return lambda tokens: None
    if hasattr(streamer, "put"):
        return lambda tokens: streamer.put(tokens.cpu())
    if callable(streamer):
        return streamer
    raise TypeError("streamer must be a callable taking each step's tokens [batch], or an object with "
                    "put()/end() such as transformers' TextStreamer")


def _end(streamer):
    if streamer is not None and hasattr(streamer, "end"):
        streamer.end()

