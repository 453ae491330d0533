"""The public API: clear errors for bad input, opaque fallback, output structure, inspection."""
import pytest
import torch

import fxforge
from fxforge.ir import capture

import zoo


class DataDependent(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # branches on a tensor value: torch.export cannot capture this
            return x * 2
        return x


def test_uncapturable_model_raises_capture_error_naming_the_line_and_fix():
    with pytest.raises(fxforge.CaptureError) as info:
        fxforge.optimize(DataDependent(), (torch.randn(2, 3),))
    msg = str(info.value)
    assert "DataDependent" in msg
    assert "test_api.py" in msg and "x.sum() > 0" in msg
    assert "torch.where" in msg


def test_wrong_rank_or_dtype_names_the_expected_ir_type():
    model, vocab = zoo.llama()
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 5)),))
    with pytest.raises(ValueError, match=r"input 0 \(input_ids\) must be i64\[B, T\]"):
        fast(torch.randint(0, vocab, (2, 5, 1)))
    with pytest.raises(ValueError, match=r"must be i64\[B, T\] \(rank 2, i64\), got a torch.float32 tensor of "
                                         r"shape \(2, 5\); convert it \(\.to\(torch\.int64\)\) or optimize with an "
                                         r"example of the dtype you call with"):
        fast(torch.randn(2, 5))


def test_unknown_pass_option_and_backend_errors():
    model = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="unknown pass 'fuse_everything'; known passes: cleanup"):
        fxforge.optimize(model, (torch.randn(2, 4),), passes=["fuse_everything"])
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['turbo'\]"):
        fxforge.optimize(model, (torch.randn(2, 4),), turbo=True)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        fxforge.optimize(model, (torch.randn(2, 4),), backend="cuda")
    with pytest.raises(ValueError, match="backend 'triton' runs on CUDA tensors"):
        fxforge.optimize(model, (torch.randn(2, 4),), backend="triton")


class UsesUnknownOps(torch.nn.Module):
    """sort/cumsum/gather are not modelled by the IR: they must run as torch_call."""

    def forward(self, x):
        values, idx = torch.sort(x, dim=-1)
        return torch.cumsum(values, -1) + torch.gather(x, -1, idx).exp()


def test_unknown_ops_fall_back_to_torch():
    model = UsesUnknownOps()
    x = torch.randn(3, 7)
    fast = fxforge.optimize(model, (x,))
    text = fast.ir
    assert 'target="aten.sort.default"' in text and 'target="aten.cumsum.default"' in text
    for shape in [(3, 7), (5, 2)]:
        y = torch.randn(*shape)
        torch.testing.assert_close(fast(y), model(y))


class GradModeInside(torch.nn.Module):
    def forward(self, x):
        with torch.no_grad():
            y = x * 3
        return y + 1, {"twice": x * 2, "none": None}


def test_higher_order_wrappers_inline_and_nested_outputs_keep_structure():
    fast = fxforge.optimize(GradModeInside(), (torch.randn(2, 3),))
    assert "wrap_with_set_grad_enabled" not in fast.ir
    x = torch.randn(4, 5)
    y, extra = fast(x)
    torch.testing.assert_close(y, x * 3 + 1)
    torch.testing.assert_close(extra["twice"], x * 2)
    assert extra["none"] is None


def test_inspection_surfaces():
    model, vocab = zoo.gpt2()
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 5)),))
    assert fast.ir.startswith("graph(%input_ids: i64[B, T]")
    assert "def program(input_ids):" in fast.code
    assert "B = input_ids.shape[0]" in fast.code
    report = fast.report()
    assert "capture" in report and "cleanup" in report and "nodes" in report
    g = capture(model, (torch.randint(0, vocab, (2, 5)),))
    assert isinstance(g, fxforge.Graph)


def test_symbol_mismatch_between_inputs_is_reported():
    model, vocab = zoo.llama()
    ids = torch.randint(0, vocab, (2, 6))
    fast = fxforge.optimize(model, example_kwargs={"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    with pytest.raises(ValueError, match="T=6 in dim 1, but another input has T=5"):
        fast(input_ids=ids[:, :5], attention_mask=torch.ones_like(ids))


def test_keyword_not_captured_is_rejected():
    model, vocab = zoo.llama()
    ids = torch.randint(0, vocab, (2, 6))
    fast = fxforge.optimize(model, (ids,))
    with pytest.raises(TypeError, match=r"keyword argument\(s\) \['attention_mask'\] were not given"):
        fast(ids, attention_mask=torch.ones_like(ids))


# A pass option whose value means nothing must fail before capture (DataDependent cannot
# even be captured: reaching the option's error proves it came first), naming the option.
@pytest.mark.parametrize("options, error, message", [
    (dict(gqa=0), ValueError, r"gqa: num_kv_heads must be a positive int .* got 0"),
    (dict(gqa=-1), ValueError, r"gqa: num_kv_heads must be a positive int .* got -1"),
    (dict(gqa=True), TypeError, r"gqa= takes the number of KV heads .* got True"),
    (dict(gqa=False), TypeError, r"gqa= takes the number of KV heads .* got False"),
    (dict(gqa=2.0), TypeError, r"gqa= takes the number of KV heads .* got 2.0"),
    (dict(gqa={"heads": 2}), TypeError, r"gqa=\{'heads': 2\}: .*fields are num_kv_heads, method, calibration"),
    (dict(kv_cache=0), TypeError, r"kv_cache= takes True or False.* got 0"),
    (dict(kv_cache=1), TypeError, r"kv_cache= takes True or False.* got 1"),
    (dict(kv_cache="yes"), TypeError, r"kv_cache= takes True or False.* got 'yes'"),
    (dict(kv_cache={"max_len": 8}), TypeError, r"kv_cache=\{'max_len': 8\}: .*fields are max_seq_len"),
    (dict(kv_cache={"max_seq_len": 0}), ValueError, r"KVCacheConfig.max_seq_len must be a positive int"),
    (dict(quantize=True), TypeError, r"quantize= takes a scheme name .* got True"),
    (dict(quantize=False), TypeError, r"quantize= takes a scheme name .* got False"),
    (dict(quantize=""), ValueError, r"unknown quantization scheme ''"),
    (dict(quantize={"scheme": "int4", "group_size": 100}), ValueError, r"int4 group_size must be one of"),
])
def test_bad_pass_option_values_raise_before_capture(options, error, message):
    with pytest.raises(error, match=message):
        fxforge.optimize(DataDependent(), (torch.randn(2, 3),), **options)


def test_none_and_false_leave_a_pass_out():
    model = torch.nn.Linear(4, 4)
    fast = fxforge.optimize(model, (torch.randn(2, 4),), gqa=None, quantize=None, kv_cache=False)
    names = [s.name for s in fast.stats]
    assert "gqa" not in names and "quantize" not in names and "kv_cache" not in names
    fast = fxforge.optimize(model, (torch.randn(2, 4),), kv_cache=None, quantize={"scheme": "int8"})
    assert "quantize" in [s.name for s in fast.stats] and "kv_cache" not in [s.name for s in fast.stats]


def test_parameters_the_passes_make_land_on_the_models_device():
    """ALiBi slopes are made by fuse_attention on the CPU; the program gets them on the
    model's device (a GPU kernel must not get a host pointer). Shown with the meta device."""
    import test_attention_variants as variants
    from fxforge.runtime.build import params_on

    fast = fxforge.optimize(variants.MODELS["bloom"][0](), (torch.randint(1, 128, (2, 7)),))
    assert any(n.startswith("_alibi_slopes") for n in fast.graph.params)
    moved = params_on(fast.graph, "meta")
    assert {t.device.type for t in moved.params.values()} == {"meta"}
    assert params_on(fast.graph, "cpu") is fast.graph  # nothing to move: the same graph


def test_the_readmes_speculative_names_resolve_after_a_plain_import():
    # README: fxforge.runtime.speculative.self_draft(...) / SpeculativeStats(); after only
    # `import fxforge` this was an AttributeError
    import subprocess
    import sys

    code = "import fxforge; fxforge.runtime.speculative.self_draft; fxforge.runtime.speculative.SpeculativeStats()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
