"""fast.save(path) / fxforge.load(path): the optimized IR, its weights and the call spec,
loaded without the model class and without capture, give the same outputs."""
import copy
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

import fxforge
from fxforge.runtime.saving import META_FILE

import zoo


def _roundtrip(fast, tmp_path):
    fast.save(str(tmp_path / "saved"))
    return fxforge.load(str(tmp_path / "saved"))


def test_llama_with_kv_cache_roundtrips(tmp_path):
    model, vocab = zoo.llama("sdpa")
    ids = torch.randint(0, vocab, (2, 7))
    fast = fxforge.optimize(model, (ids,), kv_cache=True)
    loaded = _roundtrip(fast, tmp_path)
    out = loaded(ids)
    assert type(out).__name__ == "CausalLMOutputWithPast"  # the model's own output class
    assert torch.equal(out.logits, fast(ids).logits)
    assert torch.equal(loaded(input_ids=ids).logits, out.logits)  # keyword calls as before
    assert loaded.generation_defaults == fast.generation_defaults
    assert loaded.config.to_dict() == model.config.to_dict()
    assert loaded.model_name == fast.model_name
    prompt = ids[:1, :4]
    assert torch.equal(loaded.generate(prompt, 8), fast.generate(prompt, 8))


def test_gpt2_with_kv_cache_and_tied_weights(tmp_path):
    model, vocab = zoo.gpt2("sdpa")
    ids = torch.randint(0, vocab, (2, 6))
    fast = fxforge.optimize(model, (ids,), kv_cache=True)
    loaded = _roundtrip(fast, tmp_path)
    assert torch.equal(loaded(ids).logits, fast(ids).logits)
    assert torch.equal(loaded.generate(ids[:1], 6, eos_token_id=None), fast.generate(ids[:1], 6, eos_token_id=None))
    meta = json.load(open(tmp_path / "saved" / META_FILE))
    assert meta["format_version"] == 1 and meta["model_name"] == "GPT2LMHeadModel"


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_models_roundtrip(tmp_path, scheme):
    model, vocab = zoo.llama("sdpa", hidden=128, heads=4)
    ids = torch.randint(0, vocab, (1, 6))
    fast = fxforge.optimize(model, (ids,), quantize=scheme)
    assert fast.graph.count("quant_linear") > 0
    loaded = _roundtrip(fast, tmp_path)
    assert torch.equal(loaded(ids).logits, fast(ids).logits)
    kept = {t.dtype for t in loaded.state_dict().values()}
    assert kept & {torch.int8, torch.uint8}, "the quantized weights are stored as they are"


def test_a_plain_module_returning_a_tuple(tmp_path):
    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(8, 16)

        def forward(self, x, scale=2.0):
            h = torch.relu(self.body(x))
            return h * scale, h.sum(-1)

    model = TwoHeads().eval()
    x = torch.randn(3, 8)
    fast = fxforge.optimize(model, (x,))
    loaded = _roundtrip(fast, tmp_path)
    a, b = loaded(torch.randn(5, 8))
    assert a.shape == (5, 16) and b.shape == (5,)
    assert all(torch.equal(u, v) for u, v in zip(loaded(x), fast(x)))
    assert loaded.config is None


def test_loads_in_a_process_that_never_imports_the_model_class(tmp_path):
    model, vocab = zoo.llama("sdpa")
    ids = torch.randint(0, vocab, (1, 5))
    fast = fxforge.optimize(model, (ids,), kv_cache=True)
    fast.save(str(tmp_path / "saved"))
    torch.save({"ids": ids, "logits": fast(ids).logits, "tokens": fast.generate(ids, 6)}, tmp_path / "expected.pt")
    script = f"""
import sys, torch, fxforge
loaded = fxforge.load({str(tmp_path / 'saved')!r})
expected = torch.load({str(tmp_path / 'expected.pt')!r})
assert torch.equal(loaded(expected["ids"]).logits, expected["logits"])
assert torch.equal(loaded.generate(expected["ids"], 6), expected["tokens"])
assert not any("modeling_llama" in m for m in sys.modules), "the model class was imported"
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_an_operator_from_another_library_is_imported_at_load(tmp_path):
    # transformers' MoE layers call transformers.grouped_mm_fallback, an op that exists only
    # once transformers.integrations.moe is imported: load() imports what save() recorded
    from custom_op_lib import UsesCustomOp

    torch.manual_seed(0)
    model, x = UsesCustomOp().eval(), torch.randn(3, 8)
    fast = fxforge.optimize(model, (x,))
    assert any(n.op == "torch_call" and n.attrs["target"] == "fxforge_test.scaled_tanh.default"
               for n in fast.graph.nodes), fast.ir
    fast.save(str(tmp_path / "saved"))
    assert json.load(open(tmp_path / "saved" / META_FILE))["op_modules"] == {
        "fxforge_test.scaled_tanh.default": "custom_op_lib"}
    torch.save({"x": x, "y": fast(x)}, tmp_path / "expected.pt")
    script = f"""
import sys, torch, fxforge
loaded = fxforge.load({str(tmp_path / 'saved')!r})
expected = torch.load({str(tmp_path / 'expected.pt')!r})
assert torch.equal(loaded(expected["x"]), expected["y"])
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")

    # a module that is gone: the error names the op and the module, at load
    meta = json.load(open(tmp_path / "saved" / META_FILE))
    meta["op_modules"] = {"nowhere_ns.op.default": "no_such_library.ops"}
    json.dump(meta, open(tmp_path / "saved" / META_FILE, "w"))
    with pytest.raises(RuntimeError, match="'nowhere_ns.op.default', registered by the Python module "
                                           "'no_such_library.ops', which does not import"):
        fxforge.load(str(tmp_path / "saved"))


def test_an_unregistered_operator_is_named_when_called():
    from fxforge.ir.ops import resolve_target

    with pytest.raises(RuntimeError, match="'nowhere_ns.op.default', which is not registered in this process"):
        resolve_target("nowhere_ns.op.default")


def test_an_unknown_output_class_comes_back_as_a_dict(tmp_path):
    model, vocab = zoo.llama("sdpa")
    ids = torch.randint(0, vocab, (1, 5))
    fast = fxforge.optimize(model, (ids,))
    fast.save(str(tmp_path / "saved"))
    meta_path = tmp_path / "saved" / META_FILE
    meta = json.load(open(meta_path))
    meta["call_spec"]["out_spec"]["class"] = "no_such_package.outputs:Gone"
    json.dump(meta, open(meta_path, "w"))
    with pytest.warns(UserWarning, match="no_such_package.outputs:Gone"):
        loaded = fxforge.load(str(tmp_path / "saved"))
    out = loaded(ids)
    assert isinstance(out, dict) and torch.equal(out["logits"], fast(ids).logits)


def test_another_format_version_is_a_clear_error(tmp_path):
    model, vocab = zoo.gpt2("sdpa")
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (1, 4)),))
    fast.save(str(tmp_path / "saved"))
    meta_path = tmp_path / "saved" / META_FILE
    meta = json.load(open(meta_path))
    meta.update(format_version=99, fxforge_version="9.0")
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(fxforge.IncompatibleSaveError, match="fxforge 9.0 in save format 99.*reads format 1"):
        fxforge.load(str(tmp_path / "saved"))
    with pytest.raises(fxforge.IncompatibleSaveError, match="not a model saved by fxforge"):
        fxforge.load(str(tmp_path / "nothing_here"))


def test_pickle_and_torch_save_point_at_save(tmp_path):
    fast = fxforge.optimize(torch.nn.Linear(4, 2).eval(), (torch.randn(2, 4),))
    with pytest.raises(TypeError, match=r"fast.save\(path\)"):
        pickle.dumps(fast)
    with pytest.raises(TypeError, match=r"fxforge.load\(path\)"):
        torch.save(fast, tmp_path / "model.pt")
    for copy_it in (copy.copy, copy.deepcopy):  # said "cannot be pickled" though nothing was
        with pytest.raises(TypeError, match=r"cannot be copied \(copy.copy, copy.deepcopy\).*optimize the source"):
            copy_it(fast)
    fast.save(tmp_path / "saved")
    # the file is fine: the device is what the error must name (it said "damaged or cut short")
    with pytest.raises(ValueError, match=r"onto device 'meta': an optimized model runs on 'cpu' or 'cuda'"):
        fxforge.load(tmp_path / "saved", device="meta")
    with pytest.raises(ValueError, match=r"device='xyz' is not a device"):
        fxforge.load(tmp_path / "saved", device="xyz")


def test_loaded_weights_are_aligned_for_the_bf16_int8_kernel(tmp_path):
    # safetensors gives 8-byte-aligned tensors; torch's bf16 int8 matmul crashed the process
    # (SIGSEGV) on a loaded int8 weight 8 bytes off 16: load copies such tensors to 64 bytes
    model, vocab = zoo.llama("sdpa", hidden=128, heads=4)
    model = model.to(torch.bfloat16)
    ids = torch.randint(0, vocab, (2, 6))
    fast = fxforge.optimize(model, (ids,), quantize="int8", kv_cache=True)
    loaded = _roundtrip(fast, tmp_path)
    params = loaded.graph.params
    assert any(t.dtype == torch.int8 for t in params.values())
    misaligned = [name for name, t in params.items() if t.data_ptr() % 64]
    assert not misaligned, misaligned
    torch.save(ids, tmp_path / "ids.pt")
    script = f"""
import torch, fxforge
loaded = fxforge.load({str(tmp_path / 'saved')!r})
print(tuple(loaded(torch.load({str(tmp_path / 'ids.pt')!r})).logits.shape))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
    assert result.stdout.strip().endswith(f"(2, 6, {vocab})")


def _edit_meta(path, edit):
    meta_path = path / META_FILE
    meta = json.load(open(meta_path))
    edit(meta)
    json.dump(meta, open(meta_path, "w"))


@pytest.mark.parametrize("field, edit, why", [
    ("call_spec", lambda m: m.pop("call_spec"), "it is missing"),
    ("aliases", lambda m: m.pop("aliases"), "it is missing"),
    ("generation_defaults", lambda m: m.update(generation_defaults=[1, 2]), "it is a JSON array"),
    ("aliases", lambda m: m.update(aliases={"x": "nosuch"}), "'nosuch', which weights.safetensors does not hold"),
    ("call_spec", lambda m: m["call_spec"].pop("out_spec"), "cannot be read"),
])
def test_an_edited_meta_json_is_an_error_naming_the_file_and_the_field(tmp_path, field, edit, why):
    fast = fxforge.optimize(torch.nn.Sequential(torch.nn.Linear(8, 8)).eval(), (torch.randn(2, 8),))
    saved = tmp_path / "saved"
    fast.save(str(saved))
    _edit_meta(saved, edit)
    with pytest.raises(fxforge.IncompatibleSaveError) as e:
        fxforge.load(str(saved))
    message = str(e.value)
    assert str(saved / META_FILE) in message and repr(field) in message and why in message, message
    assert "save the model again" in message


def test_damaged_files_and_a_missing_cuda_are_named(tmp_path, monkeypatch):
    fast = fxforge.optimize(torch.nn.Sequential(torch.nn.Linear(8, 8)).eval(), (torch.randn(2, 8),))
    saved = tmp_path / "saved"
    fast.save(str(saved))
    text = (saved / META_FILE).read_text()
    (saved / META_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(fxforge.IncompatibleSaveError, match=f"{META_FILE} is not valid JSON.*save the model again"):
        fxforge.load(str(saved))
    (saved / META_FILE).write_text(text)
    weights = saved / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])
    with pytest.raises(fxforge.IncompatibleSaveError, match="weights.safetensors cannot be read"):
        fxforge.load(str(saved))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        fxforge.load(str(saved), device="cuda")


class _UpcastNorm(torch.nn.Module):
    """An RMSNorm that squares in float32 (`x.float()`): a no-op on a float32 model."""

    def forward(self, x):
        h = x.float()
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


class _PinnedThreeWays(torch.nn.Module):
    """A float32 model whose graph keeps float32 three ways no node shows: a no-op upcast in
    its code, a constant tensor that is not a parameter or buffer, and (quantized with
    compute_dtype) products asked to run in float32."""

    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = torch.nn.Linear(64, 64), _UpcastNorm(), torch.nn.Linear(64, 8)
        self.scale = torch.linspace(0.5, 2.0, 8)

    def forward(self, x):
        return self.b(self.norm(self.a(x))) * self.scale


def test_fixed_dtypes_keep_their_kind_and_a_save_of_the_two_field_form_still_loads(tmp_path):
    """fixed_dtypes entries were (dtype, why), told apart by the why's text; they are
    (dtype, kind, why) now. A model saved before, in the two-field form, loads with the
    kinds given and refuses to(bfloat16) naming each kind as what it is."""
    from fxforge.ir.parser import parse, structurally_equal
    from fxforge.runtime.retarget import DtypePinnedError
    from fxforge.passes.quantize import QuantConfig

    x = torch.randn(3, 64)
    config = QuantConfig("int8", compute_dtype=torch.float32, exclude=())
    fast = fxforge.optimize(_PinnedThreeWays().eval(), (x,), quantize=config)
    signature = fast.ir.splitlines()[1]
    assert all(f'(f32, "{kind}", ' in signature for kind in ("cast", "constant", "compute_dtype")), signature
    assert structurally_equal(parse(fast.ir), parse(str(parse(fast.ir))))  # the text round trip keeps them

    fast.save(str(tmp_path / "saved"))
    ir_path = tmp_path / "saved" / "model.ir"
    text = ir_path.read_text()
    old = text.replace('(f32, "cast", ', "(f32, ").replace('(f32, "constant", ', "(f32, ") \
        .replace('(f32, "compute_dtype", ', "(f32, ")
    assert old != text and '"cast"' not in old
    ir_path.write_text(old)
    loaded = fxforge.load(str(tmp_path / "saved"))
    assert loaded.ir.splitlines()[1] == signature
    assert torch.equal(loaded(x), fast(x))
    with pytest.raises(DtypePinnedError) as caught:
        loaded.to(torch.bfloat16)
    message = str(caught.value)
    assert "casts to torch.float32" in message and "x.float() in norm (_UpcastNorm)" in message, message
    assert "reads torch.float32 constant tensor(s)" in message and "the constant tensor" in message, message
    assert "pins its compute dtype to torch.float32" in message, message
    assert "QuantConfig(compute_dtype=torch.float32): the 2 quantized products run in it" in message, message


def test_a_config_holding_infinity_loads_back(tmp_path):
    """Mamba2's default time_step_limit=(0.0, inf): to_json_string tags inf as
    {"__float__": "Infinity"}, which load() handed to from_dict undecoded (a validation
    error that failed the whole load)."""
    import transformers as tr

    class WithConfig(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = tr.Mamba2Config(num_hidden_layers=1, hidden_size=16, vocab_size=32, num_heads=4, head_dim=8)
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.proj(x)

    model = WithConfig().eval()
    x = torch.randn(2, 4)
    fxforge.optimize(model, (x,), verbose=False).save(str(tmp_path / "m"))
    loaded = fxforge.load(str(tmp_path / "m"))
    assert isinstance(loaded.config, tr.Mamba2Config)
    assert tuple(loaded.config.time_step_limit) == (0.0, float("inf"))
    torch.testing.assert_close(loaded(x), model(x))
