"""LongRoPE (Phi-3-128k, Phi-3.5, Phi-4-mini): transformers picks the short or the long
rotary factors by max(position_ids) + 1 against original_max_position_embeddings, copies
them into rotary_emb.inv_freq and reads that. fxforge captures it (the buffer is written
before it is read; the long frequencies, cached in an attribute on the first call, are
not left as the trace's fake tensor) and caches it (max of the positions is the newest
token's, which every step holds): forward and generate equal transformers' on both sides
of the switch."""
import warnings

import pytest
import torch

import fxforge
from fxforge.ir.capture import CaptureError

from helpers import assert_close_to_eager

VOCAB, SWITCH = 128, 16


def _phi3(layers: int = 2, **config):
    """A tiny LongRoPE Phi-3 switching to its long factors past SWITCH positions (seeded)."""
    import transformers as tr

    config = tr.Phi3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        rope_scaling={"rope_type": "longrope", "original_max_position_embeddings": SWITCH,
                      "short_factor": [1.0 + 0.1 * i for i in range(8)],
                      "long_factor": [2.0 + 0.5 * i for i in range(8)]}, **config)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tr.Phi3ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def phi3():
    return _phi3()


def test_forward_equals_transformers_on_both_sides_of_the_switch(phi3):
    fast = fxforge.optimize(phi3, (torch.randint(3, VOCAB, (2, 8)),), verbose=False)
    for length in (4, SWITCH, SWITCH + 1, 40):
        ids = torch.randint(3, VOCAB, (2, length))
        with torch.no_grad():
            assert_close_to_eager(phi3(ids), fast(ids))
    # the frequencies differ past the switch, so the check above can tell them apart
    rotary = phi3.model.rotary_emb
    assert not torch.equal(rotary.long_inv_freq, rotary.original_inv_freq)


def test_capture_leaves_no_fake_tensor_in_the_model(phi3):
    """transformers caches long_inv_freq on the rotary module on its first call; one made
    while tracing was a fake tensor, which broke the next trace and eager calls."""
    rotary = phi3.model.rotary_emb
    rotary.__dict__.pop("long_inv_freq", None)
    fxforge.optimize(phi3, (torch.randint(3, VOCAB, (1, 6)),), verbose=False)
    # absent, or a real tensor made by an eager call (never the trace's fake one)
    assert type(vars(rotary).get("long_inv_freq", torch.zeros(()))) is torch.Tensor
    phi3(torch.randint(3, VOCAB, (1, 40)))  # eager still runs past the switch
    assert type(rotary.long_inv_freq) is torch.Tensor


@pytest.mark.parametrize("layout", ["dense", "paged"])
def test_generate_equals_transformers_across_the_switch(phi3, layout):
    """A left-padded batch whose prompt is below the switch and whose generation passes it:
    each step picks the factors as transformers' cached generate does."""
    ids = torch.randint(3, VOCAB, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    kv = True if layout == "dense" else fxforge.KVCacheConfig(layout="paged", block_size=4, num_blocks=64)
    fast = fxforge.optimize(phi3, (ids,), kv_cache=kv, verbose=False)
    out = fast.generate(ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20)
    ref = phi3.generate(ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert torch.equal(out, ref)


class _Overwrites(torch.nn.Module):
    """A buffer written whole before it is read (as LongRoPE's inv_freq)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.ones(4), persistent=False)

    def forward(self, x):
        self.scale.copy_(torch.where(x.sum() > 0, torch.full((4,), 2.0), torch.full((4,), 3.0)))
        return x * self.scale


class _Accumulates(torch.nn.Module):
    """A buffer read before it is written: the next call sees this one's value."""

    def __init__(self):
        super().__init__()
        self.register_buffer("total", torch.zeros(4), persistent=False)

    def forward(self, x):
        self.total.add_(x.sum(0))
        return x + self.total


class _ZeroedThenAccumulates(torch.nn.Module):
    """A buffer zeroed (or filled) at the start of each call, then added to: its value
    before the call is never read."""

    def __init__(self, fill: bool):
        super().__init__()
        self.fill = fill
        self.register_buffer("total", torch.full((4,), float("nan")), persistent=False)

    def forward(self, x):
        self.total.fill_(1.5) if self.fill else self.total.zero_()
        self.total.add_(x.sum(0))
        return x + self.total


@pytest.mark.parametrize("fill", [False, True], ids=["zero_", "fill_"])
def test_a_buffer_zeroed_or_filled_before_it_is_accumulated_is_captured(fill):
    model = _ZeroedThenAccumulates(fill)
    fast = fxforge.optimize(model, (torch.randn(3, 4),), verbose=False)
    for rows in (1, 3, 5):
        y = torch.randn(rows, 4)
        torch.testing.assert_close(fast(y), model(y))


def test_a_buffer_written_before_it_is_read_is_captured_and_one_read_first_is_refused():
    model = _Overwrites()
    x = torch.randn(3, 4)
    fast = fxforge.optimize(model, (x,), verbose=False)
    for rows in (1, 3, 5):
        y = torch.randn(rows, 4)
        torch.testing.assert_close(fast(y), model(y))
    with pytest.raises(CaptureError, match="mutates total inside forward"):
        fxforge.optimize(_Accumulates(), (x,), verbose=False)


def test_generate_refuses_to_cross_where_transformers_prefills_again():
    """With config.original_max_position_embeddings = N (as Phi-3-128k's config has it),
    transformers' generate drops its cache once the sequence passes N and recomputes it
    with the long factors; a KV cache holds keys rotated with the short ones: refused up
    front. A prompt longer than N is prefilled at once with the long factors: served."""
    model = _phi3(layers=1, original_max_position_embeddings=SWITCH)
    fast = fxforge.optimize(model, (torch.randint(3, VOCAB, (1, 8)),), kv_cache=True, verbose=False)
    with pytest.raises(ValueError, match=f"original_max_position_embeddings={SWITCH}.*drops its cache"):
        fast.generate(torch.randint(3, VOCAB, (1, 10)), max_new_tokens=10)
    fast.generate(torch.randint(3, VOCAB, (1, 10)), max_new_tokens=SWITCH - 10 + 1)  # up to N: served
    ids = torch.randint(3, VOCAB, (1, SWITCH + 4))
    ref = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(fast.generate(ids, max_new_tokens=8, min_new_tokens=8), ref)
