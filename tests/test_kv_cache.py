"""kv_cache + generate(): greedy tokens equal transformers' generate, batched left-padded
prompts included; logits at every step equal a full recompute; the IR after the pass."""
import pytest
import torch
import torch.nn.functional as F

import fxforge
from fxforge.passes.kv_cache import KVCacheConfig, KVCacheError
from fxforge.runtime.generate import process_logits

import zoo
from helpers import assert_close_to_eager, assert_matches_eager, assert_round_trips
from helpers import eager_greedy as _eager_greedy

MODELS = {
    "gpt2_eager": lambda: zoo.gpt2("eager"),
    "gpt2_sdpa": lambda: zoo.gpt2("sdpa"),
    "llama_eager": lambda: zoo.llama("eager"),
    "llama_sdpa": lambda: zoo.llama("sdpa"),
    "llama_mha": lambda: zoo.llama("sdpa", kv_heads=4),
}


def _optimize(model, vocab, **kw):
    return fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),), kv_cache=kw.pop("kv_cache", True), **kw)


@pytest.fixture(scope="module")
def shared():
    """`shared(name)`: (model, vocab, kv_cache-optimized model) for a MODELS entry, optimized
    once per module (each optimize() takes seconds) for the tests that only generate and
    read results. A test that inspects or patches the cache pool or the program, or wants
    another KV cache config, asks `shared(name, kv_cache=...)` for its own optimized model,
    made from the kept capture of the same model. The model is rebuilt each call from the
    test's seed (asserted the same weights) and the example input is drawn as _optimize
    draws it, so each test's prompts are the ones it drew with its own optimize()."""
    built = {}
    captures = fxforge.CaptureCache()

    def get(name, kv_cache=None):
        model, vocab = MODELS[name]()
        example = torch.randint(0, vocab, (2, 7))
        if name not in built:
            built[name] = model, fxforge.optimize(model, (example,), kv_cache=True, capture_cache=captures)
        first, fast = built[name]
        assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), model.state_dict().values()))
        if kv_cache is not None:  # its own, from the capture of `first` (the same weights)
            fast = fxforge.optimize(first, (example,), kv_cache=kv_cache, capture_cache=captures)
        return model, vocab, fast

    return get


def _assert_left_padded_batch_generates_as_transformers(model, fast):
    ids, mask = _padded_batch(128, [5, 9, 2])
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    out = fast.generate(ids, 8, attention_mask=mask)
    assert torch.equal(out, ref), (out, ref)


def _padded_batch(vocab, lengths, pad_id=0):
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(1, vocab, (n,))
        mask[i, width - n:] = 1
    return ids, mask


@pytest.mark.parametrize("name", MODELS)
def test_greedy_tokens_equal_transformers(name, shared):
    model, vocab, fast = shared(name)
    prompt = torch.randint(0, vocab, (1, 6))
    ref = model.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=0)
    out = fast.generate(prompt, 24)
    assert torch.equal(out, ref), (out, ref)


@pytest.mark.parametrize("name", MODELS)
def test_batched_left_padded_prompts_equal_transformers(name, shared):
    model, vocab, fast = shared(name)
    ids, mask = _padded_batch(vocab, [5, 9, 2])
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    out = fast.generate(ids, 16, attention_mask=mask)
    assert torch.equal(out, ref), (out, ref)


@pytest.mark.parametrize("name", ["gpt2_sdpa", "llama_sdpa"])
def test_logits_at_every_step_equal_full_recompute(name, shared):
    model, vocab, fast = shared(name)
    seq = torch.randint(0, vocab, (2, 20))
    pad = torch.zeros(2, dtype=torch.long)
    cache = fast.kv_cache_for(2, 20)
    # prefill 8 tokens, then a chunk of 4 (Tq < Tk with an offset), then single tokens
    start = 0
    for chunk in (8, 4, 1, 1, 1, 1, 1, 1, 1, 1):
        step = fast.run_cached(seq[:, start:start + chunk], start, pad, cache)
        start += chunk
        with torch.no_grad():
            full = model(seq[:, :start]).logits[:, -chunk:]
        assert_close_to_eager(full, step)


def test_steps_run_in_inference_mode_but_return_ordinary_tensors(monkeypatch, shared):
    """run_cached runs its program under inference_mode (faster small ops); the cache it
    updates and the logits it returns stay ordinary tensors: editable in place and usable
    with autograd outside inference_mode, and the cache steps on outside it too."""
    model, vocab, fast = shared("llama_sdpa", kv_cache=True)  # its own: the program is patched
    seq = torch.randint(0, vocab, (1, 9))
    pad = torch.zeros(1, dtype=torch.long)
    cache = fast.kv_cache_for(1, 9)
    seen = []
    real = fast.program

    def program(*args):
        seen.append(torch.is_inference_mode_enabled())
        return real(*args)

    fast.program = program
    logits = fast.run_cached(seq[:, :8], 0, pad, cache)
    assert seen == [True] and not logits.is_inference()
    from fxforge.runtime import module
    monkeypatch.setattr(module, "INFERENCE_MODE_MAX_TOKENS", 7)  # a longer step: no_grad, no copy
    long_step = fast.run_cached(seq[:, :8], 0, pad, fast.kv_cache_for(1, 9))
    assert seen == [True, False] and torch.equal(long_step, logits)
    logits[:, :, 0] = 0.0  # in place, outside inference_mode
    target = torch.randn(logits.shape[-1], requires_grad=True)
    (logits[0, -1] * target).sum().backward()  # saved for backward: not an inference tensor
    torch.testing.assert_close(target.grad, logits[0, -1])
    # outside inference_mode the cache is edited in place (as a beam reorder does) and
    # keeps its version counter: it is an ordinary tensor; then the next step runs on it
    buffer = cache.buffers[0]
    before = buffer._version
    buffer.add_(0.0)
    assert buffer._version > before
    step = fast.run_cached(seq[:, 8:9], 8, pad, cache)
    with torch.no_grad():
        full = model(seq).logits[:, -1:]
    assert_close_to_eager(full, step)


def test_plain_call_still_matches_eager(shared):
    model, vocab, fast = shared("llama_sdpa")
    assert_matches_eager(model, fast, vocab, [(1, 1), (3, 11)])


def test_ir_after_kv_cache():
    model, vocab = zoo.llama("sdpa", n_layer=1)
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),),
                            passes=["cleanup", "fuse_attention", "kv_cache"])
    text = fast.ir
    head = text.splitlines()[0]
    # the roles the runtime reads are in the signature (ir/roles.py)
    assert ('%input_ids: i64[B, T], %L: int {role="cache_len"}, %kv_positions: i64[B, T] {role="positions"}, '
            '%kv_bias: f32[B, 1, 1, L + T] {role="key_bias"}') in head
    assert '%s0: state "layer0.k_cache" f32[B, 2, S, 16] {layer=0, kind="k", layout="dense"}' in head
    assert '%s1: state "layer0.v_cache" f32[B, 2, S, 16] {layer=0, kind="v", layout="dense"}' in head
    # (then fixed_dtypes: Llama's RMSNorm and rotary cast to float32, no-ops at capture)
    assert text.splitlines()[1].startswith('  signature {outputs=("logits",), fixed_dtypes=((f32, ')
    lines = [ln.strip() for ln in text.splitlines()]
    appends = [ln for ln in lines if "kv_append(" in ln]
    assert len(appends) == 2 and all(ln.endswith("{start=L}") and "f32[B, 2, L + T, 16]" in ln for ln in appends)
    attn = next(ln for ln in lines if "= attention(" in ln)
    assert attn.endswith("%kv_bias) {causal=true, scale=0.25}"), attn
    # rotary reads the per-row positions, not an arange over T
    assert not any("arange(" in ln for ln in lines)
    assert any(ln.endswith("unsqueeze(%kv_positions) {dim=2}") for ln in lines)
    assert_round_trips(fast.graph)


def test_cache_is_reused_and_sized_to_the_request(shared):
    model, vocab, fast = shared("llama_sdpa", kv_cache=True)  # its own cache pool
    fast.generate(torch.randint(0, vocab, (2, 5)), 10)
    [cache] = fast._caches.idle  # given back after the call
    per_token = fast.kv_layout.bytes_per_token
    assert cache.nbytes() == per_token * 2 * cache.capacity
    fast.generate(torch.randint(0, vocab, (1, 3)), 4)
    assert fast._caches.idle == [cache]  # smaller request: same buffers


def test_nanogpt_positions_are_per_row_and_serve_left_padding():
    """nanoGPT looks its positions up as wpe(arange(T)), [T, C] rows added to the [B, T, C]
    token embeddings: each row looks up its own positions ([B, T, C]), so a left-padded
    batch generates each row as alone (shared positions shifted a padded row's before)."""
    gm, vocab = zoo.nanogpt_traced()
    fast = fxforge.optimize(gm, (torch.randint(0, vocab, (2, 7)),), kv_cache=True)
    assert fast.kv_layout.per_row_positions and fast.kv_layout.max_seq_len == 64  # the position table's rows
    prompt = torch.randint(0, vocab, (2, 5))
    out = fast.generate(prompt, 8)
    # check against greedy decoding by full recompute on the eager model
    seq = prompt
    for _ in range(8):
        with torch.no_grad():
            nxt = gm(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)
    ids, mask = _padded_batch(vocab, [3, 5])
    batched = fast.generate(ids, 6, attention_mask=mask)
    for row, n in enumerate([3, 5]):
        alone = fast.generate(ids[row:row + 1, 5 - n:], 6)
        assert torch.equal(batched[row, 5 - n:], alone[0])


class _PositionsOnTheHeads(torch.nn.Module):
    """wpe(arange(T)) [T, 8] added to q [B, H, T, 8]: per-row rows [B, T, 8] would meet
    the heads dim, not the batch; they are read as [B, 1, T, 8]."""

    def __init__(self):
        super().__init__()
        self.wte, self.wpe = torch.nn.Embedding(50, 32), torch.nn.Embedding(64, 8)
        self.qkv, self.out = torch.nn.Linear(32, 96), torch.nn.Linear(32, 50)

    def forward(self, idx):
        b, t = idx.shape
        q, k, v = (z.view(b, t, 4, 8).transpose(1, 2) for z in self.qkv(self.wte(idx)).split(32, 2))
        q = q + self.wpe(torch.arange(t, device=idx.device))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, 32))


def _assert_generates_as_eager_alone_and_left_padded(model, fast, vocab=50):
    ids = torch.randint(0, vocab, (2, 6))
    assert torch.equal(fast.generate(ids, 6), _eager_greedy(model, ids, 6))
    padded, mask = _padded_batch(vocab, [3, 5])
    batched = fast.generate(padded, 6, attention_mask=mask)
    for row, n in enumerate([3, 5]):  # each row as its prompt alone
        assert torch.equal(batched[row, 5 - n:], _eager_greedy(model, padded[row:row + 1, 5 - n:], 6)[0])


def test_looked_up_positions_broadcast_against_heads_are_per_row():
    torch.manual_seed(0)
    model = _PositionsOnTheHeads().eval()
    fast = fxforge.optimize(model, (torch.randint(0, 50, (2, 8)),), kv_cache=True)
    assert fast.kv_layout.per_row_positions
    _assert_generates_as_eager_alone_and_left_padded(model, fast)


class _PositionsMixedOverTheirFirstDim(torch.nn.Module):
    """Position rows [1, T, C] reduced or picked over the dim that per-row rows would put
    their batch in: summed over dim 0 (`sum0`: a plain call at batch 2 was off by 2.5), or
    transposed to [T, 1, C] first and then picked (`transpose_pick`, wrong left-padded rows)
    or summed (`ids_transpose_sum`: arange(T).unsqueeze(0) transposed, a plain call at batch
    3 off by 2.9, before this session too). These positions stay shared."""

    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.wte, self.wpe = torch.nn.Embedding(50, 32), torch.nn.Embedding(64, 32)
        self.scale = torch.nn.Parameter(torch.randn(1, 1, 32))
        self.qkv, self.out = torch.nn.Linear(32, 96), torch.nn.Linear(32, 50)

    def forward(self, idx):
        b, t = idx.shape
        arange = torch.arange(t, device=idx.device)
        if self.mode == "sum0":
            x = self.wte(idx) + (self.wpe(arange) * self.scale).sum(0, keepdim=True)
        elif self.mode == "transpose_pick":
            x = self.wte(idx) + self.wpe.weight[:t].unsqueeze(0).transpose(0, 1)[:, 0]
        else:
            x = self.wte(idx) + self.wpe(arange.unsqueeze(0).transpose(0, 1).sum(1))
        q, k, v = (z.view(b, t, 4, 8).transpose(1, 2) for z in self.qkv(x).split(32, 2))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, 32))


@pytest.mark.parametrize("mode", ["sum0", "transpose_pick", "ids_transpose_sum"])
def test_positions_mixed_over_their_first_dim_stay_shared(mode):
    torch.manual_seed(0)
    model = _PositionsMixedOverTheirFirstDim(mode).eval()
    fast = fxforge.optimize(model, (torch.randint(0, 50, (2, 8)),), kv_cache=True)
    assert not fast.kv_layout.per_row_positions
    ids = torch.randint(0, 50, (3, 6))
    torch.testing.assert_close(fast(ids), model(ids), rtol=1e-4, atol=1e-5)
    assert torch.equal(fast.generate(ids, 6), _eager_greedy(model, ids, 6))


class _RotaryTableSliced(torch.nn.Module):
    """Hand-written rotary as people write it outside transformers: lit-gpt's cos[:T] / sin[:T]
    ([T, D], broadcast against q [B, H, T, D]), NeoX's cos[:T][None, None], or Meta's complex
    freqs_cis[0:T] viewed as [1, T, 1, D/2]. Each row looks its own positions up now (they
    were shared by the batch: left padding and the engine refused)."""

    def __init__(self, spelling):
        super().__init__()
        self.spelling, self.emb = spelling, torch.nn.Embedding(50, 32)
        self.qkv, self.out = torch.nn.Linear(32, 96), torch.nn.Linear(32, 50)
        angles = torch.outer(torch.arange(64).float(), 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8))
        self.register_buffer("cos", angles.repeat(1, 2).cos(), persistent=False)
        self.register_buffer("sin", angles.repeat(1, 2).sin(), persistent=False)
        self.register_buffer("freqs_cis", torch.polar(torch.ones_like(angles), angles), persistent=False)

    def _rotate(self, x, t):  # x [B, H, T, 8]
        if self.spelling == "complex":
            xc = torch.view_as_complex(x.transpose(1, 2).float().reshape(x.shape[0], t, 4, 4, 2))
            return torch.view_as_real(xc * self.freqs_cis[0:t].view(1, t, 1, 4)).flatten(3).transpose(1, 2)
        cos, sin = self.cos[:t], self.sin[:t]
        if self.spelling == "neox":
            cos, sin = cos[None, None], sin[None, None]
        half = torch.cat([-x[..., 4:], x[..., :4]], -1)
        return x * cos + half * sin

    def forward(self, idx):
        b, t = idx.shape
        q, k, v = (z.view(b, t, 4, 8).transpose(1, 2) for z in self.qkv(self.emb(idx)).split(32, 2))
        y = torch.nn.functional.scaled_dot_product_attention(self._rotate(q, t), self._rotate(k, t), v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, 32))


@pytest.mark.parametrize("spelling", ["lit", "neox", "complex"])
def test_rotary_tables_sliced_by_the_length_are_per_row(spelling):
    torch.manual_seed(0)
    model = _RotaryTableSliced(spelling).eval()
    fast = fxforge.optimize(model, (torch.randint(0, 50, (2, 8)),), kv_cache=True)
    assert fast.kv_layout.per_row_positions and fast.kv_layout.max_seq_len == 64
    _assert_generates_as_eager_alone_and_left_padded(model, fast)
    prompts = [torch.randint(0, 50, (n,), generator=torch.Generator().manual_seed(n)) for n in (3, 7)]
    outs = fxforge.Engine(fast, max_batch=2, max_seq_len=32, prefill_chunk=4).generate_many(prompts, max_new_tokens=5)
    for p, out in zip(prompts, outs):
        assert torch.equal(out, _eager_greedy(model, p[None], 5)[0, p.numel():])


def test_eos_stops_each_row_and_pads(shared):
    model, vocab, fast = shared("gpt2_sdpa")
    ids = torch.randint(0, vocab, (3, 4))
    free = fast.generate(ids, 12)
    eos = int(free[0, 6])  # row 0 produces this token at step 3: make it the EOS
    ref = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=1)
    out = fast.generate(ids, 12, eos_token_id=eos, pad_token_id=1)
    assert torch.equal(out, ref), (out, ref)


def test_streamer_gets_every_token(shared):
    model, vocab, fast = shared("llama_sdpa")
    seen = []
    out = fast.generate(torch.randint(0, vocab, (2, 4)), 6, streamer=seen.append)
    assert torch.equal(torch.stack(seen, 1), out[:, 4:])

    class Streamer:  # transformers' streamer protocol: the prompt first, then each step
        def __init__(self):
            self.parts, self.ended = [], False

        def put(self, x):
            self.parts.append(x)

        def end(self):
            self.ended = True

    s = Streamer()
    out = fast.generate(torch.randint(0, vocab, (1, 4)), 5, streamer=s)
    assert s.ended and torch.equal(torch.cat([s.parts[0][0]] + [p for p in s.parts[1:]]), out[0])


def test_sampling_is_reproducible_and_respects_top_k(shared):
    model, vocab, fast = shared("llama_sdpa")
    prompt = torch.randint(0, vocab, (2, 4))
    # no EOS: a row that samples it would be padded after it, and pad is no top-3 token
    a = fast.generate(prompt, 10, do_sample=True, top_k=3, eos_token_id=None, generator=torch.Generator().manual_seed(1))
    b = fast.generate(prompt, 10, do_sample=True, top_k=3, eos_token_id=None, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    # every sampled token is among the 3 most likely given its prefix
    with torch.no_grad():
        logits = model(a[:, :-1]).logits[:, 3:]
    top3 = logits.topk(3, dim=-1).indices
    assert (top3 == a[:, 4:, None]).any(-1).all()


@pytest.mark.parametrize("top_k,top_p,temperature", [(None, 0.9, 1.0), (5, None, 0.7), (4, 0.5, 1.3), (0, 1.0, 2.0)])
def test_logits_processing_equals_transformers_warpers(top_k, top_p, temperature):
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    scores = torch.randn(4, 50)
    ref = scores.clone()
    if temperature != 1.0:
        ref = TemperatureLogitsWarper(temperature)(None, ref)
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p is not None and top_p < 1.0:
        ref = TopPLogitsWarper(top_p)(None, ref)
    out = process_logits(scores, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    assert torch.allclose(out[~torch.isinf(out)], ref[~torch.isinf(ref)])


# -- limits and errors, checked before any work ------------------------------------------------
def test_too_long_raises_before_generating(shared):
    model, vocab, fast = shared("gpt2_sdpa", kv_cache=True)  # 128 learned positions; its own cache pool
    assert fast.kv_layout.max_seq_len == 128
    with pytest.raises(ValueError, match="max_seq_len=128"):
        fast.generate(torch.randint(0, vocab, (1, 100)), 30)
    assert fast._caches.idle == []  # nothing was allocated
    fast.generate(torch.randint(0, vocab, (1, 100)), 29)  # exactly 128 fed (the last token never is)


def test_config_limits(shared):
    model, vocab, fast = shared("llama_sdpa", kv_cache=KVCacheConfig(max_seq_len=32, max_batch=2))
    with pytest.raises(ValueError, match="max_batch=2"):
        fast.generate(torch.randint(0, vocab, (3, 4)), 2)
    with pytest.raises(ValueError, match="max_seq_len=32"):
        fast.generate(torch.randint(0, vocab, (1, 30)), 4)
    gpt, gvocab = zoo.gpt2("sdpa")
    with pytest.raises(KVCacheError, match="only 128 rows"):
        _optimize(gpt, gvocab, kv_cache=KVCacheConfig(max_seq_len=4096))
    with pytest.raises(ValueError, match="max_seq_len must be"):
        KVCacheConfig(max_seq_len=0)


def test_fp16_cache_halves_memory_and_still_generates(shared):
    model, vocab, f32 = shared("llama_sdpa")
    f16 = _optimize(model, vocab, kv_cache=KVCacheConfig(dtype=torch.float16))
    assert f16.kv_layout.bytes_per_token * 2 == f32.kv_layout.bytes_per_token
    prompt = torch.randint(0, vocab, (1, 6))
    assert f16.generate(prompt, 8).shape == (1, 14)


def test_bad_inputs_to_generate(shared):
    model, vocab, fast = shared("llama_sdpa")
    with pytest.raises(ValueError, match="int64 tensor"):
        fast.generate(torch.randint(0, vocab, (5,)), 3)
    with pytest.raises(ValueError, match="left padding"):
        fast.generate(torch.ones(2, 4, dtype=torch.long), 3, attention_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="top_p"):
        fast.generate(torch.ones(1, 4, dtype=torch.long), 3, do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match=r"input_ids has no rows \(shape \(0, 4\)\)"):  # was a RuntimeError in min()
        fast.generate(torch.ones(0, 4, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):  # was a TypeError at a token
        fast.generate(torch.ones(1, 4, dtype=torch.long), 3, do_sample=True, generator=5)
    plain = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),))
    with pytest.raises(RuntimeError, match="kv_cache=True"):
        plain.generate(torch.ones(1, 4, dtype=torch.long), 3)


def test_refuses_attention_with_a_mask_input():
    model, vocab = zoo.llama("sdpa")
    ids = torch.randint(0, vocab, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    with pytest.raises(KVCacheError, match="mask computed from the input.s. attention_mask.*input_ids only"):
        fxforge.optimize(model, (ids,), example_kwargs={"attention_mask": mask}, kv_cache=True)


class _PadMaskedDecoder(torch.nn.Module):
    """Attention masked by the token values (pad tokens): a mask the cache cannot extend,
    though the model was captured with input_ids only."""

    def __init__(self, vocab=32, dim=16):
        super().__init__()
        self.emb, self.qkv, self.head = torch.nn.Embedding(vocab, dim), torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, vocab)

    def forward(self, ids):
        q, k, v = self.qkv(self.emb(ids)).unsqueeze(1).chunk(3, dim=-1)
        keep = (ids != 0)[:, None, None, :]
        causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
        return self.head(torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep & causal)[:, 0])


def test_refuses_a_mask_computed_from_the_tokens_and_says_so():
    ids = torch.randint(1, 32, (2, 7))
    with pytest.raises(KVCacheError, match="token values or the activations") as caught:
        fxforge.optimize(_PadMaskedDecoder(), (ids,), kv_cache=True)
    assert "input_ids only" not in str(caught.value)  # it was captured with input_ids only


def test_refuses_a_graph_without_attention():
    """A model with no attention at all (a state-space model, an MLP) is told so; one whose
    softmax fuse_attention did not take is sent to its notes (carried by the error)."""
    lin = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(KVCacheError, match="no attention at all .* Optimize it without kv_cache"):
        fxforge.optimize(lin, (torch.randn(2, 8),), kv_cache=True)
    scored = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Softmax(-1))
    with pytest.raises(KVCacheError, match=r"no fused attention .* its notes \(below\) say why"):
        fxforge.optimize(scored, (torch.randn(2, 8),), kv_cache=True)


def test_refuses_non_causal_attention():
    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(16, 48)

        def forward(self, x):
            q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    with pytest.raises(KVCacheError, match="not causal"):
        fxforge.optimize(Encoder(), (torch.randn(2, 5, 16),), kv_cache=True)


class _FoldedHeads(torch.nn.Module):
    """Heads folded into the batch for bmm ([B*H, T, D]); `across`: attention over the
    heads of each token instead, the length in the heads dim."""

    def __init__(self, across=False):
        super().__init__()
        self.emb, self.qkv, self.head = torch.nn.Embedding(32, 16), torch.nn.Linear(16, 48), torch.nn.Linear(16, 32)
        self.across = across
        self.register_buffer("mask", torch.full((64, 64), float("-inf")).triu(1), persistent=False)

    def forward(self, ids):
        b, t = ids.shape
        q, k, v = (x.view(b, t, 2, 8) for x in self.qkv(self.emb(ids)).split(16, -1))
        if self.across:
            o = (q @ k.transpose(-2, -1) / 4.0).softmax(-1) @ v
        else:
            q, k, v = (x.transpose(1, 2).reshape(b * 2, t, 8) for x in (q, k, v))
            o = (torch.bmm(q, k.transpose(1, 2)) / 4.0 + self.mask[:t, :t]).softmax(-1).bmm(v)
            o = o.view(b, 2, t, 8).transpose(1, 2)
        return self.head(o.reshape(b, t, 16))


# (heads folded with the batch for a bmm, a causal mask on the folded scores, now gets a
# cache: tests/test_kv_cache_seq_first.py)
@pytest.mark.parametrize("across, says", [
    (True, r"within each token[\s\S]*kv_cache=False")], ids=["across-heads"])
def test_refuses_attention_not_over_b_h_t_d_with_what_is_wrong(across, says):
    # a length that is not the sequence axis: another example length (the fixed-size advice) cannot help
    with pytest.raises(KVCacheError, match=says) as caught:
        fxforge.optimize(_FoldedHeads(across).eval(), (torch.randint(0, 32, (2, 7)),), kv_cache=True)
    assert "fixed batch or sequence size" not in str(caught.value)


def test_interpret_backend_runs_the_cached_graph():
    model, vocab = zoo.llama("sdpa", n_layer=1)
    ref_fast = _optimize(model, vocab)
    fast = _optimize(model, vocab, backend="interpret")
    ids, mask = _padded_batch(vocab, [3, 6])
    assert torch.equal(fast.generate(ids, 5, attention_mask=mask), ref_fast.generate(ids, 5, attention_mask=mask))


def _arch(name):
    import transformers as tr

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    build = {
        "qwen2": lambda: tr.Qwen2ForCausalLM(tr.Qwen2Config(**common)),
        "mistral": lambda: tr.MistralForCausalLM(tr.MistralConfig(**common, sliding_window=None)),
        "phi3": lambda: tr.Phi3ForCausalLM(tr.Phi3Config(**common, pad_token_id=0)),
        "gemma": lambda: tr.GemmaForCausalLM(tr.GemmaConfig(**common, head_dim=16)),
        # interleaved rotary tables (repeat_interleave): positions still per row
        "cohere": lambda: tr.CohereForCausalLM(tr.CohereConfig(**common, pad_token_id=0)),
        # a sinusoidal position table indexed by position ids (table[ids]): a row lookup
        "ctrl": lambda: tr.CTRLLMHeadModel(tr.CTRLConfig(vocab_size=128, n_embd=64, n_layer=2, n_head=4, dff=128,
                                                         n_positions=256)),
        # attention scaled by a floor of the positions (Llama-4-style temperature tuning)
        "ministral3": lambda: tr.Ministral3ForCausalLM(tr.Ministral3Config(**common, head_dim=16, pad_token_id=0)),
        # mixture of experts: the router indexes the step's tokens with arange(B*T), not positions
        "mixtral": lambda: tr.MixtralForCausalLM(tr.MixtralConfig(**common, num_local_experts=4,
                                                                  num_experts_per_tok=2, sliding_window=None)),
        "gpt_neox": lambda: tr.GPTNeoXForCausalLM(tr.GPTNeoXConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256)),
    }[name]
    return build().eval(), 128


@pytest.mark.parametrize("name", ["qwen2", "mistral", "phi3", "gemma", "gpt_neox", "mixtral", "cohere", "ctrl", "ministral3"])
def test_more_architectures_generate_like_transformers(name):
    model, vocab = _arch(name)
    fast = _optimize(model, vocab)
    ids, mask = _padded_batch(vocab, [6, 3])
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    assert torch.equal(fast.generate(ids, 12, attention_mask=mask, eos_token_id=None), ref)


def test_refuses_positions_it_cannot_place():
    # positions from a cumulative sum over an all-ones mask built from (B, T), squared: not
    # arange + c at the sample sizes, so the pass cannot tell what they mean with a cache
    # (the ones are one value per token, fine; the cumulative sum along T is refused)
    class SquaredPositions(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.pos = torch.nn.Embedding(32, 16), torch.nn.Embedding(64, 16)
            self.qkv, self.out = torch.nn.Linear(16, 48), torch.nn.Linear(16, 32)

        def forward(self, ids):
            ones = torch.ones(ids.shape, device=ids.device)  # as OPT: a float mask
            pos = ((ones.cumsum(1) * ones - 1) ** 2).long()
            x = self.emb(ids) + self.pos(pos)
            q, k, v = (t.view(ids.shape[0], ids.shape[1], 2, 8).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.out(y.transpose(1, 2).reshape(ids.shape[0], ids.shape[1], 16))

    with pytest.raises(KVCacheError, match=r"runs along the sequence[\s\S]*at: .*cumsum"):
        fxforge.optimize(SquaredPositions().eval(), (torch.randint(1, 32, (2, 7)),), kv_cache=True)


@pytest.mark.parametrize("window", [4, 16])  # 16: longer than every size fuse_attention samples
def test_sliding_window_attention_generates_like_transformers(window):
    # the window is an attribute of the attention op: prefill and decode drop keys `window`
    # or more positions back, counted in cache slots (left padding does not shift them)
    model, vocab = zoo.mistral(sliding_window=window)
    fast = _optimize(model, vocab)
    assert all(n.attrs.get("window") == window for n in fast.graph.nodes if n.op == "attention")
    ids, mask = _padded_batch(vocab, [9, 3])
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=2 * window, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    assert torch.equal(fast.generate(ids, 2 * window, attention_mask=mask, eos_token_id=None), ref)


def test_a_window_at_least_max_seq_len_wide_is_plain_causal_for_the_cache():
    """Every sequence the cache holds is shorter than the window: the band mask is causal."""
    model, vocab = zoo.mistral(sliding_window=64)
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 9)),), kv_cache=KVCacheConfig(max_seq_len=64))
    assert all(n.attrs["causal"] for n in fast.graph.nodes if n.op == "attention")
    ids, mask = _padded_batch(vocab, [6, 3])
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    assert torch.equal(fast.generate(ids, 12, attention_mask=mask, eos_token_id=None), ref)


@pytest.mark.parametrize("window", [4, 63])  # 63: one key short of max_seq_len
def test_a_window_narrower_than_max_seq_len_is_cached_as_the_window_attribute(window):
    # not made causal (that would change answers past the window): fuse_attention proves
    # the band and the cached attention keeps window=W
    torch.manual_seed(0)
    model, vocab = zoo.mistral(sliding_window=window)
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 9)),), kv_cache=KVCacheConfig(max_seq_len=64))
    windows = {n.attrs.get("window") for n in fast.graph.nodes if n.op == "attention"}
    assert windows == {window}, fast.ir
    ids = torch.randint(1, vocab, (1, 7))
    ref = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(fast.generate(ids, 12, eos_token_id=None), ref)


def test_a_length_only_mask_that_is_not_a_band_is_refused_as_such():
    class PrefixLM(torch.nn.Module):  # the first 2 positions are seen by every query
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(16, 48)

        def forward(self, x):
            t = x.shape[1]
            q, k, v = self.qkv(x).view(x.shape[0], t, 3, 2, 8).permute(2, 0, 3, 1, 4)
            i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) | (j < 2))

    with pytest.raises(KVCacheError, match="mask built from the sequence length that is not plain causal"):
        fxforge.optimize(PrefixLM(), (torch.randn(2, 5, 16),), kv_cache=True)


class ChunkedAttention(torch.nn.Module):
    """Llama 4's chunked attention: causal within chunks of `chunk` positions."""

    def __init__(self, chunk):
        super().__init__()
        self.chunk = chunk
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x):
        t = x.shape[1]
        q, k, v = self.qkv(x).view(x.shape[0], t, 3, 2, 8).permute(2, 0, 3, 1, 4)
        i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
        mask = (j <= i) & (i // self.chunk == j // self.chunk)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_a_chunked_mask_is_refused_with_the_max_seq_len_that_makes_it_causal():
    x = torch.randn(2, 5, 16)
    with pytest.raises(KVCacheError, match=r"chunked mask .* set kv_cache=KVCacheConfig\(max_seq_len=N\)"):
        fxforge.optimize(ChunkedAttention(32), (x,), kv_cache=True)
    # every sequence the cache holds fits in one chunk: causal, proven and cached
    fast = fxforge.optimize(ChunkedAttention(32), (x,), kv_cache=KVCacheConfig(max_seq_len=32))
    assert [n.attrs["causal"] for n in fast.graph.nodes if n.op == "attention"] == [True]
    # one position past the chunk is not causal, and the error says so
    with pytest.raises(KVCacheError, match="not causal at max_seq_len=33 either"):
        fxforge.optimize(ChunkedAttention(32), (x,), kv_cache=KVCacheConfig(max_seq_len=33))


@pytest.mark.parametrize("field, value", [("max_seq_len", 0), ("max_seq_len", True), ("max_batch", 0),
                                          ("max_batch", -2), ("max_batch", 2.0)])
def test_config_sizes_must_be_positive_ints(field, value):
    with pytest.raises(ValueError, match=rf"KVCacheConfig.{field} must be a positive int or None"):
        KVCacheConfig(**{field: value})


@pytest.mark.parametrize("dtype", [torch.int8, "float16", torch.bool])
def test_config_dtype_must_be_a_float_dtype(dtype):
    with pytest.raises(ValueError, match="KVCacheConfig.dtype must be a floating torch.dtype"):
        KVCacheConfig(dtype=dtype)


def test_refuses_positions_counted_along_the_sequence():
    """RoBERTa-family models count positions with a cumulative sum over input_ids != pad:
    with a cache the step holds only the new tokens, so the count would restart (tokens
    unlike transformers'). The pass refuses rather than generate them."""
    import transformers as tr

    cfg = tr.RobertaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                           num_attention_heads=4, max_position_embeddings=256, is_decoder=True, pad_token_id=0)
    model = tr.RobertaForCausalLM(cfg).eval()
    with pytest.raises(KVCacheError, match=r"runs along the sequence[\s\S]*at: .*cumsum"):
        fxforge.optimize(model, (torch.randint(1, 128, (2, 7)),), kv_cache=True)


class _ConvThenAttention(torch.nn.Module):
    """A short causal convolution along the sequence before causal attention (the shape of
    LFM hybrids' conv blocks): each token mixes the 3 before it, outside attention."""

    def __init__(self, vocab=64, dim=32, heads=2, kernel=4):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.conv = torch.nn.Conv1d(dim, dim, kernel, groups=dim, padding=kernel - 1)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.head = torch.nn.Linear(dim, vocab)
        self.heads = heads

    def forward(self, ids):
        x = self.embed(ids)
        b, t, d = x.shape
        x = self.conv(x.transpose(1, 2))[..., :t].transpose(1, 2)
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(y.transpose(1, 2).reshape(b, t, d))


def test_refuses_a_convolution_along_the_sequence():
    """A convolution whose kernel spans several tokens carries state along the sequence that
    the cache does not keep (lfm3 generated other tokens than transformers): refused, with
    the node; without kv_cache the model still optimizes and equals eager."""
    torch.manual_seed(0)
    model = _ConvThenAttention().eval()
    ids = torch.randint(0, 64, (2, 7))
    with pytest.raises(KVCacheError, match=r"convolution runs along the sequence[\s\S]*at: .*conv1d"):
        fxforge.optimize(model, (ids,), kv_cache=True)
    assert_matches_eager(model, fxforge.optimize(model, (ids,)), 64, [(1, 5), (3, 9)])


class _OneAttentionLM(torch.nn.Module):
    """Embedding, one fused q/k/v projection and an output head, for the one-layer test
    models below (each writes its own forward)."""

    def __init__(self, vocab=64, dim=32, heads=2):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.head = torch.nn.Linear(dim, vocab)
        self.heads = heads


class _TokenMixer(_OneAttentionLM):
    """Causal attention after an op that moves values along the sequence: RWKV's token shift
    (a pad by one), a roll, a flip, the first token broadcast to all, a smear of the previous
    token (slices and a cat), a gather at position - 1. Each reads other tokens than the
    step's own, so a cached step (which holds only the new tokens) would answer differently."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, ids):
        x = self.embed(ids)
        b, t, d = x.shape
        if self.kind == "pad_shift":
            x = x + F.pad(x, (0, 0, 1, -1))
        elif self.kind == "roll":
            x = x + torch.roll(x, 1, dims=1)
        elif self.kind == "flip":
            x = x + x.flip(1)
        elif self.kind == "first_token":
            x = x + x[:, :1]
        elif self.kind == "smear":
            x = x + torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        elif self.kind == "gather_previous":
            x = x + x[:, (torch.arange(t, device=x.device) - 1).clamp(min=0)]
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(x + y.transpose(1, 2).reshape(b, t, d))


@pytest.mark.parametrize("kind", ["pad_shift", "roll", "flip", "first_token", "smear", "gather_previous"])
def test_refuses_ops_that_move_values_along_the_sequence(kind):
    """Such a model used to generate other tokens than eager greedy (or crash indexing past
    the step's tokens): refused, naming the op; without kv_cache it optimizes and equals eager."""
    torch.manual_seed(0)
    model = _TokenMixer(kind).eval()
    ids = torch.randint(0, 64, (2, 7))
    with pytest.raises(KVCacheError, match=r"moves values along the sequence[\s\S]*at: "):
        fxforge.optimize(model, (ids,), kv_cache=True)
    assert_matches_eager(model, fxforge.optimize(model, (ids,)), 64, [(1, 5), (3, 9)])


class _ScalingPastALength(_OneAttentionLM):
    """Rotary frequencies that switch when the sequence is longer than 16 tokens (Phi-3's
    LongRoPE picks its long factors so): export records `T <= 16` for a shorter example."""

    def forward(self, ids):
        x = self.embed(ids)
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        hd = d // self.heads
        factor = 4.0 if t > 16 else 1.0
        inv = 1.0 / (factor * 10000 ** (torch.arange(0, hd, 2, device=x.device).float() / hd))
        f = torch.outer(torch.arange(t, device=x.device).float(), inv)
        cos, sin = torch.cat([f, f], -1).cos(), torch.cat([f, f], -1).sin()

        def rot(z):
            return z * cos + torch.cat([-z[..., hd // 2:], z[..., :hd // 2]], -1) * sin
        y = F.scaled_dot_product_attention(rot(q), rot(k), v, is_causal=True)
        return self.head(x + y.transpose(1, 2).reshape(b, t, d))


def test_a_guard_on_the_length_holds_for_the_cached_and_new_tokens_together():
    """The graph is the model's computation for sequences of at most 16 tokens. With a
    cache a one-token step at position 16 is such a sequence's 17th token: generate() used
    to run it on the short factors (other tokens than eager from there); now the guard is
    on L + T and generate() refuses before any work, while shorter generations equal eager."""
    torch.manual_seed(0)
    model = _ScalingPastALength().eval()
    fast = fxforge.optimize(model, (torch.randint(0, 64, (2, 7)),), kv_cache=True)
    assert any(line.strip() == "guard L + T <= 16" for line in fast.ir.splitlines()), fast.ir
    assert_round_trips(fast.graph)
    ids = torch.randint(0, 64, (1, 12))
    with pytest.raises(fxforge.ir.guards.GuardError, match=r"L \+ T <= 16"):
        fast.generate(ids, max_new_tokens=10)
    expected = ids
    for _ in range(5):
        with torch.no_grad():
            expected = torch.cat([expected, model(expected)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(fast.generate(ids, max_new_tokens=5), expected)
    with pytest.raises(fxforge.ir.guards.GuardError):
        fast(torch.randint(0, 64, (1, 17)))


class _MetaRepeatKV(torch.nn.Module):
    """Meta's llama / llama2.c GQA: K and V repeated on [B, T, H, D] (expand + reshape),
    then transposed to [B, H, T, D]."""

    def __init__(self, vocab=64, dim=32, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.embed = torch.nn.Embedding(vocab, dim)
        self.wq = torch.nn.Linear(dim, dim, bias=False)
        self.wkv = torch.nn.Linear(dim, 2 * kv_heads * self.hd, bias=False)
        self.output = torch.nn.Linear(dim, vocab, bias=False)

    def repeat_kv(self, x):
        b, t, h, d = x.shape
        n = self.heads // self.kv_heads
        return x[:, :, :, None, :].expand(b, t, h, n, d).reshape(b, t, h * n, d)

    def forward(self, ids):
        x = self.embed(ids)
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.heads, self.hd)
        k, v = self.wkv(x).view(b, t, 2, self.kv_heads, self.hd).unbind(2)
        q, k, v = q.transpose(1, 2), self.repeat_kv(k).transpose(1, 2), self.repeat_kv(v).transpose(1, 2)
        s = torch.matmul(q, k.transpose(2, 3)) / self.hd ** 0.5
        s = s + torch.full((t, t), float("-inf"), device=x.device).triu(1)
        y = torch.matmul(F.softmax(s.float(), dim=-1).type_as(q), v)
        return self.output(x + y.transpose(1, 2).reshape(b, t, -1))


def test_keys_repeated_before_the_transpose_are_cached_once_per_kv_head():
    """The cache used to hold the repeated heads (2x the bytes for 4 query / 2 KV heads);
    the fused op now reads the 2 KV heads, and the tokens stay eager greedy's."""
    torch.manual_seed(0)
    model = _MetaRepeatKV().eval()
    fast = fxforge.optimize(model, (torch.randint(0, 64, (2, 7)),), kv_cache=True)
    assert fast.kv_layout.bytes_per_token == 2 * 2 * 8 * 4  # K and V, 2 heads of 8, float32, 1 layer
    ids = torch.randint(0, 64, (1, 6))
    expected = ids
    for _ in range(8):
        with torch.no_grad():
            expected = torch.cat([expected, model(expected)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(fast.generate(ids, max_new_tokens=8), expected)
    assert_matches_eager(model, fxforge.optimize(model, (torch.randint(0, 64, (2, 7)),)), 64, [(1, 5), (3, 9)])


class _RelativePositionBias(_OneAttentionLM):
    """T5's relative position bias: a learned value per head and query-key distance, added
    to the scores, with the causal mask."""

    def __init__(self):
        super().__init__()
        self.rel = torch.nn.Embedding(32, self.heads)

    def forward(self, ids):
        x = self.embed(ids)
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        pos = torch.arange(t, device=x.device)
        distance = (pos[:, None] - pos[None, :]).clamp(0, 31)
        bias = self.rel(distance).permute(2, 0, 1)[None]
        mask = torch.full((t, t), float("-inf"), device=x.device).triu(1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias + mask)
        return self.head(y.transpose(1, 2).reshape(b, t, d))


def test_a_relative_position_bias_is_refused_as_what_it_is():
    """It used to be refused as 'a prefix-LM or chunked pattern' with a max_seq_len hint that
    cannot help; the error now says what the bias is and what the cache supports."""
    torch.manual_seed(0)
    with pytest.raises(KVCacheError, match=r"bias built from the positions that is not a mask[\s\S]*at: "):
        fxforge.optimize(_RelativePositionBias().eval(), (torch.randint(0, 64, (2, 7)),), kv_cache=True)


def _tiny_bert():
    import transformers as tr

    torch.manual_seed(0)
    cfg = tr.BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, is_decoder=True, pad_token_id=0)
    return tr.BertLMHeadModel(cfg).eval()


def test_positions_sliced_from_a_position_ids_buffer_are_per_row():
    """BERT slices its positions from a registered buffer, `position_ids[:, 0:T]`, and its
    token types gather an all-zero buffer at them. The buffer's values are arange, so the
    slice is per-row positions: a left-padded batch generates what transformers does
    (which passes per-row position_ids from the attention mask)."""
    model = _tiny_bert()
    fast = _optimize(model, 128)
    assert fast.kv_layout.per_row_positions and fast.kv_layout.max_seq_len == 64
    assert "gather" not in fast.code  # all zeros whatever the positions
    _assert_left_padded_batch_generates_as_transformers(model, fast)


def test_a_position_ids_buffer_that_is_not_arange_stays_shared():
    """Only the buffer's actual values prove it holds positions: one element off and the
    slice stays a table shared by the batch (left padding refused, not guessed)."""
    model = _tiny_bert()
    with torch.no_grad():
        model.bert.embeddings.position_ids[0, 40] = 3
    fast = _optimize(model, 128)
    assert not fast.kv_layout.per_row_positions
    prompt = torch.randint(3, 128, (1, 6))
    assert torch.equal(fast.generate(prompt, 6), model.generate(prompt, max_new_tokens=6, do_sample=False,
                                                                pad_token_id=0))
    ids, mask = _padded_batch(128, [3, 5])
    with pytest.raises(ValueError, match="left-padded batches"):
        fast.generate(ids, 4, attention_mask=mask)
    # the engine left-pads rows of different lengths in one step: refused for more than one
    with pytest.raises(ValueError, match="max_batch=2: .*positions per row"):
        fxforge.Engine(fast, max_batch=2, max_seq_len=32)
    engine = fxforge.Engine(fast, max_batch=1, max_seq_len=32)
    outs = engine.generate_many([prompt[0], prompt[0, :4]], max_new_tokens=5)
    assert torch.equal(outs[1], fast.generate(prompt[:, :4], 5)[0, 4:])


def test_left_padding_with_the_models_own_shifted_positions():
    """Marian's decoder takes no position_ids: transformers' generate cannot give it
    per-row positions, so a left-padded row is shifted there too. Positions shared by the
    batch are then exactly what transformers computes, and generate() serves the batch."""
    import transformers as tr

    torch.manual_seed(0)
    cfg = tr.MarianConfig(vocab_size=128, d_model=64, decoder_ffn_dim=128, decoder_layers=2,
                          decoder_attention_heads=4, max_position_embeddings=64, pad_token_id=0,
                          decoder_start_token_id=1, is_decoder=True, is_encoder_decoder=False)
    model = tr.MarianForCausalLM(cfg).eval()
    fast = _optimize(model, 128)
    assert not fast.kv_layout.per_row_positions and fast.left_padding_shifts_positions
    _assert_left_padded_batch_generates_as_transformers(model, fast)


class _TokenTypesFromShape(torch.nn.Module):
    """Token types as `zeros(B, T)` (as MegatronBERT and RoFormer default them), learned
    positions, causal attention; `pairwise` adds a [T, T] tensor of ones to the scores."""

    def __init__(self, pairwise=False):
        super().__init__()
        self.emb, self.types, self.pos = (torch.nn.Embedding(32, 16), torch.nn.Embedding(2, 16),
                                          torch.nn.Embedding(64, 16))
        self.qkv, self.out = torch.nn.Linear(16, 48), torch.nn.Linear(16, 32)
        self.pairwise = pairwise

    def forward(self, ids):
        b, t = ids.shape
        types = torch.zeros(ids.shape, dtype=torch.long, device=ids.device)
        x = self.emb(ids) + self.types(types) + self.pos(torch.arange(t, device=ids.device))
        q, k, v = (y.view(b, t, 2, 8).transpose(1, 2) for y in self.qkv(x).chunk(3, -1))
        if self.pairwise:
            v = v + torch.ones(t, t).tril().sum(-1).view(1, 1, t, 1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, 16))


def test_a_constant_per_token_tensor_is_kept_and_generates_exactly():
    """zeros(B, T) holds one value per new token whatever its position: with a cache it
    means what it meant over the whole sequence, so the model is cached (it used to be
    refused as 'a tensor built from the sequence length')."""
    torch.manual_seed(0)
    model = _TokenTypesFromShape().eval()
    fast = fxforge.optimize(model, (torch.randint(1, 32, (2, 7)),), kv_cache=True)
    prompt = torch.randint(1, 32, (2, 5))
    seq = prompt
    for _ in range(6):
        with torch.no_grad():
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(fast.generate(prompt, 6), seq)


def test_a_tensor_over_token_pairs_is_still_refused():
    """ones(T, T): T in two dims pairs the step's tokens with each other, which with a cache
    would not cover the cached ones: refused, with the node."""
    with pytest.raises(KVCacheError, match=r"builds a tensor from the sequence length[\s\S]*at: .*full\(\)"):
        fxforge.optimize(_TokenTypesFromShape(pairwise=True).eval(), (torch.randint(1, 32, (2, 7)),),
                         kv_cache=True)


class _LinearThenSoftmaxAttention(torch.nn.Module):
    """One linear-attention layer (a key-value state summed over the tokens, MiniMax's
    lightning attention in miniature) before a softmax attention that fuse_attention takes."""

    def __init__(self, vocab=64, dim=32, heads=2):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.qkv1, self.qkv2 = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, 3 * dim)
        self.head = torch.nn.Linear(dim, vocab)
        self.heads = heads

    def _split(self, proj, x):
        b, t, d = x.shape
        return proj(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)

    def forward(self, ids):
        x = self.embed(ids)
        b, t, d = x.shape
        q, k, v = self._split(self.qkv1, x)
        y = q @ (k.transpose(-1, -2) @ v)  # a [D, D] state summed over every token
        x = x + y.transpose(1, 2).reshape(b, t, d)
        q, k, v = self._split(self.qkv2, x)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(y.transpose(1, 2).reshape(b, t, d))


def test_refuses_linear_attention_outside_the_fused_attention():
    """A matmul that sums over the tokens outside a fused attention (linear attention) would
    see only the new tokens with a cache: refused, with the node (MiniMax used to be
    optimized and then stopped by a guard at T=1)."""
    torch.manual_seed(0)
    with pytest.raises(KVCacheError, match=r"matmul sums over the sequence[\s\S]*at: .*matmul"):
        fxforge.optimize(_LinearThenSoftmaxAttention().eval(), (torch.randint(0, 64, (2, 7)),), kv_cache=True)


def test_capture_turns_off_a_cache_the_forward_takes_only_through_kwargs():
    """GraniteMoE's forward takes use_cache only through **kwargs (and a multimodal model's
    language model reads its text config's): with it on, the model returns a cache object,
    which torch.export rejects. Capture turns it off while tracing, and restores it."""
    import types

    class Config:
        def __init__(self):
            self.use_cache, self.text = True, types.SimpleNamespace(use_cache=True)

        def get_text_config(self):
            return self.text

    class CacheByDefault(_ConvThenAttention):
        def __init__(self):
            super().__init__(kernel=1)
            self.config = Config()

        def forward(self, ids, **kwargs):
            logits = super().forward(ids)
            if self.config.use_cache or self.config.text.use_cache:
                return logits, object()  # not a tensor: torch.export cannot return it
            return logits

    model = CacheByDefault().eval()
    fast = fxforge.optimize(model, (torch.randint(0, 64, (2, 7)),), kv_cache=True)
    assert model.config.use_cache and model.config.text.use_cache  # restored
    prompt = torch.randint(0, 64, (1, 5))
    seq = prompt
    model.config.use_cache = model.config.text.use_cache = False
    for _ in range(4):
        with torch.no_grad():
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(fast.generate(prompt, 4), seq)


def test_gptj_sin_cos_rows_gathered_at_the_positions_are_per_row():
    """GPT-J gathers its sin/cos rows with `gather(table.repeat(1, 1, 1), 1,
    positions.unsqueeze(-1).repeat(1, 1, D))`, a row lookup spelled as a gather whose
    source has one row: it becomes embedding(table, positions), so a left-padded batch
    gets per-row positions and generates what transformers does."""
    import transformers as tr

    torch.manual_seed(0)
    cfg = tr.GPTJConfig(vocab_size=128, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64,
                        pad_token_id=0)
    model = tr.GPTJForCausalLM(cfg).eval()
    fast = _optimize(model, 128)
    assert fast.kv_layout.per_row_positions and "gather" not in fast.code
    _assert_left_padded_batch_generates_as_transformers(model, fast)


def test_xglm_sinusoidal_rows_selected_at_the_positions_are_per_row():
    """XGLM looks its sinusoidal positions up with `table.index_select(0, ids.view(-1))
    .view(1, T, D)`: fixed views a per-row [B, T] cannot pass through. It is
    embedding(table, ids) exactly, so the positions become per row and a left-padded batch
    generates what transformers does (it refused left padding before)."""
    import transformers as tr

    torch.manual_seed(0)
    cfg = tr.XGLMConfig(vocab_size=128, d_model=64, ffn_dim=128, num_layers=2, attention_heads=4,
                        max_position_embeddings=64, pad_token_id=0)
    model = tr.XGLMForCausalLM(cfg).eval()
    fast = _optimize(model, 128)
    assert fast.kv_layout.per_row_positions and "index_select" not in fast.code
    _assert_left_padded_batch_generates_as_transformers(model, fast)


def test_complex_rotary_through_polar_is_per_row():
    """DeepSeek-V2 (as Meta's Llama code and Llama 4) rotates with complex numbers,
    `freqs_cis = torch.polar(ones, angles)` and `view_as_complex(q) * freqs_cis`: ATen calls
    the IR keeps opaque, whose types the positions can still follow (ROW_SAFE_CALLS), so a
    left-padded batch generates what transformers does (it refused left padding before)."""
    import transformers as tr

    torch.manual_seed(0)
    cfg = tr.DeepseekV2Config(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                              num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
                              q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                              max_position_embeddings=64, pad_token_id=0, n_group=1, topk_group=1)
    model = tr.DeepseekV2ForCausalLM(cfg).eval()
    fast = _optimize(model, 128)
    assert fast.kv_layout.per_row_positions and "polar" in fast.code
    _assert_left_padded_batch_generates_as_transformers(model, fast)


def test_a_half_alibi_refusal_names_the_dtype_and_the_remedy():
    """Bloom in float16 builds ALiBi in float32 and rounds it to float16: the refusal says
    so and what to do, not a list of possible causes."""
    import transformers as tr

    torch.manual_seed(0)
    cfg = tr.BloomConfig(vocab_size=128, hidden_size=64, n_layer=1, n_head=4)
    model = tr.BloomForCausalLM(cfg).eval().to(torch.float16)
    with pytest.raises(KVCacheError, match=r"computes in float16[\s\S]*Optimize the model in float32 for kv_cache"):
        fxforge.optimize(model, (torch.randint(0, 128, (1, 8)),), kv_cache=True, verbose=False)


def test_llama4_nope_layers_serve_left_padded_batches():
    """Llama 4's NoPE layers scale attention by a temperature read from cache_position
    (shared by the batch) while rotary reads position_ids (per row): both kept as
    transformers' generate has them, where the pass fell back to shared positions for all
    and refused left-padded batches."""
    import transformers as tr

    torch.manual_seed(0)
    cfg = tr.Llama4TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                              num_local_experts=4, num_experts_per_tok=1, attention_chunk_size=64,
                              no_rope_layers=[1, 0], interleave_moe_layer_step=1, max_position_embeddings=128,
                              pad_token_id=0)
    model = tr.Llama4ForCausalLM(cfg).eval()
    fast = fxforge.optimize(model, (torch.randint(3, 128, (2, 8)),), kv_cache=KVCacheConfig(max_seq_len=64),
                            verbose=False)
    assert fast.kv_layout.per_row_positions
    ids = torch.randint(3, 128, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids = ids.masked_fill(mask == 0, 0)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(fast.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0), ref)
