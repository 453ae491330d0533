"""Approximations (gqa, quantize) say honestly what they did: an error measured on data
nothing was fitted to, the layers they touched chosen by what the graph computes (the same
under torch.compile as under optimize), and refusals at optimize() that name the weight or
dtype and the way out, not a crash at the first call."""
import pytest
import torch

import fxforge
from fxforge.passes.gqa import GQAConfig
from fxforge.passes.quantize import DEFAULT_EXCLUDE, QuantConfig
from fxforge.runtime.retarget import DtypePinnedError

import zoo


def _details(fast, name):
    return next(s for s in fast.stats if s.name == name).details[name]


def _report_lines(fast, words):
    return [line.strip() for line in fast.report().splitlines() if words in line]


# -- gqa: the error reported is a held-out one -----------------------------------------------
class _WithAttentionOutputs(torch.nn.Module):
    """A llama that also returns each layer's o_proj output: the quantity gqa reports on."""

    def __init__(self, model):
        super().__init__()
        self.m, self.acts = model, []
        for layer in model.model.layers:
            layer.self_attn.o_proj.register_forward_hook(lambda mod, i, o: self.acts.append(o))

    def forward(self, x):
        self.acts.clear()
        logits = self.m(x, use_cache=False).logits
        acts, self.acts = list(self.acts), []
        return (logits, *acts)


@pytest.fixture(scope="module")
def attention_model():
    torch.manual_seed(0)
    return _WithAttentionOutputs(zoo.llama("sdpa", kv_heads=4)[0]).eval()


def test_gqa_aligned_reports_a_held_out_error(attention_model):
    # 'aligned' fits a rank-head_dim merge per group: on the tokens it was fitted on the
    # error was ~50x below the error on any other input, and that was what report() gave
    torch.manual_seed(1)
    calib, fresh = torch.randint(0, 128, (2, 16)), torch.randint(0, 128, (4, 48))
    fast = fxforge.optimize(attention_model, (calib[:, :8],), gqa=GQAConfig(1, "aligned", calibration=calib))
    details = _details(fast, "gqa")
    assert details["error_held_out"] and details["error_tokens"] == 16
    assert "held-out: 16 tokens" in fast.report()
    with torch.no_grad():
        ref, got = attention_model(fresh), fast(fresh)
    true = [float((g - r).norm() / r.norm()) for g, r in zip(got[1:], ref[1:])]
    reported = [layer["rel_error"] for layer in details["layers"]]
    assert all(0.5 * t < r < 2 * t for r, t in zip(reported, true)), (reported, true)


def test_gqa_too_small_calibration_says_its_error_is_in_sample(attention_model):
    calib = torch.randint(0, 128, (1, 16))  # head_dim tokens: enough to fit, none to hold out
    fast = fxforge.optimize(attention_model, (calib[:, :8],), gqa=GQAConfig(1, "aligned", calibration=calib))
    (line,) = _report_lines(fast, "relative error per layer")
    assert "in-sample" in line and "give at least 21 tokens per row" in line, line
    assert _details(fast, "gqa")["error_held_out"] is False
    # 'mean' fits nothing: measured on all the calibration tokens, and it says so
    mean = fxforge.optimize(attention_model, (calib[:, :8],), gqa=GQAConfig(1, "mean", calibration=calib))
    assert "all 16 calibration tokens ('mean' fits nothing to them)" in mean.report()
    with torch.no_grad():
        ref, got = attention_model(calib), mean(calib)
    true = [float((g - r).norm() / r.norm()) for g, r in zip(got[1:], ref[1:])]
    assert [layer["rel_error"] for layer in _details(mean, "gqa")["layers"]] == pytest.approx(true, rel=1e-3)


# -- quantize: the output head is the linear that makes the logits ---------------------------
class _ReturnsItsKeys(torch.nn.Module):
    """One attention layer that returns its keys as well as the logits (as a KV cache
    does): k's result is a graph output, yet it feeds the attention, so it is no head."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(64, 64) for _ in range(4))
        self.output = torch.nn.Linear(64, 96)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        a = torch.softmax(q @ k.transpose(-1, -2) * 0.125, dim=-1) @ v
        return self.output(self.o(a)), k.relu(), v


def test_returned_keys_and_values_are_not_the_output_head():
    torch.manual_seed(0)
    fast = fxforge.optimize(_ReturnsItsKeys().eval(), (torch.randn(2, 5, 64),), quantize="int8")
    skipped = dict(_details(fast, "quantize")["skipped"])
    assert skipped["output.weight"].startswith("the output head"), skipped
    assert "k.weight" not in skipped and "v.weight" not in skipped, skipped
    assert sorted(name for name, _, _ in _details(fast, "quantize")["layers"]) == \
        ["k.weight", "o.weight", "q.weight", "v.weight"]


def test_compile_quantizes_the_same_layers_as_optimize():
    # under torch.compile a HF model with use_cache=True returns its K/V cache: k_proj and
    # v_proj were skipped there as "the output head", quantized by optimize()
    from fxforge.dynamo import FxforgeBackend

    torch.manual_seed(0)
    model, vocab = zoo.llama("sdpa", kv_heads=4)
    ids = torch.randint(0, vocab, (1, 8))
    backend = FxforgeBackend(quantize="int8")
    with torch.no_grad():
        compiled = torch.compile(model, backend=backend)(ids).logits
    fast = fxforge.optimize(model, (ids,), quantize="int8")
    via_compile = _details(backend.compiled[0].model, "quantize")
    assert not [name for name, reason in via_compile["skipped"] if reason.startswith("the output head")]
    assert sorted(n for n, _, _ in via_compile["layers"]) == sorted(n for n, _, _ in _details(fast, "quantize")["layers"])
    assert torch.allclose(compiled, fast(ids).logits, atol=1e-5)


# -- quantize: refusals at optimize() that say what to do ------------------------------------
class _Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = (torch.nn.Linear(64, 64) for _ in range(3))

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4"])
def test_float64_model_is_refused_at_optimize_with_the_remedy(scheme):
    torch.manual_seed(0)
    model, x = _Mlp().eval().double(), torch.randn(1, 4, 64, dtype=torch.float64)
    config = QuantConfig(scheme, exclude=(), group_size=32 if scheme != "int8" else None)
    with pytest.raises(ValueError, match=r"computes in float64.*compute_dtype=torch\.float32"):
        fxforge.optimize(model, (x,), quantize=config)
    # the remedy it names works; w8a8 runs in float64 as it is
    fixed = QuantConfig(scheme, exclude=(), group_size=config.group_size, compute_dtype=torch.float32)
    out = fxforge.optimize(model, (x,), quantize=fixed)(x)
    assert out.dtype == torch.float64 and torch.allclose(out, model(x), atol=0.1)
    w8a8 = fxforge.optimize(model, (x,), quantize=QuantConfig("w8a8", exclude=()))(x)
    assert w8a8.dtype == torch.float64


def test_non_finite_weight_is_named_with_the_way_out():
    torch.manual_seed(0)
    model, x = _Mlp().eval(), torch.randn(1, 4, 64)
    with torch.no_grad():
        model.a.weight[0, 0], model.a.weight[3, 1] = float("inf"), float("nan")
    with pytest.raises(ValueError, match=r"weight 'a\.weight' \(shape \[64, 64\]\) has 2 non-finite elements.*"
                                         r"exclude=\(\*DEFAULT_EXCLUDE, 'a\.weight'\)"):
        fxforge.optimize(model, (x,), quantize="int8")
    # excluding it, as the message says, quantizes the rest
    fast = fxforge.optimize(model, (x,), quantize=QuantConfig("int8", exclude=(*DEFAULT_EXCLUDE, "a.weight")))
    assert [name for name, _, _ in _details(fast, "quantize")["layers"]] == ["b.weight"]


def test_an_explicit_compute_dtype_pins_to():
    """QuantConfig(compute_dtype=torch.float32) on a float32 model, then to(bfloat16): the
    cast to float32 was a no-op and left no node, so the products silently ran in bfloat16.
    It is refused now, naming the setting, and kept where the dtype does not change."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()
    x = torch.randn(3, 64)
    config = QuantConfig("int8", compute_dtype=torch.float32, exclude=())
    fast = fxforge.optimize(model, (x,), quantize=config)
    with pytest.raises(DtypePinnedError, match=r"QuantConfig\(compute_dtype=torch.float32\): the 2 "
                                                       r"quantized products run in it") as caught:
        fast.to(torch.bfloat16)
    # said as the compute dtype it is (it read as a cast in the model's code)
    message = str(caught.value)
    assert "pins its compute dtype to torch.float32" in message and "the model's code casts" not in message, message
    assert fast.to(torch.float32) is fast and fast(x).dtype == torch.float32
    plain = fxforge.optimize(model, (x,), quantize=QuantConfig("int8", exclude=()))
    assert plain.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16  # no compute dtype asked: it follows


# -- quantize (and gqa): the error against the source model on the example inputs -----------
@pytest.mark.parametrize("quantize", ["int8", "int4", "nf4", "w8a8"])
def test_quantize_reports_its_error_against_the_source_model(quantize):
    """quantize= used to report bytes and layers only: report() now states the whole
    model's error on the example inputs, and the figures are what one measures oneself."""
    torch.manual_seed(0)
    model, vocab = zoo.llama(n_layer=2)
    ids = torch.randint(0, vocab, (2, 16))
    fast = fxforge.optimize(model, (ids,), quantize=quantize, verbose=False)
    (line,) = _report_lines(fast, "error vs the source model on the example inputs (2x16)")
    error = next(s for s in fast.stats if s.name == "quantize").details["error"]
    with torch.no_grad():
        ref, out = model(ids).logits.double(), fast(ids).logits.double()
    assert error["rel_error"] == pytest.approx(float((out - ref).norm() / ref.norm()), rel=1e-6)
    assert error["max_abs_error"] == pytest.approx(float((out - ref).abs().max()), rel=1e-6)
    agree = (out.argmax(-1) == ref.argmax(-1)).double().mean()
    assert error["top1_agreement"] == pytest.approx(float(agree)) and error["rows"] == 32
    assert f"relative {error['rel_error']:.3g}" in line and "top-1 agreement" in line
    assert 0 < error["rel_error"] < 0.5


def test_gqa_reports_the_whole_models_error_too_and_training_mode_is_not_measured():
    torch.manual_seed(0)
    model, vocab = zoo.llama(n_layer=2)
    ids = torch.randint(0, vocab, (1, 12))
    fast = fxforge.optimize(model, (ids,), gqa=GQAConfig(num_kv_heads=1), verbose=False)
    assert _report_lines(fast, "error vs the source model on the example inputs (1x12): relative")
    model.train()  # (this llama has no dropout: optimize() does not warn, the measure declines anyway)
    trained = fxforge.optimize(model, (ids,), quantize="int8", verbose=False)
    assert _report_lines(trained, "error vs the source model not measured: the model is in training mode")


def test_the_error_is_measured_on_the_logits_when_a_loss_comes_first():
    torch.manual_seed(0)
    model, vocab = zoo.llama(n_layer=1)
    ids = torch.randint(0, vocab, (2, 7))
    fast = fxforge.optimize(model, example_kwargs=dict(input_ids=ids, labels=ids), quantize="int8", verbose=False)
    error = next(s for s in fast.stats if s.name == "quantize").details["error"]
    assert error["output"] == 1 and error["output_shape"] == (2, 7, vocab) and error["rows"] == 14
