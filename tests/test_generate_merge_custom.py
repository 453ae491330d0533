"""A caller's logits processor or stopping criterion of the same type as one generate()
builds from its settings takes that one's place, as transformers' generate merges them
(_merge_criteria_processor_list: "the custom one will take precedence"), in greedy
search and beam search; rows stopped by a criterion with an eos_token_id are padded, as
transformers pads them. Token for token against transformers on a tiny GPT-2 and Llama."""
import warnings

import pytest
import torch

import fxforge

transformers = pytest.importorskip("transformers")
from transformers import (LogitsProcessorList, MinLengthLogitsProcessor,  # noqa: E402
                          NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor)
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria  # noqa: E402

VOCAB = 96


def _model(kind):
    torch.manual_seed(0)
    if kind == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                                                     n_positions=128))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, max_position_embeddings=128))
    model.eval()
    with torch.no_grad():  # larger weights: varied tokens, not one repeated
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pair(request):
    model = _model(request.param)
    fast = fxforge.optimize(model, example_inputs=(torch.randint(3, VOCAB, (1, 8)),), kv_cache=True)
    return model, fast


def _ids():
    return torch.randint(3, VOCAB, (3, 6), generator=torch.Generator().manual_seed(1))


def _reference(model, ids, **kw):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(ids, **kw)


def _both(model, fast, **kw):
    ids = _ids()
    ref = _reference(model, ids, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fast.generate(ids, **kw)
    return out, ref


def _token(model, step, row=0):
    """A token the model produces at `step` in `row` (greedy): an EOS that does stop a row."""
    return int(_reference(model, _ids(), max_new_tokens=step)[row, -1])


def test_custom_repetition_penalty_replaces_the_setting(pair):
    model, fast = pair
    for beams in (1, 2):
        out, ref = _both(model, fast, max_new_tokens=10, repetition_penalty=1.2, num_beams=beams,
                         logits_processor=LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.5)]))
        assert torch.equal(out, ref), beams


def test_custom_no_repeat_ngram_replaces_the_setting(pair):
    model, fast = pair
    out, ref = _both(model, fast, max_new_tokens=10, no_repeat_ngram_size=1,
                     logits_processor=LogitsProcessorList([NoRepeatNGramLogitsProcessor(3)]))
    assert torch.equal(out, ref)


def test_custom_processor_replaces_the_models_own_setting(pair):
    model, fast = pair
    model.generation_config.repetition_penalty = 1.3
    fast.generation_config.repetition_penalty = 1.3
    try:
        for beams in (1, 2):
            out, ref = _both(model, fast, max_new_tokens=10, num_beams=beams,
                             logits_processor=LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.6)]))
            assert torch.equal(out, ref), beams
    finally:
        model.generation_config.repetition_penalty = None
        fast.generation_config.repetition_penalty = None


def test_custom_min_length_leaves_min_new_tokens_own_processor(pair):
    # transformers builds MinLength and MinNewTokensLength for min_new_tokens: a custom
    # MinLengthLogitsProcessor replaces the first only, the second still holds EOS back
    model, fast = pair
    eos = _token(model, 2)
    custom = MinLengthLogitsProcessor(7, eos_token_id=eos)
    out, ref = _both(model, fast, max_new_tokens=10, min_new_tokens=5, eos_token_id=eos,
                     logits_processor=LogitsProcessorList([custom]))
    assert torch.equal(out, ref)


@pytest.mark.parametrize("max_length", [14, 8, 3])
def test_custom_max_length_replaces_the_length(pair, max_length):
    model, fast = pair
    out, ref = _both(model, fast, max_new_tokens=4, stopping_criteria=[MaxLengthCriteria(max_length=max_length)])
    assert out.shape == ref.shape and torch.equal(out, ref)


def test_custom_max_length_in_beam_search(pair):
    model, fast = pair
    out, ref = _both(model, fast, max_new_tokens=4, num_beams=2, stopping_criteria=[MaxLengthCriteria(max_length=8)])
    assert torch.equal(out, ref)
    # longer than the beam search's own length: transformers fails (IndexError), fxforge says why
    with pytest.raises(ValueError, match=r"max_length=14 \(the MaxLengthCriteria .*beam search.*max_new_tokens=8"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fast.generate(_ids(), max_new_tokens=4, num_beams=2, stopping_criteria=[MaxLengthCriteria(max_length=14)])


def test_custom_eos_criterion_replaces_eos_token_id(pair):
    model, fast = pair
    eos = _token(model, 3, row=1)
    for beams in (1, 2):
        out, ref = _both(model, fast, max_new_tokens=10, eos_token_id=[eos], num_beams=beams,
                         stopping_criteria=[EosTokenCriteria(eos_token_id=95)])
        assert torch.equal(out, ref), beams


def test_replacing_warns_as_transformers_does(pair):
    _, fast = pair
    with pytest.warns(UserWarning, match=r"RepetitionPenaltyLogitsProcessor'> will take precedence"):
        fast.generate(_ids(), max_new_tokens=2, repetition_penalty=1.2,
                      logits_processor=LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.5)]))


def test_rows_stopped_by_an_eos_criterion_are_padded(pair):
    model, fast = pair
    eos = _token(model, 3)
    for beams in (1, 2):
        out, ref = _both(model, fast, max_new_tokens=10, pad_token_id=1, num_beams=beams,
                         stopping_criteria=[EosTokenCriteria(eos_token_id=eos)])
        assert torch.equal(out, ref), beams
    out, _ = _both(model, fast, max_new_tokens=10, pad_token_id=1, stopping_criteria=[EosTokenCriteria(eos)])
    assert (out[0, 9:] == 1).all()  # (the row that stopped is padded: the comparison is not vacuous)


def test_eos_criterion_without_a_pad_token_is_refused(pair):
    # transformers fails with a TypeError (None * tensor) when the first row stops
    model, fast = pair
    model.generation_config.pad_token_id = None
    fast.generation_config.pad_token_id = None
    try:
        with pytest.raises(ValueError, match=r"EosTokenCriteria.*pass pad_token_id="):
            fast.generate(_ids(), max_new_tokens=4, stopping_criteria=[EosTokenCriteria(eos_token_id=5)])
    finally:
        model.generation_config.pad_token_id = 0
        fast.generation_config.pad_token_id = 0
