"""w8a8 decides its outliers per token (quant_formats.w8a8_split_activations), so a prompt's
logits and tokens are those it gets alone, in any batch: with outlier columns chosen over
the batch, a small value in a column where another prompt has an outlier was computed in
float in the batch but quantized alone, and fxforge.Engine's tokens differed from
generate()'s (README: each request's tokens those of generate() alone)."""
import pytest
import torch

import fxforge

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model_ids():
    torch.manual_seed(4)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
                                   bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval(), torch.randint(1, 128, (3, 8))


def test_logits_of_a_prompt_are_the_same_in_any_batch(model_ids):
    model, ids = model_ids
    f = fxforge.optimize(model, (ids[:1],), quantize="w8a8", verbose=False)
    alone = torch.cat([f(ids[i:i + 1]).logits for i in range(3)])
    assert torch.equal(f(ids).logits, alone)  # was up to 0.24 apart on this model


def test_generate_and_engine_tokens_are_those_of_each_prompt_alone(model_ids):
    model, ids = model_ids
    f = fxforge.optimize(model, (ids[:1],), quantize="w8a8", kv_cache=True, verbose=False)
    alone = [f.generate(ids[i:i + 1], 6, min_new_tokens=6) for i in range(3)]
    batch = f.generate(ids, 6, min_new_tokens=6)
    for i in range(3):
        assert torch.equal(batch[i], alone[i][0])
    outs = fxforge.Engine(f, max_batch=4).generate_many([ids[i] for i in range(3)], max_new_tokens=6,
                                                         min_new_tokens=6)
    for i, o in enumerate(outs):
        assert torch.equal(torch.as_tensor(o).flatten()[-6:], alone[i][0, -6:])
