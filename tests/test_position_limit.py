"""A request feeds its prompt and every new token but the last (which is returned, never
fed back), so a model with a position table of N rows generates up to N + 1 tokens, as
transformers does: GPT-2 with n_positions=16 gives a 10-token prompt 7 new tokens. Every
path fxforge runs (greedy, sampling, beam search, speculative decoding with either draft,
the dense and the paged engine) goes exactly to the last position, and one token more is
a clear ValueError that does not suggest a larger KV cache the position table cannot
give."""
import pytest
import torch

import fxforge
from fxforge.passes.kv_cache import KVCacheConfig

transformers = pytest.importorskip("transformers")

POSITIONS, PROMPT, NEW = 16, 10, 7  # 10 + 7 = 17 tokens, positions 0..15 fed
VOCAB = 100
TOO_MANY = r"fed 17 positions .*more than max_seq_len=16"
TABLE = "the model's position table has 16 rows"


def _model():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=32, n_layer=2, n_head=2,
                                  bos_token_id=1, eos_token_id=1)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def gpt2():
    model = _model()
    ids = torch.randint(3, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    fast = fxforge.optimize(model, (ids,), kv_cache=True, verbose=False)
    assert fast.kv_layout.max_seq_len == POSITIONS
    return model, fast, ids


@pytest.fixture(scope="module")
def paged(gpt2):
    model, _, ids = gpt2
    return fxforge.optimize(model, (ids,), kv_cache=KVCacheConfig(layout="paged", block_size=4), verbose=False)


def _reference(model, ids, new, **settings):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new, eos_token_id=None, pad_token_id=0, **settings)


def _refused(call):
    """One token past the last position: a ValueError naming the position table, with no
    advice to optimize with a larger KVCacheConfig(max_seq_len) (the table has no more rows)."""
    with pytest.raises(ValueError) as info:
        call()
    assert "KVCacheConfig" not in str(info.value), str(info.value)
    return str(info.value)


def test_greedy_reaches_the_last_position(gpt2):
    model, fast, ids = gpt2
    expected = _reference(model, ids, NEW, do_sample=False)
    assert expected.shape == (1, PROMPT + NEW)
    assert torch.equal(fast.generate(ids, NEW, eos_token_id=None), expected)
    message = _refused(lambda: fast.generate(ids, NEW + 1, eos_token_id=None))
    assert "ask for at most max_new_tokens=7" in message and TABLE in message
    assert "fed 17 positions" in message and "max_seq_len=16" in message


def test_max_length_reaches_the_last_position(gpt2):
    model, fast, ids = gpt2
    with torch.no_grad():
        expected = model.generate(ids, max_length=PROMPT + NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(fast.generate(ids, max_length=PROMPT + NEW, eos_token_id=None), expected)
    message = _refused(lambda: fast.generate(ids, max_length=PROMPT + NEW + 1, eos_token_id=None))
    assert "max_length=18 (the prompt's 10 tokens included)" in message
    assert "use at most max_length=17" in message and TABLE in message


def test_a_full_prompt_gets_one_token(gpt2):
    model, fast, _ = gpt2
    ids = torch.randint(3, VOCAB, (1, POSITIONS), generator=torch.Generator().manual_seed(2))
    assert torch.equal(fast.generate(ids, 1, eos_token_id=None), _reference(model, ids, 1, do_sample=False))
    longer = torch.randint(3, VOCAB, (1, POSITIONS + 1), generator=torch.Generator().manual_seed(2))
    assert "shorten the prompt to at most 16 tokens" in _refused(lambda: fast.generate(longer, 1, eos_token_id=None))


def test_sampling_reaches_the_last_position(gpt2):
    model, fast, ids = gpt2
    settings = dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, eos_token_id=None)
    first = fast.generate(ids, NEW, generator=torch.Generator().manual_seed(3), **settings)
    again = fast.generate(ids, NEW, generator=torch.Generator().manual_seed(3), **settings)
    assert first.shape == (1, PROMPT + NEW) and torch.equal(first, again)
    # each sampled token is drawn from the model's distribution after the tokens before it:
    # transformers' logits at every position of the sampled sequence give the same draws
    with torch.no_grad():
        logits = model(first[:, :-1]).logits[0, PROMPT - 1:].float()
    draws = torch.Generator().manual_seed(3)
    replay = [int(torch.multinomial(row.softmax(-1)[None], 1, generator=draws)) for row in logits]
    assert replay == first[0, PROMPT:].tolist()
    _refused(lambda: fast.generate(ids, NEW + 1, generator=torch.Generator().manual_seed(3), **settings))


def test_beam_search_reaches_the_last_position(gpt2):
    model, fast, ids = gpt2
    expected = _reference(model, ids, NEW, num_beams=2, do_sample=False)
    assert torch.equal(fast.generate(ids, NEW, num_beams=2, eos_token_id=None), expected)
    message = _refused(lambda: fast.generate(ids, NEW + 1, num_beams=2, eos_token_id=None))
    assert "ask for at most max_new_tokens=7" in message


def test_paged_generate_reaches_the_last_position(gpt2, paged):
    model, _, ids = gpt2
    expected = _reference(model, ids, NEW, do_sample=False)
    # a paged cache's rows get blocks for the positions fed (4 blocks of 4), none for the last token
    assert torch.equal(paged.generate(ids, NEW, eos_token_id=None), expected)
    assert torch.equal(paged.generate(ids, NEW, draft="ngram", eos_token_id=None), expected)
    assert torch.equal(paged.generate(ids, NEW, num_beams=2, eos_token_id=None),
                       _reference(model, ids, NEW, num_beams=2, do_sample=False))
    _refused(lambda: paged.generate(ids, NEW + 1, eos_token_id=None))


def test_a_shorter_cache_than_the_table_suggests_a_larger_one(gpt2):
    model, _, ids = gpt2
    fast = fxforge.optimize(model, (ids,), kv_cache=KVCacheConfig(max_seq_len=12), verbose=False)
    assert torch.equal(fast.generate(ids, 3, eos_token_id=None), _reference(model, ids, 3, do_sample=False))
    with pytest.raises(ValueError, match=r"fed 13 positions.*at most max_new_tokens=3, or optimize with a larger "
                                         r"KVCacheConfig\(max_seq_len=\.\.\.\) \(at most 16"):
        fast.generate(ids, 4, eos_token_id=None)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_ngram_speculation_reaches_the_last_position(gpt2, k):
    model, fast, ids = gpt2
    expected = _reference(model, ids, NEW, do_sample=False)
    assert torch.equal(fast.generate(ids, NEW, draft="ngram", num_draft_tokens=k, eos_token_id=None), expected)
    _refused(lambda: fast.generate(ids, NEW + 1, draft="ngram", num_draft_tokens=k, eos_token_id=None))


def test_model_draft_reaches_the_last_position(gpt2):
    """The draft is fed at most prompt + new tokens - 2 positions (it never runs on the
    model's last fed position): a draft of 15 positions serves a 10 + 7 request."""
    model, fast, ids = gpt2
    draft = fxforge.optimize(model, (ids,), kv_cache=KVCacheConfig(max_seq_len=POSITIONS - 1), verbose=False)
    expected = _reference(model, ids, NEW, do_sample=False)
    for k in (1, 2, 4, 8):
        assert torch.equal(fast.generate(ids, NEW, draft=draft, num_draft_tokens=k, eos_token_id=None), expected)
    _refused(lambda: fast.generate(ids, NEW + 1, draft=draft, num_draft_tokens=4, eos_token_id=None))
    # a draft one position shorter than that is refused by name, before any work
    with pytest.raises(ValueError, match="draft is fed 15 positions, more than the draft model's max_seq_len=14"):
        short = fxforge.optimize(model, (ids,), kv_cache=KVCacheConfig(max_seq_len=POSITIONS - 2), verbose=False)
        fast.generate(ids, NEW, draft=short, num_draft_tokens=4, eos_token_id=None)


def test_a_guard_on_the_length_is_checked_at_the_positions_fed_only(gpt2):
    """A graph guard on the sequence's length (L + T once cached: MPT's ALiBi slice has one)
    is checked before any work for every step a request runs, and only for those: a
    verification step never feeds past the last position, nor a draft step past the one
    before it."""
    model, fast, ids = gpt2
    guarded = fxforge.load_ir(fast.ir.replace("  signature", "  guard L + T <= 16\n  signature"), fast.graph.params)
    expected = _reference(model, ids, NEW, do_sample=False)
    assert torch.equal(guarded.generate(ids, NEW, eos_token_id=None), expected)
    for k in (1, 4, 8):
        assert torch.equal(guarded.generate(ids, NEW, draft="ngram", num_draft_tokens=k, eos_token_id=None), expected)
        assert torch.equal(guarded.generate(ids, NEW, draft=guarded, num_draft_tokens=k, eos_token_id=None), expected)
    with fxforge.Engine(guarded, max_batch=2) as engine:
        assert engine.generate_many([ids[0]], NEW, eos_token_id=None)[0].tolist() == expected[0, PROMPT:].tolist()



def _engine_prompts(ids):
    # 10 + 7 and 9 + 8: both end on position 15
    return [(ids[0], NEW), (ids[0, 1:], NEW + 1)]


def test_engine_reaches_the_last_position(gpt2):
    _, fast, ids = gpt2
    with fxforge.Engine(fast, max_batch=2) as engine:
        assert engine.capacity == POSITIONS
        for prompt, new in _engine_prompts(ids):
            alone = fast.generate(prompt[None], new, eos_token_id=None)[0, prompt.numel():]
            assert torch.equal(engine.generate_many([prompt], new, eos_token_id=None)[0], alone)
        # both at once: the second waits for room (its 8 new tokens from position 10 do not fit beside the first)
        requests = [engine.submit(p, n, eos_token_id=None) for p, n in _engine_prompts(ids)]
        engine.run()
        assert [r.result().tolist() for r in requests] == \
            [fast.generate(p[None], n, eos_token_id=None)[0, p.numel():].tolist() for p, n in _engine_prompts(ids)]
        message = _refused(lambda: engine.submit(ids[0], NEW + 1, eos_token_id=None))
        assert "needs 17 positions" in message and "position table" in message


def test_engine_requests_of_mixed_lengths_reach_the_last_position(gpt2):
    _, fast, ids = gpt2
    prompts = [ids[0], ids[0, 2:], ids[0, 4:]]  # 10 + 7, 8 + 9, 6 + 11 new tokens
    news = [NEW, NEW + 2, NEW + 4]
    alone = [fast.generate(p[None], n, eos_token_id=None)[0, p.numel():] for p, n in zip(prompts, news)]
    with fxforge.Engine(fast, max_batch=3) as engine:
        requests = [engine.submit(p, n, eos_token_id=None) for p, n in zip(prompts, news)]
        engine.run()
        assert [r.result().tolist() for r in requests] == [a.tolist() for a in alone]


def test_paged_engine_reaches_the_last_position(gpt2, paged):
    _, fast, ids = gpt2
    prompts = [ids[0], ids[0, 2:], ids[0, 4:]]
    news = [NEW, NEW + 2, NEW + 4]
    alone = [fast.generate(p[None], n, eos_token_id=None)[0, p.numel():] for p, n in zip(prompts, news)]
    # a pool of exactly one request's 16 positions (4 blocks of 4): they run one after another
    with fxforge.Engine(paged, max_batch=2, num_blocks=POSITIONS // 4) as engine:
        assert [o.tolist() for o in engine.generate_many(prompts[:1], NEW, eos_token_id=None)] == [alone[0].tolist()]
        requests = [engine.submit(p, n, eos_token_id=None) for p, n in zip(prompts, news)]
        engine.run()
        assert [r.result().tolist() for r in requests] == [a.tolist() for a in alone]
        message = _refused(lambda: engine.submit(ids[0], NEW + 1, eos_token_id=None))
        assert "needs 17 positions" in message
