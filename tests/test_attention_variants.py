"""Attention variants on tiny random transformers models (issue 18 item 3): soft-cap
(Gemma2), sliding window (Mistral, Gemma2), ALiBi slopes (bloom, mpt), multi-query attention
by broadcasting (falcon, gpt_bigcode), positions from the attention mask (OPT), a mask fill made in forward (GPT-Neo). Each: every
layer's attention is fused with the variant as an attribute, no softmax is left, outputs
equal eager, and kv_cache's greedy generate equals transformers' for a left-padded batch."""
import warnings

import pytest
import torch

import fxforge

from fxforge.ir import typecheck
from helpers import assert_close_to_eager, assert_round_trips


def gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return Gemma2ForCausalLM(Gemma2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, attn_logit_softcapping=5.0,
        final_logit_softcapping=30.0, sliding_window=4, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        attn_implementation="eager")).eval()


def bloom():
    from transformers import BloomConfig, BloomForCausalLM

    return BloomForCausalLM(BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4, bos_token_id=0,
                                        eos_token_id=0, pad_token_id=0)).eval()


def mpt():
    from transformers import MptConfig, MptForCausalLM

    return MptForCausalLM(MptConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, max_seq_len=128,
                                    attn_config={"alibi": True})).eval()


def falcon(alibi):
    from transformers import FalconConfig, FalconForCausalLM

    return FalconForCausalLM(FalconConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=alibi,
        new_decoder_architecture=False, multi_query=True, bos_token_id=0, eos_token_id=0,
        attn_implementation="eager")).eval()


def gpt_bigcode():
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    return GPTBigCodeForCausalLM(GPTBigCodeConfig(
        vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128, multi_query=True, bos_token_id=0,
        eos_token_id=0, attn_implementation="eager")).eval()


def opt():
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(OPTConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
        max_position_embeddings=128, word_embed_proj_dim=64, bos_token_id=0, eos_token_id=0, pad_token_id=1,
        attn_implementation="eager")).eval()


def gpt_neo():
    # global then local (window 4) layers; no 1/sqrt(d) scale; q, k in float32; the causal
    # mask applied with where() and a fill made in forward (torch.tensor(finfo.min))
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    return GPTNeoForCausalLM(GPTNeoConfig(
        vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
        window_size=4, max_position_embeddings=128, bos_token_id=0, eos_token_id=0)).eval()


def mistral():
    import zoo

    return zoo.mistral(sliding_window=4, attn="eager")[0]


# name -> (model, the variant attributes of layer 0's and layer 1's attention, K/V heads)
MODELS = {
    # Gemma2: soft-capped everywhere, sliding window on even layers
    "gemma2": (gemma2, [{"softcap": 5.0, "window": 4}, {"softcap": 5.0}], 2),
    "mistral_eager": (mistral, [{"window": 4}] * 2, 2),
    "bloom": (bloom, [{"alibi": True}] * 2, 4),
    "mpt": (mpt, [{"alibi": True}] * 2, 4),
    "falcon_mqa": (lambda: falcon(False), [{}] * 2, 1),
    "gpt_bigcode_mqa": (gpt_bigcode, [{}] * 2, 1),
    "opt": (opt, [{}] * 2, 4),
    "gpt_neo": (gpt_neo, [{}, {"window": 4}], 4),
}
VARIANTS = ("softcap", "window", "alibi")


@pytest.fixture(scope="module", params=list(MODELS))
def fused(request):
    torch.manual_seed(0)
    make, attrs, kv_heads = MODELS[request.param]
    model = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = fxforge.optimize(model, (torch.randint(0, 128, (2, 7)),), kv_cache=True)
    return request.param, model, fast, attrs, kv_heads


def test_every_layer_fuses_with_its_variant(fused):
    name, model, fast, attrs, kv_heads = fused
    atts = [n for n in fast.graph.nodes if n.op == "attention"]
    assert len(atts) == len(attrs) and fast.graph.count("softmax") == 0, fast.ir
    for n, want in zip(atts, attrs):
        assert n.attrs["causal"], fast.ir
        assert {a: n.attrs[a] for a in VARIANTS if a in n.attrs} == want, fast.ir
        assert int(n.inputs[1].shape[1]) == kv_heads
        # the cached attention reads q, the cached K/V, the key bias, and ALiBi's slopes only
        assert len(n.inputs) == 4 + bool(n.attrs.get("alibi"))
        if n.attrs.get("alibi"):
            assert n.inputs[4].type.shape == (4,) and n.inputs[4].param
    typecheck(fast.graph)
    assert_round_trips(fast.graph)  # the attributes print and parse back


def test_outputs_equal_eager(fused):
    name, model, fast, attrs, kv_heads = fused
    plain = fxforge.optimize(model, (torch.randint(0, 128, (2, 7)),))
    assert plain.graph.count("attention") == len(attrs) and plain.graph.count("softmax") == 0
    for b, t in [(1, 3), (2, 11)]:  # 11: beyond the window of 4
        ids = torch.randint(0, 128, (b, t))
        with torch.no_grad():
            assert_close_to_eager(model(ids), plain(ids))


def test_generate_equals_transformers_left_padded(fused):
    name, model, fast, attrs, kv_heads = fused
    gen = torch.Generator().manual_seed(3)
    ids, mask = torch.zeros(3, 9, dtype=torch.long), torch.zeros(3, 9, dtype=torch.long)
    for i, n in enumerate([5, 9, 2]):
        ids[i, 9 - n:] = torch.randint(2, 128, (n,), generator=gen)
        mask[i, 9 - n:] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=10, pad_token_id=0,
                             eos_token_id=None)
    assert torch.equal(fast.generate(ids, 10, attention_mask=mask, pad_token_id=0, eos_token_id=None), ref)


def test_falcon_bf16_alibi_stays_an_exact_bias_and_kv_cache_refuses_it():
    # falcon builds its ALiBi in bfloat16 (slope * position rounded to 8 bits): not slopes
    # at lengths the sample sizes do not reach, so it stays a [B, H, T, T] bias (exact)
    from fxforge.passes.kv_cache import KVCacheError

    model = falcon(True)
    ids = torch.randint(0, 128, (2, 7))
    fast = fxforge.optimize(model, (ids,))
    atts = [n for n in fast.graph.nodes if n.op == "attention"]
    assert len(atts) == 2 and all(len(n.inputs) == 4 and not n.attrs.get("alibi") for n in atts)
    with torch.no_grad():
        assert_close_to_eager(model(ids), fast(ids))
    with pytest.raises(KVCacheError, match="mask"):
        fxforge.optimize(model, (ids,), kv_cache=True)


def test_interpret_backend_runs_the_variant_kernels():
    # the Triton kernels (FlashAttention for the prompt, split decode for one token) with
    # SOFTCAP / WINDOW (Gemma2) and ALIBI (bloom), through the interpreter; Cohere: GQA with an
    # interleaved rotary (no cat), where rotary q (4 heads) joins the kernel storing K/V
    # (2 heads) as a part of its own (the launch plan once broadcast all their inputs
    # together, and failed)
    for make in (gemma2, bloom, cohere_gqa):
        torch.manual_seed(0)
        model = make()
        fast = fxforge.optimize(model, (torch.randint(0, 128, (2, 7)),), backend="interpret", kv_cache=True)
        ids = torch.randint(2, 128, (1, 6))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = model.generate(ids, do_sample=False, max_new_tokens=6, pad_token_id=0, eos_token_id=None)
        assert torch.equal(fast.generate(ids, 6, pad_token_id=0, eos_token_id=None), ref)


def cohere_gqa():
    from transformers import CohereConfig, CohereForCausalLM

    return CohereForCausalLM(CohereConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, bos_token_id=0,
                                          eos_token_id=0, pad_token_id=0)).eval()


def xglm():
    from transformers import XGLMConfig, XGLMForCausalLM

    return XGLMForCausalLM(XGLMConfig(vocab_size=128, d_model=64, num_layers=2, attention_heads=4, ffn_dim=128,
                                      max_position_embeddings=128, pad_token_id=1)).eval()


def test_xglm_heads_folded_for_a_3d_softmax_and_a_floor_under_the_scores_fuse():
    # XGLM: q pre-scaled, [B*H] matmuls, the mask added to [B, H] scores, then
    # torch.max(scores, finfo.min), folded back for a 3-D softmax
    torch.manual_seed(0)
    model = xglm()
    ids = torch.randint(2, 128, (2, 9))
    fast = fxforge.optimize(model, (ids,), kv_cache=True)
    atts = [n for n in fast.graph.nodes if n.op == "attention"]
    assert len(atts) == 2 and all(n.attrs["causal"] for n in atts) and fast.graph.count("softmax") == 0, fast.ir
    plain = fxforge.optimize(model, (ids,))
    with torch.no_grad():
        assert_close_to_eager(model(ids).logits, plain(ids).logits)
    one = ids[:1, 3:]
    ref = model.generate(one, max_new_tokens=10, do_sample=False, pad_token_id=1, eos_token_id=None)
    assert torch.equal(fast.generate(one, 10, eos_token_id=None), ref)


def test_a_floor_under_masked_scores_moves_onto_the_bias():
    # max(scores + bias, finfo.min) == scores + max(bias, finfo.min) after softmax, even
    # for a bias with -inf and a row whose every key is masked
    class Floored(torch.nn.Module):
        def forward(self, q, k, v, bias):
            s = q @ k.transpose(-1, -2) * 0.25 + bias
            s = torch.max(s, torch.tensor(torch.finfo(s.dtype).min))
            return torch.softmax(s, dim=-1) @ v

    q, k, v = (torch.randn(2, 2, 5, 8) for _ in range(3))
    bias = torch.zeros(2, 1, 5, 5)
    bias[0, 0, :, 3:] = float("-inf")
    bias[1, 0, 2, :] = float("-inf")  # every key of one query masked
    fast = fxforge.optimize(Floored(), (q, k, v, bias))
    assert fast.graph.count("attention") == 1 and fast.graph.count("softmax") == 0, fast.ir
    torch.testing.assert_close(fast(q, k, v, bias), Floored()(q, k, v, bias), rtol=1e-5, atol=1e-6)
