"""Attention sinks (gpt-oss, hy_v4, flint, granite_swa): a logit per query head that joins
each row's softmax with a zero value. Hand-written modules in both spellings fuse into
one `attention {sinks=true}` op per layer, equal eager on the torch and interpret backends,
generate with the KV cache (dense and paged, static decode) as an eager re-run does, and
survive the IR's text form and save/load; near misses stay unfused (and still equal eager)."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxforge
from fxforge.ir import parse, typecheck
from fxforge.ir.typecheck import IRCheckError
from fxforge.ir.ops import attention_reference
from fxforge.passes.kv_cache import KVCacheConfig
from helpers import assert_close_to_eager, assert_round_trips
from helpers import eager_greedy as _eager_greedy

VOCAB = 64


class SinkAttention(nn.Module):
    """Causal self-attention with sinks. spelling: "cat" (the sink column, softmax, slice:
    gpt_oss with `minus_max`, flint without), "gate" (granite_swa's sigmoid(lse - sink)), or
    a near miss: "cat_slice_front" (drops the first column: a score, not the sink),
    "cat_sink_per_row" (the extra column differs per row), "cat_softmax_dim2",
    "cat_max_dim2", "gate_sign" (sigmoid(sink - lse)), "gate_other_scores"."""

    def __init__(self, spelling="cat", d=32, heads=4, kv_heads=2, minus_max=True, window=None, softcap=None):
        super().__init__()
        self.spelling, self.heads, self.kv_heads, self.hd = spelling, heads, kv_heads, d // heads
        self.minus_max, self.window, self.softcap = minus_max, window, softcap
        self.q = nn.Linear(d, heads * self.hd, bias=False)
        self.k = nn.Linear(d, kv_heads * self.hd, bias=False)
        self.v = nn.Linear(d, kv_heads * self.hd, bias=False)
        self.o = nn.Linear(heads * self.hd, d, bias=False)
        self.sinks = nn.Parameter(torch.randn(heads) * 2)
        self.row_sinks = nn.Parameter(torch.randn(64))

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.hd).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv_heads, self.hd).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv_heads, self.hd).transpose(1, 2)
        n = self.heads // self.kv_heads
        if n > 1:  # repeat_kv
            k = k[:, :, None].expand(b, self.kv_heads, n, t, self.hd).reshape(b, self.heads, t, self.hd)
            v = v[:, :, None].expand(b, self.kv_heads, n, t, self.hd).reshape(b, self.heads, t, self.hd)
        s = torch.matmul(q, k.transpose(2, 3)) * (1.0 / math.sqrt(self.hd))
        if self.softcap is not None:
            s = torch.tanh(s / self.softcap) * self.softcap
        i = torch.arange(t)
        keep = i[None, :] <= i[:, None]
        if self.window is not None:
            keep = keep & (i[None, :] > i[:, None] - self.window)
        s = s + torch.zeros(t, t).masked_fill(~keep, torch.finfo(torch.float32).min)
        sp = self.spelling
        if sp.startswith("cat"):
            col = self.sinks.reshape(1, -1, 1, 1).expand(b, -1, t, -1)
            if sp == "cat_sink_per_row":
                col = self.row_sinks[:t].view(1, 1, t, 1).expand(b, self.heads, t, 1)
            c = torch.cat([s, col], dim=-1)
            if self.minus_max or sp == "cat_max_dim2":
                c = c - c.max(dim=-2 if sp == "cat_max_dim2" else -1, keepdim=True).values
            p = F.softmax(c, dim=-2 if sp == "cat_softmax_dim2" else -1)
            p = p[..., 1:] if sp == "cat_slice_front" else p[..., :-1]
            o = torch.matmul(p, v)
        else:
            lse = torch.logsumexp(s * 2.0 if sp == "gate_other_scores" else s, dim=-1)
            sink = self.sinks.view(1, -1, 1)
            gate = torch.sigmoid(sink - lse if sp == "gate_sign" else lse - sink)
            o = torch.matmul(F.softmax(s, dim=-1), v) * gate.unsqueeze(-1)
        return self.o(o.transpose(1, 2).reshape(b, t, -1))


class SinkLM(nn.Module):
    def __init__(self, layers=2, positions=True, **kw):
        super().__init__()
        torch.manual_seed(0)
        self.positions = positions
        self.emb = nn.Embedding(VOCAB, 32)
        self.pos = nn.Embedding(64, 32)
        self.attn = nn.ModuleList(SinkAttention(**kw) for _ in range(layers))
        self.head = nn.Linear(32, VOCAB, bias=False)

    def forward(self, ids):
        x = self.emb(ids)
        if self.positions:
            x = x + self.pos(torch.arange(ids.shape[1]))
        for a in self.attn:
            x = x + a(x)
        return self.head(x)


SPELLINGS = {"cat_max": dict(spelling="cat"), "cat": dict(spelling="cat", minus_max=False),
             "gate": dict(spelling="gate")}
NEAR_MISSES = ["cat_slice_front", "cat_sink_per_row", "cat_softmax_dim2", "cat_max_dim2", "gate_sign",
               "gate_other_scores"]


def _example():
    return torch.randint(0, VOCAB, (2, 7))


def _sinks_ops(fast):
    return [n for n in fast.graph.nodes if n.op == "attention" and n.attrs.get("sinks")]


@pytest.mark.parametrize("name", list(SPELLINGS))
@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_both_spellings_fuse_and_equal_eager(name, backend):
    model = SinkLM(**SPELLINGS[name]).eval()
    fast = fxforge.optimize(model, (_example(),), backend=backend)
    assert len(_sinks_ops(fast)) == 2, fast.graph
    assert fast.graph.count("softmax") == 0
    typecheck(fast.graph)
    sizes = [(2, 7), (3, 11)] if backend == "torch" else [(2, 5)]
    for b, t in sizes:
        ids = torch.randint(0, VOCAB, (b, t))
        with torch.no_grad():
            assert_close_to_eager(model(ids), fast(ids), rel=1e-5)


@pytest.mark.parametrize("kw", [dict(spelling="cat", window=3), dict(spelling="gate", softcap=5.0),
                                dict(spelling="cat", kv_heads=4)], ids=["window", "softcap", "mha"])
def test_variants_with_sinks_equal_eager(kw):
    model = SinkLM(**kw).eval()
    fast = fxforge.optimize(model, (_example(),))
    ops = _sinks_ops(fast)
    assert len(ops) == 2
    if "window" in kw:
        assert ops[0].attrs["window"] == 3
    if "softcap" in kw:
        assert ops[0].attrs["softcap"] == 5.0
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert_close_to_eager(model(ids), fast(ids), rel=1e-5)


@pytest.mark.parametrize("name", NEAR_MISSES)
def test_near_misses_do_not_fuse(name):
    model = SinkLM(spelling=name, layers=1).eval()
    fast = fxforge.optimize(model, (_example(),))
    assert fast.graph.count("attention") == 0, fast.graph
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        assert_close_to_eager(model(ids), fast(ids), rel=1e-5)


@pytest.mark.parametrize("name", ["cat_max", "gate"])
@pytest.mark.parametrize("layout", ["dense", "paged"])
def test_kv_cache_generate_equals_an_eager_rerun(name, layout):
    model = SinkLM(**SPELLINGS[name]).eval()
    config = KVCacheConfig(layout="paged", block_size=4) if layout == "paged" else True
    fast = fxforge.optimize(model, (_example(),), kv_cache=config)
    assert len([n for n in fast.graph.nodes if n.attrs.get("sinks")]) == 2
    ids = torch.randint(0, VOCAB, (2, 6))
    assert torch.equal(fast.generate(ids, 8), _eager_greedy(model, ids, 8))


def test_kv_cache_generate_on_the_interpret_backend():
    # the prefill flash kernel for the prompt, the split decode kernel for each token
    model = SinkLM(spelling="cat").eval()
    fast = fxforge.optimize(model, (_example(),), kv_cache=True, backend="interpret")
    ids = torch.randint(0, VOCAB, (1, 5))
    assert torch.equal(fast.generate(ids, 4), _eager_greedy(model, ids, 4))


def test_static_decode_keeps_the_sinks():
    model = SinkLM(spelling="gate", window=4, positions=False).eval()
    fast = fxforge.optimize(model, (_example(),), kv_cache=True)
    assert fast.static_decode_problem is None
    ids = torch.randint(0, VOCAB, (2, 6))
    fast.static_decode = True
    out = fast.generate(ids, 6)
    assert torch.equal(out, _eager_greedy(model, ids, 6))


def test_ir_text_round_trips_and_typechecks_the_sinks(tmp_path):
    model = SinkLM(spelling="cat").eval()
    fast = fxforge.optimize(model, (_example(),))
    text = str(fast.graph)
    assert "sinks=true" in text
    assert_round_trips(fast.graph)
    again = parse(text)
    typecheck(again)
    fast.save(str(tmp_path / "saved"))
    loaded = fxforge.load(str(tmp_path / "saved"))
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        assert_close_to_eager(model(ids), loaded(ids), rel=1e-5)


def test_typecheck_refuses_sinks_of_the_wrong_shape():
    text = ("graph(%q: f32[B, 4, T, 8], %k: f32[B, 2, T, 8], %v: f32[B, 2, T, 8], %s: f32[2]) {\n"
            "  %1: f32[B, 4, T, 8] = attention(%q, %k, %v, %s) {causal=true, scale=0.5, sinks=true}\n"
            "  return (%1)\n}")
    with pytest.raises(IRCheckError, match="sinks must be a float \\[H=4\\]"):
        typecheck(parse(text))
    typecheck(parse(text.replace("%s: f32[2]", "%s: f32[4]")))
    # a bias, then one more input: slopes or sinks, which the attributes must say
    two = text.replace("%s: f32[2]", "%b: f32[1, 1, T, T], %s: f32[4]").replace("%v, %s)", "%v, %b, %s)")
    typecheck(parse(two))
    with pytest.raises(IRCheckError, match="alibi=true .* or sinks=true"):
        typecheck(parse(two.replace(", sinks=true", "")))


def test_reference_is_an_extra_zero_value_key():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    sink = torch.randn(4)
    out = attention_reference(q, k, v, sink, causal=True, scale=0.3, sinks=True)
    # one more key of zeros in front, its score raised to the sink by a bias column
    kz = torch.cat([torch.zeros(2, 2, 1, 8), k], 2)
    vz = torch.cat([torch.zeros(2, 2, 1, 8), v], 2)
    bias = torch.zeros(1, 4, 1, 8)
    bias[..., 0] = sink.view(1, 4, 1)
    keep = torch.ones(5, 8, dtype=torch.bool)
    keep[:, 1:] = torch.arange(7)[None, :] <= torch.arange(5)[:, None] + 2
    bias = bias.masked_fill(~keep, float("-inf"))
    ref = attention_reference(q, kz, vz, bias, causal=False, scale=0.3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_fully_masked_rows_give_zeros_as_eager_does():
    # with a sink every row has a key to attend to: eager's softmax gives the sink all the
    # weight (output 0) where the scores are all masked; so do the torch paths
    from fxforge.runtime.torch_kernels import attention_sdpa

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    bias = torch.zeros(1, 1, 3, 4)
    bias[..., 1, :] = torch.finfo(torch.float32).min
    sink = torch.tensor([0.5, -1.0])
    for dtype in (torch.float32, torch.float64):
        args = (q.to(dtype), k.to(dtype), v.to(dtype), bias.to(dtype), sink)
        out = attention_sdpa(*args, causal=False, scale=0.3, sinks=True)
        ref = attention_reference(*args, causal=False, scale=0.3, sinks=True)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        assert out[:, :, 1].abs().max() < 1e-6


@pytest.mark.parametrize("method", ["mean"])
def test_gqa_keeps_sinks_per_query_head(method):
    model = SinkLM(spelling="cat", kv_heads=4, layers=1).eval()
    fast = fxforge.optimize(model, (_example(),), gqa={"num_kv_heads": 2, "method": method})
    ops = _sinks_ops(fast)
    assert len(ops) == 1 and ops[0].inputs[1].shape[1] == 2 and ops[0].inputs[-1].shape[0] == 4


def test_shard_slices_the_sinks_with_the_heads():
    from fxforge.ir.capture import capture_with_spec
    from fxforge.passes import registry
    from fxforge.passes.manager import run_pipeline
    from fxforge.passes.shard import ShardConfig

    model = SinkLM(spelling="gate", layers=1).eval()
    graph, _ = capture_with_spec(model, (_example(),))
    for rank in range(2):
        parsed = registry.parse_options({"tensor_parallel": ShardConfig(2, rank)})
        out, _ = run_pipeline(graph, [registry.get(n) for n in ("cleanup", "fuse_attention", "shard")], parsed,
                              check=True)
        (attn,) = [n for n in out.nodes if n.op == "attention"]
        assert attn.attrs["sinks"] and attn.inputs[0].shape[1] == 2
        producers = out.producers()
        node = producers[attn.inputs[-1]]  # rank r keeps the sinks of its query heads 2r, 2r + 1
        while node.op != "slice":
            node = producers[node.inputs[0]]
        assert (node.attrs["start"], node.attrs["end"]) == (2 * rank, 2 * rank + 2)
        assert_round_trips(out)


def test_gqa_aligned_moves_the_sinks_with_the_query_heads():
    # KV heads 0 and 2 (and 1 and 3) are the same: 'aligned' groups them, an exact merge,
    # and permutes the query heads to [0, 2, 1, 3]; the output stays eager's only if each
    # sink moves with its query head
    from fxforge.passes.gqa import GQAConfig

    model = SinkLM(spelling="cat", kv_heads=4, layers=1).eval()
    attn = model.attn[0]
    with torch.no_grad():
        for w in (attn.k.weight, attn.v.weight):
            w[16:24] = w[0:8]
            w[24:32] = w[8:16]
    ids = torch.randint(0, VOCAB, (2, 9))
    fast = fxforge.optimize(model, (_example(),), gqa=GQAConfig(2, "aligned", calibration=ids))
    (op,) = _sinks_ops(fast)
    assert op.inputs[1].shape[1] == 2
    with torch.no_grad():
        assert_close_to_eager(model(ids), fast(ids), rel=1e-4)


def test_optional_inputs_are_sorted_by_the_flags():
    # the implementations take (bias, slopes, sinks) positionally, as many as the node has
    from fxforge.ir.ops import attention_inputs

    b, s, k = "bias", "slopes", "sinks"
    assert attention_inputs(b, s, k, alibi=True, sinks=True) == (b, s, k)
    assert attention_inputs(b, k, sinks=True) == (b, None, k)
    assert attention_inputs(s, k, alibi=True, sinks=True) == (None, s, k)
    assert attention_inputs(k, sinks=True) == (None, None, k)
    assert attention_inputs(s, alibi=True) == (None, s, None)
    assert attention_inputs(b, s) == (b, s, None)  # slopes in their own slot stay slopes
    assert attention_inputs(None, s) == (None, s, None)


class _ShiftedMaskSinks(nn.Module):
    """Sinks over scores whose causal mask also adds `shift` to every kept entry: softmax
    alone would not see the shift, the sink does (it competes with the scores)."""

    def __init__(self, shift: float):
        super().__init__()
        torch.manual_seed(0)
        self.shift = shift
        self.qk = nn.Linear(8, 16)
        self.sinks = nn.Parameter(torch.randn(2))

    def forward(self, x):
        b, t, _ = x.shape
        q, k = self.qk(x).view(b, t, 2, 2, 4).permute(2, 0, 3, 1, 4)
        i = torch.arange(t)
        mask = torch.zeros(t, t).masked_fill(i[None, :] > i[:, None], torch.finfo(torch.float32).min) + self.shift
        c = torch.cat([q @ k.transpose(-1, -2) / 2.0 + mask, self.sinks.reshape(1, -1, 1, 1).expand(b, -1, t, 1)], -1)
        return torch.softmax(c, -1)[..., :-1] @ k


@pytest.mark.parametrize("shift", [0.0, 1.5])
def test_a_mask_that_shifts_the_kept_scores_stays_a_bias_with_sinks(shift):
    # causal up to a constant is causal for softmax, not for a sink: the shift must stay
    model = _ShiftedMaskSinks(shift).eval()
    x = torch.randn(2, 7, 8)
    fast = fxforge.optimize(model, (x,))
    (op,) = _sinks_ops(fast)
    assert op.attrs["causal"] == (shift == 0.0), fast.ir
    with torch.no_grad():
        assert_close_to_eager(model(x), fast(x), rel=1e-5)
        assert_close_to_eager(model(x[:, :4]), fast(x[:, :4]), rel=1e-5)


class _PaddedSinks(nn.Module):
    """Sinks over causal scores masked with -inf from a padding mask input; `spelling`
    "cat" (a row of padding only is 0 in eager: the sink takes all the weight) or "gate"
    (eager's softmax of such a row is NaN)."""

    def __init__(self, spelling: str):
        super().__init__()
        torch.manual_seed(0)
        self.spelling = spelling
        self.qkv = nn.Linear(8, 24)
        self.sinks = nn.Parameter(torch.randn(2))

    def forward(self, x, mask):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 2, 4).permute(2, 0, 3, 1, 4)
        i = torch.arange(t)
        keep = (i[None, :] <= i[:, None])[None, None] & (mask[:, None, None, :] != 0)
        s = (q @ k.transpose(-1, -2) / 2.0).masked_fill(~keep, float("-inf"))
        if self.spelling == "cat":
            c = torch.cat([s, self.sinks.reshape(1, -1, 1, 1).expand(b, -1, t, 1)], -1)
            return torch.softmax(c, -1)[..., :-1] @ v
        gate = torch.sigmoid(torch.logsumexp(s, -1) - self.sinks.reshape(1, -1, 1)).unsqueeze(-1)
        return (torch.softmax(s, -1) @ v) * gate


@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_a_sink_column_fuses_over_rows_masked_throughout(backend):
    # eager gives 0 on a row of padding only (the sink column takes all the weight), as the
    # op does; the pass refused it, saying eager gives NaN there
    model = _PaddedSinks("cat").eval()
    x, mask = torch.randn(2, 5, 8), torch.tensor([[0, 0, 0, 0, 0], [0, 0, 1, 1, 1]])
    fast = fxforge.optimize(model, (x, mask), backend=backend)
    assert len(_sinks_ops(fast)) == 1, fast.ir
    with torch.no_grad():
        expected = model(x, mask)
    assert not expected.isnan().any()
    assert_close_to_eager(expected, fast(x, mask), rel=1e-5)


def test_a_gated_sink_over_rows_masked_throughout_stays_unfused():
    # gated, eager's softmax of a row masked throughout is NaN: the op (0 there) would differ
    model = _PaddedSinks("gate").eval()
    x, mask = torch.randn(2, 5, 8), torch.tensor([[0, 0, 0, 0, 0], [0, 0, 1, 1, 1]])
    fast = fxforge.optimize(model, (x, mask))
    assert not _sinks_ops(fast)
    with torch.no_grad():
        expected = model(x, mask)
    got = fast(x, mask)
    assert torch.equal(expected.isnan(), got.isnan())
