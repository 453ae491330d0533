"""nn.TransformerEncoder's nested-tensor fast path, traced as eager computes it.

In eval mode without grad, TransformerEncoder.forward (enable_nested_tensor=True, the
default) with a src_key_padding_mask packs each row's kept tokens into a nested tensor,
runs the layers on it and pads the result back to src's shape with zeros. So eager
outputs exactly 0 at the padded positions (before `norm`), where the slow path, the one
torch.export traces (it skips the fast path while compiling), computes values there.

While exporting, `nested_fast_path_as_eager(model)` gives each such encoder a forward
that computes the fast path's result on dense tensors: the slow path with a key padding
mask of the positions the nested tensor leaves out, and zeros there. The conditions eager
decides from the module, the call's arguments and torch's settings are decided at
capture; the one that depends on the mask's values (mask_check: the fast path is taken
only where every row's padding is at its end) is computed in the graph, so the captured
model agrees with eager for any mask.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn

# the devices TransformerEncoder.forward's fast path runs on (its _supported_device_type)
_FAST_PATH_DEVICES = ("cpu", "cuda", "xpu")


@contextlib.contextmanager
def nested_fast_path_as_eager(model):
    """While tracing `model`, its TransformerEncoders compute what eager's fast path does."""
    encoders = [m for m in model.modules() if _has_torch_forward(m)] if isinstance(model, nn.Module) else []
    for encoder in encoders:
        encoder.forward = _forward_as_eager(encoder)
    try:
        yield
    finally:
        for encoder in encoders:
            del encoder.forward  # the class's forward again


def _has_torch_forward(module) -> bool:
    """A TransformerEncoder that runs torch's own forward: one whose forward a subclass or
    an instance attribute replaced computes something this module cannot know."""
    return (isinstance(module, nn.TransformerEncoder) and type(module).forward is nn.TransformerEncoder.forward
            and "forward" not in vars(module))


def _forward_as_eager(encoder):
    original = encoder.forward

    @functools.wraps(original)  # the same signature, which torch.export binds inputs to
    def forward(src, mask=None, src_key_padding_mask=None, is_causal=None):
        if not _takes_fast_path(encoder, src, mask, src_key_padding_mask):
            return original(src, mask, src_key_padding_mask, is_causal)
        return _fast_path_result(encoder, src, src_key_padding_mask, is_causal)

    return forward


def _takes_fast_path(encoder, src, mask, src_key_padding_mask) -> bool:
    """Whether eager TransformerEncoder.forward would pack src into a nested tensor, as far
    as that is decided without the mask's values (see _fast_path_result for those). fxforge
    calls run under torch.no_grad() on plain tensors, so eager's checks of grad and of
    __torch_function__ overrides pass at every call."""
    first = encoder.layers[0]
    return (torch.backends.mha.get_fastpath_enabled()
            and getattr(encoder, "use_nested_tensor", False)  # set at init from enable_nested_tensor and the layer
            and not first.training
            and first.self_attn.batch_first  # the nested tensor is built from (batch, sequence) rows
            and src.dim() == 3
            and src_key_padding_mask is not None
            and mask is None
            and not torch.is_autocast_enabled()
            and src.device.type in _FAST_PATH_DEVICES)


def _fast_path_result(encoder, src, src_key_padding_mask, is_causal):
    """What the fast path returns, on dense tensors. torch._nested_tensor_from_mask keeps
    the first n tokens of a row with n kept (mask 0) positions, wherever those are; each
    layer then attends within them, which the slow path computes with a padding mask of the
    other positions, and to_padded_tensor(0.) fills those with zeros (before encoder.norm)."""
    padding = F._canonical_mask(mask=src_key_padding_mask, mask_name="src_key_padding_mask", other_type=None,
                                other_name="mask", target_type=src.dtype)
    padded = padding != 0  # eager keeps the positions where padding.logical_not()
    outside = torch.arange(src.shape[1], device=src.device) >= (~padded).sum(-1, keepdim=True)
    layer_mask = _as_padding_mask(outside, src.dtype)
    if getattr(encoder, "mask_check", True):
        # eager takes the fast path only where the padding of every row is at its end, and
        # the slow path (the mask as given, no zeros) otherwise: a choice on the mask's values
        taken = (outside == padded).all()
        outside = outside & taken
        layer_mask = torch.where(taken, layer_mask, padding)
    output = src
    for layer in encoder.layers:
        output = layer(output, src_mask=None, is_causal=is_causal is True, src_key_padding_mask=layer_mask)
    output = output.masked_fill(outside.unsqueeze(-1), 0.0)
    return encoder.norm(output) if encoder.norm is not None else output


def _as_padding_mask(positions, dtype):
    """A boolean padding mask as the float one the slow path passes its layers."""
    return F._canonical_mask(mask=positions, mask_name="src_key_padding_mask", other_type=None,
                             other_name="mask", target_type=dtype)
