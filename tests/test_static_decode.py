"""Decode steps on static buffers (runtime/static_decode.py): the path a GPU captures as a
CUDA graph, run here without capture. Same tokens and logits as the eager steps, the same
tensors fed to every step (nothing allocated per step for the cache, positions or bias),
and graphs it cannot serve say why and decode eagerly."""
import pytest
import torch

import fxforge
from fxforge.passes.kv_cache import KVCacheConfig
from fxforge.runtime import state, static_decode
from fxforge.runtime.static_decode import kv_append_at

import zoo
from helpers import prompts

MODELS = {"llama_gqa_rotary": lambda: zoo.llama("sdpa"), "gpt2": lambda: zoo.gpt2("eager"),
          # the window and ALiBi are measured from the query inside the static step (attention_at)
          "mistral_window": lambda: zoo.mistral(sliding_window=4)}


# Each MODELS entry is built once per module and captured once (torch.export: seconds a
# call): the tests optimize it afresh (their own caches and static steps) from the kept
# capture. The tests change the optimized models, never the models.
_BUILT: dict = {}
_CAPTURES = fxforge.CaptureCache()


@pytest.fixture(autouse=True, scope="module")
def _models_built_once():
    yield
    _BUILT.clear()
    _CAPTURES.clear()


def _model(name):
    """(model, vocab) of a MODELS entry built from seed 0, and the global RNG set as building
    it leaves it (what the test draws next is what it drew when it built the model)."""
    if name not in _BUILT:
        torch.manual_seed(0)
        model, vocab = MODELS[name]()
        _BUILT[name] = model, vocab, torch.get_rng_state()
    model, vocab, rng = _BUILT[name]
    torch.set_rng_state(rng)
    return model, vocab


def _optimize(name, backend="auto", kv_cache=True):
    model, vocab = _model(name)
    return fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),), kv_cache=kv_cache, backend=backend,
                            capture_cache=_CAPTURES), vocab


def _generate(fast, ids, mask, static: bool, n=10):
    fast.static_decode = static
    out = fast.generate(ids, attention_mask=mask, max_new_tokens=n, eos_token_id=None, pad_token_id=0,
                        return_dict_in_generate=True, output_logits=True)
    return out.sequences, torch.stack(out.logits)


# every model on the torch backend; the Triton kernels (interpreted: slow) on the case that
# exercises the most of them at once: GQA, rotary and left padding
CASES = [(name, padded, "torch") for name in MODELS for padded in (False, True)] + [
    ("llama_gqa_rotary", True, "interpret")]


@pytest.mark.parametrize("name,padded,backend", CASES,
                         ids=[f"{n}-{'left_padded_batch3' if p else 'batch1'}-{b}" for n, p, b in CASES])
def test_static_steps_give_the_eager_tokens_and_logits(name, padded, backend):
    fast, vocab = _optimize(name, backend)
    assert fast.static_decode_problem is None
    ids, mask = prompts(vocab, padded)
    n = 10 if backend == "torch" else 5  # the interpreter runs each Triton kernel slowly
    eager_tokens, eager_logits = _generate(fast, ids, mask, static=False, n=n)
    tokens, logits = _generate(fast, ids, mask, static=True, n=n)
    assert torch.equal(tokens, eager_tokens)
    # the masked slots past the token get exactly zero weight; only the summation order of
    # a kernel over the longer buffer may differ
    torch.testing.assert_close(logits, eager_logits, rtol=1e-5, atol=1e-5)
    steps = [s for c in fast._caches.idle for s in c.static_steps.values()]
    assert len(steps) == 1 and steps[0].steps == n - 1  # every token after the prefill's first
    assert not steps[0].capture and steps[0].graph is None  # no CUDA here: run, not captured


def test_every_step_reads_the_same_buffers_and_allocates_no_cache(monkeypatch):
    fast, vocab = _optimize("llama_gqa_rotary")
    ids, mask = prompts(vocab, padded=True)
    fast.static_decode = True
    seen = []
    real_build = static_decode.build_program

    def recording_build(*args, **kwargs):
        program = real_build(*args, **kwargs)
        run = program.fn

        def recording(*inputs):
            seen.append(tuple(t.data_ptr() if isinstance(t, torch.Tensor) else t for t in inputs))
            return run(*inputs)

        program.fn = recording
        return program

    monkeypatch.setattr(static_decode, "build_program", recording_build)
    made = []
    real_init = state.KVCache.__init__

    def counting_init(self, *args, **kwargs):
        made.append(1)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(state.KVCache, "__init__", counting_init)
    for _ in range(2):  # a second call reuses the cache and its static step
        fast.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None, pad_token_id=0)
    assert len(seen) == 10 and len(set(seen)) == 1, "a decode step got other tensors than the step before"
    assert len(made) == 1


def test_graphs_it_cannot_serve_say_why_and_decode_eagerly():
    # paged: the window is measured from the last key
    paged, vocab = _optimize("mistral_window", kv_cache=KVCacheConfig(layout="paged", block_size=4))
    assert "sliding window" in paged.static_decode_problem
    paged.static_decode = True
    assert not paged.uses_static_decode()
    assert "static buffers not possible: a paged attention with a sliding window" in paged.report()
    ids, mask = prompts(vocab, padded=True)
    out = paged.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=None, pad_token_id=0)
    assert out.shape == (3, 14)
    plain = fxforge.optimize(_model("mistral_window")[0], (torch.randint(0, vocab, (2, 7)),), capture_cache=_CAPTURES)
    assert plain.static_decode_problem is None and "decode: no KV cache" in plain.report()


def test_report_says_how_decode_runs():
    fast, _ = _optimize("gpt2")
    assert "decode: eager steps (static buffers off on cpu)" in fast.report()
    fast.static_decode = True
    assert "decode: static buffers, one step per cache and batch size, run without capture" in fast.report()


def test_kv_append_at_writes_at_a_device_side_length_and_returns_the_whole_buffer():
    cache = torch.zeros(3, 2, 8, 4)
    new = torch.randn(2, 2, 1, 4)
    out = kv_append_at(cache, new, start=torch.tensor(5))
    assert out.shape == (2, 2, 8, 4) and out.data_ptr() == cache.data_ptr()
    assert torch.equal(cache[:2, :, 5:6], new) and cache[:2, :, :5].eq(0).all() and cache[2].eq(0).all()
    chunk = torch.randn(2, 2, 3, 4)
    kv_append_at(cache, chunk, start=torch.tensor(1))
    assert torch.equal(cache[:2, :, 1:4], chunk)


def test_a_step_past_the_buffer_is_refused_before_any_work():
    fast, vocab = _optimize("gpt2")
    with fast.kv_cache_lease(1, 8) as cache:
        step = fast.static_step(cache, 1)
        with pytest.raises(ValueError, match=f"holds {cache.capacity} positions"):
            step(torch.zeros(1, 1, dtype=torch.long), cache.capacity, torch.zeros(1, dtype=torch.long))
        with pytest.raises(ValueError, match=r"takes \[1, 1\] token ids"):
            step(torch.zeros(2, 1, dtype=torch.long), 3, torch.zeros(1, dtype=torch.long))


@pytest.mark.parametrize("backend,name", [("torch", "gemma2"), ("torch", "bloom"), ("torch", "mpt"),
                                          ("torch", "falcon_mqa"),
                                          # the decode kernel reading a per-head (ALiBi) bias
                                          ("interpret", "bloom")])
def test_windows_softcaps_and_alibi_measure_from_the_query_in_static_steps(name, backend):
    """Gemma2 (soft-cap, a sliding window on every other layer), Bloom and MPT (ALiBi) and
    Falcon (MQA): the static step adds the window and ALiBi to the key bias from the
    device-side position, and gives the eager steps' tokens."""
    import test_attention_variants as variants

    torch.manual_seed(0)
    model = variants.MODELS[name][0]()
    fast = fxforge.optimize(model, (torch.randint(1, 128, (2, 7)),), kv_cache=True, backend=backend)
    assert fast.static_decode_problem is None
    ids, mask = prompts(128, padded=True)
    n = 4 if backend == "interpret" else 8  # the interpreter's steps cost seconds each
    eager_tokens, eager_logits = _generate(fast, ids, mask, static=False, n=n)
    tokens, logits = _generate(fast, ids, mask, static=True, n=n)
    assert torch.equal(tokens, eager_tokens)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-5, atol=1e-5)


def test_beam_search_on_static_steps_gives_the_eager_beams():
    """Beam search reorders the cache rows in place between steps: the static step's
    buffers stay put, and the beams are the eager steps' beams."""
    fast, vocab = _optimize("llama_gqa_rotary")
    ids, mask = prompts(vocab, padded=True)
    runs = []
    for static in (False, True):
        fast.static_decode = static
        out = fast.generate(ids, attention_mask=mask, max_new_tokens=7, num_beams=3, num_return_sequences=2,
                            eos_token_id=None, pad_token_id=0, return_dict_in_generate=True, output_scores=True)
        runs.append(out)
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    torch.testing.assert_close(torch.stack(runs[1].scores), torch.stack(runs[0].scores), rtol=1e-5, atol=1e-5)
    steps = [s for c in fast._caches.idle for s in c.static_steps.values()]
    assert len(steps) == 1 and steps[0].batch == 9 and steps[0].steps == 6


# -- paged caches (runtime/static_paged.py) -----------------------------------------------------
PAGED = KVCacheConfig(layout="paged", block_size=4)


def test_paged_static_steps_give_the_eager_tokens_and_logits():
    """A paged graph's static step runs the model's own program over a fixed-width block
    table, with the slot mapping made on the device: the eager steps' tokens and logits."""
    fast, vocab = _optimize("llama_gqa_rotary", kv_cache=PAGED)
    assert fast.static_decode_problem is None
    ids, mask = prompts(vocab, padded=True)
    eager_tokens, eager_logits = _generate(fast, ids, mask, static=False)
    tokens, logits = _generate(fast, ids, mask, static=True)
    assert torch.equal(tokens, eager_tokens)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-5, atol=1e-5)
    steps = [s for c in fast._caches.idle for s in c.static_steps.values()]
    assert [type(s).__name__ for s in steps] == ["StaticPagedStep"] and steps[0].steps == 9


def test_a_paged_row_past_its_blocks_is_refused_before_any_work():
    fast, vocab = _optimize("llama_gqa_rotary", kv_cache=PAGED)
    cache = fast.paged_cache(16)
    cache.row_capacity = 32
    cache.use_rows([[3, 5], [7]])  # 8 and 4 tokens
    step = fast.static_step(cache, 2)
    before = [b.clone() for b in cache.buffers]
    ids, pad = torch.ones(2, 1, dtype=torch.long), torch.tensor([0, 3])
    with pytest.raises(ValueError, match="row 1 writes token 4 but holds 1 block"):
        step(ids, 7, pad, host_pad=[0, 3])
    with pytest.raises(ValueError, match="row 1 writes token 7"):  # no host pad: every row must hold `start`
        step(ids, 7, pad)
    assert all(torch.equal(a, b) for a, b in zip(before, cache.buffers)) and step.steps == 0
    step(ids, 6, pad, host_pad=[0, 3])  # row 1's token 3 fits its block
    assert step.steps == 1


def test_a_static_step_makes_its_positions_and_bias_in_one_launch():
    """On the Triton backends the per-step update of the static buffers is one kernel
    (codegen/kernels/step_inputs.py), reading the cache length on the device: the torch ops
    that made them (sub, clamp, lt, gt, or, zero, masked_fill) are gone from the step."""
    from fxforge.runtime.launch_count import LaunchCounter

    fast, vocab = _optimize("llama_gqa_rotary", "interpret")
    ids = torch.randint(3, vocab, (2, 6))
    pad = torch.tensor([0, 2])
    with fast.kv_cache_lease(2, 8) as cache, torch.no_grad():
        fast.run_cached(ids[:, :4], 0, pad, cache)
        step = fast.static_step(cache, 2)
        with LaunchCounter() as c:
            step(ids[:, 4:5], 4, pad)
        assert c.by_name["triton._step_inputs_kernel"] == 1 and c.syncs == 0
        assert not {"aten.clamp", "aten.masked_fill_", "aten.lt", "aten.gt", "aten.zero_"} & set(c.by_name), c.by_name
        assert step.positions.tolist() == [[4], [2]]
        lowest = torch.finfo(step.bias.dtype).min
        assert step.bias[1, 0, 0].tolist() == [lowest] * 2 + [0.0] * 3 + [lowest] * (step.capacity - 5)


def test_a_paged_static_step_makes_its_slots_in_the_same_launch():
    """A paged static step's row starts and slot mapping come out of the positions/bias
    kernel too: no gather, div, remainder or copy in the step on the Triton backends."""
    from fxforge.runtime.launch_count import LaunchCounter

    fast, vocab = _optimize("llama_gqa_rotary", "interpret", kv_cache=PAGED)
    cache = fast.paged_cache(16)
    cache.row_capacity = 32
    cache.use_rows([[3, 5], [7]])  # 8 and 4 tokens
    step = fast.static_step(cache, 2)
    with LaunchCounter() as c, torch.no_grad():
        step(torch.ones(2, 1, dtype=torch.long), 6, torch.tensor([0, 3]), host_pad=[0, 3])
    # (the host's block checks before the step read the cache's row table: not device work)
    assert c.by_name["triton._step_inputs_kernel"] == 1
    assert not {"aten.gather", "aten.div", "aten.remainder", "aten.clamp", "aten.masked_fill_"} & set(c.by_name)
    assert step.positions.tolist() == [[6], [3]] and step.row_start.tolist() == [0, 3]
    assert step.slots.tolist() == [[5 * 4 + 2], [7 * 4 + 3]]  # row 0: token 6 in block 5; row 1: token 3 in block 7


def test_gpt2_on_the_triton_kernels_decodes_the_same_tokens_eager_and_static():
    """gpt2 (learned positions: the positions input feeds an embedding, not a rotary) on
    the interpreted kernels: eager steps outside a prepared call (run_cached: the step-inputs
    kernel), static steps (the kernel with the device-side length) and the torch backend's
    generate() give the same greedy tokens for a left-padded batch."""
    fast, vocab = _optimize("gpt2", "interpret")
    ref, _ = _optimize("gpt2", "torch")
    ids, mask = prompts(vocab, padded=True)
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=None, pad_token_id=0)
    for static in (False, True):
        fast.static_decode = static
        got = fast.generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=None, pad_token_id=0)
        assert torch.equal(got, want), static
    pad = state.left_padding(mask, *ids.shape, ids.device)
    tokens = ids
    with fast.kv_cache_lease(ids.shape[0], ids.shape[1] + 4) as cache, torch.no_grad():
        logits = fast.run_cached(ids, 0, pad, cache)  # no prepare(): every step makes its inputs
        for k in range(4):
            nxt = logits[:, -1:].argmax(-1)
            tokens = torch.cat([tokens, nxt], 1)
            logits = fast.run_cached(nxt, ids.shape[1] + k, pad, cache)
    assert torch.equal(tokens, want)
