"""fxforge.load_ir: a dumped (or hand-edited) .ir file plus its weights runs, because the
graph carries everything the runtime needs: input roles, state specs, output roles,
limits and guards (ir/roles.py)."""
import os

import pytest
import torch

import fxforge

import zoo


@pytest.fixture(scope="module")
def cached_llama():
    model, vocab = zoo.llama("sdpa")
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (2, 7))
    return fxforge.optimize(model, (ids,), kv_cache=True), ids


def test_a_dumped_ir_runs_and_generates_like_the_original(cached_llama, tmp_path):
    fast, ids = cached_llama
    fast.dump(str(tmp_path))
    last = sorted(f for f in os.listdir(tmp_path) if f.endswith(".ir"))[-1]
    text = open(tmp_path / last).read()
    assert text == fast.ir
    loaded = fxforge.load_ir(text, fast.graph.params)
    assert torch.equal(loaded(ids), fast(ids).logits)
    assert loaded.kv_layout == fast.kv_layout  # read from the text, not from a pass report
    prompt = ids[:1, :5]
    assert torch.equal(loaded.generate(prompt, 9, eos_token_id=None), fast.generate(prompt, 9, eos_token_id=None))


def test_hand_edits_take_effect(cached_llama):
    fast, ids = cached_llama
    text = fast.ir
    # a limit written into the signature is enforced by generate()
    limited = fxforge.load_ir(text.replace('signature {outputs=("logits",)',
                                           'signature {outputs=("logits",), max_seq_len=10'), fast.graph.params)
    limited.generate(ids[:1, :5], 6, eos_token_id=None)  # 10 positions fed (the last token never is)
    with pytest.raises(ValueError, match="more than max_seq_len=10"):
        limited.generate(ids[:1, :5], 7, eos_token_id=None)
    # a guard written by hand is checked on every call
    guarded = fxforge.load_ir(text.replace("  signature", "  guard T <= 6\n  signature"), fast.graph.params)
    with pytest.raises(ValueError, match="T=7"):
        guarded(ids)
    # without the logits role, generate() cannot tell which output to sample from
    no_logits = fxforge.load_ir(text.replace('outputs=("logits",)', 'outputs=("output",)'), fast.graph.params)
    with pytest.raises(ValueError, match="role logits"):
        no_logits.generate(ids[:1], 2)


def test_malformed_signatures_and_missing_weights_are_clear_errors(cached_llama):
    fast, _ = cached_llama
    text = fast.ir
    with pytest.raises(fxforge.IRCheckError, match="role 'cache_length'"):
        fxforge.load_ir(text.replace('role="cache_len"', 'role="cache_length"'), fast.graph.params)
    with pytest.raises(fxforge.IRCheckError, match="needs attributes layer, kind and layout"):
        fxforge.load_ir(text.replace(', kind="k", layout="dense"}', "}", 1), fast.graph.params)
    with pytest.raises(fxforge.IRCheckError, match="one role per output"):
        fxforge.load_ir(text.replace('outputs=("logits",)', 'outputs=("logits", "output")'), fast.graph.params)
    some = dict(list(fast.graph.params.items())[1:])
    with pytest.raises(KeyError, match="no tensor for 1 parameter"):
        fxforge.load_ir(text, some)


def test_a_quantized_graph_loads():
    model, vocab = zoo.gpt2("sdpa")
    ids = torch.randint(0, vocab, (1, 6))
    fast = fxforge.optimize(model, (ids,), quantize="int8")
    loaded = fxforge.load_ir(fast.ir, fast.graph.params)
    assert torch.equal(loaded(ids), fast(ids).logits)
