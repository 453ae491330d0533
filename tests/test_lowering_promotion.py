"""A Python scalar in a pointwise op promotes as torch promotes it (torch.result_type):
dimensioned tensors over 0-dim tensors over Python scalars, each within its category. The
IR holds a scalar as a 0-dim constant, which promotes like a 0-dim tensor; these tests run
a table of ops x operand kinds (dimensioned, 0-dim, scalar first or second) x dtypes
through fxforge and compare each result's dtype and value with eager.

The bug: `torch.where(mask, torch.tensor(0.0, dtype=bf16), finfo.min)` (transformers'
eager attention mask) was f32 in the IR, and the bf16 linear after it failed."""
import pytest
import torch
import torch.nn as nn

import fxforge

SCALARS = (0.1, -2.5, 3, True, float("-inf"))
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64,
          torch.uint8, torch.bool)


def _ops(s) -> dict:
    """name -> f(t, mask): each op with the scalar `s` on a tensor operand `t`."""
    return {
        "add": lambda t, m: t + s, "radd": lambda t, m: s + t, "sub": lambda t, m: t - s,
        "rsub": lambda t, m: s - t, "mul": lambda t, m: t * s, "div": lambda t, m: t / s,
        "rdiv": lambda t, m: s / t, "pow": lambda t, m: t ** s, "rpow": lambda t, m: s ** t,
        "eq": lambda t, m: t == s, "lt": lambda t, m: t < s, "ge": lambda t, m: t >= s,
        "where_other": lambda t, m: torch.where(m, t, s), "where_self": lambda t, m: torch.where(m, s, t),
        "where_0d_mask": lambda t, m: torch.where(m[0, 0], t, s),
        "add_alpha": lambda t, m: torch.add(t, t, alpha=s) if not isinstance(s, bool) else t + t,
    }


def _operands(x: torch.Tensor, dtype) -> dict:
    """name -> f(x): the tensor operand, dimensioned or 0-dim (an element, or a constant
    the model makes in forward, which capture lifts)."""
    return {"dim": lambda x: x, "0d": lambda x: x[0, 1],
            "0d_const": lambda x: torch.tensor(1, dtype=dtype) if dtype == torch.bool else torch.tensor(1.5).to(dtype)}


class _Table(nn.Module):
    def __init__(self, cases):
        super().__init__()
        self.cases = cases

    def forward(self, x, mask):
        return [op(operand(x), mask) for _, operand, op in self.cases]


def _input(dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 3) * 3
    if dtype == torch.bool:
        return x > 0
    if not dtype.is_floating_point:
        return x.abs().to(dtype) + 1
    return x.to(dtype)


def _eager_cases(dtype, x, mask):
    """Every (name, operand, op) that eager runs (an int to a negative power, bool
    subtraction... are errors there, and not what this tests)."""
    cases = []
    for s in SCALARS:
        for oname, operand in _operands(x, dtype).items():
            for name, op in _ops(s).items():
                try:
                    op(operand(x), mask)
                except Exception:  # noqa: BLE001
                    continue
                cases.append((f"{name}({oname}, {s!r})", operand, op))
    return cases


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.isnan(), b.isnan()) and \
        torch.equal(a.masked_fill(a.isnan(), 0), b.masked_fill(b.isnan(), 0))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_python_scalars_promote_as_in_eager(dtype):
    x = _input(dtype)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    cases = _eager_cases(dtype, x, mask)
    model = _Table(cases).eval()
    want = model(x, mask)
    fast = fxforge.optimize(model, (x, mask), verbose=False, passes=[])
    got = fast(x, mask)
    wrong = [f"{name}: eager {w.dtype} {w.tolist()}, fxforge {g.dtype} {g.tolist()}"
             for (name, _, _), w, g in zip(cases, want, got) if not _same(w, g)]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_eager_attention_mask_feeds_a_half_linear(dtype):
    """transformers' eager attention mask (masking_utils): where(mask, 0-dim 0.0, finfo.min),
    added to the scores of a half-precision model."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x, mask):
            bias = torch.where(mask.bool(), torch.tensor(0.0, dtype=x.dtype), torch.finfo(x.dtype).min)
            return self.lin(x + bias)

    m = M().to(dtype).eval()
    x, mask = torch.randn(2, 5, 8, dtype=dtype), torch.ones(2, 5, 8, dtype=torch.long)
    fast = fxforge.optimize(m, (x, mask), verbose=False, passes=[])
    assert torch.equal(fast(x, mask), m(x, mask))


class _Sqrt(nn.Module):
    def forward(self, a):
        return a.pow(0.5)


@pytest.mark.parametrize("shape", [(2, 1, 2), (1, 2, 2)])
def test_a_scalar_exponent_is_evaluated_as_the_model_ran_it(shape):
    """x ** 0.5 with a scalar exponent is sqrt (NaN at -inf, -0.0 at -0.0); the IR evaluator
    (capture's size-one check, fuse_attention's masks, gqa's calibration) ran the general
    pow of a 0-d tensor (inf, +0.0), so an example holding -inf was refused as a model that
    'computes something else when T == 1'."""
    x = torch.tensor([4.0, -float("inf"), -0.0, 2.0]).reshape(shape)
    fast = fxforge.optimize(_Sqrt(), (x,), verbose=False)
    out, ref = fast(x), _Sqrt()(x)
    torch.testing.assert_close(out, ref, equal_nan=True)
    assert torch.equal(out.signbit(), ref.signbit())
    from fxforge.ir.evaluate import evaluate
    (evaluated,) = evaluate(fast.graph, [x])
    torch.testing.assert_close(evaluated, ref, equal_nan=True)


def test_matrix_transposes_lower_to_permutes():
    # x.mT / x.mH / x.adjoint() of a real tensor are the last two dims swapped: a permute the
    # passes understand (kv_cache took aten.mT for an op it could not see through)
    class M(torch.nn.Module):
        def forward(self, x):
            return x.mT + x.mH * 2 + x.adjoint()

    x = torch.randn(2, 3, 4)
    fast = fxforge.optimize(M(), (x,))
    assert "torch_call" not in fast.ir and fast.ir.count("permute") >= 1
    torch.testing.assert_close(fast(x), M()(x))


def test_narrow_lowers_to_a_slice():
    # a table narrowed by the length (wpe.weight.narrow(0, 0, t)) is the slice [:t], which
    # kv_cache reads as positions; it was an opaque call it refused
    class M(torch.nn.Module):
        def forward(self, x):
            return x.narrow(1, 0, x.shape[1] - 1)[:, :2] + x.narrow(1, 1, 2)

    x = torch.randn(2, 5, 3)
    fast = fxforge.optimize(M(), (x,))
    assert "narrow" not in fast.ir and "slice" in fast.ir
    for t in (3, 5, 8):
        y = torch.randn(2, t, 3)
        torch.testing.assert_close(fast(y), M()(y))
