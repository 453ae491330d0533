"""generate() and the Engine take their settings as transformers' generate does: the
default length (20 new tokens, capped at config.max_position_embeddings), a passed
GenerationConfig merged over the model's own (its unset fields do not hide the model's
settings), numpy integers, None for the sampling warpers and early_stopping; the Engine
counts a prompt's leading pad tokens as generate() does and refuses the model's beams and
stop strings by name. Bad settings raise errors that name them. Tiny llama, few tokens."""
import contextlib
import warnings

import numpy as np
import pytest
import torch

import fxforge

import zoo
from fxforge.passes.kv_cache import KVCacheConfig

MAX_SEQ_LEN = 64


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    model, vocab = zoo.llama("eager")  # eos_token_id=0, max_position_embeddings=256
    fast = fxforge.optimize(model, (torch.randint(1, vocab, (2, 7)),),
                            kv_cache=KVCacheConfig(max_seq_len=MAX_SEQ_LEN, max_batch=2))
    return model, fast, vocab


def _prompt(vocab, n=6, seed=3):
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _reference(model, ids, **kw):
    kw.setdefault("pad_token_id", 1)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return model.generate(ids, **kw)


@contextlib.contextmanager
def model_settings(model, fast, **settings):
    """The model's own generation_config sets `settings` (for transformers and for fast)."""
    config, saved = model.generation_config, dict(fast.generation_defaults)
    old = {key: getattr(config, key) for key in settings}
    try:
        for key, value in settings.items():
            setattr(config, key, value)
        fast.generation_config = config
        yield
    finally:
        for key, value in old.items():
            setattr(config, key, value)
        fast.generation_defaults = saved


# -- W1: the default length -------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["greedy", "beams", "ngram_draft"])
def test_default_length_is_capped_at_max_position_embeddings(pair, monkeypatch, mode):
    """No max_new_tokens nor max_length: transformers generates up to prompt + 20 tokens, at
    most config.max_position_embeddings in all (fxforge capped at the cache's max_seq_len)."""
    model, fast, vocab = pair
    monkeypatch.setattr(model.config, "max_position_embeddings", 40)  # fast.config is model.config
    ids = _prompt(vocab, 30)
    kw = dict(eos_token_id=None, pad_token_id=1)
    extra = {"beams": dict(num_beams=2), "greedy": {}, "ngram_draft": {}}[mode]
    ref = _reference(model, ids, **kw, **extra)
    out = fast.generate(ids, **kw, **extra, **({"draft": "ngram"} if mode == "ngram_draft" else {}))
    assert ref.shape == (1, 40) and torch.equal(out, ref)


def test_default_length_past_max_seq_len_names_max_seq_len(pair):
    """transformers' default length (50 + 20 positions) does not fit the 64-position cache:
    an error naming max_seq_len and the default length, not a silently shorter output."""
    model, fast, vocab = pair
    ids = _prompt(vocab, 50)
    assert _reference(model, ids, eos_token_id=None).shape == (1, 70)
    with pytest.raises(ValueError, match=r"plus 20 new tokens \(transformers' default length.*more than "
                                         r"max_seq_len=64.*at most max_new_tokens=15"):
        fast.generate(ids, eos_token_id=None)
    # 50 + 15 tokens: the last one is never fed, so 64 positions hold them
    assert fast.generate(ids, 15, eos_token_id=None).shape == (1, 65)


def test_max_length_past_max_seq_len_names_max_length(pair):
    _, fast, vocab = pair
    with pytest.raises(ValueError, match=r"max_length=80 \(the prompt's 6 tokens included\): the model is fed 79 "
                                         r"positions.*more than max_seq_len=64.*use at most max_length=65"):
        fast.generate(_prompt(vocab), max_length=80)


# -- W2, W5: generation_config ----------------------------------------------------------------
def test_a_generation_config_does_not_hide_the_models_unsupported_setting(pair):
    """transformers fills a passed GenerationConfig's unset fields from the model's: the
    model's bad_words_ids still applies, so generate() must still refuse it."""
    from transformers import GenerationConfig

    model, fast, vocab = pair
    ids = _prompt(vocab)
    with model_settings(model, fast, bad_words_ids=[[5]]):
        for config in (GenerationConfig(max_new_tokens=4), {"max_new_tokens": 4}):
            with pytest.raises(ValueError, match="model's generation_config sets bad_words_ids"):
                fast.generate(ids, generation_config=config)
        assert fast.generate(ids, generation_config=GenerationConfig(max_new_tokens=4),
                             bad_words_ids=None).shape == (1, 10)


def test_a_generation_config_merges_over_the_models_settings(pair):
    from transformers import GenerationConfig

    model, fast, vocab = pair
    ids = _prompt(vocab)
    with model_settings(model, fast, repetition_penalty=1.6, no_repeat_ngram_size=2):
        config = GenerationConfig(max_new_tokens=8, no_repeat_ngram_size=1, eos_token_id=None)
        ref = _reference(model, ids, generation_config=config)
        assert torch.equal(fast.generate(ids, generation_config=config, pad_token_id=1), ref)


def test_a_misspelled_generation_config_key_is_refused(pair):
    from transformers import GenerationConfig

    _, fast, vocab = pair
    ids = _prompt(vocab)
    with pytest.raises(ValueError, match=r"generation_config has keys that are not generation settings: "
                                         r"max_new_token, repetiton_penalty \(max_new_token: did you mean "
                                         r"max_new_tokens\?; repetiton_penalty: did you mean repetition_penalty\?\)"):
        fast.generate(ids, generation_config={"max_new_token": 3, "repetiton_penalty": 5.0})
    # transformers' own GenerationConfig keeps unknown attributes, and generate ignores them
    assert fast.generate(ids, generation_config=GenerationConfig(max_new_token=3, max_new_tokens=2)).shape == (1, 8)
    # a dict of transformers' own settings is fine, those generate() does not use included
    assert fast.generate(ids, generation_config=GenerationConfig(max_new_tokens=2).to_dict()).shape == (1, 8)


# -- C1, C2: None and numpy values --------------------------------------------------------------
@pytest.mark.parametrize("key", ["temperature", "top_k", "top_p"])
def test_sampling_without_a_warper_equals_transformers(pair, key):
    model, fast, vocab = pair
    ids = _prompt(vocab)
    kw = {**dict(max_new_tokens=6, do_sample=True, eos_token_id=None, temperature=0.7, top_k=20, top_p=0.9), key: None}
    torch.manual_seed(9)
    ref = _reference(model, ids, **kw)
    torch.manual_seed(9)
    assert torch.equal(fast.generate(ids, pad_token_id=1, **kw), ref)


@pytest.mark.parametrize("kw", [dict(max_new_tokens=5, eos_token_id=np.int64(67)),
                                dict(max_new_tokens=np.int64(5), eos_token_id=None),
                                dict(max_new_tokens=5, eos_token_id=[np.int64(67), 9], pad_token_id=np.int64(1)),
                                dict(max_length=np.int64(9), eos_token_id=None, top_k=np.int64(5))],
                         ids=["eos", "max_new_tokens", "eos_list_pad", "max_length"])
def test_numpy_integers_as_transformers(pair, kw):
    model, fast, vocab = pair
    ids = _prompt(vocab)
    assert torch.equal(fast.generate(ids, **kw), _reference(model, ids, **kw))


def test_beams_with_early_stopping_none_as_transformers(pair):
    """transformers' beam search takes early_stopping=None as neither True nor 'never'."""
    model, fast, vocab = pair
    ids = _prompt(vocab)
    kw = dict(max_new_tokens=6, num_beams=2, eos_token_id=[3, 5, 7], early_stopping=None)
    assert torch.equal(fast.generate(ids, pad_token_id=1, **kw), _reference(model, ids, **kw))


# -- unclear errors -------------------------------------------------------------------------------
def test_errors_name_the_argument(pair):
    _, fast, vocab = pair
    ids = _prompt(vocab)
    with pytest.raises(ValueError, match=r"1 prompt x 4 beams = 4 rows is larger than the KV cache's max_batch=2"):
        fast.generate(ids, 3, num_beams=4)
    with pytest.raises(ValueError, match=r"max_new_tokens must be an int >= 1, got -1.*refuses 0 too"):
        fast.generate(ids, -1)
    with pytest.raises(ValueError, match=r"max_new_tokens must be an int >= 1, got 0"):
        fast.generate(ids, 0)
    with pytest.raises(ValueError, match=r"pad_token_id must be a token id \(an int\) or None, got str 'x'"):
        fast.generate(ids.repeat(2, 1), 3, pad_token_id="x")
    with pytest.raises(ValueError, match=r"eos_token_id must be a token id \(an int\), a list of token ids, or None"):
        fast.generate(ids, 3, eos_token_id="a")
    with pytest.raises(TypeError, match=r"stopping_criteria must be a list of callables .*; item 0 is int 1"):
        fast.generate(ids, 3, stopping_criteria=[1])
    with pytest.raises(TypeError, match=r"logits_processor must be a list of callables .*; item 0 is int 1"):
        fast.generate(ids, 3, logits_processor=[1])
    with pytest.raises(ValueError, match=r"length_penalty must be a number"):
        fast.generate(ids, 3, num_beams=2, length_penalty="x")
    with pytest.raises(ValueError, match=r"forced_eos_token_id=500 is outside the model's vocabulary \[0, 128\)"):
        fast.generate(ids, 3, forced_eos_token_id=500)


# -- W3, W4: the Engine ---------------------------------------------------------------------------
@pytest.fixture
def engine(pair):
    engine = fxforge.Engine(pair[1], max_batch=2, max_seq_len=MAX_SEQ_LEN)
    yield engine
    engine.close()


@pytest.mark.parametrize("opts", [dict(eos_token_id=list(range(3, 128)), min_length=16),
                                  dict(eos_token_id=list(range(3, 128)), min_new_tokens=3),
                                  dict(eos_token_id=None, no_repeat_ngram_size=1),
                                  dict(eos_token_id=None, repetition_penalty=2.0)],
                         ids=["min_length", "min_new_tokens", "no_repeat_ngram", "repetition_penalty"])
def test_engine_counts_leading_pad_tokens_as_generate(pair, engine, opts):
    """A prompt's leading pad tokens are left padding; min_length and the n-gram bans count
    them, in transformers, in generate() and now in the Engine."""
    model, fast, vocab = pair
    prompt = torch.tensor([1, 1, 1, 1, 1, 1, 114, 51, 115, 45, 113, 33])
    kw = dict(pad_token_id=1, **opts)
    ref = _reference(model, prompt[None], max_new_tokens=8, **kw)[0, prompt.numel():]
    assert torch.equal(fast.generate(prompt[None], 8, **kw)[0, prompt.numel():], ref)
    assert torch.equal(engine.generate_many([prompt], max_new_tokens=8, **kw)[0], ref)


@pytest.mark.parametrize("setting", [dict(num_beams=3), dict(num_beams=2, num_return_sequences=2),
                                     dict(stop_strings=["t5"])], ids=["beams", "sequences", "stop_strings"])
def test_engine_refuses_the_models_generate_only_settings(pair, engine, setting):
    model, fast, vocab = pair
    prompt = _prompt(vocab)[0]
    with model_settings(model, fast, **setting):
        with pytest.raises(ValueError, match=rf"the model's generation_config sets .*{list(setting)[-1]}="):
            engine.submit(prompt, 4)
        neutral = {key: {"num_beams": 1, "num_return_sequences": 1, "stop_strings": None}[key] for key in setting}
        out = engine.generate_many([prompt], max_new_tokens=4, eos_token_id=None, **neutral)[0]
        assert torch.equal(out, fast.generate(prompt[None], 4, eos_token_id=None, **neutral)[0, 6:])


def test_engine_takes_numpy_integers(pair, engine):
    _, fast, vocab = pair
    prompt = _prompt(vocab)[0]
    out = engine.generate_many([prompt], max_new_tokens=np.int64(4), eos_token_id=np.int64(67))[0]
    assert torch.equal(out, fast.generate(prompt[None], 4, eos_token_id=67)[0, 6:])


@pytest.mark.parametrize("setting", [{}, dict(max_new_tokens=5), dict(max_length=13)],
                         ids=["transformers_default", "model_max_new_tokens", "model_max_length"])
def test_engine_default_length_is_generates(pair, engine, monkeypatch, setting):
    """Without max_new_tokens a request runs as long as generate() would: the model's
    generation_config, else 20 new tokens capped at max_position_embeddings (the Engine
    made 32 whatever the model said)."""
    model, fast, vocab = pair
    monkeypatch.setattr(model.config, "max_position_embeddings", 40)  # fast.config is model.config
    prompts = [_prompt(vocab)[0]] + ([_prompt(vocab, 30)[0]] if not setting else [])  # (30 + 20 > 40: capped)
    for prompt in prompts:
        with model_settings(model, fast, **setting):
            ref = _reference(model, prompt[None], eos_token_id=None)[0, prompt.numel():]
            assert torch.equal(engine.generate_many([prompt], eos_token_id=None)[0], ref)
            request = engine.submit(prompt, eos_token_id=None)
            engine.run()
            assert torch.equal(request.result(timeout=0), ref)
    out = engine.generate_many([_prompt(vocab)[0]], eos_token_id=None, max_length=9)[0]
    assert torch.equal(out, fast.generate(_prompt(vocab), eos_token_id=None, max_length=9)[0, 6:])


def test_sampling_with_top_p_zero_as_transformers(pair):
    """transformers takes top_p=0 (the most likely token only); fxforge refused it."""
    model, fast, vocab = pair
    ids = _prompt(vocab)
    kw = dict(max_new_tokens=6, do_sample=True, eos_token_id=None, top_p=0.0, pad_token_id=1)
    torch.manual_seed(5)
    ref = _reference(model, ids, **kw)
    torch.manual_seed(5)
    assert torch.equal(fast.generate(ids, **kw), ref)
    assert torch.equal(ref, _reference(model, ids, **{**kw, "do_sample": False}))  # top_p=0 is greedy


def test_generation_config_is_held_and_edited_in_place(pair, tmp_path):
    """fast.generation_config is a GenerationConfig that later generate() calls read, as on a
    transformers model (it was a dict copy: an edit did nothing); a copy of the model's, so
    an edit of either does not reach the other, and what save() writes."""
    from transformers import GenerationConfig

    model, _, vocab = pair
    fast = fxforge.optimize(model, (torch.randint(1, vocab, (1, 7)),), kv_cache=KVCacheConfig(max_seq_len=32))
    config = fast.generation_config
    assert isinstance(config, GenerationConfig) and config is fast.generation_config
    assert config is not model.generation_config and config.eos_token_id == model.generation_config.eos_token_id
    ids = _prompt(vocab)
    config.max_new_tokens, config.eos_token_id = 3, None
    assert fast.generate(ids).shape == (1, 9)
    assert model.generation_config.max_new_tokens is None  # the source model's own is untouched
    fast.save(tmp_path / "saved")
    assert fxforge.load(tmp_path / "saved").generate(ids).shape == (1, 9)
    fast.generation_config = {"max_new_tokens": 2, "eos_token_id": None}
    assert isinstance(fast.generation_config, GenerationConfig) and fast.generate(ids).shape == (1, 8)
    with pytest.raises(ValueError, match="generation_config must be a transformers GenerationConfig or a dict, "
                                         "got int"):
        fast.generation_config = 5


def test_unsupported_transformers_arguments_get_no_self_hint(pair):
    """A setting transformers knows and fxforge does not implement is named without a
    "bad_words_ids: did you mean bad_words_ids?" hint; transformers' speculative arguments
    point to draft=; a misspelling still gets its hint; numpy ints count for num_draft_tokens."""
    _, fast, vocab = pair
    ids = _prompt(vocab)
    for kw in (dict(bad_words_ids=[[3]]), dict(max_time=1.0)):
        with pytest.raises(ValueError, match=f"does not support these arguments: {next(iter(kw))}$"):
            fast.generate(ids, 3, **kw)
    with pytest.raises(ValueError, match=r"assistant_model \(assistant_model: fxforge spells it draft="):
        fast.generate(ids, 3, assistant_model=object())
    with pytest.raises(ValueError, match=r"repetiton_penalty: did you mean repetition_penalty\?"):
        fast.generate(ids, 3, repetiton_penalty=1.2)
    out = fast.generate(ids, 5, draft="ngram", num_draft_tokens=np.int64(3), eos_token_id=None)
    assert torch.equal(out, fast.generate(ids, 5, eos_token_id=None))
