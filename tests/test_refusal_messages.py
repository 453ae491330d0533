"""The refusals of generate() and of the Engine name what is wrong and a fix that works
for the caller: a misspelled keyword gets "name: did you mean ...?" (generate() and the
Engine alike); a transformers setting fxforge does not implement is said to be one (not
sent to generate(), which refuses it too); generate()'s own arguments the Engine does not
take get the Engine's reason; a pad token inside an Engine prompt gets advice the Engine
can follow (it takes no attention_mask). Tiny llama, few tokens."""
import pytest
import torch

import fxforge

import zoo
from fxforge.passes.kv_cache import KVCacheConfig


@pytest.fixture(scope="module")
def fast():
    torch.manual_seed(0)
    model, vocab = zoo.llama("eager", n_layer=1)
    return fxforge.optimize(model, (torch.randint(1, vocab, (1, 7)),),
                            kv_cache=KVCacheConfig(max_seq_len=32, max_batch=2))


@pytest.fixture(scope="module")
def engine(fast):
    with fxforge.Engine(fast, max_batch=2) as engine:
        yield engine


def _message(call) -> str:
    with pytest.raises(ValueError) as err:
        call()
    return str(err.value)


def test_generate_typo_hint_reads_naturally(fast):
    text = _message(lambda: fast.generate(torch.tensor([[3, 4]]), max_new_token=3))
    assert "max_new_token: did you mean max_new_tokens?" in text, text
    assert "->" not in text, text
    text = _message(lambda: fast.generate(torch.tensor([[3, 4]]), 3, assistant_model=object()))
    assert "assistant_model: " in text and "draft=" in text and "->" not in text, text


def test_engine_typo_gets_a_hint_not_generate(engine):
    for call in (lambda: engine.generate_many([[3, 4]], max_new_token=3),
                 lambda: engine.submit([3, 4], max_new_token=3)):
        text = _message(call)
        assert "does not take max_new_token" in text, text
        assert "max_new_token: did you mean max_new_tokens?" in text, text
        assert "generate() takes" not in text and "one greedy or sampled" not in text, text
    text = _message(lambda: engine.submit([3, 4], 3, callbak=print))
    assert "callbak: did you mean callback?" in text, text


def test_engine_unsupported_setting_is_said_to_be_unsupported(fast, engine):
    with pytest.raises(ValueError, match="min_p"):
        fast.generate(torch.tensor([[3, 4]]), 3, do_sample=True, min_p=0.1)  # generate() refuses it too
    text = _message(lambda: engine.generate_many([[3, 4]], max_new_tokens=3, do_sample=True, min_p=0.1))
    assert "min_p: " in text and "does not implement" in text, text
    assert "generate() takes" not in text and "one greedy or sampled" not in text, text


def test_engine_takes_what_generate_takes_without_effect(fast, engine):
    """Settings that change no token (use_cache) and unimplemented ones at their off value
    (min_p=None: what the refusal of a model's min_p advises) are taken, as generate() takes them."""
    alone = fast.generate(torch.tensor([[3, 4]]), 3, eos_token_id=None)[0, 2:]
    got = engine.generate_many([[3, 4]], 3, eos_token_id=None, use_cache=True, min_p=None, typical_p=1.0)[0]
    assert torch.equal(got, alone)


def test_engine_takes_generates_arguments_at_the_value_that_asks_for_nothing(fast, engine):
    # streamer=None, output_scores=False, return_dict_in_generate=False: generate() takes them
    alone = fast.generate(torch.tensor([[3, 4]]), 3, eos_token_id=None)[0, 2:]
    got = engine.generate_many([[3, 4]], 3, eos_token_id=None, streamer=None, output_scores=False,
                               return_dict_in_generate=False, attention_mask=None)[0]
    assert torch.equal(got, alone)
    text = _message(lambda: engine.submit([3, 4], 3, output_scores=True))
    assert "output_scores: a request's result() is its new tokens" in text, text


def test_engine_reason_only_where_it_fits(engine):
    text = _message(lambda: engine.submit([3, 4], 3, num_beams=2))
    assert "num_beams: one greedy or sampled sequence per request" in text, text
    text = _message(lambda: engine.submit([3, 4], 3, attention_mask=torch.ones(2)))
    assert "attention_mask: " in text and "one greedy or sampled" not in text, text
    assert "leading pad tokens" in text, text


def test_engine_pad_token_inside_the_prompt_gets_advice_it_can_follow(fast, engine):
    # (the model's eos_token_id is 0: a pad token that is also EOS is never taken for padding)
    text = _message(lambda: engine.generate_many([[5, 2, 7, 9]], max_new_tokens=3, pad_token_id=2))
    assert "Pass an attention_mask" not in text and "pass an attention_mask" not in text, text
    assert "padding_side" not in text, text
    assert "pad_token_id=None" in text, text
    # the advice works, and gives what generate() gives the prompt with it
    got = engine.generate_many([[5, 2, 7, 9]], max_new_tokens=3, pad_token_id=None, eos_token_id=None)[0]
    alone = fast.generate(torch.tensor([[5, 2, 7, 9]]), 3, pad_token_id=None, eos_token_id=None)[0, 4:]
    assert torch.equal(got, alone)
    # generate() takes a mask: its advice stays
    text = _message(lambda: fast.generate(torch.tensor([[5, 2, 7, 9]]), 3, pad_token_id=2))
    assert "Pass an attention_mask" in text, text
