"""What capture makes of the example inputs: the call it stands for (transformers' default
use_cache), example tensors passed for two arguments, non-tensor keyword arguments, sizes
used as booleans, and optimize()'s checks of its own arguments."""
import importlib.util
import os
import warnings

import pytest
import torch

import fxforge

from helpers import FunctionModule

# loaded by path under its own name: `coverage` is also the name of coverage.py (pytest-cov)
_spec = importlib.util.spec_from_file_location(
    "fxforge_coverage_sweep_capture_inputs",
    os.path.join(os.path.dirname(__file__), "..", "benchmarks", "coverage.py"))
coverage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(coverage)


@pytest.fixture(scope="module")
def llama():
    model, _ = coverage.build("llama", "eager")
    return model


def _optimize(model, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxforge.optimize(model, *args, **kwargs)


# -- 1. position_ids: the model's default call builds a cache, so its masks ignore packing --
RESTARTING = torch.tensor([[0, 0, 1, 2, 3, 4]])  # read as two packed sequences without a cache


def test_position_ids_masks_are_those_of_the_default_call(llama):
    torch.manual_seed(1)
    ex = torch.randint(3, 128, (2, 8))
    fast = _optimize(llama, example_kwargs=dict(input_ids=ex, position_ids=torch.arange(8).expand(2, 8)))
    ids = torch.randint(3, 128, (1, 6))
    with torch.no_grad():
        want = llama(input_ids=ids, position_ids=RESTARTING).logits
        packed = llama(input_ids=ids, position_ids=RESTARTING, use_cache=False).logits
    assert (want - packed).abs().max() > 1e-2  # the two calls do differ here
    torch.testing.assert_close(fast(input_ids=ids, position_ids=RESTARTING).logits, want)
    # the graph computes the default call: use_cache=False at call time is refused, not answered otherwise
    with pytest.raises(TypeError, match="use_cache=False"):
        fast(input_ids=ids, position_ids=RESTARTING, use_cache=False)
    # and the packing detection is back after the capture
    from transformers import masking_utils
    assert masking_utils.find_packed_sequence_indices(RESTARTING) is not None


def test_position_ids_with_use_cache_false_keeps_packed_masks(llama):
    torch.manual_seed(1)
    ex = torch.randint(3, 128, (2, 8))
    fast = _optimize(llama, example_kwargs=dict(input_ids=ex, position_ids=torch.arange(8).expand(2, 8),
                                                use_cache=False))
    ids = torch.randint(3, 128, (1, 6))
    with torch.no_grad():
        want = llama(input_ids=ids, position_ids=RESTARTING, use_cache=False).logits
    torch.testing.assert_close(fast(input_ids=ids, position_ids=RESTARTING, use_cache=False).logits, want)


# -- 2. one example tensor for two arguments: each keeps its own graph input --------------
class _Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 8)

    def forward(self, x, y):
        return self.a(x) + 2 * self.b(y)


@pytest.mark.parametrize("second", ["same", "view"])
def test_the_same_example_tensor_for_two_arguments(second):
    torch.manual_seed(0)
    model = _Two().eval()
    t = torch.randn(2, 6, 8)
    fast = _optimize(model, (t, t if second == "same" else t.view(2, 6, 8)))
    x, y = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x, y), model(x, y))


def test_labels_equal_to_input_ids(llama):
    torch.manual_seed(1)
    ex = torch.randint(3, 128, (2, 8))
    fast = _optimize(llama, example_kwargs=dict(input_ids=ex, labels=ex))
    ids, labels = torch.randint(3, 128, (2, 8)), torch.randint(3, 128, (2, 8))
    with torch.no_grad():
        want = llama(input_ids=ids, labels=labels)
    got = fast(input_ids=ids, labels=labels)
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got.loss, want.loss)


# -- 3. a condition on sizes as a constant ------------------------------------------------
def test_a_size_condition_as_a_constant():
    from fxforge.ir.evaluate import evaluate

    model = FunctionModule(lambda x: x * (x.shape[1] > 7))
    fast = _optimize(model, (torch.randn(2, 6, 8),))
    assert not fast.graph.guards  # the size-1 probe evaluated the graph, found it right
    x = torch.randn(2, 6, 8)
    torch.testing.assert_close(evaluate(fast.graph, [x])[0], model(x))
    for shape in ((1, 9, 8), (1, 1, 8), (3, 8, 8), (2, 7, 8)):
        x = torch.randn(*shape)
        torch.testing.assert_close(fast(x), model(x))


def test_size_conditions_keep_eager_dtypes():
    from fxforge.ir.parser import parse

    model = FunctionModule(lambda x: ((x > 0) * (x.shape[1] >= 7), (x > 0) & (x.shape[1] != 7), x.shape[1] > 7))
    fast = _optimize(model, (torch.randn(2, 6, 8),))
    const = FunctionModule(lambda x: (x > 0) * (x.shape[1] >= 7))  # a const of a condition: IR text
    graph = _optimize(const, (torch.randn(2, 6, 8),), passes=[]).graph
    assert str(parse(str(graph))) == str(graph)
    for shape in ((2, 6, 8), (1, 7, 8), (3, 1, 8)):
        x = torch.randn(*shape)
        for got, want in zip(fast(x), model(x)):
            if isinstance(want, torch.Tensor):
                assert got.dtype == want.dtype and torch.equal(got, want)
            else:
                assert got is want


# -- 4. non-tensor kwargs that reach forward() through **kwargs: constants of the capture --
# (a tuple output is captured with use_cache=False: the default call's tuple would hold the
# cache, which fxforge does not return, tests/test_calling_conventions.py)
@pytest.mark.parametrize("kw", [dict(return_dict=False), dict(output_hidden_states=True)])
def test_constant_kwargs_through_var_keyword(llama, kw):
    ex = torch.randint(3, 128, (2, 8))
    cache = dict(use_cache=False) if "return_dict" in kw else {}
    fast = _optimize(llama, example_kwargs=dict(input_ids=ex, **kw, **cache))
    ids = torch.randint(3, 128, (1, 5))
    with torch.no_grad():
        want = llama(input_ids=ids, use_cache=False, **kw)
    got = fast(input_ids=ids, **kw, **cache)
    if isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want)
        torch.testing.assert_close(got[0], want[0])
    else:
        torch.testing.assert_close(got.logits, want.logits)
        assert len(got.hidden_states) == len(want.hidden_states)
        for a, b in zip(got.hidden_states, want.hidden_states):
            torch.testing.assert_close(a, b)
    ((name, value),) = kw.items()
    with pytest.raises(ValueError, match="optimize again"):  # another value: a constant of the capture
        fast(input_ids=ids, **{name: not value}, **cache)
    with pytest.raises(TypeError, match=name):
        fast(input_ids=ids, **cache)


def test_a_var_keyword_constant_at_call_time_points_to_example_kwargs():
    class Scaled(torch.nn.Module):
        def forward(self, x, **kwargs):
            return x * 2 if kwargs.get("double") else x

    model = Scaled()
    fast = _optimize(model, (torch.randn(2, 4),))
    with pytest.raises(TypeError, match="example_kwargs"):
        fast(torch.randn(2, 4), double=True)
    fast = _optimize(model, (torch.randn(2, 4),), example_kwargs=dict(double=True))  # as that error says
    x = torch.randn(3, 4)
    torch.testing.assert_close(fast(x, double=True), model(x, double=True))


# -- 5. optimize()'s own arguments: clear errors before the capture -------------------------
def _linear():
    return torch.nn.Linear(4, 4).eval()


@pytest.mark.parametrize("call, error, words", [
    (lambda: fxforge.optimize(_linear(), example_kwargs=[torch.randn(2, 4)]), TypeError, "example_kwargs is a list"),
    (lambda: fxforge.optimize(_linear(), (torch.randn(2, 4),), passes="cleanup"), TypeError, r"passes=\['cleanup'\]"),
    (lambda: fxforge.optimize(_linear(), (torch.randn(2, 4),), disable="gqa"), TypeError, r"disable=\['gqa'\]"),
    (lambda: fxforge.optimize(lambda x: x + 1, (torch.randn(2, 3),)), TypeError, "torch.nn.Module.*wrap"),
    (lambda: fxforge.optimize(_linear(), {"input": torch.randn(2, 4)}), TypeError, "example_kwargs=dict"),
    (lambda: fxforge.optimize(_linear(), (torch.randn(2, 4),), dynamic="yes"), TypeError, "dynamic is True"),
])
def test_misused_arguments(call, error, words):
    with pytest.raises(error, match=words):
        call()


def test_a_meta_device_model_is_named_as_such():
    with torch.device("meta"):
        model = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="meta device.*Materialise"):
        fxforge.optimize(model, (torch.randn(2, 4),))


def test_a_dict_that_is_one_positional_argument_still_works():
    class Batch(torch.nn.Module):
        def forward(self, batch):
            return batch["a"] * 2

    model = Batch()
    fast = _optimize(model, {"a": torch.randn(2, 4)})
    x = torch.randn(3, 4)
    torch.testing.assert_close(fast({"a": x}), model({"a": x}))


def test_a_dynamic_rope_capture_error_names_the_rotary_scaling():
    """rope_type='dynamic' recomputes the frequencies under a branch on max(position_ids)
    (data-dependent control flow): refused, naming the scaling (LongRoPE is captured:
    tests/test_longrope.py)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                         rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with pytest.raises(fxforge.CaptureError, match=r"rope_type='dynamic'[\s\S]*inside forward\(\)"):
        _optimize(model, (torch.randint(3, 128, (2, 8)),))
