"""kv_cache + generate() on SmolLM2-135M-Instruct with its real weights (slow; runs in CI):
greedy tokens equal transformers' generate, alone and in a left-padded batch of 3, and
64 tokens past EOS equal greedy decoding by full recompute."""
import pytest
import torch

import fxforge

import zoo

pytestmark = zoo.smollm2_marks()


@pytest.fixture(scope="module")
def smol(smollm2_captures):
    model, tok = zoo.smollm2()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    return model, tok, fxforge.optimize(model, (ids,), kv_cache=True, capture_cache=smollm2_captures), ids


def test_smollm2_greedy_tokens_equal_transformers(smol):
    model, tok, fast, ids = smol
    # with the model's own EOS (the default on both sides) both stop at the same place
    ours = fast.generate(ids, 64)
    with torch.no_grad():
        theirs = model.generate(ids, max_new_tokens=64, do_sample=False)
    assert torch.equal(ours, theirs)
    assert "Paris" in tok.decode(ours[0, ids.shape[1]:])


def test_smollm2_64_tokens_equal_full_recompute(smol):
    model, _, fast, ids = smol
    # no EOS: all 64 tokens, past the end of turn the instruct model emits; each one the
    # argmax of a full forward pass of the eager model over everything so far
    ours = fast.generate(ids, 64, eos_token_id=None)
    assert ours.shape == (1, ids.shape[1] + 64)
    seq = ids
    with torch.no_grad():
        for _ in range(64):
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(ours, seq)


def test_smollm2_left_padded_batch_equals_transformers(smol):
    model, tok, fast, _ = smol
    tok.padding_side = "left"
    enc = tok(["The capital of France is", "Once upon a time", "def fibonacci(n):\n    "],
              return_tensors="pt", padding=True)
    assert (enc.attention_mask == 0).any()  # the prompts really are padded
    ours = fast.generate(enc.input_ids, 64, attention_mask=enc.attention_mask)
    with torch.no_grad():
        theirs = model.generate(**enc, max_new_tokens=64, do_sample=False)
    assert torch.equal(ours, theirs)


def test_smollm2_cache_memory(smol):
    model, _, fast, _ = smol
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    # K and V, every layer, 3 KV heads of 64, float32
    assert fast.kv_layout.bytes_per_token == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4
    assert fast.kv_layout.per_row_positions and fast.kv_layout.n_layers == 30
