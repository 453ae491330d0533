"""fuse_attention on float16 / bfloat16 models whose eager attention computes parts in float32.

  - GPT-J casts q and k to float32 before q @ k^T, takes the softmax in float32 and casts
    the probabilities back to the half dtype before @ v: the fused op computes the scores
    from the half q, k in float32 anyway, and rounds the probabilities as Llama's
    softmax(dtype=float32).to(query.dtype) does, so it fuses (and kv_cache=True serves it);
  - CodeGen adds float16's min as its mask and then divides scores and mask by sqrt(d):
    the scaled fill still removes the key, so it fuses as causal;
  - MPT selects a float16 constant 0.0 into its float32 causal mask and adds a float32
    ALiBi table: no slope x position is rounded to half, so the slopes form (alibi=true)
    is proven; Bloom rounds slope x position to float16, which stays declined.

Generation is compared with transformers' greedy tokens; a token may differ only where
eager's own top-2 logit margin is a near-tie (a couple of half ulps)."""
import warnings

import pytest
import torch
import torch.nn as nn

import fxforge

HALF = (torch.float16, torch.bfloat16)
VOCAB = 128


class Float32ScoresAttn(nn.Module):
    """GPT-J's _attn: q, k to float32, q k^T / sqrt(D), softmax, probabilities back to v's dtype."""

    def forward(self, q, k, v):
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        scores = q.to(torch.float32) @ k.to(torch.float32).transpose(-1, -2) / 8 ** 0.5
        p = torch.softmax(scores, dim=-1).to(v.dtype)
        return (p @ v).transpose(1, 2)


def _quiet_optimize(model, example, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxforge.optimize(model, example, backend="torch", verbose=False, **kw)


@pytest.mark.parametrize("dtype", HALF)
def test_float32_scores_from_half_q_and_k_fuse_and_match_eager(dtype):
    gen = torch.Generator().manual_seed(0)
    example = tuple(torch.randn(2, 6, 2, 8, generator=gen).to(dtype) for _ in range(3))
    inputs = tuple(torch.randn(3, 9, 2, 8, generator=gen).to(dtype) for _ in range(3))
    model = Float32ScoresAttn()
    fast = _quiet_optimize(model, example)
    assert fast.graph.count("attention") == 1
    assert fast.graph.count("softmax") == 0 and fast.graph.count("cast") == 0
    out, ref = fast(*inputs), model(*inputs)
    assert out.dtype == ref.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def _scaled(model, dtype):
    """Weights scaled up (x3) so greedy margins are not all ties at init's tiny logits."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
    return model.eval().to(dtype)


def _gptj(dtype):
    import transformers as tr

    torch.manual_seed(0)
    cfg = tr.GPTJConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, rotary_dim=8,
                        attn_implementation="eager", pad_token_id=0)
    return _scaled(tr.GPTJForCausalLM(cfg), dtype)


def _mpt(dtype):
    import transformers as tr

    torch.manual_seed(0)
    cfg = tr.MptConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, max_seq_len=256, pad_token_id=0)
    return _scaled(tr.MptForCausalLM(cfg), dtype)


def _codegen(dtype):
    import transformers as tr

    torch.manual_seed(0)
    cfg = tr.CodeGenConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _scaled(tr.CodeGenForCausalLM(cfg), dtype)


def _logits(out):
    return out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out


def _assert_same_tokens_but_near_ties(model, tokens, ref, prompt_len):
    """tokens == ref, or each row first differs where eager's top-2 margin is a near-tie."""
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        logits = model(ref).logits.float()
    for row in range(ref.shape[0]):
        diff = (tokens[row] != ref[row]).nonzero()
        if len(diff) == 0:
            continue
        step = int(diff[0])
        assert step >= prompt_len
        top = logits[row, step - 1].topk(2).values
        tie = 2 * torch.finfo(dtype).eps * max(1.0, float(top[0].abs()))
        assert float(top[0] - top[1]) <= tie, f"row {row} differs at {step}, eager margin {float(top[0] - top[1])}"


def _check_half_model(model, dtype, alibi: bool):
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    fast = _quiet_optimize(model, (ids,))
    atts = [n for n in fast.graph.nodes if n.op == "attention"]
    assert len(atts) == 2 and all(n.attrs["causal"] for n in atts)
    assert all(bool(n.attrs.get("alibi")) == alibi for n in atts)
    longer = torch.randint(1, VOCAB, (3, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(longer).logits.float()
    out = _logits(fast(longer)).float()
    tol = 4 * torch.finfo(dtype).eps * float(ref.abs().max())
    assert float((out - ref).abs().max()) <= tol
    cached = _quiet_optimize(model, (ids,), kv_cache=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_tokens = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)
    _assert_same_tokens_but_near_ties(model, cached.generate(ids, 16), ref_tokens, ids.shape[1])


@pytest.mark.parametrize("dtype", HALF)
def test_gptj_half_fuses_and_generates_transformers_tokens(dtype):
    _check_half_model(_gptj(dtype), dtype, alibi=False)


@pytest.mark.parametrize("dtype", HALF)
def test_mpt_half_alibi_fuses_and_generates_transformers_tokens(dtype):
    _check_half_model(_mpt(dtype), dtype, alibi=True)


@pytest.mark.parametrize("dtype", HALF)
def test_codegen_half_mask_scaled_after_it_is_added_fuses_causal(dtype):
    """CodeGen adds its mask (float16's min, -65504, in a float16 model) before dividing by
    sqrt(head dim): the fill reaches the softmax as -16376, scaled with the scores, and
    still removes each future key exactly."""
    _check_half_model(_codegen(dtype), dtype, alibi=False)


def test_bloom_half_alibi_rounded_to_half_stays_a_bias():
    """Bloom rounds slope x position to float16: the slopes form would not reproduce that."""
    import transformers as tr

    torch.manual_seed(0)
    cfg = tr.BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=1, n_head=4)
    model = tr.BloomForCausalLM(cfg).eval().to(torch.float16)
    fast = _quiet_optimize(model, (torch.randint(0, VOCAB, (1, 8)),))
    assert not any(n.attrs.get("alibi") for n in fast.graph.nodes if n.op == "attention")


def test_float64_scores_from_float32_q_and_k_stay_unfused():
    """Scores in float64 from float32 q, k are not what the op computes (float32 scores for
    float32 operands): the casts stay, and so does the attention, with eager's answer."""
    def fn(q, k, v):
        scores = q.double() @ k.double().transpose(-1, -2) / 8 ** 0.5
        return torch.softmax(scores, dim=-1).to(v.dtype) @ v

    class Model(nn.Module):
        def forward(self, q, k, v):
            return fn(q, k, v)

    gen = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randn(2, 2, 6, 8, generator=gen) for _ in range(3))
    fast = _quiet_optimize(Model(), inputs)
    assert fast.graph.count("attention") == 0
    torch.testing.assert_close(fast(*inputs), fn(*inputs), atol=0, rtol=0)


class _BiasAfterTheScale(nn.Module):
    """An ALiBi-like term before a 1/16 scale and a -4096 step after it: the step is 4096
    below the scores at the softmax, not a fill of -65504 before the scale, so it removes no
    key where scores/16 reach thousands (large q/k weights)."""

    def __init__(self, d=32, h=2):
        super().__init__()
        self.h, self.dh = h, d // h
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        with torch.no_grad():
            self.qkv.weight.mul_(300.0)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.h, self.dh).permute(2, 0, 3, 1, 4)
        i = torch.arange(T)
        scores = (q @ k.transpose(-1, -2) - 0.5 * (i[None, :] - i[:, None]).float()) * 0.0625
        scores = scores + (i[None, :] > i[:, None]).float() * -4096.0
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D)


def test_a_finite_step_added_after_the_scale_is_not_taken_for_a_causal_mask():
    torch.manual_seed(0)
    model, x = _BiasAfterTheScale().eval(), torch.randn(1, 8, 32)
    fast = _quiet_optimize(model, (x,))
    assert not any(n.attrs["causal"] for n in fast.graph.nodes if n.op == "attention")
    torch.testing.assert_close(fast(x), model(x))
