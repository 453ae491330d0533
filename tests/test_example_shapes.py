"""How dynamic capture turns the example's shapes into symbols: a batch-1 example in
PyTorch's seq-first layout, token ids of length 1 (decoder_input_ids=[[start]]), an
attention bias (B|1, 1, T, T), a size made a tensor and read back (DeBERTa v1), and the
fixed-length warning on an image's or a spectrogram's channels."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxforge
from fxforge.ir.capture import CaptureError

from helpers import assert_close_to_eager

D, H = 16, 2


def _and_warnings(fn):
    """fn()'s result and the UserWarnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


class SeqFirst(nn.Module):
    """nn.MultiheadAttention's default layout: x (T, B, D), key_padding_mask (B, T)."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(D, H)

    def forward(self, x, key_padding_mask):
        return self.mha(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)[0]


def _padding_mask(b, t):
    mask = torch.zeros(b, t, dtype=torch.bool)
    mask[0, -2:] = True
    return mask


def test_a_seq_first_batch_1_example_grows_its_mask_with_the_batch():
    torch.manual_seed(0)
    model = SeqFirst().eval()
    fast = fxforge.optimize(model, (torch.randn(7, 1, D), _padding_mask(1, 7)), verbose=False)
    for t, b in ((7, 1), (5, 3)):
        x, mask = torch.randn(t, b, D), _padding_mask(b, t)
        assert_close_to_eager(model(x, mask), fast(x, mask))


class Decoder(nn.Module):
    """A seq2seq shape: encoder ids (B, S) and decoder ids (B, T) of their own length."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, D)

    def forward(self, input_ids, decoder_input_ids):
        memory = self.emb(input_ids)
        queries = self.emb(decoder_input_ids)
        return F.scaled_dot_product_attention(queries, memory, memory)


def test_decoder_ids_of_length_1_get_a_length_of_their_own():
    torch.manual_seed(0)
    model = Decoder().eval()
    ids = torch.randint(0, 32, (2, 7))
    fast = fxforge.optimize(model, example_kwargs=dict(input_ids=ids, decoder_input_ids=torch.full((2, 1), 2)),
                            verbose=False)
    for dec in (torch.full((2, 1), 2), torch.randint(0, 32, (2, 5))):
        assert_close_to_eager(model(ids, dec), fast(input_ids=ids, decoder_input_ids=dec))


class Biased(nn.Module):
    """Attention with an additive bias input (B or 1, 1, T, T)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)

    def forward(self, x, bias):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, H, D // H).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(b, t, D)


def test_a_broadcast_bias_stays_broadcast_and_its_length_is_the_sequence():
    torch.manual_seed(0)
    model = Biased().eval()
    fast, said = _and_warnings(lambda: fxforge.optimize(model, (torch.randn(1, 6, D), torch.randn(1, 1, 6, 6)),
                                                       verbose=False))
    assert not [w for w in said if "fixed" in w], said
    for b, t in ((3, 6), (1, 9), (2, 4)):
        x, bias = torch.randn(b, t, D), torch.randn(1, 1, t, t)
        assert_close_to_eager(model(x, bias), fast(x, bias))


class PerRowBias(Biased):
    """Reads its bias as one per row (bias.view(B, ...)): a batch-1 bias must be the batch."""

    def forward(self, x, bias):
        return super().forward(x, bias.view(x.shape[0], 1, x.shape[1], x.shape[1]))


def test_a_bias_the_model_reads_per_row_is_traced_with_the_batch():
    torch.manual_seed(0)
    model = PerRowBias().eval()
    fast = fxforge.optimize(model, (torch.randn(1, 6, D), torch.randn(1, 1, 6, 6)), verbose=False)
    x, bias = torch.randn(3, 6, D), torch.randn(3, 1, 6, 6)
    assert_close_to_eager(model(x, bias), fast(x, bias))


class SpanAsTensor(nn.Module):
    """transformers' DeBERTa v1 compute_attention_span: a size made a tensor, then sliced with."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(16, D))

    def forward(self, x):
        span = torch.tensor(min(x.size(1), 4))
        return x + self.table[8 - span:8 + span].sum(0)


def test_a_size_made_a_tensor_and_read_back_is_named_with_dynamic_false():
    model = SpanAsTensor().eval()
    with pytest.raises(CaptureError, match=r"makes an input's size a tensor .*\n(.*\n)*  fix: keep the size a Python "
                                           r"int .*pass dynamic=False"):
        fxforge.optimize(model, (torch.randn(2, 8, D),), verbose=False)
    fast = fxforge.optimize(model, (torch.randn(2, 8, D),), dynamic=False, verbose=False)
    x = torch.randn(2, 8, D)
    assert_close_to_eager(model(x), fast(x))


@pytest.mark.parametrize("model, example", [
    (nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.Flatten(1)), torch.randn(2, 3, 16, 16)),  # an image
    (nn.Sequential(nn.Conv1d(16, 8, 3, padding=1), nn.GELU()), torch.randn(2, 16, 20)),  # mel bins x frames
], ids=["image", "spectrogram"])
def test_channels_a_convolution_takes_are_not_a_fixed_length(model, example):
    _, said = _and_warnings(lambda: fxforge.optimize(model.eval(), (example,), verbose=False))
    assert not [w for w in said if "fixed the length" in w], said
