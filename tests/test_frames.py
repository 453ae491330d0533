"""Hot frames start a data-stack chunk of their own (fxforge/runtime/frames.py).

CPython 3.11+ maps a fresh 16 KiB chunk whenever a call does not fit in the current one
and unmaps it when that call returns. The sweep below calls a program at every stack
depth in a range longer than one chunk and counts minor page faults per call (a fresh
mapping faults when touched): a program whose op calls cross a chunk boundary shows a
spike of one fault per op call at some depth."""
import sys

import pytest
import torch

import fxforge
import fxforge.runtime.frames as frames
import fxforge.runtime.generate  # noqa: F401 - decorated (padded) now, not inside a monkeypatched test
import zoo

resource = pytest.importorskip("resource")  # minor page-fault counts (Unix)

pytestmark = pytest.mark.skipif(sys.version_info < (3, 11), reason="CPython's data stack came in 3.11")


def _at_depth(k, fn):
    return fn() if k == 0 else _at_depth(k - 1, fn)


def _faults(fn) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _fault_spike(fn, depths=260) -> int:
    """Faults per call at the worst depth, above the median depth (min of 3 calls each, so
    a one-off fault elsewhere in the process does not count). The recursion itself adds a
    few faults at the deepest depths; a thrashing call adds one per Python call inside."""
    fn()
    per_depth = sorted(min(_faults(lambda: _at_depth(d, fn)) for _ in range(3)) for d in range(depths))
    return per_depth[-1] - per_depth[len(per_depth) // 2]


@pytest.fixture(scope="module")
def llama_and_ids():
    torch.manual_seed(0)
    model, vocab = zoo.llama(n_layer=2)
    return model, torch.randint(0, vocab, (1, 5))


def test_program_frame_is_bigger_than_a_chunk(llama_and_ids):
    model, ids = llama_and_ids
    fast = fxforge.optimize(model, (ids,))
    assert frames.frame_slots(fast.program.fn) >= frames.FRAME_SLOTS_MIN
    assert frames.frame_slots(type(fast).__call__) >= frames.FRAME_SLOTS_MIN
    torch.testing.assert_close(fast(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_unpadded_program_thrashes_and_padded_does_not(llama_and_ids, monkeypatch):
    model, ids = llama_and_ids
    padded = fxforge.optimize(model, (ids,))
    monkeypatch.setattr(frames, "FRAME_SLOTS_MIN", 0)
    unpadded = fxforge.optimize(model, (ids,))
    # the check can fail: without the padding some depth maps a chunk per op call
    assert _fault_spike(lambda: unpadded.program(ids)) >= 30  # 67 measured
    assert _fault_spike(lambda: padded.program(ids)) <= 10  # 3 measured


def test_generate_does_not_thrash_at_any_depth(llama_and_ids):
    model, ids = llama_and_ids
    fast = fxforge.optimize(model, (ids,), kv_cache=True)
    # 8 measured; 51 with generate() itself unpadded (its per-token Python calls thrash)
    assert _fault_spike(lambda: fast.generate(ids, 8, eos_token_id=None)) <= 16


def test_generators_are_left_alone():
    def gen():
        yield 1

    assert frames.with_frame_of_its_own(gen.__code__) is gen.__code__  # their frames live in the object


def test_a_big_frame_is_left_alone():
    def big():
        pass

    code = big.__code__.replace(co_stacksize=frames.FRAME_SLOTS_MIN + 5)
    assert frames.with_frame_of_its_own(code) is code
    small = frames.with_frame_of_its_own(big.__code__)
    assert small.co_nlocals + small.co_stacksize == frames.FRAME_SLOTS_MIN
