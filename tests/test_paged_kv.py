"""The paged KV cache layout (KVCacheConfig(layout="paged")): the IR the pass writes, greedy
tokens identical to the dense layout (llama with rotary + GQA, gpt2, a sliding window;
batch 1 and a left-padded batch; the torch backend and the Triton kernels interpreted),
beam search over it, the block allocator, and clear errors."""
import functools

import pytest
import torch

import fxforge
from fxforge.ir.typecheck import typecheck
from fxforge.passes.kv_cache import KVCacheConfig
from fxforge.runtime.block_allocator import BlockAllocator, OutOfBlocks, blocks_for

import zoo
from helpers import assert_round_trips, prompts

MODELS = {"llama": lambda: zoo.llama("sdpa"), "gpt2": lambda: zoo.gpt2("eager"),
          "mistral_window": lambda: zoo.mistral(sliding_window=4)}
PAGED = KVCacheConfig(layout="paged", block_size=4)


@functools.lru_cache(maxsize=None)  # optimized once per module run: the tests only read them
def _pair(name, backend="auto", n_layer=None):
    torch.manual_seed(0)
    model, vocab = MODELS[name]() if n_layer is None else zoo.llama("sdpa", n_layer=n_layer)
    example = (torch.randint(0, vocab, (2, 7)),)
    dense = fxforge.optimize(model, example, kv_cache=True, backend=backend)
    paged = fxforge.optimize(model, example, kv_cache=PAGED, backend=backend)
    return dense, paged, vocab


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request):
    return _pair(request.param)


@pytest.mark.parametrize("padded", [False, True], ids=["batch1", "left-padded-batch3"])
def test_greedy_tokens_equal_the_dense_layout(pair, padded):
    dense, paged, vocab = pair
    ids, mask = prompts(vocab, padded)
    want = dense.generate(ids, 12, attention_mask=mask, eos_token_id=None)
    assert torch.equal(paged.generate(ids, 12, attention_mask=mask, eos_token_id=None), want)


def test_a_plain_call_gives_the_dense_logits(pair):
    dense, paged, vocab = pair
    ids = torch.randint(1, vocab, (2, 11))
    torch.testing.assert_close(paged(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)


def test_beam_search_equals_the_dense_layout():
    dense, paged, vocab = _pair("llama")
    ids, mask = prompts(vocab, True)
    want = dense.generate(ids, 6, attention_mask=mask, num_beams=2, eos_token_id=None)
    assert torch.equal(paged.generate(ids, 6, attention_mask=mask, num_beams=2, eos_token_id=None), want)


def test_the_triton_kernels_read_through_the_table():
    """The interpret backend: the paged prefill and decode kernels and the write kernel
    (codegen/kernels/paged_kv_write.py) in the model, eager steps and static steps."""
    dense, paged, vocab = _pair("llama", backend="interpret", n_layer=1)
    assert "paged_attention" in paged.code
    for padded in (False, True):
        ids, mask = prompts(vocab, padded)
        want = dense.generate(ids, 6, attention_mask=mask, eos_token_id=None)
        assert torch.equal(paged.generate(ids, 6, attention_mask=mask, eos_token_id=None), want)
    try:
        paged.static_decode = True
        assert paged.uses_static_decode(), paged.static_decode_problem
        assert torch.equal(paged.generate(ids, 6, attention_mask=mask, eos_token_id=None), want)
        assert any(s.steps for c in paged._caches.idle for s in c.static_steps.values())
    finally:
        paged.static_decode = None


def test_the_ir_after_the_pass():
    _, paged, _ = _pair("llama")
    graph = paged.graph
    typecheck(graph)
    head, lines = paged.ir.splitlines()[0], [ln.strip() for ln in paged.ir.splitlines()]
    assert ('%kv_bias: f32[B, 1, 1, L + T] {role="key_bias"}, %kv_block_table: i32[B, MB] {role="block_table"}, '
            '%kv_row_start: i32[B] {role="row_start"}, %kv_slots: i64[B, T] {role="slot_mapping"}') in head
    assert '%s0: state "layer0.k_cache" f32[NB, 4, 2, 16] {layer=0, kind="k", layout="paged"}' in head
    writes = [ln for ln in lines if "= paged_kv_write(" in ln]  # a layer's K and V in one write
    assert len(writes) == 2 and all(ln.startswith("%") and ln.count("f32[NB, 4, 2, 16]") == 2 for ln in writes)
    assert [ln.split("= paged_kv_write(")[1].split(", ")[:2] for ln in writes] == [["%s0", "%s1"], ["%s2", "%s3"]]
    assert all(ln.endswith(", %kv_slots)") for ln in writes)
    attn = [ln for ln in lines if "= paged_attention(" in ln]
    assert len(attn) == 2 and all(ln.endswith("%kv_block_table, %kv_row_start, %kv_bias) {causal=true, scale=0.25}")
                                  for ln in attn)
    assert not any("kv_append(" in ln or "= attention(" in ln for ln in lines)
    assert_round_trips(graph)
    assert paged.kv_layout.bytes_per_token == 2 * 2 * 2 * 16 * 4  # layers x (k, v) x heads x dim x f32


def test_a_loaded_ir_runs_paged():
    dense, paged, vocab = _pair("gpt2")
    loaded = fxforge.load_ir(paged.ir, paged.state_dict())
    ids, mask = prompts(vocab, True)
    assert torch.equal(loaded.generate(ids, 5, attention_mask=mask, eos_token_id=None),
                       dense.generate(ids, 5, attention_mask=mask, eos_token_id=None))


def test_each_row_of_a_generate_call_has_blocks_of_its_own():
    _, paged, vocab = _pair("llama")
    paged.generate(torch.randint(1, vocab, (3, 5)), 6)
    idle = paged._caches.idle
    assert idle and all(c.allocator.used == 0 for c in idle)  # the calls' rows gave their blocks back
    assert max(c.num_blocks for c in idle) >= 3 * blocks_for(11, 4)


# -- the block allocator ------------------------------------------------------------------
def test_allocator_hands_out_and_takes_back():
    a = BlockAllocator(4)
    got = a.allocate(3)
    assert sorted(got) == [0, 1, 2] and a.free == 1 and a.used == 3
    with pytest.raises(OutOfBlocks, match="2 KV cache block"):
        a.allocate(2)
    a.release(got[:2])
    assert a.free == 3
    with pytest.raises(ValueError, match="not allocated"):
        a.release(got[:1])


def test_a_promise_keeps_blocks_for_its_request():
    a = BlockAllocator(5)
    assert a.reserve(3) and a.free == 2 and a.used == 0
    assert not a.reserve(3)  # only 2 are neither handed out nor promised
    a.allocate(2, reserved=True)
    assert a.used == 2 and a.reserved == 1 and a.free == 2
    a.unreserve(1)
    assert a.free == 3


# -- errors ---------------------------------------------------------------------------------
def test_config_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match="layout must be 'dense' or 'paged'"):
        KVCacheConfig(layout="blocks")
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        KVCacheConfig(layout="paged", block_size=0)
    with pytest.raises(ValueError, match="num_blocks is for layout='paged'"):
        KVCacheConfig(num_blocks=8)
    with pytest.raises(TypeError, match="layout, block_size, num_blocks"):
        fxforge.optimize(torch.nn.Linear(2, 2), (torch.randn(1, 2),), kv_cache={"blocks": 3})


def test_the_paged_inputs_refuse_a_row_without_its_blocks():
    _, paged, vocab = _pair("llama")
    cache = paged.paged_cache(8)
    cache.use_rows([cache.allocator.allocate(1)])  # 4 tokens' room
    with pytest.raises(ValueError, match="row 0 writes token 5 but holds 1 block"):
        paged.run_cached(torch.randint(1, vocab, (1, 6)), 0, torch.zeros(1, dtype=torch.long), cache)


def test_paged_kv_write_skips_padding_slots_without_a_host_sync():
    """Slots of -1 (left padding) are not written, with no data-dependent shape (no sync:
    the step is captured as a CUDA graph on a GPU); slot 0 is written like any other."""
    from fxforge.ir.ops import paged_kv_write_reference
    from fxforge.runtime.launch_count import LaunchCounter

    torch.manual_seed(0)
    cache = torch.randn(3, 2, 1, 4)  # 6 slots
    new = torch.randn(2, 1, 3, 4)  # [B, Hkv, T, D]
    for slots in ([[-1, 0, 1], [-1, -1, 5]], [[-1, -1, -1], [-1, -1, -1]], [[2, 3, 4], [0, 1, 5]]):
        slots = torch.tensor(slots)
        expected = cache.clone().view(-1, 1, 4)
        for b in range(2):
            for t in range(3):
                if slots[b, t] >= 0:
                    expected[slots[b, t]] = new[b, :, t]
        with LaunchCounter() as c:
            got = paged_kv_write_reference(cache.clone(), new, slots)
        assert torch.equal(got.view(-1, 1, 4), expected), slots
        # no data-dependent shape; the one read is the bounds check, made on the CPU only
        assert dict(c.sync_names) == {"_local_scalar_dense": 1}, c.sync_names
    with pytest.raises(ValueError, match="slot 9 is outside"):
        paged_kv_write_reference(cache.clone(), new, torch.tensor([[0, 1, 9], [2, 3, 4]]))


def test_the_torch_backends_gather_zeroes_exactly_the_padding_keys():
    # PagedAttentionSDPA zeroes the padding keys by index on the CPU (not by a mask
    # product): the same attention as the reference's gather_paged, which reads them as 0,
    # also where the bias does not mask them and the slot they point at holds other values
    from fxforge.ir.ops import paged_attention_reference
    from fxforge.runtime.torch_kernels import PagedAttentionSDPA

    torch.manual_seed(0)
    blocks, bs, hkv, d, keys = 12, 4, 2, 8, 10
    k_cache, v_cache = torch.randn(blocks, bs, hkv, d) * 3, torch.randn(blocks, bs, hkv, d)
    table = torch.tensor([[5, 2, 9], [0, 7, 3]], dtype=torch.int32)
    row_start = torch.tensor([0, 3], dtype=torch.int32)  # row 1: 3 padding keys, read from block 0
    q, bias = torch.randn(2, 4, 1, d), torch.zeros(2, 1, 1, keys)
    attend = PagedAttentionSDPA()
    for _ in range(2):  # the second call reuses the step's slots
        got = attend(q, k_cache, v_cache, table, row_start, bias, causal=True, scale=0.3)
        want = paged_attention_reference(q, k_cache, v_cache, table, row_start, bias, causal=True, scale=0.3)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert attend.gather(k_cache, table, row_start, keys, torch.float32)[1, :, :3].abs().sum() == 0


def test_the_torch_backends_gather_leaves_padding_the_bias_masks_with_the_same_answer():
    # where the step's bias masks every padding key (as the engine's and generate()'s do),
    # the gather skips zeroing them (they hold their row's first key): the same output as
    # the zeroed gather, bit for bit; a bias that leaves one unmasked zeroes them again
    from fxforge.runtime.torch_kernels import PagedAttentionSDPA, attention_sdpa

    torch.manual_seed(0)
    blocks, bs, hkv, d, keys = 12, 4, 2, 8, 10
    k_cache, v_cache = torch.randn(blocks, bs, hkv, d) * 3, torch.randn(blocks, bs, hkv, d)
    table = torch.tensor([[5, 2, 9], [0, 7, 3]], dtype=torch.int32)
    row_start = torch.tensor([0, 3], dtype=torch.int32)
    q = torch.randn(2, 4, 1, d)
    bias = torch.zeros(2, 1, 1, keys)
    bias[1, ..., :3] = torch.finfo(torch.float32).min
    attend = PagedAttentionSDPA()
    got = attend(q, k_cache, v_cache, table, row_start, bias, causal=True, scale=0.3)
    zeroed = [attend.gather(c, table, row_start, keys, torch.float32) for c in (k_cache, v_cache)]
    assert torch.equal(got, attention_sdpa(q, *zeroed, bias, causal=True, scale=0.3))
    assert attend._masked[3] and attend.gather(k_cache, table, row_start, keys, torch.float32,
                                               zero_padding=False)[1, :, :3].abs().sum() > 0
    bias[1, 0, 0, 1] = -1e30  # not the lowest value: that key would weigh exp(-1e30 - max) = 0 too, but unproven
    attend(q, k_cache, v_cache, table, row_start, bias, causal=True, scale=0.3)
    assert attend._masked[3] is False


def test_the_torch_backends_paged_attention_takes_inference_tensors():
    # inputs made inside torch.inference_mode keep no version counter: the per-step slots
    # and groups are then worked out per call (not matched by version), with the same answer,
    # and a table edited in place between two calls is read as edited
    from fxforge.ir.ops import paged_attention_reference
    from fxforge.runtime.torch_kernels import PagedAttentionSDPA

    torch.manual_seed(0)
    blocks, bs, hkv, d, keys = 12, 4, 2, 8, 10
    k_cache, v_cache = torch.randn(blocks, bs, hkv, d), torch.randn(blocks, bs, hkv, d)
    q = torch.randn(3, 4, 1, d)
    attend = PagedAttentionSDPA()
    with torch.inference_mode():
        table = torch.tensor([[5, 2, 9], [0, 7, 3], [4, 1, 6]], dtype=torch.int32)
        row_start = torch.tensor([0, 6, 9], dtype=torch.int32)  # three lengths: grouped decode
        bias = torch.zeros(3, 1, 1, keys)
        for b, start in enumerate(row_start.tolist()):
            bias[b, ..., :start] = torch.finfo(torch.float32).min
        for edit in (False, True):
            if edit:
                table[0, 1] = 11  # in place: no version to tell, so it must not be taken for the last step
            got = attend(q, k_cache, v_cache, table, row_start, bias, causal=True, scale=0.3)
            want = paged_attention_reference(q, k_cache, v_cache, table, row_start, bias, causal=True, scale=0.3)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# -- launches of a paged decode step ------------------------------------------------------------
# zoo.llama (2 layers) on backend="interpret", one decode step. Before the paged_kv_write kernel
# (codegen/kernels/paged_kv_write.py) the writes' torch reference made these 89 (eager) and 79
# (static) launches, ~13 per write; now a layer's K and V are one launch (kv_paged.pair_writes).
# Lower them when a change saves more.
MAX_PAGED_LAUNCHES = {"eager": 35, "static": 25}


def test_a_paged_decode_step_writes_a_layers_k_and_v_in_one_launch():
    from fxforge.runtime.launch_count import LaunchCounter

    torch.manual_seed(0)
    model, vocab = zoo.llama()
    fast = fxforge.optimize(model, (torch.randint(3, vocab, (1, 5)),), kv_cache=PAGED, backend="interpret")
    ids, pad = torch.randint(3, vocab, (1, 8)), torch.zeros(1, dtype=torch.long)
    counts = {}
    with torch.no_grad():
        cache = fast.paged_cache(16)
        cache.row_capacity = 32
        cache.use_rows([cache.allocator.allocate(3)])
        fast.run_cached(ids[:, :4], 0, pad, cache)
        fast.run_cached(ids[:, 4:5], 4, pad, cache)  # warm-up: compiles
        with LaunchCounter() as counts["eager"]:
            fast.run_cached(ids[:, 5:6], 5, pad, cache)
        step = fast.static_step(cache, 1)
        step(ids[:, 6:7], 6, pad, host_pad=[0])
        with LaunchCounter() as counts["static"]:
            step(ids[:, 7:8], 7, pad, host_pad=[0])
    reference_ops = {"aten.index_copy_", "aten.index_select", "aten.argmax"}  # the torch reference's
    for kind, c in counts.items():
        assert c.by_name["triton._paged_kv_write_kernel"] == 2, (kind, c.by_name)  # one per layer
        assert not reference_ops & set(c.by_name), (kind, c.by_name)
        assert c.triton + c.torch <= MAX_PAGED_LAUNCHES[kind], (kind, c.by_name)
    assert counts["static"].syncs == 0
