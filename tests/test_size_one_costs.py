"""What optimize()'s checks against the model cost, and what they compare (ir/size_one.py):
outputs compared chunk by chunk with the same verdicts, the probe of an excluded length at
batch 1, and the padded positions of an attention mask left out of the comparison."""
import pytest
import torch

import fxforge
import zoo
from fxforge.ir import size_one

inf, nan = float("inf"), float("nan")


def _t(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


# (got, ref, close): the rule is NaN at the same places, the same infinities, and finite
# values within tol * max(1, max |ref|) (tol 1e-4 in float32/64, 2e-2 in half/bfloat16)
CLOSE_CASES = [
    (_t([1.0, 2.0]), _t([1.0, 2.0]), True),
    (_t([1.0, 2.0]), _t([1.0, 2.0002]), False),
    (_t([1.0, 2.0]), _t([1.0, 2.00005]), True),
    (_t([100.0, 2.0]), _t([100.0, 2.005]), True),        # the scale is max |ref| = 100
    (_t([100.0, 2.0]), _t([100.0, 2.02]), False),
    (_t([nan, 1.0]), _t([nan, 1.0]), True),
    (_t([nan, 1.0]), _t([1.0, 1.0]), False),
    (_t([1.0, 1.0]), _t([nan, 1.0]), False),
    (_t([inf, -inf]), _t([inf, -inf]), True),
    (_t([inf, 1.0]), _t([-inf, 1.0]), False),
    (_t([inf, 1.0]), _t([1.0, 1.0]), False),             # an infinity where ref is finite
    (_t([1e30, 1.0]), _t([inf, 1.0]), False),
    (_t([-0.0, 0.0]), _t([0.0, -0.0]), True),
    (_t([nan, nan]), _t([nan, nan]), True),
    (_t([]), _t([]), True),
    (_t([1.0, 2.0], torch.float64), _t([1.0, 2.0], torch.float32), False),
    (_t([1.0, 2.0], torch.float16), _t([1.0, 2.01], torch.float16), True),
    (_t([1.0, 2.0], torch.float16), _t([1.0, 2.1], torch.float16), False),
    (_t([1.0, 2.0], torch.bfloat16), _t([1.0, 2.0], torch.bfloat16), True),
    (_t([60000.0, inf], torch.float16), _t([60000.0, inf], torch.float16), True),
    (_t([1, 2], torch.int64), _t([1, 2], torch.int64), True),
    (_t([1, 2], torch.int64), _t([1, 3], torch.int64), False),
    (_t([True, False], torch.bool), _t([True, False], torch.bool), True),
    (_t([True, False], torch.bool), _t([True, True], torch.bool), False),
]


@pytest.mark.parametrize("chunk", [2 ** 20, 1, 3])
def test_outputs_are_compared_chunk_by_chunk_with_the_same_verdicts(monkeypatch, chunk):
    """A comparison of whole outputs (logits) made copies of them (masks, float64) that cost
    10x an eager forward's memory; by chunks it gives the same verdicts, the scale
    (max |ref|) taken over all of them."""
    monkeypatch.setattr(size_one, "CHUNK", chunk)
    for got, ref, close in CLOSE_CASES:
        assert size_one._close(got, ref) is close, (got, ref)
    # the largest |ref| in a later chunk than the difference it excuses
    got, ref = torch.zeros(8), torch.zeros(8)
    ref[7], got[7], got[0] = 1000.0, 1000.0, 0.05
    assert size_one._close(got, ref)
    got[0] = 0.2
    assert not size_one._close(got, ref)
    assert size_one._max_abs_difference(got, ref) == pytest.approx(0.2)
    # a non-contiguous output compares by its values
    a = torch.randn(4, 6)
    assert size_one._close(a.t(), a.t().contiguous()) and not size_one._close(a.t(), a.t() + 1)


def test_an_excluded_length_is_probed_at_batch_one(monkeypatch):
    """nanoGPT's Ne(T, block_size) is probed by a forward at T == block_size; with the
    example's batch that forward (at block 4096, batch 8) took more memory than the machine
    had. Whether T == block_size computes otherwise does not hang on the batch."""
    torch.manual_seed(0)
    model = zoo.NanoGPT().eval()
    block = model.wpe.num_embeddings
    shapes = []
    compare = size_one._difference

    def spy(model, graph, spec, probe, inputs, **kwargs):  # the ids each comparison runs both sides on
        shapes.append(tuple(inputs[0].shape))
        return compare(model, graph, spec, probe, inputs, **kwargs)

    monkeypatch.setattr(size_one, "_difference", spy)
    fast = fxforge.optimize(model, (torch.randint(0, 96, (3, 7)),), verbose=False)
    assert not any("Ne(" in str(g) for g in fast.graph.guards), fast.graph.guards
    at_block = [s for s in shapes if s[1] == block]
    assert at_block and all(b == 1 for b, _ in at_block), shapes


class TwiceAtBatchOne(torch.nn.Module):
    """Slices a buffer by the length (export: Ne(T, 16)) and computes otherwise at batch 1."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.arange(16.0))

    def forward(self, x):
        y = x + self.table[:x.shape[1]]
        return y * 2 if x.shape[0] == 1 else y


def test_a_model_guarded_at_batch_one_is_probed_at_the_examples_batch():
    fast = fxforge.optimize(TwiceAtBatchOne(), (torch.randn(2, 5),), verbose=False)
    assert "B >= 2" in fast.ir
    x = torch.randn(2, 16)
    assert torch.equal(fast(x), TwiceAtBatchOne()(x))


def _llama_eager_attention(dtype):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3)  # large scores: the fully masked rows' fp16 noise shows
    return model.to(dtype)


def test_padded_positions_of_a_left_padded_fp16_example_are_not_compared():
    """fp16 eager attention at a fully masked (padded) query adds finfo.min to the scores,
    which keeps none of their digits: the model's output there is rounding noise the graph
    need not repeat. optimize() refused it, blaming str() of a shape; the real tokens agree."""
    model = _llama_eager_attention(torch.float16)
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    fast = fxforge.optimize(model, example_kwargs=dict(input_ids=ids, attention_mask=mask), backend="torch",
                            verbose=False)
    with torch.no_grad():
        out = fast(input_ids=ids, attention_mask=mask).logits
        ref = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (out[real].float() - ref[real].float()).abs().max() < 2e-2 * ref[real].float().abs().max()


def test_a_difference_at_the_real_tokens_of_a_padded_example_is_still_refused():
    class FormatsTheLength(torch.nn.Module):
        def forward(self, x, attention_mask):
            return x * len(str(x.shape[1])) * attention_mask[..., None]

    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0
    with pytest.raises(fxforge.CaptureError, match="at the real .not padded. tokens"):
        fxforge.optimize(FormatsTheLength(), example_kwargs=dict(x=torch.randn(2, 12, 4), attention_mask=mask),
                         verbose=False)
