"""generate()'s settings and inputs refused (or taken) as transformers takes them: a dict
with a misspelled key assigned to fast.generation_config or generation_defaults is
refused by name, as the same dict passed to generate() is; max_new_tokens=5.0 makes 5
tokens (transformers takes it); a 1-D prompt and transformers' `inputs=` are named."""
import warnings

import pytest
import torch

import fxforge

transformers = pytest.importorskip("transformers")

VOCAB = 96


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=128)).eval()
    fast = fxforge.optimize(model, example_inputs=(torch.randint(3, VOCAB, (1, 8)),), kv_cache=True)
    return model, fast


def _ids():
    return torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("attribute", ["generation_config", "generation_defaults"])
def test_assigned_dict_with_a_misspelled_key_is_refused(pair, attribute):
    _, fast = pair
    before = fast.generation_defaults
    with pytest.raises(ValueError, match=rf"{attribute} has keys that are not generation settings: repetiton_penalty"
                                         r" \(repetiton_penalty: did you mean repetition_penalty\?\)"):
        setattr(fast, attribute, {"max_new_tokens": 4, "repetiton_penalty": 1.4})
    assert fast.generation_defaults == before  # the refused dict changed nothing
    setattr(fast, attribute, {**before, "max_new_tokens": 4, "repetition_penalty": 1.4})  # spelled right: taken
    try:
        assert fast.generation_defaults["repetition_penalty"] == 1.4
        assert fast.generate(_ids()).shape == (1, 10)
    finally:
        fast.generation_defaults = before


def test_integral_float_max_new_tokens_is_taken_as_transformers_takes_it(pair):
    model, fast = pair
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = model.generate(_ids(), max_new_tokens=5.0, pad_token_id=0)
    assert torch.equal(fast.generate(_ids(), max_new_tokens=5.0, pad_token_id=0), ref)
    with pytest.raises(ValueError, match=r"max_new_tokens must be an int, got float 5\.5$"):
        fast.generate(_ids(), max_new_tokens=5.5)


def test_one_dimensional_prompt_is_named_by_its_shape(pair):
    _, fast = pair
    with pytest.raises(ValueError, match=r"input_ids must be a tensor \[batch, length\] \(2-D\), got a torch.int64 "
                                         r"tensor of shape \(6,\); one prompt of shape \[length\] is input_ids\[None\]$"):
        fast.generate(_ids()[0], max_new_tokens=3)
    with pytest.raises(ValueError, match=r"pass input_ids.long\(\)"):  # the dtype message stays for the dtype
        fast.generate(_ids().float(), max_new_tokens=3)


def test_transformers_inputs_keyword_is_the_prompt(pair):
    """generate(inputs=ids), transformers' name for the prompt, is generate(ids); both at once
    are refused by name."""
    _, fast = pair
    assert torch.equal(fast.generate(inputs=_ids(), max_new_tokens=3), fast.generate(_ids(), max_new_tokens=3))
    with pytest.raises(ValueError, match=r"does not support these arguments: inputs \(inputs: transformers' name"):
        fast.generate(_ids(), inputs=_ids(), max_new_tokens=3)
