"""The dense engine's work and memory follow the tokens its rows hold, not its capacity
(runtime/engine.py): a join shifts, and a leave moves, only the positions in use, so a
run at max_seq_len=4096 makes the same tensors as one at 64 (same sizes, same tokens);
its cache starts at FIRST_POSITIONS positions per row and grows, doubling, only when a
request needs more. No timing: the elements each op writes are counted with a dispatch mode."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fxforge
from fxforge.runtime.engine import FIRST_POSITIONS

SMALL, LARGE = 64, 4096


@pytest.fixture
def fast():
    """A model of each test's own: its cache pool starts empty, so a small engine's cache
    is small (the pool hands an idle cache that fits, a large one too)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # a position limit far above what the requests use, so that the engine's capacity can be
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                      bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval()
    return fxforge.optimize(model, (torch.randint(0, 128, (2, 7)),), kv_cache=True, verbose=False)


def _workload():
    """Requests of different lengths that join and leave a batch of 3: the longest row
    leaves while others run, so joins shift the rows both ways (checked below)."""
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 128, (int(k),), generator=gen) for k in (9, 3, 12, 2, 7, 5, 11, 4)]
    news = [3, 9, 2, 8, 5, 7, 2, 6]
    return prompts, news


class _WrittenElements(TorchDispatchMode):
    """Per op, the elements its outputs hold, for the ops that make or write a tensor
    (views make none: a slice of the whole cache costs nothing)."""

    def __init__(self):
        super().__init__()
        self.written: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns):
            tensors = [t for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor)]
            name = str(func.overloadpacket)
            self.written[name] = self.written.get(name, 0) + sum(t.numel() for t in tensors)
        return out


def _run(fast, capacity, count: bool = False):
    """Each request's tokens and, with `count`, the elements written per op during the run
    (the cache is allocated before: its size is the capacity by design)."""
    prompts, news = _workload()
    engine = fxforge.Engine(fast, max_batch=3, max_seq_len=capacity)
    shifts = []
    shift = engine._shift
    engine._shift = lambda delta: (shifts.append((delta, max((r.cached for r in engine._rows), default=0))),
                                   shift(delta))
    requests = [engine.submit(p, n, eos_token_id=None) for p, n in zip(prompts, news)]
    mode = _WrittenElements()
    if count:
        with mode:
            engine.run()
    else:
        engine.run()
    allocated = engine._cache.capacity
    engine.close()
    return [r.result() for r in requests], mode.written, shifts, allocated


def test_tokens_are_the_same_at_any_capacity_and_equal_each_alone(fast):
    prompts, news = _workload()
    small, _, shifts, _ = _run(fast, SMALL)
    large, _, _, _ = _run(fast, LARGE)
    for p, n, a, b in zip(prompts, news, small, large):
        alone = fast.generate(p[None], n, eos_token_id=None)[0, p.numel():]
        assert torch.equal(a, alone) and torch.equal(b, alone)
    # the workload moves rows right (over their own tokens: the ranges overlap) and left
    moved = [(delta, held) for delta, held in shifts if delta and held]
    assert any(0 < delta < held for delta, held in moved) and any(delta < 0 for delta, _ in moved)


def test_a_run_writes_the_same_elements_at_any_capacity(fast):
    """A join's shift and a leave's move used to copy whole rows of max_seq_len positions
    (torch.roll: a cat and a copy_ of every row, per layer): at 4096 positions they wrote
    16x what they wrote at 64 (a cache of 256 positions, as allocated). Now no op writes
    more at the larger capacity."""
    _run(fast, SMALL)  # (first calls' one-off work out of the way)
    _, small, _, small_cache = _run(fast, SMALL, count=True)
    _, large, _, large_cache = _run(fast, LARGE, count=True)
    # the cache holds what the requests need, whatever the capacity
    assert small_cache == large_cache == FIRST_POSITIONS  # (allocations are whole 256s)
    grown = {op: (small.get(op, 0), n) for op, n in large.items() if n > small.get(op, 0)}
    assert not grown, f"ops that write more at max_seq_len={LARGE} than at {SMALL}: {grown}"


def test_the_cache_grows_only_when_a_request_needs_more_and_keeps_every_token(fast):
    """max_seq_len=8192 on a model of 8192 positions: the cache starts at FIRST_POSITIONS
    per row, grows when a running batch is joined by a request that needs more (the rows'
    tokens move into the larger cache) and while a long prompt is prefilled in chunks (the
    scratch cache keeps the chunks already in), and every request's tokens are its own."""
    gen = torch.Generator().manual_seed(3)
    lengths = [(6, 40), (300, 12), (9, 250), (4, 8)]  # (prompt, new): the 2nd and 3rd need > 256
    prompts = [torch.randint(1, 128, (p,), generator=gen) for p, _ in lengths]
    engine = fxforge.Engine(fast, max_batch=3, max_seq_len=8192, prefill_chunk=100)
    assert engine.stats()["allocated_positions"] == 3 * FIRST_POSITIONS
    requests = [engine.submit(p, n, eos_token_id=None) for p, (_, n) in zip(prompts, lengths)]
    engine.run()
    grown = engine.stats()["allocated_positions"] // 3
    engine.close()
    # the longest need: a row of 300 cached tokens joined by one of 250 new tokens to come
    assert 300 + 250 <= grown <= 2048
    for p, (_, n), r in zip(prompts, lengths, requests):
        assert torch.equal(r.result(), fast.generate(p[None], n, eos_token_id=None)[0, p.numel():])


def test_stats_count_the_cache_the_engine_holds(fast):
    """The model's pool hands the engine an idle cache that fits: one of more rows (left by
    a generate() of batch 6) is counted as it is, rows x length."""
    fast.generate(torch.randint(1, 128, (6, 5)), 3, eos_token_id=None)
    engine = fxforge.Engine(fast, max_batch=2, max_seq_len=700)
    cache = engine._cache
    assert cache.batch == 6  # (the pool's idle cache)
    assert engine.stats()["allocated_positions"] == cache.batch * cache.capacity
    engine.close()
