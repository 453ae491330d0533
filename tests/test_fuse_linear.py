"""fuse_linear: linears reading the same input become one wider linear, sliced. Exact, and
only for parameter weights that can be concatenated."""
import pytest
import torch
from torch import nn

import fxforge
from fxforge.passes.fuse_linear import _joined_name

import zoo
from helpers import assert_matches_eager, assert_round_trips


class Heads(nn.Module):
    """q/k/v with biases on one input, gate/up without on the same input (a different
    group: bias on all or none), and q again on another input (not a sibling)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 6), nn.Linear(8, 4), nn.Linear(8, 4)
        self.gate = nn.Linear(8, 5, bias=False)
        self.up = nn.Linear(8, 5, bias=False)

    def forward(self, x):
        return self.q(x) * 2, self.k(x), self.v(x), self.gate(x) * self.up(x), self.q(x.relu())


def test_siblings_fuse_into_one_linear_and_slices():
    torch.manual_seed(0)
    model = Heads().eval()
    fast = fxforge.optimize(model, (torch.randn(2, 3, 8),), passes=["cleanup", "fuse_linear"], cpu_linear=False)
    assert fast.ir == """\
graph(%x: f32[B, T, 8], %p0: param "q.weight" f32[6, 8], %p1: param "q.bias" f32[6], %p2: param "{q,k,v}.weight" f32[14, 8], %p3: param "{q,k,v}.bias" f32[14], %p4: param "{gate,up}.weight" f32[10, 8]) {
  %1: f32[B, T, 14] = linear(%x, %p2, %p3)
  %2: f32[B, T, 6] = slice(%1) {dim=-1, start=0, end=6, step=1}
  %3: f32[B, T, 4] = slice(%1) {dim=-1, start=6, end=10, step=1}
  %4: f32[B, T, 4] = slice(%1) {dim=-1, start=10, end=14, step=1}
  %5: i64[] = const() {value=2, dtype=i64}
  %6: f32[B, T, 6] = mul(%2, %5)
  %7: f32[B, T, 10] = linear(%x, %p4)
  %8: f32[B, T, 5] = slice(%7) {dim=-1, start=0, end=5, step=1}
  %9: f32[B, T, 5] = slice(%7) {dim=-1, start=5, end=10, step=1}
  %10: f32[B, T, 5] = mul(%8, %9)
  %11: f32[B, T, 8] = relu(%x)
  %12: f32[B, T, 6] = linear(%11, %p0, %p1)
  return (%6, %3, %4, %10, %12)
}"""
    stats = next(s for s in fast.stats if s.name == "fuse_linear")
    assert stats.rules["concat_linear"] == 2
    assert stats.details["fuse_linear"]["groups"] == [["q.weight", "k.weight", "v.weight"], ["gate.weight", "up.weight"]]
    # the concatenated weight holds the originals, in order; k/v/gate/up left the graph
    torch.testing.assert_close(fast.graph.params["{q,k,v}.weight"], torch.cat([model.q.weight, model.k.weight, model.v.weight]))
    assert "k.weight" not in fast.graph.params and "q.weight" in fast.graph.params
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        for ref, out in zip(model(x), fast(x)):
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert_round_trips(fast.graph)


def test_llama_and_qwen2_blocks_fuse_and_match_eager():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    llama, vocab = zoo.llama("sdpa", n_layer=2)
    torch.manual_seed(0)
    qwen2 = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()  # q/k/v with biases
    for model in (llama, qwen2):
        fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),))
        stats = next(s for s in fast.stats if s.name == "fuse_linear")
        assert stats.rules["concat_linear"] == 4  # per layer: q/k/v and gate/up
        assert fast.graph.count("linear") == 2 * 4 + 1  # qkv, o, gate_up, down per layer, and lm_head
        assert_matches_eager(model, fast, vocab, [(1, 1), (3, 9)])


@pytest.mark.parametrize("scheme", ["int8", "w8a8", "nf4", "int4"])
def test_quantized_siblings_fuse_and_equal_the_unfused(scheme):
    """quant_linears packed alike stack their per-row packed tensors: the same numbers as
    the separate layers, so the outputs are bit-identical where both take the same kernel
    (torch backend)."""
    model, vocab = zoo.llama("sdpa", hidden=128)
    ids = torch.randint(0, vocab, (2, 7))
    fast = fxforge.optimize(model, (ids,), quantize=scheme)
    apart = fxforge.optimize(model, (ids,), quantize=scheme, disable=["fuse_linear"])
    stats = next(s for s in fast.stats if s.name == "fuse_linear")
    assert stats.rules["concat_linear"] == 4  # per layer: q/k/v and gate/up; lm_head has no sibling
    assert fast.graph.count("quant_linear") == 2 * 4 and apart.graph.count("quant_linear") == 2 * 7
    if scheme == "int8":
        # the CPU picks an int8 product's kernel by the weight's width (runtime/cpu_quant.py:
        # int8 digits from 512 outputs on, with AMX): the stacked gate/up may take another
        # kernel than its halves, each float32-accurate, so equal within float32 rounding
        torch.testing.assert_close(fast(ids).logits, apart(ids).logits, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(fast(ids).logits, apart(ids).logits)


def test_double_quantized_nf4_siblings_stay_apart():
    # nf4's absmax is quantized in blocks of 256 that run across rows: stacking would re-block it
    model, vocab = zoo.llama("sdpa", hidden=128)
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),),
                            quantize=fxforge.QuantConfig("nf4", double_quant=True))
    assert fast.graph.count("quant_linear") == 2 * 7
    assert "14 nf4 products with double_quant=True stay separate" in fast.report()  # the report says why


def test_int4_siblings_merge_only_in_whole_kernel_row_blocks():
    """An int4 weight takes PyTorch's packed CPU kernel only with a multiple of 16 rows
    (runtime/cpu_int4.py): k and v of 24 rows stay apart, so a merge never moves q off
    the kernel; gate and up (192 each) merge, and the model still matches the unmerged one."""
    model, vocab = zoo.llama("sdpa", hidden=96, heads=4, kv_heads=1)  # k/v: 24 outputs; q/o: 96; gate/up: 192
    ids = torch.randint(0, vocab, (1, 5))
    fast = fxforge.optimize(model, (ids,), quantize=fxforge.QuantConfig("int4", group_size=32))
    apart = fxforge.optimize(model, (ids,), quantize=fxforge.QuantConfig("int4", group_size=32),
                             disable=["fuse_linear"])
    assert fast.graph.count("quant_linear") == 2 * 6  # q, k, v, o, gate_up, down
    assert torch.equal(fast(ids).logits, apart(ids).logits)


def test_disabled_leaves_the_projections_apart():
    model, vocab = zoo.llama("sdpa")
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),), disable=["fuse_linear"])
    assert fast.graph.count("linear") == 2 * 7 + 1


def test_joined_names():
    assert _joined_name(["m.l.0.attn.q_proj.weight", "m.l.0.attn.k_proj.weight"]) == "m.l.0.attn.{q_proj,k_proj}.weight"
    assert _joined_name(["a.weight", "b.weight"]) == "{a,b}.weight"
    assert _joined_name(["x.w.gqa_q", "x.w.gqa_k"]) == "x.w.{gqa_q,gqa_k}"
