"""The continuous-batching engine (runtime/engine.py): requests of different lengths join
and leave the running batch, and each one's tokens are the ones generate() gives it alone
(greedy, EOS, sampling with its own generator); admission waits when the cache is full;
submission from several threads with streaming callbacks; clear errors. Every test runs on
the dense cache, on a paged one (runtime/engine_paged.py) and with static decode steps
(runtime/static_decode.py, static_paged.py); the last ones are the paged engine's own: blocks come back, a
small pool makes requests wait, KV waste."""
import threading

import pytest
import torch

import fxforge

import zoo
from fxforge.passes.kv_cache import KVCacheConfig
from fxforge.runtime.engine_paged import PagedEngine


PAGED = KVCacheConfig(layout="paged", block_size=4)


@pytest.fixture(scope="module", params=["llama", "gpt2", "llama-paged", "llama-static", "llama-paged-static"])
def fast(request):
    torch.manual_seed(0)
    model, vocab = zoo.gpt2("eager") if request.param == "gpt2" else zoo.llama("sdpa")
    cache = PAGED if "paged" in request.param else True
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),), kv_cache=cache)
    # decode steps on static buffers, one per batch size (what a GPU replays as CUDA graphs)
    fast.static_decode = request.param.endswith("static")
    return fast, vocab


@pytest.fixture(scope="module")
def paged():
    torch.manual_seed(0)
    model, vocab = zoo.llama("sdpa")
    return fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),), kv_cache=PAGED), vocab


def _workload(vocab, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, vocab, (int(k),), generator=gen) for k in torch.randint(1, 30, (n,), generator=gen)]
    news = [int(k) for k in torch.randint(1, 24, (n,), generator=gen)]
    return prompts, news


def _alone(fast, prompt, n, **kw):
    return fast.generate(prompt[None], n, **kw)[0, prompt.numel():]


@pytest.mark.parametrize("chunk", [512, 5], ids=["whole-prompts", "prefill-chunks-of-5"])
def test_mixed_requests_equal_each_alone(fast, chunk):
    fast, vocab = fast
    prompts, news = _workload(vocab, 12)
    engine = fxforge.Engine(fast, max_batch=4, max_seq_len=64, prefill_chunk=chunk)
    requests = [engine.submit(p, n) for p, n in zip(prompts, news)]
    engine.run()
    for p, n, r in zip(prompts, news, requests):
        assert torch.equal(r.result(), _alone(fast, p, n, eos_token_id=None)), r.id
    stats = engine.stats()
    assert stats["running"] == stats["waiting"] == 0 and stats["cached_tokens"] == 0
    # continuous: fewer steps than running the requests one after another
    assert engine.steps < sum(news)
    if fast.static_decode:  # one static step (a CUDA graph on a GPU) per batch size the run had
        sizes = (engine.cache if isinstance(engine, PagedEngine) else engine._cache).static_steps
        assert len(sizes) >= 2 and set(sizes) <= set(range(1, 5)) and sum(s.steps for s in sizes.values()) > 0
    engine.close()


def test_a_long_prompt_is_prefilled_in_chunks_while_others_decode(fast):
    fast, vocab = fast
    short, long = torch.randint(1, vocab, (3,)), torch.randint(1, vocab, (40,))
    engine = fxforge.Engine(fast, max_batch=2, max_seq_len=64, prefill_chunk=8)
    during: list[int] = []  # how many prompts were still going in as each short-request token came
    first = engine.submit(short, 10, callback=lambda r, t: during.append(engine.stats()["waiting"]))
    engine.step()  # the short prompt joins and decodes
    second = engine.submit(long, 4)
    engine.run()
    assert during.count(1) >= 4  # 40 prompt tokens at 8 a step: the short one kept decoding meanwhile
    assert torch.equal(first.result(), _alone(fast, short, 10, eos_token_id=None))
    assert torch.equal(second.result(), _alone(fast, long, 4, eos_token_id=None))


def test_admission_waits_when_the_cache_is_full(fast):
    fast, vocab = fast
    prompts, news = _workload(vocab, 8, seed=1)
    longest = max(p.numel() + n for p, n in zip(prompts, news))
    # a paged pool as big as two of the longest requests: the dense cache's limit is its rows
    blocks = {"num_blocks": 2 * -(-longest // 4)} if fast._paged else {}
    engine = fxforge.Engine(fast, max_batch=8, max_seq_len=longest, **blocks)
    running = []
    requests = [engine.submit(p, n, callback=lambda r, t: running.append(engine.stats()["running"]))
                for p, n in zip(prompts, news)]
    engine.run()
    assert all(r.done for r in requests)
    assert max(running) < 8  # the cache could not hold all eight at once: some waited
    for p, n, r in zip(prompts, news, requests):
        assert torch.equal(r.result(), _alone(fast, p, n, eos_token_id=None))


def test_eos_ends_a_request_early_and_sampling_follows_its_generator(fast):
    fast, vocab = fast
    prompts, news = _workload(vocab, 6, seed=2)
    eos = [3, 5, 7, 11, 13, 17, 19, 23]
    engine = fxforge.Engine(fast, max_batch=3, max_seq_len=64)
    greedy = [engine.submit(p, n, eos_token_id=eos) for p, n in zip(prompts, news)]
    sampled = [engine.submit(p, n, do_sample=True, top_k=20, temperature=0.8, eos_token_id=None,
                             generator=torch.Generator().manual_seed(i)) for i, (p, n) in enumerate(zip(prompts, news))]
    engine.run()
    for i, (p, n) in enumerate(zip(prompts, news)):
        assert torch.equal(greedy[i].result(), _alone(fast, p, n, eos_token_id=eos))
        want = _alone(fast, p, n, do_sample=True, top_k=20, temperature=0.8, eos_token_id=None,
                      generator=torch.Generator().manual_seed(i))
        assert torch.equal(sampled[i].result(), want)


def test_threads_submit_while_the_engine_runs_and_callbacks_stream(fast):
    fast, vocab = fast
    prompts, news = _workload(vocab, 12, seed=3)
    engine = fxforge.Engine(fast, max_batch=4, max_seq_len=64)
    engine.start()
    streamed: dict[int, list] = {}
    results: dict[int, torch.Tensor] = {}

    def client(indices):
        for i in indices:
            r = engine.submit(prompts[i], news[i], callback=lambda req, tok: streamed.setdefault(req.id, []).append(tok))
            results[i] = (r, r.result(timeout=120))

    threads = [threading.Thread(target=client, args=(range(k, 12, 3),)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.stop()
    for i in range(12):
        request, tokens = results[i]
        assert torch.equal(tokens, _alone(fast, prompts[i], news[i], eos_token_id=None))
        assert streamed[request.id] == tokens.tolist()


def test_generate_many_and_errors(fast):
    fast, vocab = fast
    prompts, _ = _workload(vocab, 5, seed=4)
    engine = fxforge.Engine(fast, max_batch=2, max_seq_len=48)
    outs = engine.generate_many([p.tolist() for p in prompts], max_new_tokens=6)
    assert [o.tolist() for o in outs] == [_alone(fast, p, 6, eos_token_id=None).tolist() for p in prompts]
    with pytest.raises(ValueError, match=r"needs 57 positions \(.*\); the engine has max_seq_len=48"):
        engine.submit(torch.ones(50, dtype=torch.long), 8)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.submit([], 4)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        engine.submit([1, 2], 0)
    with pytest.raises(ValueError, match="max_batch must be an int >= 1"):
        fxforge.Engine(fast, max_batch=0)
    with pytest.raises(ValueError, match="prefill_chunk must be an int >= 1"):
        fxforge.Engine(fast, prefill_chunk=0)
    torch.manual_seed(0)
    model, _ = zoo.llama("sdpa")
    with pytest.raises(RuntimeError, match="needs a KV cache"):
        fxforge.Engine(fxforge.optimize(model, (torch.randint(0, vocab, (1, 5)),)))


# -- the paged engine's own -------------------------------------------------------------
def test_a_paged_model_gets_the_paged_engine_and_gives_every_block_back(paged):
    fast, vocab = paged
    prompts, news = _workload(vocab, 10, seed=5)
    engine = fxforge.Engine(fast, max_batch=3, num_blocks=30, prefill_chunk=7)
    assert isinstance(engine, PagedEngine) and engine.block_size == 4
    used = []
    requests = [engine.submit(p, n, callback=lambda r, t: used.append(engine.stats()["used_blocks"]))
                for p, n in zip(prompts, news)]
    engine.run()
    for p, n, r in zip(prompts, news, requests):
        assert torch.equal(r.result(), _alone(fast, p, n, eos_token_id=None))
    assert engine.allocator.free == engine.allocator.num_blocks == 30 and engine.allocator.reserved == 0
    assert 0 < max(used) <= 30 and engine.stats()["used_blocks"] == 0


def test_decode_rows_attended_in_length_groups_equal_each_alone(paged, monkeypatch):
    # the torch backend attends a decode step's rows in groups of similar length
    # (torch_kernels.length_groups); at no cost per group every distinct length is a group
    from fxforge.runtime import torch_kernels

    fast, vocab = paged
    monkeypatch.setattr(torch_kernels, "GROUP_COST_KEYS", 0)
    formed = []
    monkeypatch.setattr(torch_kernels.PagedAttentionSDPA, "_grouped_decode",
                        lambda self, *a, grouped=torch_kernels.PagedAttentionSDPA._grouped_decode:
                        formed.append(len(a[4])) or grouped(*a))
    prompts, news = _workload(vocab, 8, seed=1)
    engine = fxforge.Engine(fast, max_batch=4, max_seq_len=64)
    requests = [engine.submit(p, n) for p, n in zip(prompts, news)]
    engine.run()
    for p, n, r in zip(prompts, news, requests):
        assert torch.equal(r.result(), _alone(fast, p, n, eos_token_id=None)), r.id
    assert formed and max(formed) >= 3


def test_length_groups_leave_out_the_padding_worth_a_group():
    from fxforge.runtime.torch_kernels import length_groups

    # three lengths far apart: three groups, rows in order of start (the longest first)
    assert length_groups([0, 300, 10, 600, 650, 5, 320, 640], 700, cost=384) == [[0, 5, 2], [1, 6], [3, 7, 4]]
    assert length_groups([0, 10, 5], 700, cost=384) == [[0, 2, 1]]  # no padding worth a group's cost
    assert length_groups([0, 3, 3], 10, cost=0) == [[0], [1, 2]]


def test_a_small_pool_makes_requests_wait_and_none_is_lost(paged):
    fast, vocab = paged
    prompts, news = _workload(vocab, 8, seed=6)
    need = max(-(-(p.numel() + n) // 4) for p, n in zip(prompts, news))
    engine = fxforge.Engine(fast, max_batch=8, num_blocks=need + 2)  # room for about one request at a time
    running = []
    requests = [engine.submit(p, n, callback=lambda r, t: running.append(engine.stats()["running"]))
                for p, n in zip(prompts, news)]
    engine.run()
    assert max(running) < 8 and all(r.done for r in requests)
    for p, n, r in zip(prompts, news, requests):
        assert torch.equal(r.result(), _alone(fast, p, n, eos_token_id=None))
    assert engine.allocator.free == need + 2


def test_a_request_larger_than_the_pool_fails_at_once(paged):
    fast, vocab = paged
    engine = fxforge.Engine(fast, max_batch=2, num_blocks=5)  # 20 tokens
    with pytest.raises(ValueError, match="needs 6 KV cache blocks of 4 tokens, more than the engine's whole pool"):
        engine.submit(torch.ones(15, dtype=torch.long), 8)
    with pytest.raises(ValueError, match="block_size=16, but the model was optimized with blocks of 4"):
        fxforge.Engine(fast, block_size=16)
    dense = fxforge.optimize(zoo.llama("sdpa")[0], (torch.randint(0, vocab, (1, 5)),), kv_cache=True)
    with pytest.raises(ValueError, match="num_blocks and block_size are for a paged KV cache"):
        fxforge.Engine(dense, num_blocks=8)


def test_paged_waste_is_under_5_percent_on_a_mixed_workload(paged):
    """KV slots handed out vs holding tokens, averaged over the decode steps: only each
    request's last block is partly empty (the dense engine wastes what its rows do not use)."""
    fast, vocab = paged
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, vocab, (int(k),), generator=gen) for k in torch.randint(16, 100, (10,), generator=gen)]
    news = [int(k) for k in torch.randint(16, 60, (10,), generator=gen)]
    engine = fxforge.Engine(fast, max_batch=4, num_blocks=200)
    requests = [engine.submit(p, n) for p, n in zip(prompts, news)]
    engine.run()
    assert all(r.done for r in requests)
    stats = engine.stats()
    assert stats["kv_waste"] < 0.05, stats
    # a dense engine would hold 4 rows of the longest request all along
    longest = max(p.numel() + n for p, n in zip(prompts, news))
    assert stats["peak_allocated_blocks"] * 4 < 4 * longest
