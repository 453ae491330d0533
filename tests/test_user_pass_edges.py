"""Edges of the user-pass API: what a registered pass gets (weights of its own), what the
pass manager checks after it (the inputs the call feeds), what typecheck refuses (an
enumerated attribute misspelt), what is dumped when it fails, and a pass that declares
itself approximate."""
import os

import pytest
import torch

import fxforge
from fxforge.ir import parse, typecheck
from fxforge.ir.typecheck import IRCheckError
from fxforge.passes import PassError
from fxforge.passes.manager import PassInfo, run_pipeline
from fxforge.passes.pattern import Rule, apply_rules, op, var


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16)).eval()


def _registry_with(name, fn, **where):
    registry = fxforge.passes.default_registry()
    fxforge.register_pass(name, registry=registry, **where)(fn)
    return registry


# -- 1. a pass never gets the source model's tensors -------------------------------------------------
def test_a_pass_that_scales_a_weight_in_place_leaves_the_source_model_alone():
    model, x = _mlp(), torch.randn(2, 5, 16)
    ref, w0 = model(x).detach().clone(), model[0].weight.detach().clone()

    def scale_weights(g):  # "fold a scale into the weight", in place
        g.params["0.weight"].mul_(2.0)
        return g

    fast = fxforge.optimize(model, (x,), registry=_registry_with("scale_weights", scale_weights))
    assert torch.equal(model[0].weight, w0), "optimize() changed the source model's weight"
    with torch.no_grad():
        assert torch.equal(model(x), ref)
        # ... and the optimized model has the pass's edit
        scaled = _mlp()
        scaled[0].weight.mul_(2.0)
        assert torch.allclose(fast(x), scaled(x), atol=1e-5)


def test_weights_are_copied_once_just_before_the_first_user_pass_and_never_for_builtin_passes():
    graph = fxforge.capture(_mlp(), (torch.randn(2, 5, 16),))
    calls = []

    def copy(g):
        calls.append([info.name for info in pipeline_seen])
        return g

    registry = fxforge.passes.default_registry()
    builtin = [registry.get("cleanup"), registry.get("fuse_linear")]
    pipeline_seen = []
    run_pipeline(graph, builtin, own_weights=copy)
    assert calls == [], "fxforge's own passes alone need no copy of the weights"

    def mine(g):
        pipeline_seen.append("ran")
        return g

    user = [registry.get("cleanup"), PassInfo("mine", mine), PassInfo("mine2", mine)]
    run_pipeline(graph, user, own_weights=copy)
    assert calls == [[]], "copied once, before the first user pass ran"


# -- 2. a pass keeps the graph's inputs ---------------------------------------------------------------
class _Two(torch.nn.Module):
    def forward(self, x, y):
        return x + y * 0


def test_a_pass_that_drops_an_input_is_refused_by_name():
    def drop_y(g):
        g2 = g.with_nodes([], outputs=[g.inputs[0]])
        g2.inputs, g2.input_names = [g.inputs[0]], g.input_names[:1]
        return g2

    x = torch.randn(2, 3, 4)
    with pytest.raises(IRCheckError, match=r"after pass 'drop_y': the graph takes 1 input\(s\) where it took 2"):
        fxforge.optimize(_Two(), (x, x), registry=_registry_with("drop_y", drop_y))


def test_a_pass_that_retypes_an_input_is_refused_by_name():
    from fxforge.ir.graph import Node, Value
    from fxforge.ir.types import TensorType

    def retype(g):  # y read as f16 (and cast back): the IR types, the call would not
        old = g.inputs[1]
        new = Value(TensorType(old.type.shape, torch.float16), hint=old.hint)
        g2 = g.with_nodes([Node("cast", (new,), {"dtype": torch.float32}, (old,), {}), *g.nodes])
        g2.inputs = [g.inputs[0], new]
        return g2

    x = torch.randn(2, 3, 4)
    with pytest.raises(IRCheckError, match=r"after pass 'retype': input 1 \(y\) has type f16\[B, T, 4\] where it "
                                           r"had f32\[B, T, 4\]"):
        fxforge.optimize(_Two(), (x, x), registry=_registry_with("retype", retype))


# -- 3. enumerated string attributes ------------------------------------------------------------------
_GELU = """graph(%x: f32[B, T, 8]) {{
  %1: f32[B, T, 8] = gelu(%x) {{approximate="{}"}}
  return (%1)
}}"""


@pytest.mark.parametrize("value", ["Tanh", "bogus", ""])
def test_typecheck_refuses_a_gelu_approximation_torch_does_not_know(value):
    with pytest.raises(IRCheckError, match=r"attribute 'approximate' of gelu must be one of 'none', 'tanh'"):
        typecheck(parse(_GELU.format(value)))
    with pytest.raises(IRCheckError, match="approximate"):
        fxforge.load_ir(_GELU.format(value), {})


@pytest.mark.parametrize("value", ["none", "tanh"])
def test_typecheck_accepts_torchs_gelu_approximations(value):
    typecheck(parse(_GELU.format(value)))
    x = torch.randn(2, 3, 8)
    assert torch.allclose(fxforge.load_ir(_GELU.format(value), {}, backend="torch")(x),
                          torch.nn.functional.gelu(x, approximate=value))


def test_a_builder_cannot_emit_a_misspelt_attribute_either():
    def g2t(g, ctx):
        return apply_rules(g, [Rule("g2t", op("gelu", var("x"), approximate="none"),
                                    lambda m, b: b.emit("gelu", m["x"], approximate="Tanh"))], ctx.rules, "g2t")

    with pytest.raises((PassError, IRCheckError), match="approximate"):
        fxforge.optimize(_mlp(), (torch.randn(2, 5, 16),), registry=_registry_with("g2t", g2t))


_CALLS = """graph(%x: f32[B, T, 8]) {{
  %1: f32[B, T, 8] = torch_call(%x) {{target="aten.div.Tensor_mode", args=($0, 3.0), kwargs=(("rounding_mode", {}),)}}
  %2: f32[B, T, 10] = torch_call(%x) {{target="aten.pad.default", args=($0, [1, 1], {}), kwargs=()}}
  return (%1, %2)
}}"""


@pytest.mark.parametrize("rounding, mode, bad", [('"Floor"', '"reflect"', "rounding_mode"),
                                                 ('"floor"', '"mirror"', "mode")])
def test_typecheck_refuses_an_aten_calls_misspelt_mode(rounding, mode, bad):
    with pytest.raises(IRCheckError, match=rf"argument '{bad}' must be one of"):
        typecheck(parse(_CALLS.format(rounding, mode)))


@pytest.mark.parametrize("rounding", ['"floor"', '"trunc"', "none"])
def test_typecheck_accepts_an_aten_calls_own_modes(rounding):
    typecheck(parse(_CALLS.format(rounding, '"reflect"')))


# -- 4. dumps when a pass fails -----------------------------------------------------------------------
def _files(directory):
    return sorted(f for f in os.listdir(directory) if f.endswith(".ir"))


def test_a_pass_that_breaks_the_ir_leaves_the_dumps_before_it_and_its_graph(tmp_path):
    def broken(g):
        return g.with_nodes(list(reversed(g.nodes)))  # use before def

    (tmp_path / "09_stale.ir").write_text("an earlier run's")
    with pytest.raises(IRCheckError) as info:
        fxforge.optimize(_mlp(), (torch.randn(2, 3, 16),), registry=_registry_with("broken", broken),
                         dump_dir=str(tmp_path))
    files = _files(tmp_path)
    assert files[0] == "00_capture.ir" and files[-1].endswith("_broken.failed.ir"), files
    assert "09_stale.ir" not in files
    assert str(tmp_path) in str(info.value) and files[-1] in str(info.value)


def test_a_pass_that_raises_leaves_the_dumps_before_it(tmp_path, monkeypatch):
    def boom(g):
        raise KeyError("no such node")

    monkeypatch.setenv("FXFORGE_DUMP", str(tmp_path))
    with pytest.raises(PassError, match=rf"pass 'boom' raised KeyError[\s\S]*{tmp_path}") as info:
        fxforge.optimize(_mlp(), (torch.randn(2, 3, 16),), registry=_registry_with("boom", boom))
    files = _files(tmp_path)
    assert files[0] == "00_capture.ir" and len(files) >= 2 and not any("boom" in f for f in files)
    assert files[-1] in str(info.value)


# -- 5. a pass that declares itself approximate -------------------------------------------------------
def _gelu_to_tanh(g, ctx):
    return apply_rules(g, [Rule("g2t", op("gelu", var("x"), approximate="none"),
                                lambda m, b: b.emit("gelu", m["x"], approximate="tanh"))], ctx.rules, "g2t")


@pytest.mark.parametrize("approximate", [True, False])
def test_an_approximate_pass_gets_its_error_measured_and_reported(approximate):
    registry = fxforge.passes.default_registry()
    fxforge.register_pass("g2t", registry=registry, approximate=approximate)(_gelu_to_tanh)
    fast = fxforge.optimize(_mlp(), (torch.randn(2, 5, 16),), registry=registry, verbose=False)
    stat = next(s for s in fast.stats if s.name == "g2t")
    measured = [n for n in stat.notes if n.startswith("error vs the source model")]
    assert bool(measured) == approximate, stat.notes
    if approximate:
        assert stat.details["error"]["max_abs_error"] > 0
        assert "error vs the source model" in fast.report()


def test_approximate_is_a_bool():
    with pytest.raises(TypeError, match="approximate"):
        fxforge.register_pass("x", registry=fxforge.passes.default_registry(), approximate="yes")
