"""What the guards of a call rest on (runtime/module.py, ir/size_one.py): constants of the
call compared as the model's code can tell them apart, guards dropped only where the graph
and the model agree on more than the example's own data, the graph checked against the
model at the example itself, and eval()/train() that say what the capture holds."""
import math

import pytest
import torch

import fxforge
from fxforge.ir.guards import GuardError
from helpers import FunctionModule
from fxforge.runtime.module import _same_constant


# -- constants of the call ------------------------------------------------------------------
class Scaled(torch.nn.Module):
    def forward(self, x, k=1, flag=False):
        y = x.long() * k  # int64 at k=1, float32 at k=1.0
        if flag is True:
            y = y + 100
        return y


@pytest.mark.parametrize("a, b", [(1, 1.0), (1, True), (1.0, True), (0, False), (0.0, -0.0),
                                  ((1, 2), (1.0, 2)), ([True], [1]), ({"a": 1}, {"a": 1.0})])
def test_constants_of_another_type_or_sign_differ(a, b):
    assert not _same_constant(a, b) and not _same_constant(b, a)


@pytest.mark.parametrize("a", [1, True, 1.5, float("nan"), float("inf"), -0.0, "s", None, (1, float("nan")),
                               {"k": [1, 2.0]}, torch.float16])
def test_constants_equal_to_themselves(a):
    again = type(a)(a) if isinstance(a, (tuple, dict)) else a
    assert _same_constant(again, a)
    if isinstance(a, float) and math.isnan(a):
        assert _same_constant(float("nan"), a)  # another NaN object


def test_int_constant_refuses_float_and_bool_calls():
    m, x = Scaled(), torch.randn(2, 6, 8) * 10
    fast = fxforge.optimize(m, (x,), example_kwargs=dict(k=1, flag=1))
    assert torch.equal(fast(x, k=1, flag=1), m(x, k=1, flag=1))
    for k, flag in ((1.0, 1), (1, True), (True, 1)):
        with pytest.raises(ValueError, match="captured as the constant"):
            fast(x, k=k, flag=flag)


def test_nan_constant_runs_and_survives_save_load(tmp_path):
    class Times(torch.nn.Module):
        def forward(self, x, s=0.0):
            return x * s

    x = torch.randn(2, 6, 8)
    fast = fxforge.optimize(Times(), (x,), example_kwargs=dict(s=float("nan")))
    assert fast(x, s=float("nan")).isnan().all()
    fast.save(str(tmp_path / "nan"))
    assert fxforge.load(str(tmp_path / "nan"))(x, s=float("nan")).isnan().all()

    fast = fxforge.optimize(Scaled(), (x,), example_kwargs=dict(k=True))
    fast.save(str(tmp_path / "bool"))
    loaded = fxforge.load(str(tmp_path / "bool"))
    assert torch.equal(loaded(x, k=True), Scaled()(x, k=True))
    for k in (1, 1.0):
        with pytest.raises(ValueError, match="captured as the constant"):
            loaded(x, k=k)


# -- guards dropped only on more than the example's own data --------------------------------
class ClampAtLength8(torch.nn.Module):
    def forward(self, x):
        return x.clamp(min=0) if x.shape[1] == 8 else x


class ClampAtBatch1(torch.nn.Module):
    def forward(self, x):
        return x.clamp(min=0) if x.shape[0] == 1 else x


@pytest.mark.parametrize("model, refused", [(ClampAtLength8(), (2, 8, 4)), (ClampAtBatch1(), (1, 6, 4))],
                         ids=["Ne(T, 8)", "B == 1"])
def test_a_guard_stays_where_only_the_examples_data_agrees(model, refused):
    """The example is non-negative (torch.rand): clamp(min=0) is a no-op on it, so the
    probe at the excluded size agreed on the example's own data and the guard went; a
    call with negative values there got another answer."""
    torch.manual_seed(0)
    fast = fxforge.optimize(model, (torch.rand(2, 6, 4),), verbose=False)
    with pytest.raises(GuardError):
        fast(torch.randn(*refused))
    x = torch.randn(3, 5, 4)  # elsewhere it runs, as eager
    assert torch.equal(fast(x), model(x))


def test_integer_inputs_are_probed_on_other_valid_ids():
    """The example's ids are all odd (3 and 9): at T == 8 the model adds 1 at even ids
    only, so the example's own ids agree there; a draw of ids in the example's range shows
    it."""
    table = torch.arange(16.0)

    def fn(ids):
        if ids.shape[1] == 8:
            return table[ids] + (ids % 2 == 0).float()
        return table[ids]

    model = FunctionModule(fn)
    fast = fxforge.optimize(model, (torch.tensor([[3, 3, 3, 3, 3, 9]] * 2),), verbose=False)
    with pytest.raises(GuardError):
        fast(torch.randint(0, 16, (2, 8)))
    ids = torch.randint(3, 10, (2, 5))
    assert torch.equal(fast(ids), model(ids))


def test_an_ordinary_model_still_drops_the_sliced_buffer_guard_and_runs_at_one():
    """The random draws agree wherever the model computes the same: no new guards."""
    torch.manual_seed(0)
    model = FunctionModule(lambda x: (x * 2).softmax(-1)[:, -3:])
    fast = fxforge.optimize(model, (torch.rand(2, 6, 4),), verbose=False)
    assert not any("Ne(" in str(g) or ">= 2" in str(g) for g in fast.graph.guards), fast.graph.guards
    for shape in ((1, 3, 4), (1, 9, 4), (4, 7, 4)):
        x = torch.randn(*shape)
        assert torch.equal(fast(x), model(x))


# -- the graph against the model at the example itself --------------------------------------
def test_a_graph_that_differs_at_the_example_itself_is_refused():
    """Under export str() of a size is its symbol's name ("s1"), so len(str(T)) was 2 in
    the graph where eager has 1 at T = 6: another answer at the example's own shape."""
    model = FunctionModule(lambda x: x * len(str(x.shape[1])))
    with pytest.raises(fxforge.CaptureError, match=r"output 0 differs by up to .*torch.export cannot follow"):
        fxforge.optimize(model, (torch.randn(2, 6, 8),), verbose=False)
    fast = fxforge.optimize(model, (torch.randn(2, 6, 8),), dynamic=False, verbose=False)  # the remedy it names
    x = torch.randn(2, 6, 8)
    assert torch.equal(fast(x), model(x))


def test_the_error_names_the_output_that_differs():
    class TwoOutputs(torch.nn.Module):
        def forward(self, x):
            return {"same": x + 1, "formatted": x * len(str(x.shape[0]))}

    with pytest.raises(fxforge.CaptureError, match=r"\['formatted'\]"):
        fxforge.optimize(TwoOutputs(), (torch.randn(2, 6, 8),), verbose=False)


# -- eval() / train() of a model optimized in training mode ---------------------------------
def _dropout_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5), torch.nn.ReLU())


def test_eval_of_a_training_mode_capture_raises_instead_of_staying_random():
    model = _dropout_model().train()
    with pytest.warns(UserWarning, match="training mode"):
        fast = fxforge.optimize(model, (torch.randn(2, 6, 4),), verbose=False)
    assert fast.training
    with pytest.raises(RuntimeError, match=r"optimized in training mode.*model\.eval\(\) before fxforge\.optimize"):
        fast.eval()
    with pytest.raises(RuntimeError, match="optimized in training mode"):
        fast.train(False)


class _AttentionDropout(torch.nn.Module):
    """Dropout through SDPA's dropout_p, as transformers' attention layers pass it: no
    nn.Dropout module anywhere."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.5 if self.training else 0.0)


def test_attention_dropout_in_training_mode_is_found_like_dropout_ops():
    """It went unnoticed: no warning, fast.training False, eval() passed, outputs random."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 8)
    with pytest.warns(UserWarning, match=r"training mode: 1 dropout op\(s\) \(first: aten.scaled_dot_product_attention"):
        fast = fxforge.optimize(_AttentionDropout().train(), (x,), verbose=False)
    assert fast.training
    with pytest.raises(RuntimeError, match="optimized in training mode"):
        fast.eval()
    import warnings
    with warnings.catch_warnings():  # dropout_p=0.0 in eval mode: no warning, an inference graph
        warnings.simplefilter("error")
        fast = fxforge.optimize(_AttentionDropout().eval(), (x,), verbose=False)
    assert not fast.training and fast.eval() is fast


def test_eval_of_an_eval_mode_capture_returns_itself(tmp_path):
    model = _dropout_model().eval()
    fast = fxforge.optimize(model, (torch.randn(2, 6, 4),), verbose=False)
    assert not fast.training and fast.eval() is fast and fast.train(False) is fast
    with pytest.raises(RuntimeError, match="inference only"):
        fast.train()
    fast.save(str(tmp_path / "m"))
    assert fxforge.load(str(tmp_path / "m")).eval() is not None
    x = torch.randn(3, 5, 4)
    assert torch.equal(fast(x), model(x))


def test_a_model_random_in_eval_mode_is_not_refused_at_the_example():
    """Noise drawn in forward (eval mode) differs between any two runs: the graph cannot
    be compared with it, which is no reason to refuse it (nor to guard its sizes)."""
    model = FunctionModule(lambda x: x + torch.rand_like(x))
    fast = fxforge.optimize(model.eval(), (torch.randn(2, 6, 8),), verbose=False)
    assert not fast.graph.guards
    x = torch.randn(1, 1, 8)
    assert ((fast(x) - x) >= 0).all() and ((fast(x) - x) < 1).all()


class NoisyBranchAtOne(torch.nn.Module):
    """Random in eval mode, and another computation at T == 1."""

    def forward(self, x):
        noise = torch.rand_like(x) * x.abs().amax() * 1e-2
        return x * 2 + noise if x.shape[1] == 1 else x + noise


def test_a_model_random_in_eval_mode_keeps_its_size_one_guard():
    # the noise hides whether T == 1 computes the same: the guard must stay (it went, and a
    # T=1 call gave x + noise where eager gives 2x + noise)
    fast = fxforge.optimize(NoisyBranchAtOne().eval(), (torch.randn(2, 8),))
    with pytest.raises(GuardError, match="T >= 2"):
        fast(torch.randn(3, 1))


def test_an_int64_input_at_its_largest_value_is_probed():
    # a hash-like input holding 2**63 - 1: the random draw's upper bound overflowed
    class Hashed(torch.nn.Module):
        def forward(self, x, h):
            return x * 2 + (h % 7).float()

    model = Hashed()
    x, h = torch.randn(2, 8), torch.full((2, 8), 2**63 - 1)
    fast = fxforge.optimize(model, (x, h))
    assert torch.equal(fast(x, h), model(x, h))


def test_a_float_mask_is_drawn_from_its_own_values():
    # a 0/1 float mask: both branches agree on every 0/1 mask, so no guard at T == 1 (normal
    # draws, data the model never gets, made one)
    class Masked(torch.nn.Module):
        def forward(self, x, mask):
            return x * mask[..., None] if x.shape[1] == 1 else x.masked_fill(mask[..., None] == 0, 0.0)

    model = Masked()
    mask = torch.ones(2, 8)
    mask[1, 0] = 0
    fast = fxforge.optimize(model, (torch.randn(2, 8, 4), mask))
    assert not fast.graph.guards
    y, my = torch.randn(3, 1, 4), torch.tensor([[1.0], [0.0], [1.0]])
    assert torch.equal(fast(y, my), model(y, my))


def test_position_ids_that_restart_in_the_example_are_compared_with_the_default_call():
    # the graph computes the default call's masks (no packed sequences); the check at the
    # example ran eager with use_cache=False, which reads restarting positions as packed
    # sequences, and refused a right graph
    import sys
    sys.path.insert(0, "benchmarks")
    from coverage import build

    model, _ = build("llama", "eager")
    ids = torch.randint(1, 128, (2, 8))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]] * 2)
    fast = fxforge.optimize(model, example_kwargs=dict(input_ids=ids, position_ids=pos))
    with torch.no_grad():
        expected = model(input_ids=ids, position_ids=pos).logits
    assert (fast(input_ids=ids, position_ids=pos).logits - expected).abs().max() < 1e-4
