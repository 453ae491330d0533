"""nn.TransformerEncoder's nested-tensor fast path: in eval mode without grad, with a
src_key_padding_mask and enable_nested_tensor=True (the default), eager outputs exactly 0
at padded positions (before the encoder's norm), where the slow path that torch.export
traces computes values there. fxforge computes what eager does, for any mask: the fast
path only where eager takes it (mask_check: every row's padding at its end; settings that
turn it off at init: norm_first, batch_first=False, enable_nested_tensor=False; training
mode), and the slow path elsewhere."""
import warnings

import pytest
import torch
from torch import nn

import fxforge

from helpers import assert_close_to_eager

D, HEADS, T = 16, 2, 7


def _encoder(enable_nested_tensor=True, norm_first=False, batch_first=True, mask_check=True, final_norm=False):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, HEADS, 32, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
    norm = nn.LayerNorm(D) if final_norm else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "enable_nested_tensor is True, but ... norm_first was True"
        encoder = nn.TransformerEncoder(layer, 2, norm=norm, enable_nested_tensor=enable_nested_tensor,
                                        mask_check=mask_check)
    if norm is not None:
        nn.init.normal_(norm.bias)  # padded positions come out as norm(0) = its bias: not 0
    return encoder.eval()


def _padding(lengths, width=T, left=False):
    """A key padding mask (True: padded) of rows with these many tokens, padded at the end
    (or at the start: not left-aligned, so eager keeps the slow path)."""
    positions, kept = torch.arange(width), torch.tensor(lengths).unsqueeze(-1)
    return positions < width - kept if left else positions >= kept


def _src(batch, width=T, batch_first=True):
    x = torch.randn(batch, width, D)
    return x if batch_first else x.transpose(0, 1).contiguous()


def _optimize(encoder, example_mask, batch_first=True, **options):
    src = _src(example_mask.shape[0], example_mask.shape[1], batch_first)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "nested tensors are in prototype stage"
        return fxforge.optimize(encoder, example_kwargs=dict(src=src, src_key_padding_mask=example_mask),
                                verbose=False, **options)


def _assert_as_eager(encoder, fast, mask, batch_first=True):
    src = _src(mask.shape[0], mask.shape[1], batch_first)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = encoder(src, src_key_padding_mask=mask)
    out = fast(src=src, src_key_padding_mask=mask)
    assert_close_to_eager(ref, out)
    return ref, out


# calls: end-padded rows of several lengths (a row all padding too), batch 1, none padded,
# and start-padded rows (not left-aligned: eager's slow path, no zeros)
CALLS = [_padding([7, 5, 2]), _padding([4]), _padding([7, 7]), _padding([6, 0, 3]), _padding([5, 3], left=True)]


@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("example", ["padded", "unpadded"])
def test_padded_positions_are_zero_as_in_eager(example, dynamic):
    encoder = _encoder()
    example_mask = _padding([7, 5, 2]) if example == "padded" else _padding([7, 7, 7])
    fast = _optimize(encoder, example_mask, dynamic=dynamic)
    for mask in CALLS if dynamic else [m for m in CALLS if m.shape[0] == 3]:
        ref, out = _assert_as_eager(encoder, fast, mask)
        if not _padding([5, 3], left=True).equal(mask):
            assert (ref[mask] == 0).all() and (out[mask] == 0).all()
    if dynamic:  # another sequence length
        _assert_as_eager(encoder, fast, _padding([9, 4], width=9))


@pytest.mark.parametrize("settings", [
    dict(final_norm=True),  # zeros before the norm: padded positions are its bias
    dict(mask_check=False),  # eager keeps each row's first n tokens, padded or not
    dict(enable_nested_tensor=False),
    dict(norm_first=True),  # no fast path (set at init)
    dict(batch_first=False),  # no fast path (set at init)
], ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_encoder_settings_compute_as_eager(settings):
    encoder = _encoder(**settings)
    batch_first = settings.get("batch_first", True)
    fast = _optimize(encoder, _padding([7, 5, 2]), batch_first=batch_first, dynamic=False)
    # no row all padding here: without the nested path eager's layers (their own fast path)
    # give such a row NaN, and torch's slow path finite values
    for mask in (_padding([7, 5, 2]), _padding([6, 1, 3]), _padding([5, 3, 7], left=True)):
        _assert_as_eager(encoder, fast, mask, batch_first)


def test_training_mode_keeps_the_slow_path():
    """A model in training mode (dropout 0: deterministic) takes eager's slow path, also under no_grad."""
    encoder = _encoder().train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fxforge: "in training mode: dropout op(s)"
        fast = _optimize(encoder, _padding([7, 5, 2]), dynamic=False)
    ref, _ = _assert_as_eager(encoder, fast, _padding([7, 5, 2]))
    assert ref[_padding([7, 5, 2])].abs().max() > 0


def test_encoder_inside_a_model():
    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = _encoder(final_norm=True)
            self.head = nn.Linear(D, 3)

        def forward(self, x, padding):
            return self.head(self.encoder(x, src_key_padding_mask=padding))

    model = Classifier().eval()
    x, padding = _src(3), _padding([7, 5, 2])
    fast = fxforge.optimize(model, example_kwargs=dict(x=x, padding=padding), verbose=False)
    for mask in CALLS:
        x = _src(mask.shape[0])
        with torch.no_grad():
            assert_close_to_eager(model(x, mask), fast(x=x, padding=mask))
    assert "forward" not in vars(model.encoder)  # capture put the encoder's own forward back
