"""generate() parity with transformers' generate on the zoo models (random weights,
greedy): generation_config, max_length, min_new_tokens, repetition_penalty,
no_repeat_ngram_size, stopping criteria and stop strings, return_dict_in_generate with
scores, beam search; batch 1 and a left-padded batch. Unsupported settings raise."""
import warnings

import pytest
import torch

import fxforge

import zoo
from helpers import prompts

MODELS = {"gpt2": lambda: zoo.gpt2("eager"), "llama": lambda: zoo.llama("sdpa")}


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request):
    torch.manual_seed(0)
    model, vocab = MODELS[request.param]()
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),), kv_cache=True)
    return model, fast, vocab


def _both(model, fast, ids, mask, **kw):
    kw.setdefault("pad_token_id", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = model.generate(ids, attention_mask=mask, do_sample=False, **kw)
    out = fast.generate(ids, attention_mask=mask, **kw)
    return out, ref


CASES = {
    "max_new_tokens": dict(max_new_tokens=12, eos_token_id=None),
    "max_length": dict(max_length=17, eos_token_id=None),
    "min_new_tokens": dict(max_new_tokens=12, min_new_tokens=9, eos_token_id=[0, 3, 5, 7]),
    "min_length": dict(max_new_tokens=12, min_length=14, eos_token_id=[0, 3, 5, 7]),
    "repetition_penalty": dict(max_new_tokens=12, repetition_penalty=1.7, eos_token_id=None),
    "repetition_penalty_below_1": dict(max_new_tokens=12, repetition_penalty=0.6, eos_token_id=None),
    "no_repeat_ngram_size": dict(max_new_tokens=16, no_repeat_ngram_size=2, eos_token_id=None),
    "all_processors": dict(max_new_tokens=12, repetition_penalty=1.3, no_repeat_ngram_size=3, min_new_tokens=4,
                           eos_token_id=[0, 3]),
    "eos_list": dict(max_new_tokens=12, eos_token_id=[3, 5, 7, 11, 13]),
    "beams": dict(max_new_tokens=10, num_beams=3, eos_token_id=None),
    "beams_eos": dict(max_new_tokens=10, num_beams=3, eos_token_id=[3, 5, 7, 11]),
    "beams_return_2": dict(max_new_tokens=10, num_beams=3, num_return_sequences=2, eos_token_id=[3, 5, 7]),
    "beams_early_stopping": dict(max_new_tokens=10, num_beams=4, early_stopping=True, length_penalty=0.5,
                                 eos_token_id=[3, 5, 7, 11]),
    "beams_never": dict(max_new_tokens=10, num_beams=2, early_stopping="never", length_penalty=2.0,
                        eos_token_id=[3, 5, 7, 11]),
    "beams_processors": dict(max_new_tokens=10, num_beams=3, repetition_penalty=1.4, no_repeat_ngram_size=2,
                             min_new_tokens=3, eos_token_id=[3, 5]),
}


@pytest.mark.parametrize("padded", [False, True], ids=["batch1", "left_padded"])
@pytest.mark.parametrize("case", CASES)
def test_tokens_equal_transformers(pair, case, padded):
    model, fast, vocab = pair
    ids, mask = prompts(vocab, padded)
    out, ref = _both(model, fast, ids, mask, **CASES[case])
    assert torch.equal(out, ref), (out, ref)


@pytest.mark.parametrize("padded", [False, True], ids=["batch1", "left_padded"])
def test_generation_config_equals_transformers(pair, padded):
    from transformers import GenerationConfig

    model, fast, vocab = pair
    ids, mask = prompts(vocab, padded)
    config = GenerationConfig(max_new_tokens=11, repetition_penalty=1.2, no_repeat_ngram_size=3, eos_token_id=[3, 5],
                              pad_token_id=0, do_sample=False)
    ref = model.generate(ids, attention_mask=mask, generation_config=config)
    assert torch.equal(fast.generate(ids, attention_mask=mask, generation_config=config), ref)
    # a call's own argument wins over the generation_config
    ref = model.generate(ids, attention_mask=mask, generation_config=config, max_new_tokens=4)
    assert torch.equal(fast.generate(ids, attention_mask=mask, generation_config=config, max_new_tokens=4), ref)


def test_model_defaults_from_generation_config(pair):
    from transformers import GenerationConfig

    model, fast, vocab = pair
    ids, _ = prompts(vocab, False)
    saved = fast.generation_defaults
    try:
        fast.generation_config = GenerationConfig(max_length=14, repetition_penalty=1.5, eos_token_id=[3, 5],
                                                  pad_token_id=0)
        assert fast.generation_defaults["repetition_penalty"] == 1.5
        ref = model.generate(ids, max_length=14, repetition_penalty=1.5, eos_token_id=[3, 5], pad_token_id=0)
        assert torch.equal(fast.generate(ids), ref)
    finally:
        fast.generation_defaults = saved


def test_default_length_is_20_new_tokens(pair):
    model, fast, vocab = pair
    ids, _ = prompts(vocab, False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = model.generate(ids, pad_token_id=0, eos_token_id=None)
    out = fast.generate(ids, eos_token_id=None)
    assert out.shape == (1, 26) and torch.equal(out, ref)


@pytest.mark.parametrize("padded", [False, True], ids=["batch1", "left_padded"])
@pytest.mark.parametrize("beams", [1, 3])
def test_return_dict_scores_equal_transformers(pair, padded, beams):
    model, fast, vocab = pair
    ids, mask = prompts(vocab, padded)
    kw = dict(max_new_tokens=6, num_beams=beams, repetition_penalty=1.3, eos_token_id=[3, 5],
              return_dict_in_generate=True, output_scores=True, output_logits=True)
    out, ref = _both(model, fast, ids, mask, **kw)
    assert type(out).__name__ == type(ref).__name__
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.scores) == len(ref.scores) and len(out.logits) == len(ref.logits)
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    if beams > 1:
        torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, atol=1e-4, rtol=1e-4)
        assert torch.equal(out.beam_indices.long(), ref.beam_indices.long())


def test_return_dict_without_scores(pair):
    model, fast, vocab = pair
    ids, _ = prompts(vocab, False)
    out = fast.generate(ids, 5, return_dict_in_generate=True)
    assert out.scores is None and out.sequences.shape == (1, 11)


class StopAfterToken:
    """A transformers-style stopping criterion: rows whose last token is `token`."""

    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


@pytest.mark.parametrize("padded", [False, True], ids=["batch1", "left_padded"])
@pytest.mark.parametrize("eos", [None, [3]])
def test_stopping_criteria_equal_transformers(pair, padded, eos):
    from transformers import StoppingCriteria, StoppingCriteriaList

    model, fast, vocab = pair
    ids, mask = prompts(vocab, padded)
    free = fast.generate(ids, 12, attention_mask=mask, eos_token_id=None)
    token = int(free[-1, ids.shape[1] + 3])  # a token the last row makes at its 4th step

    class Criterion(StopAfterToken, StoppingCriteria):
        pass

    out, ref = _both(model, fast, ids, mask, max_new_tokens=12, eos_token_id=eos,
                     stopping_criteria=StoppingCriteriaList([Criterion(token)]))
    assert torch.equal(out, ref), (out, ref)
    # a plain callable works too
    assert torch.equal(fast.generate(ids, 12, attention_mask=mask, eos_token_id=eos, pad_token_id=0,
                                     stopping_criteria=[StopAfterToken(token)]), ref)


def _tokenizer(vocab):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab - 1)}
    words["abcdef"] = vocab - 1  # StopStringCriteria tokenizes this prefix to clean the vocab
    tok = Tokenizer(models.WordLevel(words, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w1")


@pytest.mark.parametrize("padded", [False, True], ids=["batch1", "left_padded"])
def test_stop_strings_equal_transformers(pair, padded):
    model, fast, vocab = pair
    tok = _tokenizer(vocab)
    ids, mask = prompts(vocab, padded)
    free = fast.generate(ids, 12, attention_mask=mask, eos_token_id=None)
    stop = tok.convert_ids_to_tokens(int(free[0, ids.shape[1] + 4]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                             eos_token_id=[3], stop_strings=stop, tokenizer=tok)
    out = fast.generate(ids, 12, attention_mask=mask, eos_token_id=[3], pad_token_id=0, stop_strings=stop,
                        tokenizer=tok)
    assert torch.equal(out, ref), (out, ref)
    assert out.shape[1] < free.shape[1] or padded
    with pytest.raises(ValueError, match="tokenizer"):
        fast.generate(ids, 4, attention_mask=mask, stop_strings=stop)


def test_beam_search_reorders_the_cache(pair):
    """Beam search output equals a full recompute of each returned beam: the cache rows
    followed their beams."""
    model, fast, vocab = pair
    ids, _ = prompts(vocab, False)
    out = fast.generate(ids, 8, num_beams=4, num_return_sequences=4, eos_token_id=None,
                        return_dict_in_generate=True, output_scores=True)
    for row, score in zip(out.sequences, out.sequences_scores):
        logprobs = model(row[None]).logits[0, :-1].float().log_softmax(-1)
        taken = logprobs[ids.shape[1] - 1:].gather(-1, row[ids.shape[1]:, None]).sum()
        torch.testing.assert_close(taken / 8, score, atol=1e-4, rtol=1e-4)


def test_max_new_tokens_zero_raises_as_transformers(pair):
    model, fast, vocab = pair
    ids, _ = prompts(vocab, False)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(ids, max_new_tokens=0, pad_token_id=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        fast.generate(ids, 0)
    with pytest.raises(ValueError, match="max_length"):
        fast.generate(ids, max_length=6)  # the prompt is already 6 tokens


def test_unsupported_arguments_raise_naming_them(pair):
    from transformers import GenerationConfig

    _, fast, vocab = pair
    ids, _ = prompts(vocab, False)
    with pytest.raises(ValueError, match="diversity_penalty, num_beam_groups"):
        fast.generate(ids, 4, num_beam_groups=2, diversity_penalty=0.5)
    with pytest.raises(ValueError, match="frobnicate"):
        fast.generate(ids, 4, frobnicate=True)
    with pytest.raises(ValueError, match="bad_words_ids"):
        fast.generate(ids, 4, generation_config=GenerationConfig(bad_words_ids=[[1, 2]]))
    with pytest.raises(ValueError, match="output_attentions"):
        fast.generate(ids, 4, output_attentions=True)
    with pytest.raises(ValueError, match="num_return_sequences"):
        fast.generate(ids, 4, num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="beam sampling"):
        fast.generate(ids, 4, num_beams=2, do_sample=True)
    with pytest.raises(ValueError, match="streamer"):
        fast.generate(ids, 4, num_beams=2, streamer=lambda t: None)
    with pytest.raises(ValueError, match="repetition_penalty"):
        fast.generate(ids, 4, repetition_penalty=0.0)
    # neutral values of unsupported settings, and settings that change nothing here, pass
    fast.generate(ids, 2, num_beam_groups=1, use_cache=True, output_attentions=False)


class BanToken:
    """A transformers-style logits processor: token `token` gets -inf."""

    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.token] = -float("inf")
        return scores


@pytest.mark.parametrize("beams", [1, 3])
def test_custom_logits_processor_equals_transformers(pair, beams):
    from transformers import LogitsProcessor, LogitsProcessorList

    model, fast, vocab = pair
    ids, mask = prompts(vocab, True)
    free = fast.generate(ids, 8, attention_mask=mask, eos_token_id=None)
    token = int(free[0, ids.shape[1]])

    class Ban(BanToken, LogitsProcessor):
        pass

    out, ref = _both(model, fast, ids, mask, max_new_tokens=8, num_beams=beams, eos_token_id=None,
                     logits_processor=LogitsProcessorList([Ban(token)]))
    assert torch.equal(out, ref) and not (out[:, ids.shape[1]:] == token).any()


def test_sampling_several_sequences_per_prompt(pair):
    _, fast, vocab = pair
    ids, mask = prompts(vocab, True)
    gen = torch.Generator().manual_seed(0)
    out = fast.generate(ids, 5, attention_mask=mask, do_sample=True, num_return_sequences=2, eos_token_id=None,
                        generator=gen)
    assert out.shape == (6, ids.shape[1] + 5)
    assert torch.equal(out[::2, :ids.shape[1]], ids) and torch.equal(out[1::2, :ids.shape[1]], ids)


def _bart_decoder():
    """A tiny BartForCausalLM: its generation_config forces EOS as the last token
    (forced_eos_token_id, from BartConfig), which transformers' generate applies."""
    from transformers import BartConfig, BartForCausalLM

    cfg = BartConfig(vocab_size=128, d_model=64, decoder_layers=2, encoder_layers=2, decoder_attention_heads=4,
                     encoder_attention_heads=4, decoder_ffn_dim=128, encoder_ffn_dim=128, max_position_embeddings=128,
                     pad_token_id=0, bos_token_id=1, eos_token_id=2, forced_eos_token_id=2)
    return BartForCausalLM(cfg).eval(), 128


@pytest.mark.parametrize("padded", [False, True], ids=["batch1", "left_padded"])
def test_model_forced_eos_equals_transformers(padded):
    model, vocab = _bart_decoder()
    assert model.generation_config.forced_eos_token_id == 2
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),), kv_cache=True)
    ids, mask = prompts(vocab, padded)
    out, ref = _both(model, fast, ids, mask, max_new_tokens=8, eos_token_id=None)
    assert torch.equal(out, ref), (out, ref)
    assert (out[:, -1] == 2).all()  # forced, not chosen


@pytest.mark.parametrize("padded", [False, True], ids=["batch1", "left_padded"])
def test_suppressed_tokens_equal_transformers(pair, padded):
    """suppress_tokens (every step) and begin_suppress_tokens (the first new token; Whisper's
    generation_config sets it), here the tokens greedy search would have chosen."""
    model, fast, vocab = pair
    ids, mask = prompts(vocab, padded)
    free, _ = _both(model, fast, ids, mask, max_new_tokens=6, eos_token_id=None)
    chosen = free[:, ids.shape[1]:]
    for kw in (dict(suppress_tokens=chosen[:, 1:3].flatten().tolist()),
               dict(begin_suppress_tokens=chosen[:, 0].tolist() + [vocab + 5])):  # out of the vocabulary: ignored
        out, ref = _both(model, fast, ids, mask, max_new_tokens=6, eos_token_id=None, **kw)
        assert torch.equal(out, ref) and not torch.equal(out, free), (kw, out, ref)


@pytest.mark.parametrize("padded", [False, True], ids=["batch1", "left_padded"])
def test_prompt_ngrams_not_repeated_as_transformers(pair, padded):
    """encoder_no_repeat_ngram_size (BlenderBot's generation_config sets 3): for a
    decoder-only model transformers bans completing any n-gram of the prompt, padding
    included; here a prompt that repeats itself, so greedy search would copy it."""
    model, fast, vocab = pair
    ids, mask = prompts(vocab, padded)
    ids = torch.where(mask.bool(), ids, 0) if mask is not None else ids
    ids = torch.cat([ids, ids[:, -4:]], 1)
    mask = torch.cat([mask, torch.ones_like(mask[:, -4:])], 1) if mask is not None else None
    for n, beams in ((1, 1), (2, 1), (3, 1), (2, 3)):
        out, ref = _both(model, fast, ids, mask, max_new_tokens=8, eos_token_id=None, num_beams=beams,
                         encoder_no_repeat_ngram_size=n)
        assert torch.equal(out, ref), (n, beams, out, ref)


@pytest.mark.parametrize("kw", [dict(forced_eos_token_id=[5, 7]), dict(forced_bos_token_id=9)],
                         ids=["forced_eos", "forced_bos"])
def test_forced_tokens_equal_transformers(pair, kw):
    model, fast, vocab = pair
    for ids in (prompts(vocab, False)[0], torch.tensor([[4]])):
        out, ref = _both(model, fast, ids, None, max_new_tokens=6, eos_token_id=None, **kw)
        assert torch.equal(out, ref), (out, ref)


def test_unsupported_setting_of_the_model_raises(pair):
    """A setting generate() does not implement, on in the model's own generation_config, is
    refused (not silently dropped); its neutral value in the call turns it off."""
    from transformers import GenerationConfig

    _, fast, vocab = pair
    ids, _ = prompts(vocab, False)
    saved = fast.generation_defaults
    try:
        fast.generation_config = GenerationConfig(bad_words_ids=[[1, 2]], pad_token_id=0)
        with pytest.raises(ValueError, match="model's generation_config sets bad_words_ids"):
            fast.generate(ids, 3)
        assert fast.generate(ids, 3, bad_words_ids=None).shape == (1, 9)
    finally:
        fast.generation_defaults = saved


@pytest.mark.parametrize("beams", [1, 2])
def test_a_left_padded_batch_without_a_mask_as_transformers(pair, beams):
    """No attention_mask: transformers takes input_ids != pad_token_id as the mask when the
    pad token occurs in the prompts and is not an eos token. fxforge took every token as
    real, pads included, and generated other tokens for the padded row."""
    model, fast, vocab = pair
    torch.manual_seed(1)
    ids = torch.randint(3, vocab, (2, 9))
    ids[0, :4] = 0
    kw = dict(max_new_tokens=8, num_beams=beams, pad_token_id=0, eos_token_id=None)
    out, ref = _both(model, fast, ids, None, **kw)
    assert torch.equal(out, ref)
    out, ref = _both(model, fast, ids, (ids != 0).long(), **kw)  # the same as with the mask itself
    assert torch.equal(out, ref)
    # a pad token inside a prompt would make a mask with a hole: refused, naming the inference
    ids[1, 4] = 0
    with pytest.raises(ValueError, match=r"no attention_mask was given.*input_ids != pad_token_id \(0\)"):
        fast.generate(ids, **kw)


def test_a_token_id_outside_the_vocabulary_is_named(pair):
    model, fast, vocab = pair
    with pytest.raises(ValueError, match=rf"input_ids has token id {vocab} at \(0, 1\), outside the model's "
                                         rf"vocabulary \[0, {vocab}\)"):
        fast.generate(torch.tensor([[5, vocab, 7]]), 3)
    with pytest.raises(ValueError, match=r"token id -1 at \(0, 2\)"):
        fast.generate(torch.tensor([[5, 6, -1]]), 3)
