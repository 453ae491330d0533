"""An explicit max_new_tokens=None turns off the model's generation_config.max_new_tokens,
as transformers' generate does (a keyword always wins, None included): max_length then
sets the length, or, without it, transformers' default of 20 new tokens. generate(), the
Engine's submit() and generate_many() alike; a max_new_tokens not given at all keeps the
model's. Checked against transformers' generate on a tiny llama."""
import warnings

import pytest
import torch

import fxforge

import zoo
from fxforge.passes.kv_cache import KVCacheConfig

PROMPT_LEN = 6
MODEL_MAX_NEW_TOKENS = 7  # as many hub models' generation_config ship a max_new_tokens


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    model, vocab = zoo.llama("eager", n_layer=1)
    model.generation_config.max_new_tokens = MODEL_MAX_NEW_TOKENS
    model.generation_config.eos_token_id = None  # every request runs to its length
    fast = fxforge.optimize(model, (torch.randint(1, vocab, (1, 7)),),
                            kv_cache=KVCacheConfig(max_seq_len=64, max_batch=2))
    ids = torch.randint(3, vocab, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(5))
    return model, fast, ids


def _reference(model, ids, **kw):
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return model.generate(ids, do_sample=False, pad_token_id=1, **kw)


# keyword arguments -> the new tokens transformers generates for a 6-token prompt
CASES = [
    ({}, MODEL_MAX_NEW_TOKENS),
    ({"max_length": 12}, MODEL_MAX_NEW_TOKENS),  # the model's max_new_tokens wins over max_length
    ({"max_new_tokens": None, "max_length": 12}, 12 - PROMPT_LEN),  # ... unless turned off
    ({"max_new_tokens": None}, 20),  # transformers' default length
    ({"max_new_tokens": 3, "max_length": 12}, 3),
]


@pytest.mark.parametrize("kw, new", CASES, ids=[str(kw) for kw, _ in CASES])
def test_generate_length_as_transformers(pair, kw, new):
    model, fast, ids = pair
    ref = _reference(model, ids, **kw)
    assert ref.shape[1] - PROMPT_LEN == new  # (what transformers does, so the case means what it says)
    assert torch.equal(fast.generate(ids, pad_token_id=1, **kw), ref)


def test_positional_none_turns_the_default_off_too(pair):
    model, fast, ids = pair
    ref = _reference(model, ids, max_new_tokens=None, max_length=12)
    assert torch.equal(fast.generate(ids, None, max_length=12, pad_token_id=1), ref)


@pytest.mark.parametrize("kw, new", CASES, ids=[str(kw) for kw, _ in CASES])
def test_engine_length_as_transformers(pair, kw, new):
    model, fast, ids = pair
    ref = _reference(model, ids, **kw)[0, PROMPT_LEN:]
    with fxforge.Engine(fast, max_batch=2) as engine:
        many = engine.generate_many([ids[0]], pad_token_id=1, **kw)[0]
        request = engine.submit(ids[0], pad_token_id=1, **kw)
        engine.run()
        submitted = request.result()
    assert torch.equal(many, ref)
    assert torch.equal(submitted, ref)


def test_engine_positional_none_turns_the_default_off_too(pair):
    model, fast, ids = pair
    ref = _reference(model, ids, max_new_tokens=None, max_length=12)[0, PROMPT_LEN:]
    with fxforge.Engine(fast, max_batch=2) as engine:
        request = engine.submit(ids[0], None, max_length=12)
        many = engine.generate_many([ids[0]], None, max_length=12)[0]
        submitted = request.result()
    assert torch.equal(many, ref) and torch.equal(submitted, ref)
