"""End to end on a CUDA GPU with backend="triton" (the compiled kernels): zoo models equal
eager in float32 and within half-precision tolerance in float16/bfloat16, for batch 1 and
3 and two lengths from one optimize(), and kv_cache greedy generate gives transformers'
tokens, batch 1 and a left-padded batch. Run by `make test-gpu`
(FXFORGE_TEST_DEVICE=cuda); skipped elsewhere."""
import warnings

import pytest
import torch

import fxforge

import zoo
from helpers import assert_close_to_eager, prompts

pytestmark = pytest.mark.gpu

MODELS = {
    "gpt2_eager": lambda: zoo.gpt2("eager"),
    "llama_sdpa_gqa": lambda: zoo.llama("sdpa"),
    "llama_eager": lambda: zoo.llama("eager"),
    "mistral_window": lambda: zoo.mistral(sliding_window=4),
}
# max abs error / scale: float32 as on CPU; half precisions round every intermediate
REL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def _generates_like(fast, ref, vocab, dtype, same_tokens: bool):
    """`fast` (a pass on) generates like `ref` (the pass off) on a left-padded batch, in eager
    and in CUDA-graph steps: the first 3 steps' logits within REL[dtype] of their scale, and
    (`same_tokens`) the same tokens."""
    ids, mask = (x.cuda() for x in prompts(vocab, True))
    kw = dict(attention_mask=mask, max_new_tokens=12, eos_token_id=None, pad_token_id=0,
              return_dict_in_generate=True, output_logits=True)
    want = ref.generate(ids, **kw)
    for static in (False, None):
        fast.static_decode = static
        got = fast.generate(ids, **kw)
        logits, want_logits = torch.stack(got.logits).float(), torch.stack(want.logits).float()
        if same_tokens:
            assert torch.equal(got.sequences, want.sequences)
        scale = want_logits[:3].abs().max()
        assert (logits[:3] - want_logits[:3]).abs().max() <= REL[dtype] * scale


@pytest.mark.parametrize("dtype", list(REL), ids=str)
@pytest.mark.parametrize("name", MODELS)
def test_zoo_model_on_triton_equals_eager(name, dtype):
    torch.manual_seed(0)
    model, vocab = MODELS[name]()
    model = model.to("cuda", dtype)
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7), device="cuda"),))
    assert fast.backend.name == "triton", fast.backend.name
    assert fast.graph.count("attention") >= 1 and fast.graph.count("fused_pointwise") >= 1, fast.ir
    for b, t in [(1, 5), (3, 19)]:
        ids = torch.randint(0, vocab, (b, t), device="cuda")
        with torch.no_grad():
            ref = model(ids)
        assert_close_to_eager(ref, fast(ids), rel=REL[dtype])


@pytest.mark.parametrize("padded", [False, True], ids=["batch1", "left_padded_batch3"])
@pytest.mark.parametrize("name", ["gpt2_eager", "llama_sdpa_gqa"])
def test_kv_cache_generate_matches_transformers_on_gpu(name, padded):
    torch.manual_seed(0)
    model, vocab = MODELS[name]()
    model = model.cuda()
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7), device="cuda"),), kv_cache=True)
    ids, mask = (None if x is None else x.cuda() for x in prompts(vocab, padded))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                             eos_token_id=None, pad_token_id=0)
    out = fast.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None, pad_token_id=0)
    assert torch.equal(out.cpu(), ref.cpu())


@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4"])
def test_quantized_llama_on_triton_stays_close(scheme):
    torch.manual_seed(0)
    model, vocab = zoo.llama("sdpa")
    model = model.to("cuda", torch.float16)
    ids = torch.randint(0, vocab, (2, 9), device="cuda")
    fast = fxforge.optimize(model, (ids,), quantize=scheme)
    assert fast.graph.count("quant_linear") >= 1, fast.ir
    with torch.no_grad():
        ref = model(ids).logits.float()
    out = zoo.logits_of(fast(ids)).float()
    # a quantization's error, not a kernel bug: the logits stay correlated with eager's
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
    assert cos > 0.9, cos


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("padded", [False, True], ids=["batch1", "left_padded_batch3"])
@pytest.mark.parametrize("name", ["gpt2_eager", "llama_sdpa_gqa"])
def test_cuda_graph_decode_gives_the_eager_steps_tokens(name, padded, dtype):
    """generate() on CUDA captures the one-token step as a CUDA graph (runtime/static_decode.py)
    at its first decode step and replays it: the tokens of eager steps, logits within the
    rounding of a kernel over the longer (masked) buffer."""
    torch.manual_seed(0)
    model, vocab = MODELS[name]()
    model = model.to("cuda", dtype)
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7), device="cuda"),), kv_cache=True)
    assert fast.uses_static_decode(), fast.static_decode_problem
    ids, mask = (None if x is None else x.cuda() for x in prompts(vocab, padded))
    runs = {}
    for static in (False, None):
        fast.static_decode = static
        out = fast.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None, pad_token_id=0,
                            return_dict_in_generate=True, output_logits=True, output_scores=True)
        runs[static] = (out.sequences.cpu(), torch.stack(out.logits).float().cpu())
        # scores are kept across steps without a copy: they must not alias the graph's output
        assert torch.equal(torch.stack(out.scores).float().cpu(), runs[static][1])
    steps = [s for c in fast._caches.idle for s in c.static_steps.values()]
    assert len(steps) == 1 and steps[0].graph is not None, steps[0].capture_error if steps else "no static step"
    assert steps[0].steps == 11
    (eager_tokens, eager_logits), (tokens, logits) = runs[False], runs[None]
    if dtype == torch.float32:  # half precision may flip a near tie; float32 must not
        assert torch.equal(tokens, eager_tokens)
    # logits compared while both runs have fed the same tokens (through the first that differs)
    new = ids.shape[1]
    differs = (tokens[:, new:] != eager_tokens[:, new:]).any(0).nonzero()
    upto = int(differs[0]) + 1 if len(differs) else logits.shape[0]
    assert upto >= 3, f"the runs part after {upto - 1} tokens"
    scale = eager_logits[:upto].abs().max()
    assert (logits[:upto] - eager_logits[:upto]).abs().max() <= REL[dtype] * scale
    # a second call replays the graph captured by the first
    again = fast.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None, pad_token_id=0)
    assert torch.equal(again.cpu(), tokens) and steps[0].steps == 22


@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4", "w8a8"])
def test_quantized_decode_captures_as_a_cuda_graph(scheme):
    """The quantized kernels launch inside a captured decode step (no host sync, no host
    copy per call): graph replay gives the eager steps' tokens."""
    torch.manual_seed(0)
    model, vocab = zoo.llama("sdpa")
    model = model.to("cuda", torch.float16)
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 9), device="cuda"),), kv_cache=True,
                            quantize=scheme)
    ids, mask = (None if x is None else x.cuda() for x in prompts(vocab, True))
    runs = {}
    for static in (False, None):
        fast.static_decode = static
        out = fast.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=None, pad_token_id=0,
                            return_dict_in_generate=True, output_logits=True)
        runs[static] = (out.sequences.cpu(), torch.stack(out.logits).float().cpu())
    steps = [s for c in fast._caches.idle for s in c.static_steps.values()]
    assert steps and steps[0].graph is not None, steps[0].capture_error if steps else "no static step"
    (eager_tokens, eager_logits), (tokens, logits) = runs[False], runs[None]
    new = ids.shape[1]
    differs = (tokens[:, new:] != eager_tokens[:, new:]).any(0).nonzero()
    upto = int(differs[0]) + 1 if len(differs) else logits.shape[0]
    scale = eager_logits[:upto].abs().max()
    assert (logits[:upto] - eager_logits[:upto]).abs().max() <= REL[torch.float16] * scale


def _static_steps(fast):
    return [s for c in fast._caches.idle for s in c.static_steps.values()]


@pytest.mark.parametrize("name", ["gemma2", "bloom", "mistral_window"])
def test_cuda_graph_decode_with_windows_softcaps_and_alibi(name):
    """The captured step adds the sliding window (Gemma2, Mistral) and the ALiBi slopes
    (Bloom) from the device-side position: the eager steps' tokens in float32, every step
    replayed from one graph."""
    import test_attention_variants as variants

    torch.manual_seed(0)
    model = (MODELS[name]()[0] if name in MODELS else variants.MODELS[name][0]()).cuda()
    fast = fxforge.optimize(model, (torch.randint(1, 128, (2, 7), device="cuda"),), kv_cache=True)
    assert fast.uses_static_decode(), fast.static_decode_problem
    ids, mask = (None if x is None else x.cuda() for x in prompts(128, True))
    runs = []
    for static in (False, None):
        fast.static_decode = static
        runs.append(fast.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None, pad_token_id=0))
    steps = _static_steps(fast)
    assert steps and steps[0].graph is not None, steps[0].capture_error if steps else "no static step"
    assert torch.equal(runs[0].cpu(), runs[1].cpu())


def test_engine_replays_a_cuda_graph_per_batch_size_and_equals_each_alone():
    """The dense engine's decode steps are CUDA graphs (one per running batch size) as
    requests join and leave: each request's tokens are generate()'s for it alone."""
    torch.manual_seed(0)
    model, vocab = zoo.llama("sdpa")
    model = model.cuda()
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7), device="cuda"),), kv_cache=True)
    gen = torch.Generator().manual_seed(0)
    prompts_ = [torch.randint(1, vocab, (int(k),), generator=gen).cuda() for k in torch.randint(1, 30, (10,), generator=gen)]
    news = [int(k) for k in torch.randint(1, 20, (10,), generator=gen)]
    fast.static_decode = None  # the default: CUDA graphs where there is CUDA
    engine = fxforge.Engine(fast, max_batch=4, max_seq_len=64)
    requests = [engine.submit(p, n, eos_token_id=None) for p, n in zip(prompts_, news)]
    engine.run()
    sizes = engine._cache.static_steps
    assert len(sizes) >= 2 and all(s.graph is not None for s in sizes.values()), \
        {b: s.capture_error for b, s in sizes.items()}
    for p, n, r in zip(prompts_, news, requests):
        alone = fast.generate(p[None], n, eos_token_id=None)[0, p.numel():]
        assert torch.equal(r.result().cpu(), alone.cpu()), r.id
    engine.close()


def test_beam_search_on_cuda_graphs_gives_the_eager_beams():
    """Beam search reorders cache rows in place between replays of the captured step."""
    torch.manual_seed(0)
    model, vocab = zoo.llama("sdpa")
    model = model.cuda()
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7), device="cuda"),), kv_cache=True)
    ids, mask = (None if x is None else x.cuda() for x in prompts(vocab, True))
    runs = []
    for static in (False, None):
        fast.static_decode = static
        runs.append(fast.generate(ids, attention_mask=mask, max_new_tokens=7, num_beams=3, eos_token_id=None,
                                  pad_token_id=0))
    steps = _static_steps(fast)
    assert steps and steps[0].graph is not None, steps[0].capture_error if steps else "no static step"
    assert torch.equal(runs[0].cpu(), runs[1].cpu())


def test_paged_engine_and_generate_replay_cuda_graphs():
    """A paged cache's decode steps are CUDA graphs too (runtime/static_paged.py): the
    engine's requests equal generate() alone, and generate()'s tokens equal eager steps'."""
    from fxforge.passes.kv_cache import KVCacheConfig

    torch.manual_seed(0)
    model, vocab = zoo.llama("sdpa")
    model = model.cuda()
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7), device="cuda"),),
                            kv_cache=KVCacheConfig(layout="paged", block_size=4))
    assert fast.uses_static_decode(), fast.static_decode_problem
    ids, mask = (None if x is None else x.cuda() for x in prompts(vocab, True))
    runs = []
    for static in (False, None):
        fast.static_decode = static
        runs.append(fast.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None, pad_token_id=0))
    assert torch.equal(runs[0].cpu(), runs[1].cpu())
    steps = _static_steps(fast)
    assert steps and steps[0].graph is not None, steps[0].capture_error if steps else "no static step"
    gen = torch.Generator().manual_seed(1)
    prompts_ = [torch.randint(1, vocab, (int(k),), generator=gen).cuda() for k in torch.randint(1, 30, (8,), generator=gen)]
    news = [int(k) for k in torch.randint(1, 20, (8,), generator=gen)]
    engine = fxforge.Engine(fast, max_batch=4, max_seq_len=64)
    requests = [engine.submit(p, n, eos_token_id=None) for p, n in zip(prompts_, news)]
    engine.run()
    sizes = engine.cache.static_steps
    assert sizes and all(s.graph is not None for s in sizes.values()), {b: s.capture_error for b, s in sizes.items()}
    for p, n, r in zip(prompts_, news, requests):
        alone = fast.generate(p[None], n, eos_token_id=None)[0, p.numel():]
        assert torch.equal(r.result().cpu(), alone.cpu()), r.id
    engine.close()


@pytest.mark.parametrize("rows", [1, 16])
def test_decode_mlp_kernel_on_gpu_is_the_composition_repeatable_and_graph_safe(rows):
    """The decode MLP (codegen/kernels/decode_mlp.py) at SmolLM2's widths in bfloat16: the
    plain-torch composition within rounding, bit for bit the same on a second call, counters
    back at zero, and the same again replayed from a CUDA graph (no memset before a replay)."""
    import torch.nn.functional as F

    from fxforge.codegen.kernels import arrival, decode_mlp
    from fxforge.codegen.kernels.decode_gemv import GemvKernels
    from fxforge.codegen.pointwise import PointwiseKernels

    torch.manual_seed(0)
    k, i, h, dt = 576, 1536, 576, torch.bfloat16
    x = torch.randn(rows, k, device="cuda", dtype=dt)
    w = (torch.randn(2 * i, k, device="cuda") / k ** 0.5).to(dt)
    dw, db = (torch.randn(h, i, device="cuda") / i ** 0.5).to(dt), torch.randn(h, device="cuda").to(dt)
    attrs = dict(n_x=1, bias=False, prologue=(), prologue_outputs=(), row=None, columns=((0, i), (i, 2 * i)),
                 epilogue=(("silu", ("in0",), ()), ("mul", ("t0", "in1"), ())), epilogue_outputs=("t1",),
                 down=True, down_bias=True)
    kernels = GemvKernels(PointwiseKernels())
    out = kernels.run(x, w, dw, db, **attrs)
    y = F.linear(x.float(), w.float()).to(dt).float()
    want = F.linear((F.silu(y[:, :i]) * y[:, i:]).to(dt).float(), dw.float(), db.float())
    assert (out.float() - want).abs().max() <= 2e-2 * want.abs().max()
    assert torch.equal(kernels.run(x, w, dw, db, **attrs), out)
    assert int(arrival.SCRATCH[out.device][decode_mlp.COUNTERS].abs().sum()) == 0
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = kernels.run(x, w, dw, db, **attrs)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rope_attention_kernel_decodes_like_the_unfused_kernels(dtype):
    """fuse_rope_attention's one kernel (rotary, K/V stores, decode attention) on a left-padded
    batch, eager steps and CUDA-graph steps, against the graph without the pass."""
    torch.manual_seed(0)
    model, vocab = MODELS["llama_sdpa_gqa"]()
    model = model.to("cuda", dtype)
    example = (torch.randint(0, vocab, (2, 7), device="cuda"),)
    fast = fxforge.optimize(model, example, kv_cache=True)
    ref = fxforge.optimize(model, example, kv_cache=True, disable=("fuse_rope_attention",))
    assert fast.graph.count("rope_attention") == 2 and ref.graph.count("rope_attention") == 0
    _generates_like(fast, ref, vocab, dtype, same_tokens=dtype == torch.float32)


@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
def test_captured_step_inputs_kernel_writes_the_torch_ops_values(paged):
    """The static step's positions and key bias (and a paged step's row starts and slots)
    come from one kernel inside the CUDA graph (codegen/kernels/step_inputs.py), reading the
    cache length on the device: after replays, its buffers hold exactly what the torch ops
    (Backend.static_step_inputs) write for the last step's length and padding."""
    from fxforge.passes.kv_cache import KVCacheConfig
    from fxforge.runtime.backends.base import Backend

    torch.manual_seed(0)
    model, vocab = MODELS["llama_sdpa_gqa"]()
    model = model.to("cuda", torch.bfloat16)
    kv = KVCacheConfig(layout="paged", block_size=4) if paged else True
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7), device="cuda"),), kv_cache=kv)
    ids, mask = (x.cuda() for x in prompts(vocab, True))
    fast.static_decode = None  # the default: CUDA graphs where there is CUDA
    fast.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=None, pad_token_id=0)
    steps = _static_steps(fast)
    assert steps and steps[0].graph is not None, steps[0].capture_error if steps else "no static step"
    step = steps[0]
    want = [step.positions.clone(), step.bias.clone()]
    extra = None
    if paged:
        extra = (step.table.clone(), step.row_start.clone(), step.slots.clone(), step.block_size)
    Backend("cuda").static_step_inputs(step.length, step.pad, *want, paged=extra)
    assert torch.equal(step.positions, want[0]) and torch.equal(step.bias, want[1])
    if paged:
        assert torch.equal(step.row_start, extra[1]) and torch.equal(step.slots, extra[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_w8a8_linears_with_their_neighbours_decode_like_the_unfused_graph(dtype):
    """Quantized linear_fused nodes (w8a8: q/k/v with its RMSNorm, gate/up with add + RMSNorm
    and SwiGLU, x quantized per token inside the decode GEMV) on a left-padded batch, eager
    and CUDA-graph steps, against the graph without fuse_linear_pointwise."""
    torch.manual_seed(0)
    model, vocab = MODELS["llama_sdpa_gqa"]()
    model = model.to("cuda", dtype)
    example = (torch.randint(0, vocab, (2, 7), device="cuda"),)
    fast = fxforge.optimize(model, example, kv_cache=True, quantize="w8a8")
    ref = fxforge.optimize(model, example, kv_cache=True, quantize="w8a8", disable=("fuse_linear_pointwise",))
    assert sum(1 for n in fast.graph.nodes if n.op == "linear_fused" and n.attrs.get("parts")) == 4
    _generates_like(fast, ref, vocab, dtype, same_tokens=False)
    steps = _static_steps(fast)
    assert steps and steps[0].graph is not None, steps[0].capture_error if steps else "no static step"


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_paged_kv_write_kernel_on_gpu_equals_the_reference_and_captures(cache_dtype):
    """codegen/kernels/paged_kv_write.py compiled: a permuted float32 `new` with padding
    slots written into a paged cache equals the op's torch reference (bfloat16: the same
    rounding, to the bit), eager and replayed from a CUDA graph with new slots in place, and
    a layer's K and V written by one launch."""
    from fxforge.codegen.kernels.paged_kv_write import paged_kv_write_triton
    from fxforge.ir.ops import paged_kv_write_reference

    gen = torch.Generator().manual_seed(0)
    blocks, block_size, heads, dim, batch, seq = 40, 16, 8, 128, 3, 5
    cache = torch.randn(blocks, block_size, heads, dim, generator=gen).to("cuda", cache_dtype)
    new = torch.randn(batch, seq, heads * dim, generator=gen).cuda().view(batch, seq, heads, dim).transpose(1, 2)
    slots = torch.randperm(blocks * block_size, generator=gen)[:batch * seq].view(batch, seq).cuda()
    slots[2, :2] = -1
    want = paged_kv_write_reference(cache.clone(), new, slots)
    got = paged_kv_write_triton(cache.clone(), new, slots)
    assert torch.equal(got, want)
    target = cache.clone()
    paged_kv_write_triton(target, new, slots)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_kv_write_triton(target, new, slots)
    slots.copy_(torch.randperm(blocks * block_size, generator=gen)[:batch * seq].view(batch, seq))
    new.add_(1.0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(target, paged_kv_write_reference(want.clone(), new, slots))
    v = torch.randn(batch, heads, seq, dim, generator=gen).cuda()  # a layer's K and V in one launch
    pair = paged_kv_write_triton(cache.clone(), want.clone(), new, v, slots)
    assert all(torch.equal(a, b) for a, b in zip(pair, paged_kv_write_reference(cache.clone(), want.clone(), new,
                                                                               v, slots)))
