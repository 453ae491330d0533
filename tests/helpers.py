"""Shared assertions for differential tests."""

import os

from fxforge.ir import parse, structurally_equal

from zoo import logits_of

# The backend that runs the Triton kernels in this test session (tests/conftest.py):
# the interpreter on CPU, or the compiled kernels with FXFORGE_TEST_DEVICE=cuda.
KERNEL_BACKEND = "triton" if os.environ.get("FXFORGE_TEST_DEVICE") == "cuda" else "interpret"
KERNEL_DEVICE = "cuda" if KERNEL_BACKEND == "triton" else "cpu"


def assert_close_to_eager(ref, out, rel=1e-4):
    """Max abs error within `rel` of the output's scale (float32 tolerance of the issue)."""
    ref, out = logits_of(ref), logits_of(out)
    assert ref.shape == out.shape, (ref.shape, out.shape)
    scale = max(1.0, ref.abs().max().item())
    err = (ref.float() - out.float()).abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel} x scale {scale:.3g}"


def assert_matches_eager(model, fast, vocab: int, sizes, rel=1e-4):
    """fast(ids) close to model(ids) for random token ids of each (batch, length) in `sizes`."""
    import torch

    for b, t in sizes:
        ids = torch.randint(0, vocab, (b, t))
        with torch.no_grad():
            assert_close_to_eager(model(ids), fast(ids), rel)


def assert_round_trips(graph):
    text = str(graph)
    again = parse(text)
    assert structurally_equal(graph, again), "parse(str(g)) differs from g"
    assert str(again) == text
