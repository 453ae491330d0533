"""The Engine's answers to misuse: a clear error, never a raw one from deep inside, never a
hang. An all-pad prompt; stepping, running or waiting on the engine from a request's
callback (inside the step it would wait for); start() and stop() from several threads; a KV
pool larger than the device's memory; a model default the Engine does not run. Every wait
has a timeout, so that a regression fails instead of hanging CI. Tiny llama."""
import random
import threading
import time

import pytest
import torch

import fxforge
import zoo
from fxforge.passes.kv_cache import KVCacheConfig
from fxforge.runtime import engine as engine_module
from fxforge.runtime import generate as generate_module
from fxforge.runtime.block_allocator import BlockAllocator

WAIT = 60  # seconds


@pytest.fixture(scope="module", params=["dense", "paged"])
def fast(request):
    torch.manual_seed(0)
    model, vocab = zoo.llama("sdpa", n_layer=1)  # generation_config: eos_token_id=0
    cache = KVCacheConfig(layout="paged", block_size=4) if request.param == "paged" else True
    return fxforge.optimize(model, (torch.randint(1, vocab, (1, 7)),), kv_cache=cache)


def _engine(fast, **kw):
    return fxforge.Engine(fast, max_batch=2, max_seq_len=32, **({"num_blocks": 16} if fast._paged else {}), **kw)


def _alone(fast, prompt, n):
    return fast.generate(torch.tensor([prompt]), n, eos_token_id=None)[0, len(prompt):]


# -- an all-pad prompt ---------------------------------------------------------------------
def test_an_all_pad_prompt_is_a_clear_error_and_queues_nothing(fast):
    engine = _engine(fast)
    for call in (lambda: engine.submit([5, 5, 5], 3, pad_token_id=5),
                 lambda: engine.generate_many([[3, 4], [5, 5]], 3, pad_token_id=5)):
        with pytest.raises(ValueError, match=r"prompt_ids is made of pad tokens \(5\) only: .* at least one token "
                                             r"that is not padding\. The Engine takes no attention_mask"):
            call()
    assert engine.stats()["waiting"] == 0
    # generate() says the same of a batch's all-pad row, and names the row
    with pytest.raises(ValueError, match=r"input_ids is made of pad tokens \(5\) only \(row 1\): .* Pass an "
                                         "attention_mask"):
        fast.generate(torch.tensor([[3, 4], [5, 5]]), 3, pad_token_id=5)
    # leading pads before a real token are still left padding
    assert torch.equal(engine.generate_many([[5, 3, 4]], 3, pad_token_id=5, eos_token_id=None)[0],
                       fast.generate(torch.tensor([[5, 3, 4]]), 3, pad_token_id=5, eos_token_id=None)[0, 3:])
    engine.close()


# -- re-entering the engine from a callback ------------------------------------------------
REENTRY = {
    "step": ("Engine.step()", lambda engine, other: engine.step()),
    "run": ("Engine.run()", lambda engine, other: engine.run()),
    "generate_many": ("Engine.generate_many()", lambda engine, other: engine.generate_many([[4, 5]], 2)),
    "result": ("request.result() of request", lambda engine, other: other.result()),
    "result_timeout": ("request.result() of request", lambda engine, other: other.result(WAIT)),
}


def _reenter(fast, engine, how, serve):
    """A request whose callback calls `how` on its own engine at its first token; `serve`
    runs the engine. Returns the request and the error its callback got (if any)."""
    what, call = REENTRY[how]
    seen = []

    def callback(request, token):
        if len(request.tokens) == 1:
            try:
                call(engine, other)
            except RuntimeError as error:
                seen.append(error)
                raise

    request = engine.submit([1, 2, 3], 4, eos_token_id=None, callback=callback)
    other = engine.submit([6, 7], 6, eos_token_id=None)  # waiting or running: not finished
    serve()
    with pytest.raises(RuntimeError, match="failed in its callback") as err:
        request.result(WAIT)
    assert seen and what in str(seen[0]) and "from a request's callback, inside the engine's step" in str(seen[0])
    assert err.value.__cause__ is seen[0]
    assert torch.equal(other.result(WAIT), _alone(fast, [6, 7], 6))  # the others are served
    assert not engine.stats()["waiting"] and not engine.stats()["running"]


@pytest.mark.parametrize("how", sorted(REENTRY))
def test_reentering_a_manual_engine_from_a_callback_is_a_clear_error(fast, how):
    engine = _engine(fast)

    def serve():
        thread = threading.Thread(target=engine.run, daemon=True)
        thread.start()
        thread.join(WAIT)
        assert not thread.is_alive(), f"{how} from a callback hangs engine.run()"

    _reenter(fast, engine, how, serve)
    engine.close()


@pytest.mark.parametrize("how", ["generate_many", "result", "step"])
def test_reentering_a_started_engine_from_a_callback_is_a_clear_error(fast, how):
    engine = _engine(fast)
    _reenter(fast, engine, how, engine.start)
    # nothing the callback tried was queued, and the engine still serves
    assert torch.equal(engine.submit([3, 4], 3, eos_token_id=None).result(WAIT), _alone(fast, [3, 4], 3))
    stopper = threading.Thread(target=engine.close, daemon=True)
    stopper.start()
    stopper.join(WAIT)
    assert not stopper.is_alive()


def test_a_finished_requests_result_is_fine_from_a_callback(fast):
    engine = _engine(fast)
    first = engine.submit([6, 7], 2, eos_token_id=None)
    engine.run()
    got = []
    engine.submit([1, 2], 2, eos_token_id=None, callback=lambda request, token: got.append(first.result()))
    engine.run()
    assert len(got) == 2 and torch.equal(got[0], _alone(fast, [6, 7], 2))
    engine.close()


# -- start() and stop() from several threads -----------------------------------------------
def test_a_stop_while_start_launches_the_thread_waits_for_it(fast, monkeypatch):
    """stop() on another thread at the moment start() is making the engine's thread: it
    waits for start() and ends that thread (it never joins a thread not started yet)."""
    engine = _engine(fast)
    errors, stoppers = [], []
    real = engine_module._watch_at_exit

    def stop_meanwhile(e):
        def stop():
            try:
                engine.stop()
            except Exception as error:  # noqa: BLE001
                errors.append(error)

        stoppers.append(threading.Thread(target=stop, daemon=True))
        stoppers[-1].start()
        stoppers[-1].join(0.5)  # (with the fix it waits for this start() to finish)
        real(e)

    monkeypatch.setattr(engine_module, "_watch_at_exit", stop_meanwhile)
    engine.start()
    stoppers[0].join(WAIT)
    assert not stoppers[0].is_alive() and not errors, errors
    assert engine._thread is None  # the stop() came after the start(): the thread ended
    monkeypatch.setattr(engine_module, "_watch_at_exit", real)
    engine.start()  # serves again
    assert torch.equal(engine.submit([3, 4], 3, eos_token_id=None).result(WAIT), _alone(fast, [3, 4], 3))
    engine.close()


def test_start_and_stop_from_many_threads(fast):
    engine = _engine(fast)
    errors = []
    requests = []

    def loop(seed):
        r = random.Random(seed)
        for i in range(60):
            try:
                (engine.start if r.random() < 0.5 else engine.stop)()
                if i % 20 == 0:
                    requests.append(engine.submit([seed + 1, 2], 2, eos_token_id=None))
            except Exception as error:  # noqa: BLE001
                errors.append(repr(error))
            time.sleep(r.random() * 0.002)

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[:3]
    engine.start()  # whatever the last call was, the queued requests finish
    for request in requests:
        assert request.result(WAIT).numel() == 2
    engine.stop()
    assert engine._thread is None
    engine.close()


# -- a KV cache larger than the device's memory ----------------------------------------------
def test_a_pool_larger_than_the_device_is_refused_up_front(fast, monkeypatch):
    monkeypatch.setattr(generate_module, "device_memory_bytes", lambda device: 2**20)
    monkeypatch.setattr(engine_module, "device_memory_bytes", lambda device: 2**20)
    if fast._paged:  # K and V of 2 heads of 16 float32s, one layer: 256 bytes a token, 1 KiB a block of 4
        with pytest.raises(ValueError, match=r"num_blocks=4096 blocks of 4 tokens needs a KV cache of 0.00391 GiB "
                                             r"\(1 KiB a block\), more than this device's memory \(0.000977 GiB\); "
                                             r"pass fxforge.Engine a smaller num_blocks \(at most 1024 fit"):
            fxforge.Engine(fast, max_batch=2, num_blocks=4096)
        fxforge.Engine(fast, max_batch=2, num_blocks=256).close()  # within it
    else:  # (64 + 1) rows of 256 positions of 256 bytes
        with pytest.raises(ValueError, match=r"fxforge.Engine\(max_batch=64\) needs a KV cache of 0.00397 GiB for "
                                             r"its first 256 positions .* use a smaller max_batch"):
            fxforge.Engine(fast, max_batch=64)
        fxforge.Engine(fast, max_batch=2).close()


def test_an_absurd_pool_is_refused_without_building_it(fast):
    if not fast._paged:
        pytest.skip("num_blocks is the paged engine's")
    start = time.perf_counter()
    with pytest.raises(ValueError, match="num_blocks=1000000000000 blocks .* more than this device's memory"):
        fxforge.Engine(fast, max_batch=2, num_blocks=10**12)
    assert time.perf_counter() - start < 5


def test_the_allocator_costs_what_it_hands_out():
    a = BlockAllocator(10**12)  # nothing per block is built
    assert a.free == 10**12 and a.used == 0
    got = a.allocate(3)
    assert got == [0, 1, 2] and a.used == 3
    a.release([1, 0])
    assert a.allocate(3) == [0, 1, 3]  # the last released first, then low fresh ids (as the list was)
    with pytest.raises(ValueError, match="block 7 is not allocated"):
        a.release([7])
    with pytest.raises(ValueError, match="block -1 is not allocated"):
        a.release([-1])
    assert a.reserve(10**12 - 4) and a.free == 0


# -- a model default the Engine does not run --------------------------------------------------
def test_an_unsupported_model_default_names_the_engine(fast):
    saved, alone = fast.generation_defaults, _alone(fast, [3, 4], 3)
    try:
        fast.generation_defaults = {**(saved or {}), "typical_p": 0.5}
        engine = _engine(fast)
        for call in (lambda: engine.submit([3, 4], 3), lambda: engine.generate_many([[3, 4]], 3)):
            with pytest.raises(ValueError, match=r"sets typical_p, which Engine.submit\(\) \(and generate_many\(\)\) "
                                                 r"does not support; pass typical_p=1.0 .* to Engine.submit\(\)") as e:
                call()
            assert "which generate()" not in str(e.value)
        assert torch.equal(engine.generate_many([[3, 4]], 3, typical_p=1.0, eos_token_id=None)[0], alone)
        with pytest.raises(ValueError, match=r"which generate\(\) does not support; pass typical_p=1.0 .* to "
                                             r"generate\(\)"):
            fast.generate(torch.tensor([[3, 4]]), 3)
        engine.close()
    finally:
        fast.generation_defaults = saved


def test_a_whole_float_token_count_is_taken_as_generate_takes_it(fast):
    """max_new_tokens=3.0: generate() and transformers make 3 tokens; submit() did refuse it."""
    prompt = [5, 6, 7]
    out = _engine(fast).generate_many([prompt], max_new_tokens=3.0, eos_token_id=None)
    assert torch.equal(out[0], _alone(fast, prompt, 3))
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        _engine(fast).submit(prompt, max_new_tokens=2.5)
