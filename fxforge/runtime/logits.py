"""Logits processors for generate(), each a callable (input_ids [N, L], scores [N, V]) ->
scores, applied as a list in transformers' order (GenerationMixin._get_logits_processor):

    repetition_penalty, no_repeat_ngram_size, encoder_no_repeat_ngram_size, min_length, min_new_tokens, forced_bos_token_id,
    forced_eos_token_id, suppress_tokens, begin_suppress_tokens, the caller's own processors
    (logits_processor=), then, only when sampling, temperature, top_k, top_p.

A processor of the caller's of the same transformers type as one built from the settings
takes that one's place (`merge`, transformers' _merge_criteria_processor_list): each
processor here names the transformers class it stands for (`stands_for`).

Each follows the transformers processor of the same name exactly (which tokens it
touches, how it treats negative logits, the prompt and the padding), so greedy and beam
outputs are the same token for token.
"""
from __future__ import annotations

import math
import warnings

import torch


class RepetitionPenalty:
    """A token already in the row (prompt included, its left padding not) gets its score
    divided by `penalty` when positive, multiplied when negative."""

    stands_for = "RepetitionPenaltyLogitsProcessor"

    def __init__(self, penalty: float, pad: torch.Tensor | None):
        self.penalty, self.pad = float(penalty), pad  # pad: left-padding count per row [N]

    def __call__(self, input_ids, scores):
        vocab = scores.shape[-1]
        if self.pad is not None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            input_ids = input_ids.masked_fill(positions[None, :] < self.pad[:, None], vocab)
        input_ids = input_ids.clamp(max=vocab)
        padded = torch.nn.functional.pad(scores, (0, 1))  # column `vocab` absorbs the masked ids
        score = torch.gather(padded, 1, input_ids)
        score = torch.where(score < 0, score * self.penalty, score / self.penalty)
        return padded.scatter(1, input_ids, score)[..., :vocab]


class NoRepeatNGram:
    """Bans every token that would repeat an n-gram already in the row (prompt and its
    padding included, as transformers does)."""

    stands_for = "NoRepeatNGramLogitsProcessor"

    def __init__(self, n: int):
        self.n = n

    def __call__(self, input_ids, scores):
        length = input_ids.shape[-1]
        if length < self.n:
            return scores
        prefix = input_ids[:, length + 1 - self.n:]
        windows = input_ids.unfold(dimension=1, size=self.n, step=1)
        matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1)
        vocab = scores.shape[-1]
        banned = scores.new_zeros((scores.shape[0], vocab + 1), dtype=torch.bool)
        banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=vocab), vocab), True)
        return scores.masked_fill(banned[:, :vocab], -float("inf"))


class PromptNoRepeatNGram:
    """transformers' encoder_no_repeat_ngram_size for a decoder-only model, whose
    "encoder input" is the prompt: a token that would complete an n-gram of the row's
    prompt (its left padding included, as transformers counts it) gets -inf. `prompt` is
    the batch before beams or samples expand it; rows of `input_ids` are its rows in order,
    each repeated len(input_ids) // len(prompt) times."""

    stands_for = "EncoderNoRepeatNGramLogitsProcessor"

    def __init__(self, n: int, prompt: torch.Tensor):
        self.n, self.rows = n, prompt.shape[0]
        self.ngrams = []
        for row in prompt.tolist():
            table: dict[tuple, list[int]] = {}
            for gram in zip(*[row[i:] for i in range(n)]):
                table.setdefault(tuple(gram[:-1]), []).append(gram[-1])
            self.ngrams.append(table)

    def __call__(self, input_ids, scores):
        per_row = scores.shape[0] // self.rows
        length = input_ids.shape[-1]
        out = scores.clone()
        for i in range(scores.shape[0]):
            # the last n - 1 tokens, sliced as transformers slices them
            banned = self.ngrams[i // per_row].get(tuple(input_ids[i][length + 1 - self.n:length].tolist()), [])
            if banned:
                out[i, banned] = -math.inf
        return out


class MinLength:
    """EOS gets -inf while the row (prompt included) is shorter than `min_length`.
    `stands_for`: transformers' MinLengthLogitsProcessor, or MinNewTokensLengthLogitsProcessor
    (min_new_tokens, counted from the prompt's end: the same rule at prompt + min_new_tokens)."""

    def __init__(self, min_length: int, eos: torch.Tensor, stands_for: str = "MinLengthLogitsProcessor"):
        self.min_length, self.eos, self.stands_for = min_length, eos, stands_for

    def __call__(self, input_ids, scores):
        if input_ids.shape[-1] >= self.min_length:
            return scores
        is_eos = torch.isin(torch.arange(scores.shape[-1], device=scores.device), self.eos)
        return torch.where(is_eos, -math.inf, scores)


class ForcedBOS:
    """The first token of a row that starts from one token is `bos`: every other token gets -inf."""

    stands_for = "ForcedBOSTokenLogitsProcessor"

    def __init__(self, bos: int):
        self.bos = int(bos)

    def __call__(self, input_ids, scores):
        if input_ids.shape[-1] != 1:
            return scores
        out = torch.full_like(scores, -math.inf)
        out[:, self.bos] = 0
        return out


class ForcedEOS:
    """The last token before `max_length` (prompt included) is an EOS: everything else gets -inf."""

    stands_for = "ForcedEOSTokenLogitsProcessor"

    def __init__(self, max_length: int, eos: list[int]):
        self.max_length, self.eos = max_length, list(eos)

    def __call__(self, input_ids, scores):
        if input_ids.shape[-1] != self.max_length - 1:
            return scores
        out = torch.full_like(scores, -math.inf)
        out[:, self.eos] = 0
        return out


class SuppressTokens:
    """`tokens` get -inf at every step (ids outside the vocabulary are ignored, as in
    transformers). `at_length`: only at the step whose row (prompt included) has that
    length, the first generated token (begin_suppress_tokens)."""

    def __init__(self, tokens, at_length: int | None = None):
        self.tokens, self.at_length = torch.as_tensor(list(tokens), dtype=torch.long), at_length
        self.stands_for = "SuppressTokensLogitsProcessor" if at_length is None else \
            "SuppressTokensAtBeginLogitsProcessor"

    def __call__(self, input_ids, scores):
        if self.at_length is not None and input_ids.shape[-1] != self.at_length:
            return scores
        vocab = torch.arange(scores.shape[-1], device=scores.device)
        return torch.where(torch.isin(vocab, self.tokens.to(scores.device)), -math.inf, scores)


class Temperature:
    def __init__(self, temperature: float):
        self.temperature = temperature

    def __call__(self, input_ids, scores):
        return scores / self.temperature


class TopK:
    def __init__(self, k: int):
        self.k = k

    def __call__(self, input_ids, scores):
        k = min(self.k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]
        return scores.masked_fill(scores < kth, float("-inf"))


class TopP:
    def __init__(self, p: float):
        self.p = p

    def __call__(self, input_ids, scores):
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - self.p)
        drop[..., -1:] = False  # always keep the most likely token
        return scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def warpers(temperature: float, top_k: int | None, top_p: float | None) -> list:
    """The sampling warpers in transformers' order: temperature, top-k, top-p."""
    out = []
    if temperature is not None and temperature != 1.0:
        out.append(Temperature(temperature))
    if top_k is not None and top_k != 0:
        out.append(TopK(top_k))
    if top_p is not None and top_p < 1.0:
        out.append(TopP(top_p))
    return out


def processors(*, repetition_penalty=None, pad=None, no_repeat_ngram_size=None, min_length=None, eos=None,
               do_sample=False, temperature=1.0, top_k=None, top_p=None, custom=(), forced_bos=None,
               forced_eos=None, max_length=None, suppress_tokens=None, begin_suppress_tokens=None,
               prompt_len=None, prompt_no_repeat_ngram_size=None, prompt=None, min_new_tokens=None) -> list:
    """The processor list of one generate() call. `pad`: left padding per row; `eos`: a
    tensor of EOS ids or None; `min_length` counts the prompt (min_new_tokens already
    folded in by the caller, as transformers does; `min_new_tokens` > 0 adds transformers'
    second processor for it, the same rule, which a caller's processor may replace alone); `forced_bos`: a token id or None;
    `forced_eos`: a list of token ids (or None), forced at `max_length` - 1 (prompt included);
    `suppress_tokens` at every step, `begin_suppress_tokens` at the first generated one
    (`prompt_len` long rows; one later after a one-token prompt with forced_bos, as in
    transformers); `prompt_no_repeat_ngram_size` (encoder_no_repeat_ngram_size) over `prompt`."""
    out = []
    if repetition_penalty is not None and repetition_penalty != 1.0:
        out.append(RepetitionPenalty(repetition_penalty, pad))
    if no_repeat_ngram_size is not None and no_repeat_ngram_size > 0:
        out.append(NoRepeatNGram(no_repeat_ngram_size))
    if prompt_no_repeat_ngram_size is not None and prompt_no_repeat_ngram_size > 0:
        out.append(PromptNoRepeatNGram(prompt_no_repeat_ngram_size, prompt))
    if min_length is not None and min_length > 0 and eos is not None:
        out.append(MinLength(min_length, eos))
    if min_new_tokens is not None and min_new_tokens > 0 and eos is not None:
        out.append(MinLength(prompt_len + min_new_tokens, eos, "MinNewTokensLengthLogitsProcessor"))
    if forced_bos is not None:
        out.append(ForcedBOS(forced_bos))
    if forced_eos:
        out.append(ForcedEOS(max_length, forced_eos))
    if suppress_tokens is not None:
        out.append(SuppressTokens(_ids(suppress_tokens)))
    if begin_suppress_tokens is not None:
        begin = prompt_len if prompt_len > 1 or forced_bos is None else prompt_len + 1
        out.append(SuppressTokens(_ids(begin_suppress_tokens), at_length=begin))
    out = merge(out, list(custom or ()), "logits processor")  # the caller's come before the warpers
    if do_sample:
        out += warpers(temperature, top_k, top_p)
    return out


def merge(defaults: list, custom: list, kind: str) -> list:
    """transformers' _merge_criteria_processor_list (5.x): a default whose transformers type
    the caller also passed is replaced, in its place, by the caller's first one of that
    type ("the custom one will take precedence", with transformers' warning); the caller's
    others follow the defaults in their order. `kind`: "logits processor" or "stopping
    criteria", for the warning."""
    if not custom:
        return list(defaults)
    out = []
    for default in defaults:
        mine = next((c for c in custom if same_type(c, default)), None)
        if mine is not None:
            name = type(mine)
            warnings.warn(f"A custom {kind} of type {name} has been passed to `.generate()`, but it was also created "
                          f"in `.generate()`, given its parameterization. The custom {name} will take precedence. "
                          f"Please check the docstring of {name} to see related `.generate()` flags.", stacklevel=4)
        out.append(default if mine is None else mine)
    return out + [c for c in custom if c not in out]  # (`in`, as transformers tests it)


def same_type(custom, default) -> bool:
    """transformers' `type(custom) is type(default)`, for a default of fxforge's own that
    stands for a transformers class (by name: a subclass, or a class of the same name
    outside transformers, is another type)."""
    name = getattr(default, "stands_for", None)
    if name is None:
        return type(custom) is type(default)
    kind = type(custom)
    return kind.__name__ == name and kind.__module__.startswith("transformers.")


def _ids(tokens) -> list[int]:
    return [int(tokens)] if isinstance(tokens, int) else [int(t) for t in tokens]


def apply(processor_list, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    for process in processor_list:
        scores = process(input_ids, scores)
    return scores
