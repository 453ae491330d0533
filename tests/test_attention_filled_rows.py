"""A row whose every key the model fills (a padding query, a batch row of padding): eager's
softmax of the filled scores is uniform over the keys holding the largest fill, whatever
the scores. The fused op adds its bias to the scores, so the bias holds each fill as a
number that swamps them (fuse_attention's SWAMP): without it a fill that does not swamp
them in the op's dtype (-1e9 in float64, -1e5 in float32, float16's min) gave softmax of
the scores there, overlapping fills summed to -inf (NaN), and a causal fill under a padding
fill dropped the future padding keys eager keeps."""
import math

import pytest
import torch
import torch.nn as nn

import fxforge

# batch 0: no padding; batch 1: two keys of left padding (its first two queries see only
# padding); batch 2: all padding
KEEP = torch.tensor([[1] * 5, [0, 0, 1, 1, 1], [0] * 5])


def _fill_value(fill, dtype):
    return torch.finfo(dtype).min if fill == "min" else fill


class PaddedAttention(nn.Module):
    """Scores filled where `keep` is 0, spelled in the ways hand-written models do."""

    def __init__(self, fill, spelling: str):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.fill, self.spelling = fill, spelling

    def forward(self, x, keep):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 2, 8).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-1, -2) / math.sqrt(8)
        fill = _fill_value(self.fill, s.dtype)
        pad_key = ~keep[:, None, None, :].bool()
        future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        if self.spelling == "pad":
            s = s.masked_fill(pad_key, fill)
        elif self.spelling == "pad_key_and_query":  # two fills of one value, overlapping
            s = s.masked_fill(pad_key, fill).masked_fill(~keep[:, None, :, None].bool(), fill)
        elif self.spelling == "causal_then_pad":  # the padding fill last: future padding keys hold it
            s = s.masked_fill(future, float("-inf")).masked_fill(pad_key, fill)
        elif self.spelling == "pad_then_causal":
            s = s.masked_fill(pad_key, fill).masked_fill(future, float("-inf"))
        elif self.spelling == "where":
            s = torch.where(pad_key, torch.tensor(fill, dtype=s.dtype), s)
        return (s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, 16)


TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}
CASES = [(torch.float64, -1e9), (torch.float32, -1e5), (torch.float32, "min"), (torch.float16, "min"),
         (torch.bfloat16, -1e9)]


def _model(fill, spelling, dtype):
    torch.manual_seed(0)
    model = PaddedAttention(fill, spelling).eval()
    model.qkv.weight.data *= 4  # scores of a few units: what a trained model has, not swamped by -1e5
    return model.to(dtype), torch.randn(3, 5, 16).to(dtype)


@pytest.mark.parametrize("spelling", ["pad", "pad_key_and_query", "causal_then_pad", "pad_then_causal", "where"])
@pytest.mark.parametrize("dtype,fill", CASES, ids=[f"{d}-{f}".replace("torch.", "") for d, f in CASES])
def test_fully_filled_rows_match_eager(spelling, dtype, fill):
    model, x = _model(fill, spelling, dtype)
    fast = fxforge.optimize(model, (x, KEEP), verbose=False)
    assert fast.graph.count("attention") == 1
    ref = model(x, KEEP)
    assert not ref.isnan().any()
    tol = TOL[dtype]
    torch.testing.assert_close(fast(x, KEEP), ref, atol=tol, rtol=tol)


def test_fully_filled_rows_match_eager_in_the_triton_kernels():
    model, x = _model(-1e5, "causal_then_pad", torch.float32)
    fast = fxforge.optimize(model, (x, KEEP), backend="interpret", verbose=False)
    assert fast.graph.count("attention") == 1
    torch.testing.assert_close(fast(x, KEEP), model(x, KEEP), atol=1e-5, rtol=1e-5)


class TwoLevels(nn.Module):
    """Padding filled with -1e9, then the future with a fill `gap` above it: on a row of
    padding eager's softmax puts weight on the larger fill only when the gap is wide."""

    def __init__(self, gap: float):
        super().__init__()
        self.gap = gap

    def forward(self, q, k, v, keep):
        t = q.shape[-2]
        future = torch.ones(t, t, dtype=torch.bool).triu(1)
        s = (q @ k.transpose(-1, -2)).masked_fill(~keep[:, None, None, :].bool(), -1e9)
        return s.masked_fill(future, -1e9 + self.gap).softmax(-1) @ v


@pytest.mark.parametrize("gap", [1e8, 10.0])
def test_two_fill_values_fuse_only_when_eager_weighs_one(gap):
    """-1e9 and -1e9 + 1e8: eager's softmax weighs only the larger on a row of padding, as the
    bias's two swamped numbers do; 10 apart, eager weighs both (e^-10): not fused."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 5, 8) * 2 for _ in range(3))
    model = TwoLevels(gap).eval()
    fast = fxforge.optimize(model, (q, k, v, KEEP), verbose=False)
    assert fast.graph.count("attention") == (1 if gap > 1000 else 0)
    torch.testing.assert_close(fast(q, k, v, KEEP), model(q, k, v, KEEP), atol=1e-5, rtol=1e-5)


def test_float16_model_gets_a_float32_mask_on_the_cpu():
    """SDPA's CPU kernels take a float32 mask beside float16 q: the swamped fill (-2**100)
    reaches them, where float16 would make it -inf (a row of padding: 0, not eager's mean)."""
    from fxforge.runtime.torch_kernels import attention_sdpa
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 8, dtype=torch.float16) for _ in range(3))
    bias = torch.zeros(1, 1, 4, 4)
    bias[..., 0, :] = -2.0 ** 100
    out = attention_sdpa(q, k, v, bias, causal=False, scale=0.35)
    torch.testing.assert_close(out[:, :, 0], v.float().mean(2).half(), atol=1e-3, rtol=1e-3)


MIN = torch.finfo(torch.float32).min


class FillBesideAdd(nn.Module):
    """Fills beside large negative adds (attention_sinks aside, what HF models did before one
    combined mask): eager orders a filled key against an added one by their values as
    written (finfo.min + 0 ties with a fill of finfo.min, min + min is -inf), so the fills
    stay as written there: a swamped fill (-2**100) would outrank min."""

    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling

    def forward(self, q, k, v, keep):
        t = q.shape[-2]
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        future = torch.ones(t, t, dtype=torch.bool).triu(1)
        pad = ~keep[:, None, None, :]
        if self.spelling == "gpt_neo":  # where(causal, s, min) + an additive causal-and-padding mask
            s = torch.where(~future, s, torch.tensor(MIN)) + torch.zeros(keep.shape[0], 1, t, t).masked_fill(future | pad, MIN)
        elif self.spelling == "add_then_fill":
            s = (s + torch.zeros(keep.shape[0], 1, 1, t).masked_fill(pad, MIN)).masked_fill(future, MIN)
        elif self.spelling == "fill_plus_add_nan":  # min + min = -inf: NaN on the rows of all padding
            s = s.masked_fill(pad, MIN) + torch.zeros(keep.shape[0], 1, 1, t).masked_fill(pad, MIN)
        elif self.spelling == "fill_then_position_bias":
            pos = torch.arange(t)
            s = s.masked_fill(pad, -1e9) + (pos[None, :] - pos[:, None]).float() * 0.5
        return s.softmax(-1) @ v


@pytest.mark.parametrize("spelling", ["gpt_neo", "add_then_fill", "fill_plus_add_nan", "fill_then_position_bias"])
def test_fills_beside_adds_keep_eagers_order(spelling):
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 6, 8) * 3 for _ in range(3))
    keep = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1], [0] * 6]).bool()
    model = FillBesideAdd(spelling).eval()
    fast = fxforge.optimize(model, (q, k, v, keep), verbose=False)
    assert fast.graph.count("attention") == 1
    torch.testing.assert_close(fast(q, k, v, keep), model(q, k, v, keep), atol=1e-5, rtol=1e-5, equal_nan=True)


class FloorOverFill(nn.Module):
    """torch.max(s.masked_fill(pad, finfo.min), floor): on a filled key the floor is what
    eager's softmax sees, the same on every key of a row of padding; the op would add it to
    the scores. Not fused."""

    def forward(self, q, k, v, keep):
        s = (q @ k.transpose(-1, -2)).masked_fill(~keep[:, None, None, :], MIN)
        return torch.max(s, torch.tensor(-1e9)).softmax(-1) @ v


def test_a_floor_over_fills_is_not_fused():
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 5, 8) * 3 for _ in range(3))
    keep = KEEP.bool()
    model = FloorOverFill().eval()
    fast = fxforge.optimize(model, (q, k, v, keep), verbose=False)
    assert fast.graph.count("attention") == 0
    torch.testing.assert_close(fast(q, k, v, keep), model(q, k, v, keep), atol=1e-5, rtol=1e-5)


def test_fills_one_bfloat16_number_apart_are_not_fused():
    """-1e9 and -1e9 + 1e6 are one number in bfloat16: eager's row of padding is uniform over
    both; two swamped levels would pick one."""
    model = TwoLevels(1e6).eval().to(torch.bfloat16)
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 5, 8, dtype=torch.bfloat16) * 2 for _ in range(3))
    fast = fxforge.optimize(model, (q, k, v, KEEP), verbose=False)
    assert fast.graph.count("attention") == 0
    torch.testing.assert_close(fast(q, k, v, KEEP), model(q, k, v, KEEP), atol=1e-2, rtol=1e-2)
