"""optimize(model) with the default pipeline equals eager PyTorch, for every zoo model, at
two batch sizes and three sequence lengths from a single optimize() call."""
import pytest
import torch

import fxforge
from fxforge.ir.capture import capture_with_spec

import zoo
from helpers import assert_close_to_eager, assert_round_trips

MODELS = {
    "nanogpt_fx": zoo.nanogpt_traced,
    "gpt2_eager": lambda: zoo.gpt2("eager"),
    "gpt2_sdpa": lambda: zoo.gpt2("sdpa"),
    "llama_eager": lambda: zoo.llama("eager"),
    "llama_sdpa": lambda: zoo.llama("sdpa"),
    "llama_mha_sdpa": lambda: zoo.llama("sdpa", kv_heads=4),
}
SHAPES = [(1, 1), (1, 6), (3, 19), (3, 6), (1, 19)]


@pytest.mark.parametrize("name", MODELS)
def test_default_pipeline_matches_eager(name):
    model, vocab = MODELS[name]()
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),))
    assert_round_trips(fast.graph)
    for b, t in SHAPES:
        ids = torch.randint(0, vocab, (b, t))
        with torch.no_grad():
            ref = model(ids)
        out = fast(ids)
        assert type(out) is type(ref)
        assert_close_to_eager(ref, out)


@pytest.mark.parametrize("name", MODELS)
def test_capture_round_trips_and_is_dynamic(name):
    model, vocab = MODELS[name]()
    graph, _ = capture_with_spec(model, (torch.randint(0, vocab, (1, 5)),))
    assert_round_trips(graph)
    # one capture serves every batch and length: the input's dims are symbols
    assert [str(d) for d in graph.inputs[0].shape] == ["B", "T"]


def test_attention_mask_kwarg_and_output_structure():
    model, vocab = zoo.llama("sdpa")
    ids = torch.randint(0, vocab, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    fast = fxforge.optimize(model, example_kwargs={"input_ids": ids, "attention_mask": mask})
    for t in (4, 9):
        ids2, mask2 = ids[:, :t], mask[:, :t].clone()
        with torch.no_grad():
            ref = model(input_ids=ids2, attention_mask=mask2)
        out = fast(input_ids=ids2, attention_mask=mask2)
        # rows that are fully padded are undefined in eager too; compare the valid positions
        valid = mask2.bool()
        assert torch.allclose(ref.logits[valid], out.logits[valid], atol=1e-4)


class TwoScatteredBuffers(torch.nn.Module):
    """Two equal zero buffers, each written in place (a mixture-of-experts router's
    `full_like(...).scatter_(...)` per layer): the writes must not meet in one buffer."""

    def forward(self, x):
        a = torch.zeros_like(x).scatter_(1, x.argmax(-1, keepdim=True), 1.0)
        b = torch.zeros_like(x).scatter_(1, x.argmin(-1, keepdim=True), 1.0)
        c = x.clone()
        c.add_(1.0)  # in place on a computed tensor, then a view of the result
        return a * 2 + b + c.view(-1, x.shape[-1]).relu()


def test_in_place_writes_are_functional_and_equal_eager():
    model = TwoScatteredBuffers().eval()
    x = torch.randn(3, 5)
    fast = fxforge.optimize(model, (x,))
    targets = [n.attrs["target"] for n in fast.graph.nodes if n.op == "torch_call"]
    assert not any(t.split(".")[1].endswith("_") for t in targets), targets  # no in-place op left
    for b in (1, 2, 4):
        x = torch.randn(b, 5)
        assert torch.equal(fast(x), model(x))


class WriteThroughAView(torch.nn.Module):
    """An in-place write through a view reaches the base tensor: it stays as torch ran it."""

    def forward(self, x):
        base = x * 1.5
        first = base[:, :2]
        first.mul_(0.0)
        return base + 1


def test_in_place_write_through_a_view_equals_eager():
    model = WriteThroughAView().eval()
    fast = fxforge.optimize(model, (torch.randn(3, 5),))
    for b in (1, 4):
        x = torch.randn(b, 5)
        assert torch.equal(fast(x), model(x))
