"""Every op in the registry has every entry it needs, and its type rule agrees with its
torch reference on sample inputs."""
import inspect
import re

import pytest
import torch

from fxforge.ir.lowering import RULES, lowered_ops
from fxforge.ir.ops import KINDS, OPS, OpDef
from fxforge.ir.signature import ATTR_TYPES
from fxforge.ir.types import TensorType


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_has_every_entry(name):
    op = OPS[name]
    assert op.kind in KINDS
    assert callable(op.infer) and callable(op.reference)
    if op.kind == "pointwise":
        assert op.triton, f"pointwise op {name} needs a Triton expression template"
    if op.origin == "aten":
        assert name in lowered_ops(), f"{name} claims to come from ATen but no lowering rule produces it"


def test_every_lowering_rule_names_a_real_aten_op():
    for target in RULES:
        ns, name, overload = target.split(".")
        packet = getattr(getattr(torch.ops, ns), name)
        assert hasattr(packet, overload), target


UNARY = [n for n, o in OPS.items() if o.kind == "pointwise" and n not in ("const", "where", "clamp", "cast", "gelu")]


@pytest.mark.parametrize("name", UNARY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pointwise_type_rule_matches_reference(name, dtype):
    op = OPS[name]
    x = torch.rand(3, 4, dtype=dtype) + 0.5
    y = torch.rand(4, dtype=torch.float32) + 0.5
    if "{1}" in op.triton:  # binary: broadcasting and promotion
        out = op.reference(x, y)
        types = [TensorType((3, 4), dtype), TensorType((4,), torch.float32)]
    else:
        out = op.reference(x)
        types = [TensorType((3, 4), dtype)]
    (t,) = op.infer(types, {})
    assert tuple(int(d) for d in t.shape) == tuple(out.shape)
    assert t.dtype == out.dtype


def _keyword_params(fn) -> dict | None:
    """The keyword-only parameters of a reference (name -> has a default), or None when
    Python cannot see its signature (a torch builtin)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    return {p.name: p.default is not p.empty for p in sig.parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.name != "device"}  # the runtime passes device


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_declares_its_signature(name):
    op = OPS[name]
    lo, hi = op.arity
    assert 0 <= lo and (hi is None or lo <= hi), op.arity
    for spec in op.attr_specs.values():
        assert spec.types and all(t in ATTR_TYPES for t in spec.types)
    if op.triton:  # the template reads each operand and only declared attrs
        operands = {int(i) for i in re.findall(r"\{(\d+)\}", op.triton)}
        assert operands == set(range(lo)) and hi == lo, f"{name}: template {op.triton!r} vs arity {op.arity}"
        named = set(re.findall(r"\{([A-Za-z_]\w*)\}", op.triton))
        assert named <= set(op.attr_specs), f"{name}: template reads {named - set(op.attr_specs)}"
    keywords = _keyword_params(op.reference)
    if keywords is not None:
        # the reference is called as fn(*tensors, **attrs): it must take every declared
        # attr, and every attr it cannot do without must be declared required
        assert set(keywords) == set(op.attr_specs), f"{name}: reference takes {sorted(keywords)}"
        for attr, has_default in keywords.items():
            assert op.attr_specs[attr].required or has_default, f"{name}: {attr} is optional but the reference needs it"
        _check_positional(name, op.reference, lo, hi)


def _check_positional(name, fn, lo, hi):
    params = [p for p in inspect.signature(fn).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    variadic = any(p.kind is p.VAR_POSITIONAL for p in params)
    fixed = [p for p in params if p.kind is not p.VAR_POSITIONAL]
    needed = sum(1 for p in fixed if p.default is p.empty)
    assert needed <= lo, f"{name}: the reference needs {needed} tensors, the arity allows {lo}"
    assert variadic or (hi is not None and hi <= len(fixed)), f"{name}: arity {lo}..{hi} vs reference {params}"


def test_signature_declarations_are_checked_when_an_op_is_built():
    with pytest.raises(ValueError, match="unknown type 'integer'"):
        OpDef("bad", "other", lambda t, a: None, lambda x: x, attrs="dim: integer")
    with pytest.raises(ValueError, match="bad attribute spec"):
        OpDef("bad", "other", lambda t, a: None, lambda x: x, attrs="dim int")
    with pytest.raises(ValueError, match="bad arity"):
        OpDef("bad", "other", lambda t, a: None, lambda x: x, arity=(2, 1))


def test_traits_are_declared_on_the_entries():
    """Passes ask the registry (OpDef.has), not tuples of their own."""
    from fxforge.ir.ops import TRAITS, is_pure
    from fxforge.ir.graph import Node

    assert {n for n, o in OPS.items() if o.has("stateful")} == {"kv_append", "paged_kv_write", "rope_attention"}
    assert not is_pure(Node("kv_append", (), {}, ()))
    assert {n for n, o in OPS.items() if o.has("collective")} == {"all_reduce", "all_gather"}
    assert not is_pure(Node("all_reduce", (), {"world_size": 2}, ()))
    assert {n for n, o in OPS.items() if o.has("needs_device")} == {"const", "arange", "full"}
    assert all(o.has("row_safe") for o in OPS.values() if o.kind == "pointwise")
    assert set().union(*(o.traits for o in OPS.values())) <= set(TRAITS)
    with pytest.raises(ValueError, match="unknown trait"):
        OpDef("x", "other", lambda t, a: t, lambda x: x, traits={"fast"})


def test_collectives_are_the_identity_in_a_world_of_one():
    """Outside a process group the references of the collectives are the identity for a
    world of one, and refuse a graph sharded for more ranks (rather than a wrong answer)."""
    x = torch.randn(2, 3)
    assert OPS["all_reduce"].reference(x, world_size=1) is x
    assert OPS["all_gather"].reference(x, dim=-1, world_size=1) is x
    (t,) = OPS["all_gather"].infer([TensorType((2, 3), torch.float32)], {"dim": -1, "world_size": 4})
    assert tuple(t.shape) == (2, 12)
    with pytest.raises(RuntimeError, match="sharded for 2 ranks.*torchrun --nproc-per-node 2"):
        OPS["all_reduce"].reference(x, world_size=2)
