"""Speculative decoding (runtime/speculative.py): greedy output identical to plain greedy
for every kind of draft (the model itself, an int8 copy, an unrelated model, prompt
lookup), the rejection rule leaves the sampling distribution unchanged (exact check on
a tiny vocabulary, with a control showing the check can fail), and clear errors."""
import math
import warnings

import pytest
import torch

import fxforge
from fxforge.runtime.speculative import SpeculativeStats, accept

import zoo


@pytest.fixture(scope="module")
def llama_pair():
    torch.manual_seed(0)
    model, vocab = zoo.llama("sdpa")
    ex = (torch.randint(0, vocab, (2, 7)),)
    fast = fxforge.optimize(model, ex, kv_cache=True)
    torch.manual_seed(1)
    other, _ = zoo.llama("eager")  # same vocabulary, other weights: a draft that is often wrong
    drafts = {"self": fast, "int8": fxforge.optimize(model, ex, kv_cache=True, quantize="int8"),
              "unrelated": fxforge.optimize(other, ex, kv_cache=True), "ngram": "ngram"}
    return fast, vocab, drafts


@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("kind", ["self", "int8", "unrelated", "ngram"])
def test_greedy_tokens_equal_plain_greedy(llama_pair, kind, k):
    fast, vocab, drafts = llama_pair
    ids = torch.randint(1, vocab, (1, 9), generator=torch.Generator().manual_seed(5))
    plain = fast.generate(ids, 25, eos_token_id=None)
    stats = SpeculativeStats()
    out = fast.generate(ids, 25, eos_token_id=None, draft=drafts[kind], num_draft_tokens=k, draft_stats=stats)
    assert torch.equal(out, plain)
    assert stats.rounds >= math.ceil(25 / (k + 1)) and stats.accepted <= stats.proposed
    if kind == "self":  # the model drafting for itself is always right
        assert stats.acceptance_rate == 1.0 and stats.rounds == math.ceil(25 / (k + 1))


@pytest.mark.parametrize("settings", [
    dict(max_new_tokens=1), dict(max_new_tokens=2), dict(max_new_tokens=20, repetition_penalty=1.5),
    dict(max_new_tokens=20, no_repeat_ngram_size=2), dict(max_new_tokens=20, eos_token_id=[3, 7, 11, 13, 17, 19]),
    dict(max_new_tokens=12, min_new_tokens=10, eos_token_id=[3, 7, 11, 13, 17, 19]),
], ids=lambda s: ",".join(s))
def test_greedy_with_processors_and_stops_equals_plain(llama_pair, settings):
    fast, vocab, drafts = llama_pair
    ids = torch.randint(1, vocab, (1, 6), generator=torch.Generator().manual_seed(2))
    settings = {"eos_token_id": None, **settings}
    plain = fast.generate(ids, **settings)
    for kind in ("int8", "unrelated", "ngram"):
        assert torch.equal(fast.generate(ids, draft=drafts[kind], num_draft_tokens=4, **settings), plain), kind


def test_self_draft_keeps_greedy_tokens(llama_pair):
    """self_draft: the model itself as an int4 draft (bfloat16 products, lm_head included,
    q/k/v and gate/up merged): plain greedy's tokens at every k."""
    from fxforge.runtime.speculative import self_draft

    fast, vocab, _ = llama_pair
    torch.manual_seed(0)
    model, _ = zoo.llama("sdpa")  # llama_pair's model: the same seed
    draft = self_draft(model, (torch.randint(0, vocab, (2, 7)),))
    assert draft.graph.count("quant_linear") == 2 * 4 + 1  # qkv, o, gate_up, down per layer, and lm_head
    ids = torch.randint(1, vocab, (1, 9), generator=torch.Generator().manual_seed(5))
    plain = fast.generate(ids, 25, eos_token_id=None)
    for k in (1, 5):
        stats = SpeculativeStats()
        assert torch.equal(fast.generate(ids, 25, eos_token_id=None, draft=draft, num_draft_tokens=k,
                                         draft_stats=stats), plain)
        assert stats.accepted > 0  # the draft is the model, rounded: it is right some of the time
    # a float32 model's draft has bfloat16 weights (no casts around its bfloat16
    # products) and float32 rotary frequencies; the model itself is untouched
    assert all(p.dtype == torch.float32 for p in model.parameters())
    params = draft.graph.params
    assert params["model.embed_tokens.weight"].dtype == params["model.norm.weight"].dtype == torch.bfloat16
    assert params["model.rotary_emb.inv_freq"].dtype == torch.float32


def test_bfloat16_copy_keeps_ties_and_leaves_the_model():
    from fxforge.runtime.speculative import bfloat16_copy

    model, _ = zoo.llama("sdpa")
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as SmolLM2's
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copy16 = bfloat16_copy(model)
    assert copy16.lm_head.weight is copy16.model.embed_tokens.weight
    assert all(p.dtype == torch.bfloat16 for p in copy16.parameters())
    assert copy16.model.rotary_emb.inv_freq.dtype == torch.float32  # buffers as they were
    assert all(torch.equal(v, before[k]) and v.dtype == before[k].dtype for k, v in model.state_dict().items())
    assert torch.equal(copy16.lm_head.weight, model.lm_head.weight.detach().to(torch.bfloat16))


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


CHI2_LIMIT = {5: 25.7, 35: 75.0}  # chi-square critical values at p = 1e-4 for 5 and 35 degrees of freedom


def test_rejection_rule_draws_from_the_target_distribution():
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.05, 0.05]] * 3)
    q = [torch.tensor([0.05, 0.05, 0.3, 0.3, 0.2, 0.1])] * 2
    first = torch.zeros(6)
    for _ in range(6000):
        x = [int(torch.multinomial(q[0], 1, generator=gen)), int(torch.multinomial(q[1], 1, generator=gen))]
        m, nxt = accept(p, x, q, True, gen)
        first[x[0] if m >= 1 else nxt] += 1
    assert _chi_square(first, p[0]) < CHI2_LIMIT[5]
    assert _chi_square(first, q[0]) > 1000  # the check can tell the draft's distribution apart


def _tiny_llama(seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=6, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper distributions than the random init's near-uniform ones
        model.lm_head.weight.mul_(8.0)
    return model


@pytest.mark.slow
def test_sampling_distribution_of_two_tokens_is_unchanged():
    target, drafter = _tiny_llama(0), _tiny_llama(1)
    ex = (torch.randint(0, 6, (1, 4)),)
    fast = fxforge.optimize(target, ex, kv_cache=True)
    draft = fxforge.optimize(drafter, ex, kv_cache=True)
    prompt = torch.tensor([[1, 4, 2]])
    with torch.no_grad():  # the exact joint distribution of the next two tokens
        p1 = target(prompt).logits[0, -1].softmax(-1)
        joint = torch.stack([p1[a] * target(torch.cat([prompt, torch.tensor([[a]])], 1)).logits[0, -1].softmax(-1)
                             for a in range(6)]).flatten()
        q1 = drafter(prompt).logits[0, -1].softmax(-1)
        draft_joint = torch.stack([q1[a] * drafter(torch.cat([prompt, torch.tensor([[a]])], 1)).logits[0, -1]
                                   .softmax(-1) for a in range(6)]).flatten()
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(36)
    stats = SpeculativeStats()
    for _ in range(1000):
        out = fast.generate(prompt, 2, do_sample=True, top_k=0, eos_token_id=None, generator=gen, draft=draft,
                            num_draft_tokens=2, draft_stats=stats)
        counts[int(out[0, 3]) * 6 + int(out[0, 4])] += 1
    assert 0.05 < stats.acceptance_rate < 0.95  # both branches of the rule ran
    assert _chi_square(counts, joint) < CHI2_LIMIT[35]
    assert _chi_square(counts, draft_joint) > 3 * CHI2_LIMIT[35]  # the check can fail


def test_clear_errors(llama_pair):
    fast, vocab, drafts = llama_pair
    ids = torch.randint(1, vocab, (1, 5))
    with pytest.raises(ValueError, match="one unpadded sequence at a time, got 2 row"):
        fast.generate(ids.repeat(2, 1), 4, draft="ngram")
    with pytest.raises(ValueError, match="does not combine with num_beams"):
        fast.generate(ids, 4, draft="ngram", num_beams=2)
    with pytest.raises(ValueError, match="num_draft_tokens must be an int >= 1"):
        fast.generate(ids, 4, draft="ngram", num_draft_tokens=0)
    with pytest.raises(ValueError, match="use 'ngram'"):
        fast.generate(ids, 4, draft="medusa")
    with pytest.raises(ValueError, match="draft must be an fxforge OptimizedModel"):
        fast.generate(ids, 4, draft=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="go with draft="):
        fast.generate(ids, 4, num_draft_tokens=3)
    torch.manual_seed(0)
    model, _ = zoo.llama("sdpa")
    no_cache = fxforge.optimize(model, (torch.randint(0, vocab, (1, 5)),))
    with pytest.raises(ValueError, match="needs a KV cache"):
        fast.generate(ids, 4, draft=no_cache)
    small_vocab = fxforge.optimize(_tiny_llama(0), (torch.randint(0, 6, (1, 4)),), kv_cache=True)
    with pytest.raises(ValueError, match="vocabulary has 6 tokens and the model's 128"):
        fast.generate(ids, 4, draft=small_vocab)


def test_greedy_equals_plain_when_verification_takes_other_linear_kernels(monkeypatch, tmp_path):
    """The model's k + 1-row verification steps on other kernels and layouts than its
    one-row steps (runtime/cpu_linear.py's few-row choice): the tokens stay plain greedy's."""
    from fxforge.runtime import cpu_linear
    from fxforge.runtime.cpu_linear_cache import Decision

    if not cpu_linear.onednn_available():
        pytest.skip("this torch build has no oneDNN linear")
    monkeypatch.setenv("FXFORGE_CPU_LINEAR_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_linear, "MIN_TIMED_BYTES", 0)
    monkeypatch.setattr(cpu_linear, "measure_choices",
                        lambda shapes, candidates: {s: Decision("aten", "column", 2.0, {}, 9) for s in shapes})
    monkeypatch.setattr(cpu_linear, "measure_row_choices", lambda bucket, shapes, one_row, candidates: {
        s: Decision("onednn", "row", 2.0, {}, 9) for s in shapes})
    torch.manual_seed(0)
    model, vocab = zoo.llama("sdpa")
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),), kv_cache=True)
    stats = next(s for s in fast.runtime_stats if s.name == "cpu_linear")
    assert stats.details["cpu_linear"]["few_rows"] and stats.details["cpu_linear"]["originals_bytes"] > 0
    plain_fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),), kv_cache=True, cpu_linear=False)
    ids = torch.randint(1, vocab, (1, 9), generator=torch.Generator().manual_seed(5))
    plain = plain_fast.generate(ids, 25, eos_token_id=None)
    assert torch.equal(fast.generate(ids, 25, eos_token_id=None), plain)
    for draft in (plain_fast, "ngram"):
        for k in (3, 5):
            assert torch.equal(fast.generate(ids, 25, eos_token_id=None, draft=draft, num_draft_tokens=k), plain)


def test_greedy_equals_plain_with_packed_verification_weights(monkeypatch, tmp_path):
    """The verification steps on oneDNN-packed copies (TorchBackend(few_rows_packed_mb=...)):
    the tokens stay plain greedy's."""
    from fxforge.runtime import cpu_linear
    from fxforge.runtime.backends.torch_backend import TorchBackend
    from fxforge.runtime.cpu_linear_cache import Decision

    if not cpu_linear.onednn_available():
        pytest.skip("this torch build has no oneDNN linear")
    monkeypatch.setenv("FXFORGE_CPU_LINEAR_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_linear, "MIN_TIMED_BYTES", 0)
    monkeypatch.setattr(cpu_linear, "measure_row_choices", lambda bucket, shapes, one_row, candidates: {
        s: Decision(*cpu_linear.PACKED, 2.0, {}, 9) for s in shapes})
    torch.manual_seed(0)
    model, vocab = zoo.llama("sdpa")
    example = (torch.randint(0, vocab, (2, 7)),)
    fast = fxforge.optimize(model, example, kv_cache=True, backend=TorchBackend("cpu", few_rows_packed_mb=64))
    assert next(s for s in fast.runtime_stats if s.name == "cpu_linear").details["cpu_linear"]["packed_bytes"] > 0
    plain_fast = fxforge.optimize(model, example, kv_cache=True, cpu_linear=False)
    ids = torch.randint(1, vocab, (1, 9), generator=torch.Generator().manual_seed(5))
    plain = plain_fast.generate(ids, 25, eos_token_id=None)
    for draft in (plain_fast, "ngram"):
        for k in (2, 4, 7):
            assert torch.equal(fast.generate(ids, 25, eos_token_id=None, draft=draft, num_draft_tokens=k), plain)


def test_self_draft_falls_back_to_float32_weights_with_a_warning(monkeypatch):
    from fxforge.runtime import speculative

    def fails(model):
        raise RuntimeError("expected both operands to have the same dtype")

    monkeypatch.setattr(speculative, "bfloat16_copy", fails)
    model, vocab = zoo.llama("sdpa")
    with pytest.warns(UserWarning, match="keeps float32 weights"):
        draft = speculative.self_draft(model, (torch.randint(0, vocab, (1, 5)),))
    assert draft.graph.params["model.embed_tokens.weight"].dtype == torch.float32


def test_self_draft_fallback_when_optimize_itself_fails_once(monkeypatch):
    import fxforge.api as api

    from fxforge.runtime import speculative

    real, calls = api.optimize, []

    def flaky(model, *args, **kwargs):
        calls.append(next(p.dtype for p in model.parameters()))
        if len(calls) == 1:
            raise RuntimeError("capture failed in bfloat16")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(api, "optimize", flaky)
    model, vocab = zoo.llama("sdpa")
    with pytest.warns(UserWarning, match="capture failed in bfloat16"):
        draft = speculative.self_draft(model, (torch.randint(0, vocab, (1, 5)),))
    assert calls == [torch.bfloat16, torch.float32]
    assert draft.graph.params["model.embed_tokens.weight"].dtype == torch.float32


def test_self_draft_bad_options_raise_without_blaming_bfloat16():
    from fxforge.runtime import speculative

    model, vocab = zoo.llama("sdpa")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "bfloat16 did not optimize" warning first
        with pytest.raises(TypeError):
            speculative.self_draft(model, (torch.randint(0, vocab, (1, 5)),), no_such_option=1)


def _short_gpt2(positions, width=32):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=width, n_layer=1, n_head=2,
                                      n_positions=positions)).eval()


@pytest.mark.parametrize("block", [16, 3])
def test_paged_model_speculates_up_to_its_last_position(block):
    # prompt + max_new_tokens == the model's positions: the caches hold what plain greedy
    # needs, never k more (a paged cache has no block for them)
    from fxforge.passes.kv_cache import KVCacheConfig

    model = _short_gpt2(32)
    ex = (torch.randint(0, 128, (1, 8)),)
    fast = fxforge.optimize(model, ex, kv_cache=KVCacheConfig(layout="paged", block_size=block))
    draft = fxforge.optimize(model, ex, kv_cache=True)
    ids = torch.tensor([[5, 9, 5, 9, 5] * 4])
    plain = fast.generate(ids, 12, eos_token_id=None)
    for d in ("ngram", draft):
        for k in (2, 8):
            assert torch.equal(fast.generate(ids, 12, draft=d, num_draft_tokens=k, eos_token_id=None), plain)


def test_draft_with_fewer_positions_than_the_request_is_a_clear_error(llama_pair):
    fast, vocab, _ = llama_pair
    draft = fxforge.optimize(_short_gpt2(16), (torch.randint(0, 128, (1, 8)),), kv_cache=True)
    ids = torch.randint(1, 128, (1, 12), generator=torch.Generator().manual_seed(5))
    assert vocab == 128  # the draft's vocabulary
    with pytest.raises(ValueError, match=r"draft is fed 26 positions, more than the draft model's max_seq_len=16"):
        fast.generate(ids, 16, draft=draft, num_draft_tokens=4, eos_token_id=None)
    # within the draft's positions it speculates as before
    plain = fast.generate(ids, 4, eos_token_id=None)
    assert torch.equal(fast.generate(ids, 4, draft=draft, num_draft_tokens=4, eos_token_id=None), plain)
