"""How users call the optimized model: the outputs' structure (no past_key_values), the
arguments a call may pass that the capture did not, and the messages of what is refused."""
import warnings

import pytest
import torch

import fxforge

import zoo


def _optimize(model, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxforge.optimize(model, *args, **kwargs)


@pytest.fixture(scope="module")
def llama():
    model, vocab = zoo.llama("sdpa")
    ids = torch.randint(0, vocab, (2, 6), generator=torch.Generator().manual_seed(1))
    return model, ids


@pytest.fixture(scope="module")
def fast(llama):
    model, ids = llama
    return _optimize(model, (ids,))


# -- 1. the output's structure: fxforge returns no past_key_values -------------------------
def test_a_tuple_output_whose_default_call_holds_the_cache_is_refused(llama):
    model, ids = llama
    assert model.config.use_cache  # eager's tuple is (logits, past_key_values, hidden_states)
    with pytest.raises(ValueError, match=r"past_key_values[\s\S]*use_cache=False[\s\S]*return_dict=True"):
        _optimize(model, example_kwargs=dict(input_ids=ids, return_dict=False, output_hidden_states=True))


def test_a_tuple_output_captured_with_use_cache_false_is_the_models_own(llama):
    model, ids = llama
    kw = dict(input_ids=ids, return_dict=False, output_hidden_states=True, use_cache=False)
    fast = _optimize(model, example_kwargs=kw)
    with torch.no_grad():
        want = model(**kw)
    got = fast(**kw)
    assert isinstance(got, tuple) and len(got) == len(want) == 2
    torch.testing.assert_close(got[0], want[0])
    assert len(got[1]) == len(want[1])


def test_use_cache_true_in_a_call_points_to_generate(llama, fast):
    _, ids = llama
    with pytest.raises(ValueError, match=r"use_cache=True: fxforge's forward returns no KV cache[\s\S]*kv_cache=True"
                                         r"[\s\S]*generate") as err:
        fast(ids, use_cache=True)
    assert "captured as the constant" not in str(err.value)


def test_use_cache_none_is_the_default_call(llama, fast):
    model, ids = llama
    with torch.no_grad():
        want = model(ids).logits
    torch.testing.assert_close(fast(ids, use_cache=None).logits, want)


def test_use_cache_true_in_the_example_names_the_argument(llama):
    model, ids = llama
    with pytest.raises(ValueError, match=r"example_kwargs has use_cache=True[\s\S]*kv_cache=True"):
        _optimize(model, example_kwargs=dict(input_ids=ids, use_cache=True))
