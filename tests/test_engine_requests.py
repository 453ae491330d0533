"""The engine's requests (runtime/engine.py): a failure in a step fails the request it
concerns and the engine's thread goes on serving the others (never a dead thread and
requests that wait forever); a raising callback fails only its request; bad prompts and
sampling settings raise ValueError at submit(), by generate()'s rules; settings not given
default as in generate() (the model's generation_config, transformers' top_k=50 when
sampling, the model's EOS). Dense and paged caches."""
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

import fxforge

import zoo
from fxforge.passes.kv_cache import KVCacheConfig

WAIT = 60  # seconds: a regression fails with TimeoutError instead of hanging


@pytest.fixture(scope="module", params=["dense", "paged"])
def fast(request):
    torch.manual_seed(0)
    model, vocab = zoo.llama("sdpa")  # generation_config: eos_token_id=0
    cache = KVCacheConfig(layout="paged", block_size=4) if request.param == "paged" else True
    return fxforge.optimize(model, (torch.randint(1, vocab, (1, 7)),), kv_cache=cache), vocab


def _alone(fast, prompt, n, **kw):
    return fast.generate(prompt[None], n, **kw)[0, prompt.numel():]


def _fail_once(monkeypatch, fast, name, message):
    """The model's `name` (run_cached: a prefill; run_step: a batched decode step) raises once."""
    real, calls = getattr(fast, name), []

    def broken(*args, **kwargs):
        if not calls:
            calls.append(1)
            raise RuntimeError(message)
        return real(*args, **kwargs)

    monkeypatch.setattr(fast, name, broken)
    return calls


def _all_blocks_back(engine):
    if hasattr(engine, "allocator"):
        assert engine.allocator.free == engine.allocator.num_blocks and engine.allocator.reserved == 0


def test_failures_on_the_engine_thread_fail_their_requests_and_the_engine_keeps_serving(fast, monkeypatch):
    fast, vocab = fast
    prompt = torch.tensor([5, 6, 7, 8])
    want = _alone(fast, prompt, 6, eos_token_id=None)
    engine = fxforge.Engine(fast, max_batch=2, max_seq_len=32)
    engine.start()
    try:
        # a token id outside the vocabulary is refused at submit(), before it reaches the thread
        with pytest.raises(ValueError, match=r"token id 999 at position 2, outside the model's vocabulary \[0, 128\)"):
            engine.submit([1, 2, 999], 3)
        assert torch.equal(engine.submit(prompt, 6, eos_token_id=None).result(timeout=WAIT), want)

        # a failing prefill fails its request alone
        calls = _fail_once(monkeypatch, fast, "run_cached", "prefill broke")
        bad = engine.submit([1, 2, 3], 3, eos_token_id=None)
        with pytest.raises(RuntimeError, match=rf"request {bad.id} failed while its prompt was prefilled: "
                                               "RuntimeError: prefill broke") as info:
            bad.result(timeout=WAIT)
        assert calls and str(info.value.__cause__) == "prefill broke"
        monkeypatch.undo()
        assert engine._thread.is_alive()
        assert torch.equal(engine.submit(prompt, 6, eos_token_id=None).result(timeout=WAIT), want)

        # a failing batched decode step fails the running requests; later ones are served
        calls = _fail_once(monkeypatch, fast, "run_step", "decode broke")
        bad = engine.submit([1, 2, 3], 3, eos_token_id=None)
        with pytest.raises(RuntimeError, match=rf"request {bad.id} failed in the engine's batched decode step: "
                                               "RuntimeError: decode broke"):
            bad.result(timeout=WAIT)
        assert calls
        monkeypatch.undo()
        assert engine._thread.is_alive()
        assert torch.equal(engine.submit(prompt, 6, eos_token_id=None).result(timeout=WAIT), want)
    finally:
        engine.stop()
    _all_blocks_back(engine)


def test_a_raising_callback_fails_only_its_request(fast):
    fast, vocab = fast
    prompts = [torch.tensor([3, 4, 5]), torch.tensor([9, 8, 7, 6, 5]), torch.tensor([11, 12])]
    engine = fxforge.Engine(fast, max_batch=3, max_seq_len=32)

    def explode(request, token):
        if len(request.tokens) == 2:
            raise KeyError("client went away")

    engine.start()
    try:
        requests = [engine.submit(p, 6, eos_token_id=None, callback=explode if i == 1 else None)
                    for i, p in enumerate(prompts)]
        with pytest.raises(RuntimeError, match=rf"request {requests[1].id} failed in its callback: KeyError") as info:
            requests[1].result(timeout=WAIT)
        assert isinstance(info.value.__cause__, KeyError)
        for i in (0, 2):
            assert torch.equal(requests[i].result(timeout=WAIT), _alone(fast, prompts[i], 6, eos_token_id=None))
        later = engine.submit(prompts[1], 6, eos_token_id=None)
        assert torch.equal(later.result(timeout=WAIT), _alone(fast, prompts[1], 6, eos_token_id=None))
    finally:
        engine.stop()
    _all_blocks_back(engine)


BAD = [
    ({"prompt_ids": [1, 2, 999]}, r"token id 999 at position 2, outside the model's vocabulary \[0, 128\)"),
    ({"prompt_ids": [4, -1, 5]}, r"token id -1 at position 1, outside the model's vocabulary"),
    ({"prompt_ids": torch.tensor([[5, 6, 7], [8, 9, 10]])}, r"prompt_ids must be 1-D .* shape \(2, 3\)"),
    ({"prompt_ids": torch.tensor([5.9, 6.9, 7.9])}, r"prompt_ids must be integer token ids, got torch.float32"),
    ({"prompt_ids": [5.0, 6.0]}, r"prompt_ids must be integer token ids"),
    ({"do_sample": True, "temperature": 0.0}, r"temperature must be > 0 when sampling, got 0.0"),
    ({"do_sample": True, "temperature": -1.0}, r"temperature must be > 0 when sampling, got -1.0"),
    ({"do_sample": True, "top_k": -3}, r"top_k must be an int >= 0 or None, got -3"),
    ({"do_sample": True, "top_k": 2.5}, r"top_k must be an int >= 0 or None, got 2.5"),
    ({"do_sample": True, "top_p": -0.1}, r"top_p must be in \[0, 1\], got -0.1"),
    ({"do_sample": True, "top_p": 1.5}, r"top_p must be in \[0, 1\], got 1.5"),
    ({"callback": 5}, r"callback must be a function callback\(request, token\) or None, got int 5"),
    ({"do_sample": True, "generator": 5}, r"generator must be a torch.Generator or None, got int 5"),
]


@pytest.mark.parametrize("bad,match", BAD, ids=[m.split(" ")[0] + "-" + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_arguments_raise_at_submit(fast, bad, match):
    fast, vocab = fast
    engine = fxforge.Engine(fast, max_batch=2, max_seq_len=32)
    kwargs = {"prompt_ids": [1, 2, 3], **bad}
    with pytest.raises(ValueError, match=match):
        engine.submit(kwargs.pop("prompt_ids"), 3, **kwargs)
    assert engine.stats()["waiting"] == 0  # nothing was queued


def test_settings_default_as_in_generate(fast, monkeypatch):
    fast, vocab = fast
    engine = fxforge.Engine(fast, max_batch=4, max_seq_len=48)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, vocab, (int(k),), generator=gen) for k in (3, 9, 5, 12)]
    seeds = range(len(prompts))

    def sampled(**kw):  # the engine's and generate()'s tokens, each request with its own generator
        requests = [engine.submit(p, 12, do_sample=True, generator=torch.Generator().manual_seed(i), **kw)
                    for i, p in zip(seeds, prompts)]
        engine.run()
        alone = [_alone(fast, p, 12, do_sample=True, generator=torch.Generator().manual_seed(i), **kw)
                 for i, p in zip(seeds, prompts)]
        return [r.result() for r in requests], alone

    # transformers' top_k=50 when sampling, and the model's eos_token_id=0
    got, want = sampled()
    assert [g.tolist() for g in got] == [w.tolist() for w in want]
    got, want = sampled(top_k=None, eos_token_id=None)  # explicit None: no top-k, no EOS, as in generate()
    assert [g.tolist() for g in got] == [w.tolist() for w in want] and all(g.numel() == 12 for g in got)

    # the model's own generation_config: its EOS ends a greedy request; its sampling settings apply
    prompt = prompts[1]
    free = _alone(fast, prompt, 12, eos_token_id=None)
    eos = int(free[3])
    monkeypatch.setattr(fast, "generation_defaults", {"eos_token_id": eos, "top_k": 5, "temperature": 0.7})
    stop = int((free == eos).nonzero()[0, 0]) + 1
    request = engine.submit(prompt, 12)
    unlimited = engine.submit(prompt, 12, eos_token_id=None)
    engine.run()
    assert torch.equal(request.result(), _alone(fast, prompt, 12)) and request.result().numel() == stop
    assert torch.equal(unlimited.result(), free)
    got, want = sampled()
    assert [g.tolist() for g in got] == [w.tolist() for w in want]


def test_a_request_takes_generates_logits_settings(fast):
    """repetition_penalty and the other logits settings of generate() apply per request
    (they raised TypeError, an unexpected keyword); settings only generate() has are named."""
    fast, vocab = fast
    prompt = torch.tensor([3, 4, 5, 3, 4])
    kw = dict(repetition_penalty=1.8, no_repeat_ngram_size=2, min_new_tokens=4, eos_token_id=None)
    engine = fxforge.Engine(fast, max_batch=2, max_seq_len=32)
    engine.start()
    try:
        got = engine.submit(prompt, 8, **kw).result(timeout=WAIT)
    finally:
        engine.stop()
    assert torch.equal(got, _alone(fast, prompt, 8, **kw))
    assert not torch.equal(got, _alone(fast, prompt, 8, eos_token_id=None))  # the settings did something
    with pytest.raises(ValueError, match=r"Engine.submit\(\) does not take num_beams"):
        engine.submit(prompt, 8, num_beams=2)


def test_leading_pad_tokens_are_left_padding_as_in_generate(fast):
    """generate() alone takes leading pad tokens for left padding when no mask is given (as
    transformers does), so the engine drops them: the request's tokens are generate()'s."""
    fast, vocab = fast
    prompt = torch.tensor([5, 5, 5, 9, 8, 7])
    engine = fxforge.Engine(fast, max_batch=2, max_seq_len=32)
    engine.start()
    try:
        got = engine.submit(prompt, 6, pad_token_id=5, eos_token_id=None).result(timeout=WAIT)
    finally:
        engine.stop()
    assert torch.equal(got, _alone(fast, prompt, 6, pad_token_id=5, eos_token_id=None))
    assert torch.equal(got, _alone(fast, prompt[3:], 6, eos_token_id=None))
    with pytest.raises(ValueError, match=r"holds the pad token \(5\)"):
        engine.submit(torch.tensor([9, 5, 7]), 6, pad_token_id=5)


def test_generate_many_with_a_bad_prompt_queues_none(fast):
    fast, vocab = fast
    engine = fxforge.Engine(fast, max_batch=2, max_seq_len=32)
    with pytest.raises(ValueError, match=r"needs 42 positions \(.*\); the engine has max_seq_len=32"):
        engine.generate_many([[1, 2], [3, 4], [3] * 40], max_new_tokens=3, eos_token_id=None)
    assert engine.stats()["waiting"] == 0  # no orphans for the next run()
    prompt = torch.tensor([1, 2])
    outs = engine.generate_many([prompt], max_new_tokens=3, eos_token_id=None)
    assert torch.equal(outs[0], _alone(fast, prompt, 3, eos_token_id=None))


def test_stop_from_a_callback_on_the_engines_thread(fast):
    # stop() on the engine's own thread does not join itself: the thread finishes its
    # requests, then ends
    fast, vocab = fast
    engine = fxforge.Engine(fast, max_batch=2, max_seq_len=32)
    engine.start()
    errors = []

    def callback(request, token):
        if len(request.tokens) == 2:
            try:
                engine.stop()
            except Exception as error:  # noqa: BLE001
                errors.append(error)

    prompt = torch.tensor([5, 6, 7])
    request = engine.submit(prompt, 8, eos_token_id=None, callback=callback)
    assert torch.equal(request.result(WAIT), _alone(fast, prompt, 8, eos_token_id=None))
    assert not errors
    thread = engine._thread
    if thread is not None:
        thread.join(WAIT)
    assert engine._thread is None
    # a later start() serves again
    engine.start()
    assert torch.equal(engine.submit(prompt, 3, eos_token_id=None).result(WAIT),
                       _alone(fast, prompt, 3, eos_token_id=None))
    engine.stop()


EXIT_SCRIPT = """
import torch, fxforge, zoo, threading
torch.manual_seed(0)
model, vocab = zoo.llama("sdpa")
fast = fxforge.optimize(model, (torch.randint(1, vocab, (1, 7)),), kv_cache=True)
engine = fxforge.Engine(fast, max_batch=2, max_seq_len=256)
started = threading.Event()
engine.start()
requests = [engine.submit([1, 2, 3], 250, eos_token_id=None, callback=lambda r, t: started.set()) for _ in range(4)]
started.wait(60)
raise SystemExit(3)  # leaves while the engine's thread decodes
"""


def test_interpreter_exit_while_the_engine_decodes_does_not_abort():
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.path.dirname(here), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", EXIT_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr[-2000:]  # not SIGABRT (-6): the thread ended at exit


def test_the_exit_hook_does_not_keep_engines_alive(fast):
    import gc
    import weakref

    from fxforge.runtime import engine as engine_module

    fast, vocab = fast
    engine = fxforge.Engine(fast, max_batch=2, max_seq_len=32)
    engine.start()
    engine.submit([1, 2], 2, eos_token_id=None).result(WAIT)
    engine.stop()
    assert engine in engine_module._RUNNING
    ref = weakref.ref(engine)
    del engine
    gc.collect()
    assert ref() is None


def test_a_closed_engine_takes_no_work_and_fails_what_it_never_ran(fast):
    """close() gave the dense engine's caches back to the model but the engine went on
    serving into them: a generate() leasing the same cache then changed its tokens. Now a
    closed engine refuses work, a request queued on an engine that never ran fails instead
    of waiting forever, and the model's cache pool serves generate() as before."""
    fast, vocab = fast
    prompt = torch.tensor([5, 6, 7])
    alone = _alone(fast, prompt, 8, eos_token_id=None)
    with fxforge.Engine(fast, max_batch=1, max_seq_len=32) as engine:
        queued = engine.submit(prompt, 8, eos_token_id=None)
    with pytest.raises(RuntimeError, match=r"closed before this request finished \(call run\(\) or start\(\)"):
        queued.result(timeout=WAIT)
    for work in (lambda: engine.submit(prompt, 8), engine.step, engine.run, engine.start,
                 lambda: engine.generate_many([prompt], 2)):
        with pytest.raises(RuntimeError, match="the engine is closed"):
            work()
    engine.close()  # idempotent
    assert torch.equal(_alone(fast, prompt, 8, eos_token_id=None), alone)
    engine = fxforge.Engine(fast, max_batch=1, max_seq_len=32)
    done = engine.submit(prompt, 8, eos_token_id=None)
    engine.start()
    engine.close()  # a started engine finishes what it was given
    assert torch.equal(done.result(timeout=0), alone)


@pytest.mark.parametrize("how", ["run", "start"])
def test_close_from_a_callback_finishes_the_work_then_closes(fast, how):
    """close() from a request's callback ran inside the step that holds the step lock, and
    waited for it forever. Now, as stop() there, the engine finishes its requests and the
    step that ends them closes it."""
    fast, vocab = fast
    prompt = torch.tensor([5, 6, 7])
    engine = fxforge.Engine(fast, max_batch=2, max_seq_len=32)
    first = engine.submit(prompt, 4, eos_token_id=None, callback=lambda request, token: engine.close())
    second = engine.submit(torch.tensor([8, 9]), 3, eos_token_id=None)
    if how == "run":
        worker = threading.Thread(target=engine.run, daemon=True)
        worker.start()
        worker.join(WAIT)
        assert not worker.is_alive()
    else:
        engine.start()
    assert torch.equal(first.result(timeout=WAIT), _alone(fast, prompt, 4, eos_token_id=None))
    assert second.result(timeout=WAIT).numel() == 3
    deadline = time.monotonic() + WAIT
    while not engine._closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine._closed
    with pytest.raises(RuntimeError, match="the engine is closed"):
        engine.submit(prompt, 2)
