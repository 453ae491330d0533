"""The eager answer or a clear error, never a different answer (issue 15): shape guards,
concurrent and re-entrant generate(), static capture, and calls made differently from
the capture."""
import threading

import pytest
import sympy
import torch

import fxforge
from fxforge.ir.guards import GuardChecker, GuardError, is_size_specialization
from fxforge.ir.types import symbol

import zoo
from helpers import assert_close_to_eager, assert_round_trips


# -- 1. shape guards ----------------------------------------------------------------------------
class BranchOnLength(torch.nn.Module):
    def forward(self, x):
        return x * 2 if x.shape[1] > 4 else x - 1


class EvenLengthReshape(torch.nn.Module):
    def forward(self, x):
        b, t, c = x.shape
        return x.reshape(b, t // 2, 2 * c).sum(-1)


def test_a_call_outside_the_captured_range_raises():
    model = BranchOnLength()
    fast = fxforge.optimize(model, (torch.ones(1, 6, 8),))
    assert "  guard T >= 5" in fast.ir.splitlines()
    for t in (5, 6, 40):
        x = torch.randn(2, t, 8)
        assert torch.equal(fast(x), model(x))
    with pytest.raises(ValueError, match=r"T=3.*T >= 5 does not hold"):
        fast(torch.ones(1, 3, 8))


def test_guards_print_parse_and_typecheck():
    fast = fxforge.optimize(BranchOnLength(), (torch.ones(1, 6, 8),))
    assert_round_trips(fast.graph)
    parsed = fxforge.parse(fast.ir)
    assert [str(g) for g in parsed.guards] == ["T >= 5"]
    fxforge.typecheck(parsed)
    with pytest.raises(fxforge.IRCheckError, match="guard .* names S"):
        fxforge.typecheck(fxforge.parse(fast.ir.replace("guard T >= 5", "guard S >= 5")))
    with pytest.raises(fxforge.ParseError, match="guard"):
        fxforge.parse(fast.ir.replace("guard T >= 5", "guard T + 5"))


def test_relations_beyond_ranges_are_guarded():
    # the reshape needs an even length: export records it as a relation, not a range
    model = EvenLengthReshape()
    fast = fxforge.optimize(model, (torch.ones(1, 6, 8),))
    assert fast.graph.guards
    for t in (2, 4, 10):
        x = torch.randn(3, t, 8)
        assert torch.equal(fast(x), model(x))
    for t in (1, 5):
        with pytest.raises(GuardError, match=f"T={t}"):
            fast(torch.ones(1, t, 8))


def test_a_buffer_slice_bounds_the_length():
    gm, vocab = zoo.nanogpt_traced()  # slices a 64 x 64 mask buffer by the length
    fast = fxforge.optimize(gm, (torch.randint(0, vocab, (2, 7)),))
    assert "T <= 64" in [str(g) for g in fast.graph.guards]
    with pytest.raises(GuardError, match="T=65"):
        fast(torch.randint(0, vocab, (1, 65)))


def test_size_specialization_is_not_a_guard():
    """export records `T >= 2` / `Ne(T, 1)` for every dynamic size; those are not kept, so
    batch 1 and one-token steps run (the zoo's differential tests check their values)."""
    T = symbol("T")
    for rel in (sympy.Ge(T, 2), sympy.Gt(T, 1), sympy.Ne(T, 1), sympy.Ne(T - 1, 0), sympy.Lt(1, T)):
        assert is_size_specialization(rel), rel
    # a condition on another expression of T is the model's (a branch on T % 2, or a slice's
    # size T - 3): kept, and size_one probes the sizes it excludes, dropping it where the
    # model computes the same there
    for rel in (sympy.Ge(T, 5), sympy.Le(T, 64), sympy.Ne(T, 64), sympy.Eq(sympy.Mod(T, 2), 0),
                sympy.Ne(sympy.Mod(T, 2), 0), sympy.Ne(T - 3, 0)):
        assert not is_size_specialization(rel), rel
    model, vocab = zoo.llama("sdpa")
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),))
    assert fast.graph.guards == []


def test_generate_checks_the_guards_of_its_steps_up_front():
    model, vocab = zoo.llama("sdpa")
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),), kv_cache=True)
    fast._guards = GuardChecker([sympy.Ge(symbol("T"), 3)])  # as if the model's code needed T >= 3
    with pytest.raises(GuardError, match="generate\\(\\) steps of 1 new token"):
        fast.generate(torch.randint(0, vocab, (1, 5)), 4)
    assert fast._caches.idle == []  # refused before any work


# -- 2. concurrent and re-entrant generate() ---------------------------------------------------------
@pytest.fixture(scope="module")
def cached_llama():
    model, vocab = zoo.llama("sdpa")
    torch.manual_seed(0)
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),), kv_cache=True)
    prompts = [torch.randint(1, vocab, (1, 5 + 3 * i)) for i in range(4)]
    alone = [fast.generate(p, 12, eos_token_id=None) for p in prompts]
    return fast, prompts, alone


def test_concurrent_generate_gives_the_sequential_tokens(cached_llama):
    fast, prompts, alone = cached_llama
    results = [None] * len(prompts)
    start = threading.Barrier(len(prompts))

    def run(i):
        start.wait()
        results[i] = fast.generate(prompts[i], 12, eos_token_id=None)

    for _ in range(2):
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for got, want in zip(results, alone):
            assert torch.equal(got, want)
    assert len(fast._caches.idle) <= fast._caches.keep  # a burst does not keep every cache


def test_model_call_inside_a_streamer_does_not_change_the_tokens(cached_llama):
    fast, prompts, alone = cached_llama
    seen = []

    def streamer(tokens):
        seen.append(fast(prompts[3]).logits[0, -1].argmax().item())  # a re-entrant call

    assert torch.equal(fast.generate(prompts[0], 12, eos_token_id=None, streamer=streamer), alone[0])
    assert len(seen) == 12 and len(set(seen)) == 1  # the inner call's answer is stable too


# -- 3. static capture -----------------------------------------------------------------------------
class PositionBiasAttention(torch.nn.Module):
    """Causal attention with a learned bias per relative distance (T5/ALiBi-like), built
    from aranges: the folding of those once crashed with static shapes."""

    def __init__(self, dim=32, heads=4, max_dist=64):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)
        self.rel = torch.nn.Embedding(2 * max_dist + 1, heads)
        self.max_dist = max_dist

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        pos = torch.arange(t, device=x.device)
        dist = (pos[None, :] - pos[:, None]).clamp(-self.max_dist, self.max_dist) + self.max_dist
        bias = self.rel(dist).permute(2, 0, 1)[None]
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        bias = bias.masked_fill(~causal, float("-inf"))
        y = torch.softmax(q @ k.transpose(-1, -2) / (c // self.heads) ** 0.5 + bias, -1) @ v
        return self.out(y.transpose(1, 2).reshape(b, t, c))


STATIC_MODELS = {
    "llama_eager": lambda: zoo.llama("eager"),
    "llama_sdpa": lambda: zoo.llama("sdpa"),
    "gpt2_eager": lambda: zoo.gpt2("eager"),
    "gpt2_sdpa": lambda: zoo.gpt2("sdpa"),
    "nanogpt_fx": zoo.nanogpt_traced,
}


@pytest.mark.parametrize("name", STATIC_MODELS)
def test_static_capture_matches_eager(name):
    model, vocab = STATIC_MODELS[name]()
    ids = torch.randint(0, vocab, (2, 7))
    fast = fxforge.optimize(model, (ids,), dynamic=False)
    assert fast.graph.inputs[0].shape == (2, 7)
    with torch.no_grad():
        assert_close_to_eager(model(ids), fast(ids))
    with pytest.raises(ValueError, match="size 7 in dim 1"):
        fast(torch.randint(0, vocab, (2, 8)))


@pytest.mark.parametrize("dynamic", [False, True])
def test_position_bias_attention(dynamic):
    model = PositionBiasAttention().eval()
    x = torch.randn(2, 9, 32)
    fast = fxforge.optimize(model, (x,), dynamic=dynamic)
    with torch.no_grad():
        assert_close_to_eager(model(x), fast(x))
        if dynamic:
            y = torch.randn(1, 20, 32)
            assert_close_to_eager(model(y), fast(y))


@pytest.mark.parametrize("dynamic", [False, True])
def test_alibi_sliced_from_a_fixed_table(dynamic):
    """MPT slices its ALiBi table of max_seq_len rows: its length is `64 - Max(0, 64 - T)`,
    which export's guards say is T. fxforge writes it as T, so the bias broadcasts and the
    attention fuses; T = 64, the whole table, runs as eager does, and the guards refuse
    beyond it."""
    from transformers import MptConfig, MptForCausalLM

    model = MptForCausalLM(MptConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, max_seq_len=64)).eval()
    fast = fxforge.optimize(model, (torch.randint(0, 128, (2, 9)),), dynamic=dynamic)
    assert fast.graph.count("attention") == 2 and fast.graph.count("torch_call") == 0
    for b, t in ([(2, 9)] if not dynamic else [(2, 9), (1, 1), (3, 63), (1, 64)]):
        ids = torch.randint(0, 128, (b, t))
        with torch.no_grad():
            assert_close_to_eager(model(ids), fast(ids))
    if dynamic:
        with pytest.raises(GuardError, match="T=65"):
            fast(torch.randint(0, 128, (1, 65)))


# -- 6. calls made differently from the capture ---------------------------------------------------------
def test_an_argument_captured_by_position_may_be_passed_by_keyword():
    model, vocab = zoo.llama("sdpa")
    ids = torch.randint(0, vocab, (1, 6))
    fast = fxforge.optimize(model, (ids,))
    with torch.no_grad():
        assert_close_to_eager(model(ids), fast(input_ids=ids))
    with pytest.raises(TypeError, match=r"\['attention_mask'\].*1 positional argument\(s\) \(input_ids\)") as err:
        fast(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert "use_cache" not in str(err.value)  # fxforge's own injected argument is not the user's business


def test_generate_limits_are_checked_up_front(cached_llama):
    fast, prompts, _ = cached_llama
    with pytest.raises(ValueError, match="needs a KV cache of .* GiB"):
        fast.generate(prompts[0], 10**15)
    for bad, says in ((True, "must be an int, got bool"), (2.5, "must be an int, got float"), (-1, "must be an int >= 1")):
        with pytest.raises(ValueError, match=f"max_new_tokens {says}"):
            fast.generate(prompts[0], bad)
    # a whole float, as transformers takes it
    assert fast.generate(prompts[0], 2.0).shape[1] == prompts[0].shape[1] + 2
