"""SmolLM2-135M-Instruct with its real weights (slow; runs in CI): the default pipeline
equals eager at two batch sizes and three lengths, and greedy decoding gives the same
tokens as transformers' generate."""
import pytest
import torch

import fxforge

import zoo
from helpers import assert_close_to_eager, assert_round_trips

pytestmark = zoo.smollm2_marks()


@pytest.fixture(scope="module")
def smol(smollm2_captures):
    model, tok = zoo.smollm2()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    fast = fxforge.optimize(model, (ids,), capture_cache=smollm2_captures)
    return model, tok, fast, ids


def test_smollm2_matches_eager(smol):
    model, _, fast, _ = smol
    assert_round_trips(fast.graph)
    for b, t in [(1, 3), (2, 17), (2, 40)]:
        ids = torch.randint(0, model.config.vocab_size, (b, t))
        with torch.no_grad():
            ref = model(ids)
        assert_close_to_eager(ref, fast(ids))


def test_smollm2_greedy_tokens_equal_transformers(smol):
    model, tok, fast, ids = smol
    out = ids
    with torch.no_grad():
        for _ in range(12):
            out = torch.cat([out, fast(out).logits[:, -1:].argmax(-1)], dim=1)
        theirs = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, theirs)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_smollm2_norms_and_gates_are_single_kernels(smol):
    _, _, fast, _ = smol
    bodies = [tuple(op for op, _, _ in n.attrs["body"]) for n in fast.graph.nodes if n.op == "fused_pointwise"]
    norms = [b for b in bodies if "mean" in b and "rsqrt" in b]
    assert len(norms) == 61 and fast.graph.count("mean") == 0  # 2 per layer + the final norm
    assert bodies.count(("silu", "mul")) == 30
    assert fast.graph.count("attention") == 30


def test_the_converted_copy_is_the_gguf_model(smollm2_env, monkeypatch, tmp_path):
    """fxforge.demo_model's converted copy (what the examples and torchrun workers of this
    suite load) has the GGUF model's weights bit for bit, and its tokenizer."""
    from fxforge import demo_model

    model, tok = zoo.smollm2()
    monkeypatch.setenv(demo_model.CONVERTED_ENV, smollm2_env[demo_model.CONVERTED_ENV])
    copy, copy_tok = demo_model.load_smollm2()
    ref, got = model.state_dict(), copy.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert copy.lm_head.weight.data_ptr() == copy.model.embed_tokens.weight.data_ptr()  # still tied
    text = "The capital of France is Paris. <|im_end|>"
    assert copy_tok(text).input_ids == tok(text).input_ids
    assert (copy_tok.eos_token_id, copy.generation_config.eos_token_id) == \
        (tok.eos_token_id, model.generation_config.eos_token_id)
    monkeypatch.setenv(demo_model.CONVERTED_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="holds no converted SmolLM2"):
        demo_model.load_smollm2()
