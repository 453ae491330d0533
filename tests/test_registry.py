"""Every op in the registry has every entry it needs, and its type rule agrees with its
torch reference on sample inputs."""
import pytest
import torch

from fxforge.ir.lowering import RULES, lowered_ops
from fxforge.ir.ops import KINDS, OPS
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
