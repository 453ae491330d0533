"""The generated pointwise and row kernels compute what eager PyTorch computes: integer
constants stay integers, torch's type promotion (int op float scalar is float32), NaN
through max/min, tanh and log1p at the edges of their range, float constants outside
float32's normal range, every integer dtype, and launches from several threads.

Each case runs on backend="interpret" (the generated Triton kernels in Triton's
interpreter) and checks that a fused_pointwise node was made, so the kernel is what is
tested, not a PyTorch fallback."""
import collections
import tempfile
import threading

import pytest
import torch

import fxforge
from fxforge.codegen.pointwise import PointwiseKernels

NAN = float("nan")


class Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


def fused(fn, *xs):
    """The model `fn` optimized for the interpreter, asserting it runs a fused kernel."""
    fast = fxforge.optimize(Fn(fn), example_inputs=xs, backend="interpret", verbose=False)
    assert any(n.op == "fused_pointwise" for n in fast.graph.nodes), fast.ir
    return fast


def check(fn, *xs, exact=True, **tol):
    got, want = fused(fn, *xs)(*xs), fn(*xs)
    assert got.dtype == want.dtype
    if exact:
        assert torch.equal(got.isnan(), want.isnan()) if want.is_floating_point() else True
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    else:
        torch.testing.assert_close(got, want, equal_nan=True, **tol)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_integer_constants_compare_as_integers(dtype):
    # a float literal compared int64 values in float32: 16777217 == 16777216.0 was True
    x = torch.tensor([[16777217, 16777215, 2 ** 30 + 1, 5, -3, 16777216]], dtype=dtype).repeat(2, 1)
    check(lambda a: (a == 16777216) | (a < 0), x)
    check(lambda a: (a > 2 ** 30) & (a != 5), x)


def test_int_tensor_compared_with_float_scalar_in_float():
    x = torch.tensor([[2, 3, -1, 0]]).repeat(2, 1)
    check(lambda a: (a > 2.5) | (a == -1), x)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_int_power_of_float_exponent_is_float32(dtype):
    # torch computes int ** 2.0 in float32; integer multiplication overflowed (2**32 squared is 0)
    big = 2 ** 32 if dtype == torch.int64 else 50000
    x = torch.tensor([[big, 7, -3]], dtype=dtype).repeat(2, 1)
    check(lambda a: a ** 2.0 + 0.5, x)
    check(lambda a: a ** 0.5 * 2, x.abs())


def test_logical_ops_on_ints_and_floats():
    x = torch.tensor([[2, -2, 0, 1, 0]]).repeat(2, 1)
    y = torch.tensor([[0, 0, 4, 0, 0]]).repeat(2, 1)
    # bitwise | of 2 and -2 truncated to a bool was False
    check(lambda a, b: torch.logical_or(a, b) & (a > -100), x, y)
    check(lambda a, b: torch.logical_and(a, b) | (a > 100), x, y + 1)
    f = torch.tensor([[0.0, 1.0, 2.0, -0.0, NAN]]).repeat(2, 1)
    g = torch.tensor([[1.0, 0.0, 0.5, 3.0, 1.0]]).repeat(2, 1)
    check(lambda a, b: torch.logical_and(a, b).float() + 1, f, g)  # raised: & of float32
    check(lambda a, b: torch.logical_or(a, b).float() + 1, f, g * 0)
    check(lambda a: torch.logical_not(a * 2).float() + 1, f)


BOOL_ARITHMETIC = {
    "add": lambda a, b: (a > 0) + (b > 100),  # True + True is True (int1 1 + 1 wrapped to 0)
    "add_alpha": lambda a, b: torch.add(a > 0, b > 100, alpha=True),
    "add_then_sum": lambda a, b: ((a > 0) + (b > 100)).sum(-1),
    "add_then_float": lambda a, b: ((a > 0) + (b > 100)).float() * 3,
    "mul": lambda a, b: (a > 0) * (b > 100) + (a > 100),
    "maximum": lambda a, b: torch.maximum(a > 0, b > 100),  # a signed int1 max took True for -1
    "minimum": lambda a, b: torch.minimum(a > 0, b > 100) | (a > 100),
}


@pytest.mark.parametrize("name", sorted(BOOL_ARITHMETIC))
def test_arithmetic_on_two_bools_is_logic(name):
    a = torch.tensor([[[5, -5, 5, -5]]]).repeat(2, 3, 1)
    b = torch.tensor([[[0, 200, 200, 0]]]).repeat(2, 3, 1)
    check(BOOL_ARITHMETIC[name], a, b)


MAXMIN = {
    "maximum": lambda a: torch.maximum(a * 2, torch.ones_like(a)),
    "minimum": lambda a: torch.minimum(a * 2, torch.ones_like(a)),
    "clamp": lambda a: a.clamp(-1, 1) * 2,
    "clamp_min_above_max": lambda a: a.clamp(2, 1) * 2,
    "relu": lambda a: torch.relu(a) * 2,
    "amax": lambda a: (a * 2).amax(-1, keepdim=True) + 1,
    "amin": lambda a: (a * 2).amin(-1, keepdim=True) + 1,
    "amax_looped": lambda a: (a.repeat(1, 1, 1300) * 2).amax(-1, keepdim=True) + 1,  # rows of 5200: looped kernel
    "amin_looped": lambda a: (a.repeat(1, 1, 1300) * 2).amin(-1, keepdim=True) + 1,
}


@pytest.mark.parametrize("name", sorted(MAXMIN))
def test_nan_propagates_through_max_and_min(name):
    x = torch.tensor([[[NAN, 1.0, -2.0, 3.0], [0.5, -4.0, 2.0, 1.0]]])
    check(MAXMIN[name], x)


def test_nan_propagates_through_linear_fused_relu():
    class Lin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 4)

        def forward(self, x):
            return torch.relu(self.lin(x)) * 2

    torch.manual_seed(0)
    m = Lin().eval()
    x = torch.randn(1, 2, 8)
    fast = fxforge.optimize(m, example_inputs=(x,), backend="interpret", verbose=False)
    assert any(n.op == "linear_fused" for n in fast.graph.nodes), fast.ir
    x[0, 0, 0] = NAN
    with torch.no_grad():
        torch.testing.assert_close(fast(x), m(x), equal_nan=True)


UNARY = {"exp": torch.exp, "sigmoid": torch.sigmoid, "sqrt": torch.sqrt, "rsqrt": torch.rsqrt, "log": torch.log,
         "erf": torch.erf, "cos": torch.cos, "sin": torch.sin, "tanh": torch.tanh, "log1p": torch.log1p,
         "reciprocal": torch.reciprocal}


@pytest.mark.parametrize("name", sorted(UNARY))
def test_float_unary_ops_promote_int_and_bool_inputs(name):
    # the kernel applied tl.exp etc. to the integer itself: the interpreter raised
    fn = UNARY[name]
    x = torch.tensor([[1, 2, 3, 0]]).repeat(2, 1)
    check(lambda a: fn(a) * 2, x, exact=False, rtol=2e-6, atol=1e-6)
    y = torch.tensor([[0.5, -1.0, 2.0, 0.0]]).repeat(2, 1)
    check(lambda a: fn(a > 0) * 2, y, exact=False, rtol=2e-6, atol=1e-6)


def test_log1p_of_infinity():
    x = torch.tensor([[float("inf"), 1e38, 3e38, 1.0, -1.0, 1e-30]]).repeat(2, 1)
    check(lambda a: torch.log1p(a * 2), x, exact=False, rtol=2e-7, atol=0)


def test_tanh_is_accurate_at_every_magnitude():
    # 2 * sigmoid(2x) - 1 cancelled: tanh(2e-8) was 0, softcapping off by 2.5e-3 relative
    mags = torch.logspace(-30, 38, 4000, dtype=torch.float64).float()
    mid = torch.linspace(0, 12, 4000)
    special = torch.tensor([0.625, 0.62499994, 0.62500006, 0.0, float("inf")])
    v = torch.cat([mags, mid, special])
    x = torch.cat([v, -v, torch.tensor([NAN, NAN])]).reshape(2, -1)
    got = fused(lambda a: torch.tanh(a * 2.0), x / 2)(x / 2)  # exact halving: tanh of x itself
    want = torch.tanh(x.double())
    assert torch.equal(got.isnan(), want.isnan())
    ok = ~want.isnan()
    rel = (got.double() - want).abs() / want.abs().clamp_min(1e-300)
    assert rel[ok].max().item() < 1e-6
    assert torch.equal(torch.signbit(got[ok]), torch.signbit(want[ok]))  # -0.0 stays -0.0


def test_softcap_tanh():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16) * 10
    check(lambda a: torch.tanh(a / 30.0) * 30.0, x, exact=False, rtol=1e-6, atol=0)


def test_float_constants_outside_float32_normal_range():
    # 1e39 was a float64 literal (finite in the kernel, inf in eager); a subnormal constant
    # made the step compute in float64
    x = torch.tensor([[3e-39, 1.0, -2.0]]).repeat(2, 1)
    check(lambda a: a * 1e39 + 1, x)
    check(lambda a: a / 1e-40 * 2, x)
    check(lambda a: (a + 1e-40) * 1e30, x)
    # the largest float32, written shortest (3.4028235e38), is above it: a float64 literal
    check(lambda a: a * 3.4028234663852886e38 - 3e38, x)


@pytest.mark.parametrize("dtype", [torch.int16, torch.int8, torch.uint8])
def test_every_integer_dtype(dtype):
    x = torch.tensor([[1, 5, 100, 0]], dtype=dtype).repeat(2, 1)
    if dtype.is_signed:
        x[0, 0] = -7
    check(lambda a: (a > 3) | (a == 0), x)
    check(lambda a: a.float() * 0.5 + 1, x)
    y = torch.tensor([[1.7, -2.2, 300.9, 7.0]]).repeat(2, 1)
    check(lambda a: (a * 2).to(torch.int16).float() + 1, y)


def test_kernel_files_written_from_threads():
    # every thread of a process wrote the same {path}.{pid}.tmp: os.replace raised
    source = "import triton\n\n@triton.jit\ndef fused_x(x):\n    pass\n" + "#" * 200000 + "\n"
    errors = collections.Counter()
    for _ in range(20):
        kernels = PointwiseKernels(cache_dir=tempfile.mkdtemp())
        barrier = threading.Barrier(8)

        def load():
            barrier.wait()
            try:
                kernels._load("fused_x", source)
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors[type(e).__name__] += 1

        threads = [threading.Thread(target=load) for _ in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
    assert not errors, errors


def test_interpreted_launches_from_threads():
    # Triton's interpreter is process-global: concurrent launches failed ('x >= grid_dim[0]')
    x = torch.randn(2, 3, 8)
    fast = fused(lambda a: torch.softmax(a * 3, -1) + (a * 3).sigmoid(), x)
    want = fast(x)
    errors, barrier = [], threading.Barrier(8)

    def run():
        barrier.wait()
        try:
            torch.testing.assert_close(fast(x), want)
        except Exception as e:  # noqa: BLE001 - collected and reported
            errors.append(f"{type(e).__name__}: {str(e)[:120]}")

    threads = [threading.Thread(target=run) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors
