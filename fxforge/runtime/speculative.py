"""Speculative decoding: a cheap draft proposes k tokens, the model checks all of them in
one cached step, and keeps the longest prefix it agrees with plus one token of its own.

    fast.generate(ids, 64, draft=draft_model, num_draft_tokens=4)   # any OptimizedModel, same vocabulary
    fast.generate(ids, 64, draft="ngram")                           # prompt lookup: no second model
    draft = self_draft(model, example_inputs)                       # the same model as a cheap int4 draft
    fast.generate(ids, 64, draft=draft, num_draft_tokens=5)

The answer does not change (Leviathan et al. 2023, Chen et al. 2023):
- greedy: a draft token is kept while it is the model's own argmax, so the tokens are the
  plain greedy ones (the model's logits for a position do not depend on how many tokens
  the step carried, up to float rounding: see docs/passes.md on kv_cache);
- sampling: draft token x, drawn from the draft's q, is kept with probability
  min(1, p(x) / q(x)); at the first rejection a token is drawn from max(p - q, 0),
  renormalised; if all k are kept, one more is drawn from p. Every emitted token is then
  distributed as p, the model's processed distribution (warpers included). The n-gram
  draft proposes one token for sure: q is a point mass.

Rollback is bookkeeping: each cache remembers how many leading positions hold tokens of
the sequence (`valid`); the next step starts there and overwrites what was rejected.
One sequence at a time (batch 1), as transformers' assisted generation.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch

from . import logits as lp

NGRAM_MAX = 3  # prompt lookup tries the last 3, 2, then 1 tokens


def self_draft_config():
    """The quantization of `self_draft`: int4 in groups of 32 with float zero points (each
    group's own [min, max] range), bfloat16 products (PyTorch's vectorized int4 CPU kernel),
    and the tied lm_head quantized too (a small model's largest product). The int4 draft
    most often right among those measured on SmolLM2-135M (0.83-0.91 acceptance at k = 4-5,
    against 0.38-0.53 with integer zero points or groups of 64) at 2.1-2.4x the float32
    model's decode speed; plain `quantize="int4"` (float32 products) decodes slower than
    the float model on the CPU (docs/benchmarks.md, issue 19)."""
    from ..passes.quantize import DEFAULT_EXCLUDE, OUTPUT_HEAD, QuantConfig

    return QuantConfig("int4", group_size=32, zero_point="float", compute_dtype=torch.bfloat16,
                       exclude=tuple(p for p in DEFAULT_EXCLUDE if not p.startswith("lm_head") and p != OUTPUT_HEAD),
                       include_tied=True)


def self_draft(model, example_inputs, **options):
    """A draft for self-speculation: `model` itself optimized with a KV cache and int4
    weights (`self_draft_config()`), for `fast.generate(ids, n, draft=self_draft(model, ex))`.
    Its numerics never change greedy tokens (a draft token is kept only where it is the
    model's own argmax), only how often it is right. `options` go to fxforge.optimize
    (backend=..., ...).

    A float32 model's draft has bfloat16 weights (`bfloat16_copy`; its products are
    bfloat16 anyway): a draft step then skips the casts around each product, and
    SmolLM2's draft decodes 3% faster alone at the same acceptance, self-speculation
    1.31x -> 1.33x (benchmarks/speculative.py, docs/benchmarks.md, issue 19). Its float buffers (rotary frequencies) stay
    float32, as in a transformers model loaded in bfloat16: rounded frequencies would
    shift every angle by up to 0.2% of its position, and so lose the draft its positions
    in long prompts. Where the model does not run that way (e.g. a float32 buffer added
    to the activations makes them float32, and capture fails), the draft keeps float32
    weights and says so in a warning. The model is not changed. Memory: the int4
    weights, and the rest of the model in bfloat16."""
    from ..api import optimize

    def draft_of(m):
        return optimize(m, example_inputs, kv_cache=True, quantize=self_draft_config(), **options)

    if not _float32_parameters(model):
        return draft_of(model)
    try:
        return draft_of(bfloat16_copy(model))
    except Exception as err:  # noqa: BLE001 (any capture or pass error: the float32 draft may still work)
        failure = err
    # raises on its own where the options or the model are at fault (then no warning
    # blames bfloat16); warns only where float32 weights do what bfloat16 ones could not
    draft = draft_of(model)
    warnings.warn(f"self_draft: the model with bfloat16 weights did not optimize ({type(failure).__name__}: "
                  f"{failure}); the draft keeps float32 weights (bfloat16 products), a few % slower", stacklevel=2)
    return draft


def _float32_parameters(model) -> bool:
    params = [p for p in model.parameters() if p.is_floating_point()]
    return bool(params) and all(p.dtype == torch.float32 for p in params)


def bfloat16_copy(model):
    """A copy of `model` with bfloat16 parameters (tied ones still tied) and its buffers
    as they were, made without a float32 copy of the weights first. (A plain tensor
    attribute that views a parameter's data without being it stays a float32 copy.)"""
    # deepcopy's memo hands the copy each parameter's bfloat16 twin (one per parameter
    # object, so a tied embedding and lm_head stay one tensor)
    memo = {id(p): torch.nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False)
            for p in model.parameters() if p.is_floating_point()}
    return copy.deepcopy(model, memo)


@dataclass
class SpeculativeStats:
    """Filled by generate(..., draft=..., draft_stats=SpeculativeStats()): how often the
    draft was right. `accepted / proposed` is the acceptance rate; each round is one
    cached step of the model."""
    rounds: int = 0
    proposed: int = 0
    accepted: int = 0
    per_round: list = field(default_factory=list)  # accepted tokens in each round

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


class NGramDraft:
    """Prompt lookup: find the latest earlier occurrence of the sequence's last n tokens
    (n = 3, 2, 1) and propose the tokens that followed it."""

    def reset(self, seq: torch.Tensor, prompt_len: int, end: int):
        pass

    def propose(self, seq: torch.Tensor, length: int, k: int, processors, sample: bool, generator):
        row = seq[0, :length].tolist()
        for n in range(min(NGRAM_MAX, length - 1), 0, -1):
            tail = row[length - n:]
            for start in range(length - n - 1, -1, -1):
                if row[start:start + n] == tail:
                    follow = row[start + n:start + n + k]
                    if follow:
                        return follow, None
        return [], None

    def rollback(self, valid: int):
        pass

    def release(self):
        pass


class ModelDraft:
    """A smaller (or fxforge-cheapened) OptimizedModel with a KV cache of its own."""

    def __init__(self, model, target):
        if getattr(model, "kv_layout", None) is None:
            raise ValueError("the draft model needs a KV cache: build it with "
                             "fxforge.optimize(draft_model, example_inputs, kv_cache=True)")
        if model.device != target.device:
            raise ValueError(f"the draft runs on {model.device} and the model on {target.device}; "
                             "move one with .to(device)")
        vocab, draft_vocab = _vocab(target), _vocab(model)
        if vocab != draft_vocab:
            raise ValueError(f"the draft's vocabulary has {draft_vocab} tokens and the model's {vocab}: "
                             "speculative decoding needs the same tokenizer and vocabulary size")
        self.model, self.cache, self.valid = model, None, 0
        self.pad = torch.zeros(1, dtype=torch.long, device=model.device)

    def reset(self, seq: torch.Tensor, prompt_len: int, end: int):
        # what the draft feeds: the prompt, then at most up to position end - 3 (a round
        # proposes at most end - length - 1 tokens and never feeds its last proposal, and
        # no round runs at length end - 1), so end - 2 positions past a one-token request
        need = max(prompt_len, end - 2)
        # the draft's own position limit, checked as generate() checks the model's, before
        # any work (past it the draft's program would index past its position table)
        limit = self.model.kv_layout.max_seq_len
        if limit is not None and need > limit:
            raise ValueError(f"the prompt ({prompt_len} tokens) plus max_new_tokens ({end - prompt_len}): the draft "
                             f"is fed {need} positions, more than the draft model's max_seq_len={limit}; use a "
                             "draft with as many positions as the model (or draft='ngram'), shorten the prompt "
                             "or ask for fewer tokens")
        # the prompt, then steps of one or two tokens ending at most at position need - 1
        self.model.check_step_sizes(1, [prompt_len])
        self.model.check_step_sizes(1, [1], range(prompt_len, need))
        self.model.check_step_sizes(1, [2], range(prompt_len, need - 1))
        self._lease = self.model.kv_cache_lease(1, need)
        self.cache = self._lease.__enter__()
        self.cache.prepare(self.pad, self.model.bias_dtype())
        self.valid = 0

    def _logits(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        return self.model.run_cached(ids, start, self.pad, self.cache, last_only=True)[:, -1, :].float()

    def propose(self, seq: torch.Tensor, length: int, k: int, processors, sample: bool, generator):
        logits = self._logits(seq[:, self.valid:length], self.valid)
        self.valid = length
        tokens, probs = [], []
        for i in range(k):
            processed = lp.apply(processors, seq[:, :length + i], logits)
            if sample:
                q = processed.softmax(dim=-1)
                x = torch.multinomial(q, 1, generator=generator).squeeze(1)
                probs.append(q[0])
            else:
                x = processed.argmax(dim=-1)
            seq[:, length + i] = x
            tokens.append(int(x))
            if i < k - 1:
                logits = self._logits(x[:, None], length + i)
                self.valid = length + i + 1
        return tokens, probs

    def rollback(self, valid: int):
        self.valid = min(self.valid, valid)

    def release(self):
        if self.cache is not None:
            self._lease.__exit__(None, None, None)
            self.cache = None


def _vocab(model):
    return model.graph.outputs[model._logits_index()].shape[-1]


def make_draft(draft, target):
    if isinstance(draft, str):
        if draft != "ngram":
            raise ValueError(f"draft={draft!r}: use 'ngram' (prompt lookup) or an OptimizedModel "
                             "optimized with kv_cache=True")
        return NGramDraft()
    from .module import OptimizedModel

    if not isinstance(draft, OptimizedModel):
        raise ValueError(f"draft must be an fxforge OptimizedModel (optimized with kv_cache=True) or 'ngram', "
                         f"got {type(draft).__name__}; for a transformers model, "
                         "draft = fxforge.optimize(small_model, example_inputs, kv_cache=True)")
    return ModelDraft(draft, target)


def accept(p_rows: torch.Tensor, tokens: list[int], q_rows: list | None, sample: bool, generator) -> tuple[int, int]:
    """(how many draft tokens are kept, the token that follows them). p_rows [k+1, V]:
    the model's processed distributions (probabilities when sampling, scores when not)
    at each draft position and one past the last."""
    k = len(tokens)
    if not sample:
        best = p_rows.argmax(dim=-1).tolist()
        m = 0
        while m < k and best[m] == tokens[m]:
            m += 1
        return m, best[m]
    for i, x in enumerate(tokens):
        p = p_rows[i]
        q_x = 1.0 if q_rows is None else float(q_rows[i][x])
        u = float(torch.rand((), generator=generator, device=p.device))
        if q_x > 0 and u < min(1.0, float(p[x]) / q_x):
            continue
        if q_rows is None:  # a point-mass proposal: max(p - q, 0) is p without x
            residual = p.clone()
            residual[x] = 0
        else:
            residual = (p - q_rows[i]).clamp_min(0)
        if float(residual.sum()) <= 0:  # p == q: any draw from p is right
            residual = p
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    return k, int(torch.multinomial(p_rows[k], 1, generator=generator))


def speculative_loop(model, draft, seq: torch.Tensor, prompt_len: int, new_tokens: int, k: int, processors,
                     sample: bool, eos: torch.Tensor | None, criteria: list, emit, generator,
                     stats: SpeculativeStats | None) -> int:
    """Fill seq[0, prompt_len:] (a [1, prompt_len + new_tokens + k] buffer) and return the
    final length."""
    from .generate import fed_positions, stop_mask

    pad = torch.zeros(1, dtype=torch.long, device=seq.device)
    # a round proposes at most end - length - 1 tokens and its step feeds the draft tokens,
    # never the token it picks after them: no step reaches past position end - 2, so the
    # model's cache needs prompt + new tokens - 1 positions, as plain generate's does (a
    # model with a position table of that many rows has no room for more)
    end = prompt_len + new_tokens
    capacity = fed_positions(prompt_len, new_tokens)
    k_max = max(0, min(k, new_tokens - 1))
    # the prompt (with the first draft tokens), then verification steps of 1 + r tokens
    # after `start` cached ones (start = length - 1 >= prompt_len, r <= end - length - 1)
    model.check_step_sizes(1, range(prompt_len, prompt_len + k_max + 1))
    full = max(prompt_len, end - k - 1)  # starts below it may verify all k draft tokens
    model.check_step_sizes(1, range(1, k + 2), range(prompt_len, full))
    for start in range(full, end - 1):
        model.check_step_sizes(1, range(1, end - start), (start,))
    draft.reset(seq, prompt_len, end)
    try:
        with model.kv_cache_lease(1, capacity) as cache:
            cache.prepare(pad, model.bias_dtype())
            length, valid = prompt_len, 0
            while length < end:
                room = min(k, end - length - 1)
                tokens, q_rows = draft.propose(seq, length, room, processors, sample, generator) if room else ([], None)
                tokens = tokens[:room]
                seq[0, length:length + len(tokens)] = torch.tensor(tokens, dtype=torch.long, device=seq.device)
                logits = model.run_cached(seq[:, valid:length + len(tokens)], valid, pad, cache)[0].float()
                logits = logits[length - 1 - valid:]  # the distributions at each draft position, and after
                rows = torch.stack([lp.apply(processors, seq[:, :length + i], logits[i:i + 1])[0]
                                    for i in range(len(tokens) + 1)])
                m, nxt = accept(rows.softmax(dim=-1) if sample else rows, tokens, q_rows, sample, generator)
                if stats is not None:
                    stats.rounds += 1
                    stats.proposed += len(tokens)
                    stats.accepted += m
                    stats.per_round.append(m)
                seq[0, length + m] = nxt
                new = length + m + 1
                valid = new - 1  # the model's cache holds every kept token but the last
                draft.rollback(new - 1)
                for position in range(length, new):  # stop at the first EOS or stopping criterion
                    token = seq[:, position]
                    emit(token)
                    done = stop_mask(criteria, seq[:, :position + 1], None)
                    if eos is not None and bool(torch.isin(token, eos)):
                        return position + 1
                    if done is not None and bool(done.all()):
                        return position + 1
                length = new
            return length
    finally:
        draft.release()
