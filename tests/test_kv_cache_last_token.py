"""Models whose head reads only the last token (nanoGPT's inference path,
`self.lm_head(x[:, [-1], :])`, and its spellings x[:, -1:], x[:, -1], narrow) are cached:
the last new token is the sequence's last, so the pick means the same with a cache. The
logits are then the last token's alone: generate() and the engines serve them, speculative
decoding (which needs every new token's) refuses the model by name, and picks of any other
position stay refused."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxforge
import zoo
from fxforge.passes.kv_cache import KVCacheError

VOCAB = 96


class HeadOnLast(zoo.NanoGPT):
    """nanoGPT's forward(idx, targets=None): the full logits and the loss with targets, the
    last token's logits alone without (`pick` spells how it takes the last token)."""

    def __init__(self, pick: str):
        super().__init__(vocab=VOCAB)
        self.pick = pick

    def forward(self, idx, targets=None):
        pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        x = self.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        picks = {"index": lambda: x[:, [-1], :], "slice": lambda: x[:, -1:, :], "select": lambda: x[:, -1, :],
                 "narrow": lambda: x.narrow(1, idx.size(1) - 1, 1), "first": lambda: x[:, [0], :],
                 "second_last": lambda: x[:, [-2], :], "first_select": lambda: x[:, 0],
                 # picks of the last token whose value goes back to every token
                 "back_to_tokens": lambda: x + x[:, -1:], "last_id": lambda: x + self.wte(idx[:, -1:])}
        if self.pick == "expanded":
            return self.lm_head(x[:, -1:]).expand(idx.shape[0], idx.shape[1], VOCAB), None
        return self.lm_head(picks[self.pick]()), None


def _model(pick: str) -> HeadOnLast:
    torch.manual_seed(0)
    return HeadOnLast(pick).eval()


def _eager_greedy(model, ids, n: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(ids)
            ids = torch.cat([ids, logits.reshape(ids.shape[0], -1, VOCAB)[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


@pytest.fixture(scope="module")
def nano_index():
    model = _model("index")
    return model, fxforge.optimize(model, (torch.randint(0, VOCAB, (1, 8)),), kv_cache=True)


@pytest.mark.parametrize("pick", ["index", "slice", "select", "narrow"])
def test_last_token_heads_are_cached_and_generate_as_eager(pick, nano_index):
    model, fast = nano_index if pick == "index" else (
        _model(pick), fxforge.optimize(_model(pick), (torch.randint(0, VOCAB, (1, 8)),), kv_cache=True))
    assert fast.kv_layout is not None and not fast.logits_per_token
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    # a plain call is eager's: the last token's logits, in the shape eager gives them
    with torch.no_grad():
        ref, _ = model(ids)
    out, none = fast(ids)
    assert none is None and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(fast.generate(ids, 10), _eager_greedy(model, ids, 10))


@pytest.mark.parametrize("layout", ["dense", "paged"])
def test_the_engine_serves_a_last_token_head(layout, nano_index):
    # rows of different lengths share its steps: nanoGPT's positions (wpe(arange(T))) are per row
    model, fast = nano_index
    if layout == "paged":
        fast = fxforge.optimize(model, (torch.randint(0, VOCAB, (1, 8)),),
                                kv_cache=fxforge.KVCacheConfig(layout="paged", block_size=4))
    assert fast.kv_layout.per_row_positions
    prompts = [torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(n)) for n in (3, 9, 5)]
    engine = fxforge.Engine(fast, max_batch=2, max_seq_len=48, prefill_chunk=4,
                            **({"num_blocks": 40} if layout == "paged" else {}))
    outs = engine.generate_many(prompts, max_new_tokens=7)
    for p, out in zip(prompts, outs):
        assert torch.equal(out, _eager_greedy(model, p[None], 7)[0, p.numel():])


def test_speculation_refuses_a_last_token_target_and_takes_it_as_draft(nano_index):
    model, fast = nano_index
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="returns only the last token's.*lm_head\\(x\\)"):
        fast.generate(ids, 5, draft="ngram")
    # the same weights with every token's logits as the target; the last-token model drafts
    full = zoo.NanoGPT(vocab=VOCAB).eval()
    full.load_state_dict({k: v for k, v in model.state_dict().items()})
    target = fxforge.optimize(full, (torch.randint(0, VOCAB, (1, 8)),), kv_cache=True)
    assert target.logits_per_token
    plain = target.generate(ids, 9)
    assert torch.equal(plain, _eager_greedy(model, ids, 9))
    assert torch.equal(target.generate(ids, 9, draft=fast, num_draft_tokens=3), plain)


@pytest.mark.parametrize("pick", ["first", "second_last", "first_select", "back_to_tokens", "last_id", "expanded"])
def test_picks_of_other_positions_stay_refused(pick):
    # with a cache the step's first token is not the sequence's first, nor its second-to-last
    # one the sequence's when the step has one token; and a last-token pick read back by
    # every token (x + x[:, -1:], the last id's embedding added everywhere, a head expanded
    # over T) would give each earlier token the step's last token, not the sequence's
    with pytest.raises(KVCacheError, match="moves values along the sequence"):
        fxforge.optimize(_model(pick), (torch.randint(0, VOCAB, (1, 8)),), kv_cache=True)


def test_a_causal_buffer_shorter_than_the_proof_sizes_bounds_the_cache():
    # nanoGPT's manual attention slices a [bs, bs] tril buffer by T (a guard T <= bs): with
    # bs = 32 the mask could not be evaluated at the proof's sizes and was refused as "not
    # plain causal" unless KVCacheConfig(max_seq_len=32) was given; the guard now bounds it
    torch.manual_seed(0)
    model = zoo.NanoGPT(vocab=VOCAB, block_size=32).eval()
    fast = fxforge.optimize(model, (torch.randint(0, VOCAB, (1, 8)),), kv_cache=True)
    assert fast.kv_layout.max_seq_len == 32
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        seq = ids
        for _ in range(10):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(fast.generate(ids, 10), seq)
    with pytest.raises(ValueError, match="32"):
        fast.generate(ids, 40)


class _BufferOnly(torch.nn.Module):
    """A [16, 16] causal buffer sliced by T and no position table: the guard T <= 16 is the
    model's only length limit."""

    def __init__(self):
        super().__init__()
        self.wte, self.qkv, self.head = nn.Embedding(VOCAB, 32), nn.Linear(32, 96), nn.Linear(32, VOCAB)
        self.register_buffer("tril", torch.tril(torch.ones(16, 16)))

    def forward(self, idx):
        b, t = idx.shape
        q, k, v = (z.view(b, t, 4, 8).transpose(1, 2) for z in self.qkv(self.wte(idx)).split(32, 2))
        att = ((q @ k.transpose(-2, -1)) * 8 ** -0.5).masked_fill(self.tril[:t, :t] == 0, float("-inf"))
        return self.head((att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, 32))


def test_the_paged_engine_checks_the_models_length_guard_before_any_work():
    torch.manual_seed(0)
    fast = fxforge.optimize(_BufferOnly().eval(), (torch.randint(0, VOCAB, (1, 8)),),
                            kv_cache=fxforge.KVCacheConfig(layout="paged", block_size=4))
    engine = fxforge.Engine(fast, max_batch=2, max_seq_len=48, num_blocks=40)
    # 10 + 12 tokens feed 21 positions: past the guard L + T <= 16 (it generated 22 before)
    with pytest.raises(fxforge.ir.guards.GuardError, match=r"L \+ T <= 16"):
        engine.submit(torch.randint(0, VOCAB, (10,)), max_new_tokens=12)
    assert engine.generate_many([torch.randint(0, VOCAB, (10,))], max_new_tokens=6)[0].numel() == 6
