"""runtime/last_token.py: a prefill that wants only the last token's logits projects only
that token (the output projection is a fifth of SmolLM2's weights). The cut program gives
the full program's last row; generate() and the engine use it; graphs where the cut cannot
be shown exact keep the full program."""
import pytest
import torch

import fxforge
from fxforge.ir.parser import parse
from fxforge.ir.printer import print_graph
from fxforge.ir.typecheck import typecheck
from fxforge.runtime.last_token import last_token_graph

import zoo
from helpers import prompts


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    model, vocab = zoo.llama("sdpa")
    return fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),), kv_cache=True), model, vocab


def test_the_cut_graph_projects_one_token_and_round_trips(llama):
    fast, _, _ = llama
    cut = last_token_graph(fast.pipeline_graph)
    assert cut is not None
    typecheck(cut)
    logits = cut.outputs[0]
    assert str(logits.type.shape[1]) == "1" and str(fast.pipeline_graph.outputs[0].type.shape[1]) == "T"
    # one slice per token input of the projection (with the final add + norm inside it: two)
    assert cut.count("slice") > fast.pipeline_graph.count("slice")
    assert print_graph(parse(print_graph(cut), cut.params)) == print_graph(cut)


@pytest.mark.parametrize("padded", [False, True], ids=["batch1", "left_padded_batch3"])
def test_last_only_prefill_gives_the_full_programs_last_row(llama, padded):
    fast, _, vocab = llama
    ids, mask = prompts(vocab, padded)
    pad = (mask == 0).sum(1) if mask is not None else torch.zeros(ids.shape[0], dtype=torch.long)
    rows = []
    for last in (False, True):
        with fast.kv_cache_lease(ids.shape[0], ids.shape[1] + 4) as cache:
            cache.prepare(pad, fast.bias_dtype())
            rows.append(fast.run_cached(ids, 0, pad, cache, last_only=last))
    full, last = rows
    assert last.shape == (ids.shape[0], 1, full.shape[-1])
    # the same row; only the matmul's blocking over 1 row instead of T may round differently
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-5)


def test_generate_uses_it_and_keeps_transformers_tokens(llama):
    fast, model, vocab = llama
    ids, mask = prompts(vocab, True)
    out = fast.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None, pad_token_id=0)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    assert torch.equal(out, ref)
    program, graph = fast._last_token
    assert graph is not None and program is not fast.program


def test_a_softcap_after_the_projection_is_cut_too():
    import test_attention_variants as variants

    torch.manual_seed(0)
    model = variants.MODELS["gemma2"][0]()  # tanh soft-cap on the final logits
    fast = fxforge.optimize(model, (torch.randint(1, 128, (2, 7)),), kv_cache=True)
    cut = last_token_graph(fast.pipeline_graph)
    assert cut is not None and str(cut.outputs[0].type.shape[1]) == "1"
    ids, mask = prompts(128, True)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    assert torch.equal(fast.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=None,
                                     pad_token_id=0), ref)


IR = """graph(%x: f32[B, T, 8], %p0: param "w" f32[16, 8], %p1: param "v" f32[16, 8]) {{
  signature {{outputs=("logits",)}}
  %1: f32[B, T, 16] = linear(%x, %p0)
  {extra}
  return ({out})
}}"""


@pytest.mark.parametrize("extra, out", [
    # the logits mix tokens after the projection (a mean over T): cutting would change them
    ("%2: f32[B, 1, 16] = mean(%1) {dims=(1,), keepdim=true, dtype=none}\n  "
     "%3: f32[B, T, 16] = add(%1, %2)", "%3"),
    # the projection's output is read by something besides the logits' chain
    ("%2: f32[B, T, 16] = linear(%x, %p1)\n  %3: f32[B, T, 16] = add(%1, %2)\n  "
     "%4: f32[B, T, 16] = mul(%3, %1)", "%4"),
], ids=["mixes-tokens", "second-reader"])
def test_graphs_it_cannot_show_exact_keep_the_full_program(extra, out):
    params = {"w": torch.randn(16, 8), "v": torch.randn(16, 8)}
    graph = parse(IR.format(extra=extra, out=out), params)
    assert last_token_graph(graph) is None
    plain = parse(IR.format(extra="", out="%1"), params)
    assert last_token_graph(plain) is not None  # the bare projection is cut


def test_a_fused_group_reducing_over_tokens_is_not_cut():
    from fxforge.runtime.last_token import _within_a_token
    from fxforge.ir.graph import Node, Value
    from fxforge.ir.types import TensorType
    import sympy

    out = Value(TensorType((sympy.Symbol("B"), sympy.Symbol("T"), sympy.Integer(16)), torch.float32))
    row = Node("fused_pointwise", (), {"body": (("mean", ("in0",), (("dims", (2,)), ("keepdim", True))),),
                                        "outputs": ("t0",)}, (out,))
    over_tokens = Node("fused_pointwise", (), {"body": (("mean", ("in0",), (("dims", (1,)), ("keepdim", True))),),
                                                "outputs": ("t0",)}, (out,))
    cat_tokens = Node("fused_pointwise", (), {"body": (("cat", ("in0", "in0"), (("dim", -2),)),),
                                               "outputs": ("t0",)}, (out,))
    assert _within_a_token(row) and not _within_a_token(over_tokens) and not _within_a_token(cat_tokens)
