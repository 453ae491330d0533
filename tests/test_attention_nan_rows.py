"""A softmax-spelled attention whose additive bias comes from the inputs: eager's softmax is
NaN on a row the bias drops whole (every key -inf) or that holds +inf or NaN, where the fused
op gives 0 (SDPA's rule for a row with no key). The fusion stays, followed by NaN on exactly
those rows; a bias provably finite on any input (transformers' where(mask, 0, finfo.min))
gets no extra op."""
import math

import pytest
import torch
import torch.nn as nn

import fxforge

import zoo

NEG_INF = float("-inf")
F32_MIN = torch.finfo(torch.float32).min


def _scores(q, k):
    return q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])


class FloatMask(nn.Module):
    """A user's additive float mask [B, 1, 1, T] (holding -inf, +inf or NaN on some call)."""

    def forward(self, q, k, v, mask):
        return (_scores(q, k) + mask).softmax(-1) @ v


# an int padding mask [B, T] (1 = keep) made an additive bias inside the model
BIAS_FROM_PADDING = {
    "where_neg_inf": lambda m: torch.where(m.bool(), 0.0, NEG_INF),
    "masked_fill_neg_inf": lambda m: torch.zeros(m.shape).masked_fill(m == 0, NEG_INF),
    "log": lambda m: torch.log(m.float()),
    "times_huge": lambda m: (1.0 - m.float()) * -1e38 * 1e38,
    # finite for 0/1, but an int mask may hold anything: 3 makes (1 - 3) * min = +inf
    "int_times_finfo_min": lambda m: (1.0 - m.float()) * F32_MIN,
}


class PaddingBias(nn.Module):
    def __init__(self, spell, layers=1):
        super().__init__()
        self.spell, self.layers = spell, layers

    def forward(self, q, k, v, mask):  # q, k, v: [B, T, H, D]
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        bias = BIAS_FROM_PADDING[self.spell](mask)[:, None, None, :]
        for _ in range(self.layers):  # (every layer reads the same mask)
            q = (_scores(q, k) + bias).softmax(-1) @ v
        return q


def _ir_count(fast, word: str) -> int:
    return sum(word in line for line in fast.ir.splitlines())


def _qkv(*shape):
    return tuple(torch.randn(*shape) for _ in range(3))


@pytest.mark.parametrize("spell", sorted(BIAS_FROM_PADDING))
def test_bias_from_a_padding_mask_gives_eagers_nan_rows(spell):
    torch.manual_seed(0)
    q, k, v = _qkv(2, 5, 2, 8)
    mask = torch.ones(2, 5, dtype=torch.long)
    model = PaddingBias(spell).eval()
    fast = fxforge.optimize(model, (q, k, v, mask))
    assert fast.graph.count("attention") == 1  # still fused
    mask[1] = 3 if spell == "int_times_finfo_min" else 0  # batch row 1 drops every key
    ref = model(q, k, v, mask)
    assert ref[1].isnan().all() and not ref[0].isnan().any()
    torch.testing.assert_close(fast(q, k, v, mask), ref, equal_nan=True)
    mask[1] = 1
    mask[1, :2] = 0  # and rows that keep some keys are still exact
    torch.testing.assert_close(fast(q, k, v, mask), model(q, k, v, mask))


@pytest.mark.parametrize("value", [NEG_INF, math.inf, math.nan])
def test_a_float_mask_input_with_a_row_eager_makes_nan(value):
    torch.manual_seed(0)
    q, k, v = _qkv(2, 4, 6, 8)
    mask = torch.zeros(2, 1, 1, 6)
    model = FloatMask().eval()
    fast = fxforge.optimize(model, (q, k, v, mask))
    assert fast.graph.count("attention") == 1
    if value == NEG_INF:
        mask[1] = NEG_INF  # every key of batch row 1
    else:
        mask[1, 0, 0, 2] = value  # one key: softmax is NaN on the whole row
    mask[0, 0, 0, :3] = NEG_INF  # (a row with some keys left stays finite)
    ref = model(q, k, v, mask)
    assert ref[1].isnan().all() and not ref[0].isnan().any()
    torch.testing.assert_close(fast(q, k, v, mask), ref, equal_nan=True)


class FoldedHeads(nn.Module):
    """Heads folded into the batch: bmm on [B*H, T, D] with a [B*H, 1, T] mask."""

    def forward(self, q, k, v, mask):
        return torch.bmm((torch.bmm(q, k.transpose(1, 2)) * 0.25 + mask).softmax(-1), v)


class UnfoldedForTheMask(nn.Module):
    """XGLM's: [B*H] scores viewed to [B, H, Tq, Tk] for a [B, 1, Tq, Tk] mask, then back."""

    def forward(self, q, k, v, mask):  # q, k, v: [B, H, T, D]
        b, h, t, d = q.shape
        q, k, v = (x.reshape(b * h, t, d) for x in (q, k, v))
        s = torch.bmm(q, k.transpose(1, 2)).view(b, h, t, t) + mask
        return torch.bmm(s.view(b * h, t, t).softmax(-1), v).view(b, h, t, d)


@pytest.mark.parametrize("model, mask_shape", [(FoldedHeads(), (4, 1, 5)), (UnfoldedForTheMask(), (2, 1, 5, 5))])
def test_heads_folded_into_the_batch(model, mask_shape):
    torch.manual_seed(0)
    q, k, v = _qkv(4, 5, 8) if len(mask_shape) == 3 else _qkv(2, 2, 5, 8)
    mask = torch.zeros(*mask_shape)
    fast = fxforge.optimize(model.eval(), (q, k, v, mask), dynamic=False)  # (sizes that export keeps apart)
    assert fast.graph.count("attention") == 1
    if mask.dim() == 3:
        mask[1] = NEG_INF  # every query of folded row 1 (one batch row's head)
    else:
        mask[1, 0, 3] = NEG_INF  # query 3 of batch row 1, in every head
    ref = model(q, k, v, mask)
    assert ref.isnan().any() and not ref.isnan().all()
    torch.testing.assert_close(fast(q, k, v, mask), ref, equal_nan=True)


def test_layers_sharing_a_mask_test_its_rows_once():
    torch.manual_seed(0)
    q, k, v = _qkv(2, 5, 2, 8)
    mask = torch.ones(2, 5, dtype=torch.long)
    model = PaddingBias("where_neg_inf", layers=3).eval()
    fast = fxforge.optimize(model, (q, k, v, mask))
    assert fast.graph.count("attention") == 3
    assert _ir_count(fast, "amax") == 1  # one row test for the three layers
    mask[0, 1:] = 0
    mask[1] = 0
    torch.testing.assert_close(fast(q, k, v, mask), model(q, k, v, mask), equal_nan=True)


class FillOverBias(nn.Module):
    """(s + bias).masked_fill(m, finfo.min): the fill keeps a key the -inf bias dropped, so a
    row whose bias is all -inf is finite in eager when the fill covers some of it."""

    def forward(self, q, k, v, bias, keep):
        s = (_scores(q, k) + bias).masked_fill(keep[:, None, None, :] == 0, F32_MIN)
        return s.softmax(-1) @ v


def test_a_fill_over_a_non_finite_bias_fuses_with_eager_rows():
    """The bias holds the fill in place of what it covers, so its row max says which rows
    eager makes NaN: fused, and equal to eager with every row kind in one call."""
    torch.manual_seed(0)
    q, k, v = _qkv(4, 2, 4, 8)
    bias, keep = torch.zeros(4, 1, 1, 4), torch.ones(4, 4, dtype=torch.long)
    model = FillOverBias().eval()
    fast = fxforge.optimize(model, (q, k, v, bias, keep))
    assert fast.graph.count("attention") == 1
    bias[1] = NEG_INF
    keep[1, :2] = 0      # the fill keeps two keys the -inf bias dropped: finite in eager
    bias[2] = NEG_INF    # nothing filled: every key -inf, NaN in eager
    keep[3] = 0          # every key filled: uniform over the keys in eager
    ref = model(q, k, v, bias, keep)
    assert ref[2].isnan().all() and not ref[[0, 1, 3]].isnan().any()
    torch.testing.assert_close(fast(q, k, v, bias, keep), ref, equal_nan=True)


@pytest.mark.parametrize("spell", [
    lambda m: torch.where(m.bool(), 0.0, F32_MIN),
    lambda m: (1.0 - m.bool().float()) * F32_MIN,  # 0/1 times min: finite
    # |int64| * 1e10 < 1e29: min minus that rounds back to min (float32's half ulp there is 1e31)
    lambda m: torch.zeros(m.shape).masked_fill(m == 0, F32_MIN) + m.float() * 1e10,
])
def test_a_provably_finite_bias_gets_no_extra_op(spell):
    class Model(nn.Module):
        def forward(self, q, k, v, mask):
            return (_scores(q, k) + spell(mask)[:, None, None, :]).softmax(-1) @ v

    torch.manual_seed(0)
    q, k, v = _qkv(2, 2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.long)
    fast = fxforge.optimize(Model().eval(), (q, k, v, mask))
    assert fast.graph.count("attention") == 1
    assert _ir_count(fast, "amax") == 0 and "value=nan" not in fast.ir


def _tiny_llama(attn):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attn_implementation=attn)
    return LlamaForCausalLM(cfg).eval()


def test_llama_eager_with_a_4d_float_mask_holding_a_row_of_neg_inf():
    model = _tiny_llama("eager")
    ids = torch.randint(1, 128, (2, 6))
    mask = torch.full((6, 6), NEG_INF).triu(1).expand(2, 1, 6, 6).clone()
    fast = fxforge.optimize(model, example_kwargs=dict(input_ids=ids, attention_mask=mask))
    assert fast.graph.count("attention") == 1
    mask[1, 0, 3, :] = NEG_INF  # query 3 of row 1 sees no key
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    assert ref[1, 3].isnan().all() and ref.isnan().sum() == ref.shape[-1]
    torch.testing.assert_close(fast(input_ids=ids, attention_mask=mask).logits, ref, equal_nan=True)


@pytest.mark.parametrize("which", ["llama_eager", "llama_sdpa", "gpt2_eager", "gpt2_sdpa"])
def test_transformers_2d_attention_mask_gets_no_extra_op(which):
    """transformers turns a 2-D attention_mask into where(mask, 0, finfo.min): finite, so
    the fused graph is what it was (no row test)."""
    name, attn = which.split("_")
    model = _tiny_llama(attn) if name == "llama" else zoo.gpt2(attn, n_layer=1)[0]
    ids = torch.randint(1, 100, (2, 6))
    am = torch.ones(2, 6, dtype=torch.long)
    am[1, :2] = 0
    fast = fxforge.optimize(model, example_kwargs=dict(input_ids=ids, attention_mask=am))
    assert fast.graph.count("attention") == 1
    assert _ir_count(fast, "amax") == 0 and "value=nan" not in fast.ir
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=am).logits
    torch.testing.assert_close(fast(input_ids=ids, attention_mask=am).logits, ref, rtol=1e-4, atol=1e-4)


class _Float64Masked(nn.Module):
    def forward(self, q, k, v, mask):
        return (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + mask).softmax(-1) @ v


def test_a_float64_bias_is_added_in_float64():
    """The bias was built in float32: -1e300 (finite in float64) became -inf, and the row's
    answer NaN; an ordinary float64 mask lost its last digits (5e-7)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 8, dtype=torch.float64) for _ in range(3))
    model = _Float64Masked().eval()
    fast = fxforge.optimize(model, (q, k, v, torch.zeros(2, 1, 1, 5, dtype=torch.float64)), verbose=False)
    huge = torch.zeros(2, 1, 1, 5, dtype=torch.float64)
    huge[1] = -1e300
    for mask in (huge, torch.randn(2, 1, 1, 5, dtype=torch.float64) * 10):
        torch.testing.assert_close(fast(q, k, v, mask), model(q, k, v, mask), rtol=1e-12, atol=1e-12)
