"""Beam search over the KV cache, step for step as transformers' `_beam_search` (5.x).

Each beam is a row of the cache: B prompts of K beams are B*K rows (the prompt repeated,
as transformers expands its inputs). Each step scores every beam's continuations
(log-softmax, then the logits processors), keeps the top max(2, 1 + #eos) * K of each
prompt, moves those that hit a stopping criterion (EOS, max length, stop strings) into
the finished hypotheses (score divided by new-length ** length_penalty), and carries the
best K unfinished ones on; the cache rows are then gathered to follow their beams
(`index_select` along the batch dimension). The loop ends as transformers' does: at max
length, when every prompt has K finished beams (early_stopping=True), or when no running
beam can beat the finished ones (the heuristics of early_stopping False / "never").
"""
from __future__ import annotations

import torch

from . import logits as lp

NEG = -1.0e9


def _gather(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """tensor [B, K, ...] at beams indices [B, J] -> [B, J, ...]."""
    while indices.dim() < tensor.dim():
        indices = indices.unsqueeze(-1)
    return torch.take_along_dim(tensor, indices, dim=1)


def _reorder(cache, rows: torch.Tensor, length: int):
    """Cache row i takes the keys and values of row rows[i] (positions < length)."""
    cache.reorder_rows(rows, length)


def beam_search(model, input_ids, pad, new_tokens: int, num_beams: int, processors: list, criteria: list,
                eos, pad_token_id: int, s: dict, stop_eos=...):
    """input_ids [B*K, L] (each prompt repeated K times), pad [B*K]. `eos`: the settings'
    EOS ids (how many continuations are kept, what fills finished beams), `stop_eos` those
    that end a beam (None where a caller's EosTokenCriteria took eos_token_id's place, as in
    transformers; `eos` when not given)."""
    if stop_eos is ...:
        stop_eos = eos
    from .generate import output, stop_mask

    device = input_ids.device
    rows, prompt_len = input_ids.shape
    batch = rows // num_beams
    max_length = prompt_len + new_tokens
    length_penalty, early_stopping = s["length_penalty"], s["early_stopping"]
    want_scores = s["return_dict_in_generate"] and s["output_scores"]
    want_logits = s["return_dict_in_generate"] and s["output_logits"]

    keep = max(2, 1 + (eos.shape[0] if eos is not None else 0)) * num_beams
    top_beam_mask = torch.cat((torch.ones(num_beams, dtype=torch.bool), torch.zeros(keep - num_beams, dtype=torch.bool)))
    top_beam_mask = top_beam_mask.to(device)
    fill = (pad_token_id if pad_token_id else int(eos[0])) if eos is not None else -1
    running = torch.full((batch, num_beams, max_length), fill, dtype=torch.long, device=device)
    running[:, :, :prompt_len] = input_ids.view(batch, num_beams, prompt_len)
    finished_seqs = running.clone()
    running_scores = torch.zeros((batch, num_beams), dtype=torch.float, device=device)
    running_scores[:, 1:] = NEG  # only the first beam's tokens count at the first step
    finished_scores = torch.full((batch, num_beams), NEG, dtype=torch.float, device=device)
    is_finished = torch.zeros((batch, num_beams), dtype=torch.bool, device=device)
    can_improve = torch.ones((batch, 1), dtype=torch.bool, device=device)
    running_indices = torch.full((batch, num_beams, new_tokens), -1, dtype=torch.int32, device=device)
    finished_indices = running_indices.clone()
    all_scores, raw = ([] if want_scores else None), ([] if want_logits else None)
    offset = torch.arange(batch, device=device).view(-1, 1) * num_beams

    # the loop ends on the step that picks the token at max_length - 1, never feeding it:
    # the cache holds max_length - 1 positions (a position table's last row is the last fed)
    with model.kv_cache_lease(rows, max_length - 1) as cache:
        cache.prepare(pad, model.bias_dtype())
        cur, start, step_ids = prompt_len, 0, input_ids
        while True:
            # static one-token steps where they run: the beams' cache rows are reordered in
            # place, so the step's buffers stay put
            logits = model.run_step(step_ids, start, pad, cache)[:, -1, :].float()
            start += step_ids.shape[1]
            flat = running[:, :, :cur].reshape(rows, cur)
            log_probs = lp.apply(processors, flat, torch.log_softmax(logits, dim=-1))
            if raw is not None:
                raw.append(logits.clone())
            if all_scores is not None:
                all_scores.append(log_probs.clone())
            vocab = log_probs.shape[-1]
            log_probs = (log_probs.view(batch, num_beams, vocab) + running_scores[:, :, None]).view(batch, -1)

            # the top `keep` continuations of each prompt, over all its beams
            top_scores, top = torch.topk(log_probs, k=keep)
            top_beams = top // vocab
            top_indices = _gather(running_indices, top_beams)
            top_seqs = _gather(running, top_beams)
            top_seqs[:, :, cur] = top % vocab
            top_indices[:, :, cur - prompt_len] = (top_beams + offset).to(top_indices.dtype)

            flat_top = top_seqs[:, :, :cur + 1].reshape(batch * keep, cur + 1)
            done = torch.full((batch * keep,), cur + 1 >= max_length, dtype=torch.bool, device=device)
            if stop_eos is not None:
                done |= torch.isin(flat_top[:, -1], stop_eos)
            more = stop_mask(criteria, flat_top, tuple(all_scores) if all_scores is not None else None)
            if more is not None:
                done |= more
            done = done.view(batch, keep)

            # the best `num_beams` unfinished continuations run on
            alive_scores = top_scores + done.float() * NEG
            nxt = torch.topk(alive_scores, k=num_beams)[1]
            running = _gather(top_seqs, nxt)
            running_scores = _gather(alive_scores, nxt)
            running_indices = _gather(top_indices, nxt)

            # finished continuations among the top `num_beams` join the finished beams if good enough
            just_finished = done & top_beam_mask[None, :]
            scored = top_scores / ((cur + 1 - prompt_len) ** length_penalty)
            full = torch.all(is_finished, dim=-1, keepdim=True) & (early_stopping is True)
            scored = scored + full.float() * NEG + (~can_improve).float() * NEG + (~just_finished) * NEG
            merged_scores = torch.cat((finished_scores, scored), dim=1)
            best = torch.topk(merged_scores, k=num_beams)[1]
            finished_seqs = _gather(torch.cat((finished_seqs, top_seqs), dim=1), best)
            finished_scores = _gather(merged_scores, best)
            finished_indices = _gather(torch.cat((finished_indices, top_indices), dim=1), best)
            is_finished = _gather(torch.cat((is_finished, just_finished), dim=1), best)

            # the cache rows follow their beams
            _reorder(cache, running_indices[..., cur - prompt_len].reshape(rows).long(), start)
            cur += 1

            if early_stopping == "never" and length_penalty > 0.0:
                best_length = max_length - prompt_len
            else:
                best_length = cur - prompt_len
            best_running = running_scores[:, :1] / (best_length ** length_penalty)
            worst_finished = torch.where(is_finished, torch.min(finished_scores, dim=1, keepdim=True)[0], NEG)
            can_improve = can_improve & torch.any(best_running > worst_finished, dim=-1, keepdim=True)
            go_on = bool(torch.any(can_improve)) and not (bool(torch.all(is_finished)) and early_stopping is True) \
                and not bool(torch.all(done))
            if not go_on:
                break
            step_ids = running[:, :, cur - 1].reshape(rows, 1)

    returns = s["num_return_sequences"]
    sequences = finished_seqs[:, :returns].reshape(batch * returns, -1)
    seq_scores = finished_scores[:, :returns].reshape(batch * returns)
    indices = finished_indices[:, :returns].reshape(batch * returns, -1)
    generated = int((indices + 1).bool().sum(dim=1).max())
    sequences, indices = sequences[:, :prompt_len + generated], indices[:, :generated]
    if not s["return_dict_in_generate"]:
        return sequences
    return output("GenerateBeamDecoderOnlyOutput", sequences=sequences,
                  sequences_scores=seq_scores if s["output_scores"] else None,
                  scores=tuple(all_scores) if all_scores is not None else None,
                  logits=tuple(raw) if raw is not None else None, beam_indices=indices)
