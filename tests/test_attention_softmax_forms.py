"""Softmax spellings around attention that fuse_attention proves exact (and near-misses it
must leave alone):

  - softmax(s - s.max(-1, keepdim=True)) (mimo_v2_flash's "subtract max for BF16/FP16
    stability"): softmax subtracts the row max itself, so the subtraction is dropped;
  - one softmax's probabilities read by two matmuls (diffllama's two value halves, the
    two eager attention calls merged by CSE): each matmul is its own attention;
  - scores computed with the heads folded into the batch (baddbmm on [B*H, T, T]) and
    viewed back to [B, H, T, T] for the mask and the softmax (gpt_neox_japanese).

Each: the IR holds `attention` ops and no softmax, outputs equal eager on the torch and
interpret backends, and kv_cache generate equals transformers (or an eager re-run loop)."""
import importlib.util
import os
import warnings

import pytest
import torch

import fxforge

from helpers import assert_close_to_eager, prompts

# loaded by path under its own name: `coverage` is also the name of coverage.py (pytest-cov)
_spec = importlib.util.spec_from_file_location(
    "fxforge_coverage_sweep_forms", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "coverage.py"))
coverage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(coverage)

BACKENDS = ("torch", "interpret")


H, D = 4, 8


def split_heads(x):
    """x [B, T, 3*H*D] -> q, k, v [B, H, T, D]."""
    return (y.view(x.size(0), x.size(1), H, D).transpose(1, 2) for y in x.chunk(3, dim=-1))


def causal_fill(t, device=None):
    """The additive causal mask transformers builds: finfo.min above the diagonal."""
    return torch.triu(torch.full((t, t), torch.finfo(torch.float32).min, device=device), 1)


class Attn(torch.nn.Module):
    """softmax(fn(q k^T * 0.25 + causal)) @ v: `fn` spells the softmax input from the scores."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        q, k, v = split_heads(x)
        s = q @ k.transpose(-1, -2) * 0.25 + causal_fill(q.size(2), x.device)
        return torch.softmax(self.fn(s), dim=-1) @ v


def inputs(b, t, seed=0):
    return (torch.randn(b, t, 3 * H * D, generator=torch.Generator().manual_seed(seed)),)


def _optimize(model, args, backend="torch", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxforge.optimize(model, args, backend=backend, **kw)


def _fused(fast) -> int:
    return fast.graph.count("attention")


def _assert_equal_at_sizes(model, fast, sizes=((1, 1), (2, 5), (3, 13))):
    for b, t in sizes:
        args = inputs(b, t, seed=b * 100 + t)
        with torch.no_grad():
            ref = model(*args)
        torch.testing.assert_close(fast(*args), ref, rtol=1e-5, atol=1e-5)


# -- softmax(s - max(s)) ------------------------------------------------------------------------
MAX_SUBTRACTED = {
    "max_dim_values": lambda s: s - s.max(dim=-1, keepdim=True).values,
    "max_dim_index_0": lambda s: s - torch.max(s, 3, keepdim=True)[0],
    "amax": lambda s: s - s.amax(-1, keepdim=True),
    "amax_positive_dim": lambda s: s - torch.amax(s, dim=3, keepdim=True),
}

# the max is not the softmax's own row max of the same tensor: softmax(x - c) with c not
# the row max of x is not softmax(x) in general, or x is read elsewhere
NOT_MAX_SUBTRACTED = {
    "max_over_another_dim": lambda s: s - s.amax(-2, keepdim=True),
    "max_of_another_tensor": lambda s: s - (s * 2).amax(-1, keepdim=True),
    "max_of_a_slice": lambda s: s - s[..., :2].amax(-1, keepdim=True),
    "max_without_keepdim": lambda s: s - s.amax(-1)[..., None],
    "max_minus_scores": lambda s: s.amax(-1, keepdim=True) - s,
    "max_plus_scores": lambda s: s + s.amax(-1, keepdim=True),
    "max_indices_used": lambda s: s - torch.max(s, -1, keepdim=True)[0] + torch.max(s, -1, keepdim=True)[1] * 0,
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", MAX_SUBTRACTED)
def test_row_max_subtraction_before_softmax_fuses(form, backend):
    model = Attn(MAX_SUBTRACTED[form])
    fast = _optimize(model, inputs(2, 7), backend)
    assert _fused(fast) == 1 and fast.graph.count("softmax") == 0, fast.ir
    node = next(n for n in fast.graph.nodes if n.op == "attention")
    assert node.attrs["causal"] and node.attrs["scale"] == 0.25 and len(node.inputs) == 3, fast.ir
    assert "max" not in fast.ir, fast.ir
    _assert_equal_at_sizes(model, fast)


@pytest.mark.parametrize("form", NOT_MAX_SUBTRACTED)
def test_other_subtractions_before_softmax_stay(form):
    model = Attn(NOT_MAX_SUBTRACTED[form])
    fast = _optimize(model, inputs(2, 7))
    assert _fused(fast) == 0 and fast.graph.count("softmax") == 1, fast.ir
    _assert_equal_at_sizes(model, fast)


def test_row_max_subtraction_is_softmax_equal_on_inf_and_nan_rows():
    # why the subtraction may go: eager's softmax(x - max(x)) is softmax(x), NaN rows
    # (all -inf, a +inf, a NaN) included, in every float dtype
    inf, nan = float("inf"), float("nan")
    rows = torch.tensor([[-inf] * 4, [1.0, -inf, 2.0, -inf], [inf, 1.0, 2.0, 3.0], [nan, 1.0, 2.0, 3.0],
                         [3e38, -3e38, 0.0, 1.0], [-3.4e38] * 4])
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        x = rows.to(dtype)
        a, b = torch.softmax(x - x.max(-1, keepdim=True).values, -1), torch.softmax(x, -1)
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def test_row_max_subtraction_keeps_the_nan_row_refusal():
    # a -inf fill where an input mask says: a row it drops entirely is NaN in eager (with or
    # without the max subtracted) but 0 from fused attention, so it stays unfused
    class Filled(torch.nn.Module):
        def forward(self, x, keep):
            q, k, v = split_heads(x)
            s = (q @ k.transpose(-1, -2) * 0.25).masked_fill(~keep[:, None, None, :], float("-inf"))
            s = s - s.amax(-1, keepdim=True)
            return torch.softmax(s, dim=-1) @ v

    keep = torch.ones(2, 7, dtype=torch.bool)
    fast = _optimize(Filled(), (*inputs(2, 7), keep))
    assert _fused(fast) == 0 and fast.graph.count("softmax") == 1, fast.ir
    assert "NaN in eager" in str(fast.report())
    keep[1] = False  # every key of row 1 dropped
    out, ref = fast(*inputs(2, 7), keep), Filled()(*inputs(2, 7), keep)
    assert ref[1].isnan().all() and torch.equal(out.isnan(), ref.isnan())
    torch.testing.assert_close(out[0], ref[0])


def _tiny(arch, **overrides):
    config = coverage.tiny_config(arch)
    for key, value in overrides.items():
        setattr(config, key, value)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32).eval(), config


def _generate_equals_transformers(model, fast, vocab):
    for padded in (False, True):
        ids, mask = prompts(vocab, padded, lowest=3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=6, pad_token_id=0,
                                 eos_token_id=None)
        out = fast.generate(ids, 6, attention_mask=mask, pad_token_id=0, eos_token_id=None)
        assert torch.equal(out, ref), (padded, out, ref)


def _assert_forward_equal(model, fast, vocab):
    gen = torch.Generator().manual_seed(1)
    for b, t in [(1, 5), (3, 11)]:
        ids = torch.randint(3, vocab, (b, t), generator=gen)
        with torch.no_grad():
            assert_close_to_eager(model(ids), fast(ids))


@pytest.mark.slow
def test_mimo_v2_flash_full_attention_layers_fuse_and_generate():
    # every layer full attention (the sliding layers add attention sinks, not this form)
    model, config = _tiny("mimo_v2_flash", layer_types=["full_attention"] * 2)
    ids = torch.randint(3, 128, (2, 7))
    for backend in BACKENDS:
        fast = _optimize(model, (ids,), backend)
        assert _fused(fast) == 2 and fast.graph.count("softmax") == 0, fast.ir
        assert "aten.max.dim" not in fast.ir
        _assert_forward_equal(model, fast, 128)
    _generate_equals_transformers(model, _optimize(model, (ids,), kv_cache=True), 128)


@pytest.mark.slow
def test_mimo_v2_flash_default_layers_fuse_the_full_attention_one():
    model, config = _tiny("mimo_v2_flash")
    assert config.layer_types[0] == "full_attention"
    fast = _optimize(model, (torch.randint(3, 128, (2, 7)),))
    assert _fused(fast) >= 1, fast.ir
    _assert_forward_equal(model, fast, 128)


# -- one softmax, two matmuls ------------------------------------------------------------------
class TwoValues(Attn):
    """p = softmax(q k^T * 0.25 + causal); `fn(p, v1, v2)` reads p (diffllama: p @ v1, p @ v2)."""

    def forward(self, x):
        q, k, v = split_heads(x)
        p = torch.softmax(q @ k.transpose(-1, -2) * 0.25 + causal_fill(q.size(2), x.device), dim=-1)
        v1, v2 = (h.repeat(1, 2, 1, 1) for h in torch.chunk(v, 2, dim=1))  # diffllama's value halves
        return self.fn(p, v1, v2)


SHARED_PROBABILITIES = {
    "two_value_halves": lambda p, v1, v2: torch.cat([p @ v1, p @ v2], dim=-1),
    "difference": lambda p, v1, v2: p @ v1 - 0.5 * (p @ v2),
    "three_matmuls": lambda p, v1, v2: p @ v1 + p @ v2 + p @ (v1 * v2),
}
# the probabilities also reach something other than a matmul's left operand
NOT_SHARED_PROBABILITIES = {
    "probabilities_returned": lambda p, v1, v2: (p @ v1, p @ v2, p),
    "probabilities_summed": lambda p, v1, v2: p @ v1 + p.sum(-1, keepdim=True),
    "probabilities_as_right_operand": lambda p, v1, v2: p @ v1 + (p @ p) @ v2,
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", SHARED_PROBABILITIES)
def test_probabilities_read_by_several_matmuls_fuse_each(form, backend):
    model = TwoValues(SHARED_PROBABILITIES[form])
    fast = _optimize(model, inputs(2, 7), backend)
    n = 3 if form == "three_matmuls" else 2
    atts = [node for node in fast.graph.nodes if node.op == "attention"]
    assert len(atts) == n and fast.graph.count("softmax") == 0, fast.ir
    assert all(a.attrs["causal"] and a.inputs[:2] == atts[0].inputs[:2] for a in atts), fast.ir
    _assert_equal_at_sizes(model, fast)


@pytest.mark.parametrize("form", NOT_SHARED_PROBABILITIES)
def test_probabilities_read_elsewhere_stay(form):
    model = TwoValues(NOT_SHARED_PROBABILITIES[form])
    fast = _optimize(model, inputs(2, 7))
    assert _fused(fast) == 0 and fast.graph.count("softmax") == 1, fast.ir
    args = inputs(2, 5)
    with torch.no_grad():
        ref = model(*args)
    out = fast(*args)
    for r, o in zip(ref if isinstance(ref, tuple) else (ref,), out if isinstance(out, tuple) else (out,)):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_diffllama_fuses_both_value_halves_and_generates():
    model, config = _tiny("diffllama")
    ids = torch.randint(3, 128, (2, 7))
    for backend in BACKENDS:
        fast = _optimize(model, (ids,), backend)
        assert _fused(fast) == 2 * config.num_hidden_layers and fast.graph.count("softmax") == 0, fast.ir
        _assert_forward_equal(model, fast, 128)
    _generate_equals_transformers(model, _optimize(model, (ids,), kv_cache=True), 128)


# -- q k^T with the heads folded into the batch, viewed back for the softmax -----------------
class FoldedScores(Attn):
    """gpt_neox_japanese: q k^T on [B*H, T, D] (`fn` spells it), viewed to [B, H, T, T],
    the mask added, softmax, times [B, H, T, D] values."""

    def forward(self, x):
        q, k, v = split_heads(x)
        b, h, t, d = q.shape
        s = self.fn(q.reshape(b * h, t, d), k.reshape(b * h, t, d))
        s = s.view(b, h, t, -1) + causal_fill(t, x.device)
        return torch.softmax(s, dim=-1) @ v


FOLDED_SCORES = {
    "baddbmm_zeros": lambda q, k: torch.baddbmm(torch.zeros(q.size(0), q.size(1), k.size(1)), q,
                                                k.transpose(1, 2), beta=1.0, alpha=0.25),
    "bmm_scaled": lambda q, k: torch.bmm(q, k.transpose(1, 2)) * 0.25,
    "zeros_plus_bmm": lambda q, k: torch.zeros(q.size(0), q.size(1), k.size(1)) + torch.bmm(q * 0.25, k.transpose(1, 2)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", FOLDED_SCORES)
def test_scores_with_heads_folded_then_viewed_back_fuse(form, backend):
    model = FoldedScores(FOLDED_SCORES[form])
    fast = _optimize(model, inputs(2, 7), backend)
    atts = [n for n in fast.graph.nodes if n.op == "attention"]
    assert len(atts) == 1 and fast.graph.count("softmax") == 0, fast.ir
    assert atts[0].attrs["causal"] and len(atts[0].inputs) == 3 and atts[0].attrs["scale"] == 0.25, fast.ir
    assert all(int(x.shape[1]) == H for x in atts[0].inputs), fast.ir  # [B, H, T, D], heads apart
    _assert_equal_at_sizes(model, fast)


def test_a_nonzero_baddbmm_input_stays_a_term():
    # only an exact zero may go: a full(0.5) input is a (row-constant) term the mask proof sees
    model = FoldedScores(lambda q, k: torch.baddbmm(torch.full((q.size(0), q.size(1), k.size(1)), 0.5), q,
                                                    k.transpose(1, 2), alpha=0.25))
    fast = _optimize(model, inputs(2, 7))
    assert _fused(fast) == 1, fast.ir
    _assert_equal_at_sizes(model, fast)


@pytest.mark.slow
def test_gpt_neox_japanese_fuses_and_generates():
    model, config = _tiny("gpt_neox_japanese")
    ids = torch.randint(3, 128, (2, 7))
    for backend in BACKENDS:
        fast = _optimize(model, (ids,), backend)
        assert _fused(fast) == config.num_hidden_layers and fast.graph.count("softmax") == 0, fast.ir
        _assert_forward_equal(model, fast, 128)
    _generate_equals_transformers(model, _optimize(model, (ids,), kv_cache=True), 128)
