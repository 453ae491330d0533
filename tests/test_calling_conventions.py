"""How users call the optimized model: the outputs' structure (no past_key_values), the
arguments a call may pass that the capture did not, and the messages of what is refused."""
import warnings

import pytest
import torch

import fxforge

import zoo


def _optimize(model, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxforge.optimize(model, *args, **kwargs)


@pytest.fixture(scope="module")
def llama():
    model, vocab = zoo.llama("sdpa")
    ids = torch.randint(0, vocab, (2, 6), generator=torch.Generator().manual_seed(1))
    return model, ids


@pytest.fixture(scope="module")
def fast(llama):
    model, ids = llama
    return _optimize(model, (ids,))


# -- 1. the output's structure: fxforge returns no past_key_values -------------------------
def test_a_tuple_output_whose_default_call_holds_the_cache_is_refused(llama):
    model, ids = llama
    assert model.config.use_cache  # eager's tuple is (logits, past_key_values, hidden_states)
    with pytest.raises(ValueError, match=r"past_key_values[\s\S]*use_cache=False[\s\S]*return_dict=True"):
        _optimize(model, example_kwargs=dict(input_ids=ids, return_dict=False, output_hidden_states=True))


def test_a_tuple_output_captured_with_use_cache_false_is_the_models_own(llama):
    model, ids = llama
    kw = dict(input_ids=ids, return_dict=False, output_hidden_states=True, use_cache=False)
    fast = _optimize(model, example_kwargs=kw)
    with torch.no_grad():
        want = model(**kw)
    got = fast(**kw)
    assert isinstance(got, tuple) and len(got) == len(want) == 2
    torch.testing.assert_close(got[0], want[0])
    assert len(got[1]) == len(want[1])


def test_use_cache_true_in_a_call_points_to_generate(llama, fast):
    _, ids = llama
    with pytest.raises(ValueError, match=r"use_cache=True: fxforge's forward returns no KV cache[\s\S]*kv_cache=True"
                                         r"[\s\S]*generate") as err:
        fast(ids, use_cache=True)
    assert "captured as the constant" not in str(err.value)


def test_use_cache_none_is_the_default_call(llama, fast):
    model, ids = llama
    with torch.no_grad():
        want = model(ids).logits
    torch.testing.assert_close(fast(ids, use_cache=None).logits, want)


def test_use_cache_true_in_the_example_names_the_argument(llama):
    model, ids = llama
    with pytest.raises(ValueError, match=r"example_kwargs has use_cache=True[\s\S]*kv_cache=True"):
        _optimize(model, example_kwargs=dict(input_ids=ids, use_cache=True))


# -- 2. calls the capture did not make, answered exactly --------------------------------------
@pytest.mark.parametrize("kw", [dict(attention_mask=None), dict(return_dict=True), dict(past_key_values=None),
                                dict(output_attentions=False), dict(labels=None), dict(logits_to_keep=0)])
def test_an_argument_at_forwards_default_is_the_call_without_it(llama, fast, kw):
    model, ids = llama
    with torch.no_grad():
        want = model(ids, **kw).logits
    torch.testing.assert_close(fast(ids, **kw).logits, want)


def test_a_positional_argument_at_its_default_is_the_call_without_it(llama, fast):
    model, ids = llama
    with torch.no_grad():
        want = model(ids).logits
    torch.testing.assert_close(fast(ids, None).logits, want)  # attention_mask=None


def test_an_argument_at_another_value_is_still_refused(llama, fast):
    _, ids = llama
    with pytest.raises(TypeError, match=r"\['return_dict'\]"):
        fast(ids, return_dict=False)
    with pytest.raises(TypeError, match=r"\['logits_to_keep'\]"):
        fast(ids, logits_to_keep=False)  # equal to 0, but not forward()'s default


def test_defaults_survive_save_and_load(llama, fast, tmp_path):
    _, ids = llama
    again = fxforge.load(fast.save(str(tmp_path / "m")))
    torch.testing.assert_close(again(ids, attention_mask=None).logits, fast(ids).logits)


def test_int32_token_ids_run_as_the_captured_int64(llama, fast):
    model, ids = llama
    with torch.no_grad():
        want = model(ids.int()).logits
    torch.testing.assert_close(fast(ids.int()).logits, want)
    with pytest.raises(ValueError, match="i64"):
        fast(ids.bool())
    with pytest.raises(ValueError, match="i64"):
        fast(ids.float())


def test_an_integer_input_used_in_arithmetic_keeps_its_dtype_checked():
    class Hash(torch.nn.Module):
        def forward(self, ids):
            return ids * 1000003  # overflows at int32 in eager: widening would change the answer
    fast = _optimize(Hash(), (torch.randint(0, 9, (2, 3)),))
    with pytest.raises(ValueError, match="i64"):
        fast(torch.randint(0, 9, (2, 3), dtype=torch.int32))


def test_generate_takes_int32_token_ids():
    model, vocab = zoo.llama("sdpa")
    prompt = torch.randint(3, vocab, (1, 5), generator=torch.Generator().manual_seed(2))
    fk = _optimize(model, (prompt,), kv_cache=True)
    want = fk.generate(prompt, 3)
    got = fk.generate(prompt.int(), 3)
    assert got.dtype == torch.long and torch.equal(got, want)


class _Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, scale=1.0, flag=False):
        y = self.lin(x) * scale
        return y.relu() if flag else y


def test_a_numpy_float64_is_the_captured_float():
    np = pytest.importorskip("numpy")
    model, x = _Scaled().eval(), torch.randn(2, 4)
    fast = _optimize(model, (x,), example_kwargs=dict(scale=2.0, flag=True))
    with torch.no_grad():
        want = model(x, scale=np.float64(2.0), flag=True)
    torch.testing.assert_close(fast(x, scale=np.float64(2.0), flag=True), want)
    with pytest.raises(ValueError, match=r"pass float\(value\)"):
        fast(x, scale=np.float32(2.0), flag=True)  # not a float to isinstance
    with pytest.raises(ValueError, match=r"pass bool\(value\)"):
        fast(x, scale=2.0, flag=np.True_)  # `flag is True` is False for it
    with pytest.raises(ValueError, match="captured as the constant 2.0"):
        fast(x, scale=2, flag=True)  # int * tensor promotes otherwise than float


# -- 3. forward hooks: traced into the graph, their side effects do not run per call ----------
class _Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.second(self.first(x).relu())


def _warnings_of(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught]


def test_a_forward_hook_warns_at_optimize_naming_the_module():
    model, seen = _Two().eval(), []
    model.first.register_forward_hook(lambda m, i, o: seen.append(o))
    model.second.register_forward_pre_hook(lambda m, i: None)
    messages = [m for m in _warnings_of(lambda: fxforge.optimize(model, (torch.randn(2, 4),))) if "hook" in m]
    assert len(messages) == 1
    assert "first (forward hook)" in messages[0] and "second (forward pre-hook)" in messages[0]
    assert "side effects" in messages[0] and "will not run" in messages[0]


def test_a_global_forward_hook_warns():
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        messages = _warnings_of(lambda: fxforge.optimize(_Two().eval(), (torch.randn(2, 4),)))
    finally:
        handle.remove()
    assert any("every module (global forward hook" in m for m in messages)


def test_transformers_own_output_hooks_do_not_warn(llama):
    model, ids = llama
    with torch.no_grad():
        model(ids, output_hidden_states=True, output_attentions=True)  # transformers installs its own hooks
    assert any(m._forward_hooks for m in model.modules())
    assert not [m for m in _warnings_of(lambda: fxforge.optimize(model, (ids,))) if "forward hooks" in m]


# -- 4. gradients: fxforge runs under no_grad, and says so once ------------------------------
def test_an_input_that_requires_grad_warns_once():
    fast = _optimize(_Two().eval(), (torch.randn(2, 4),))
    x = torch.randn(2, 4, requires_grad=True)
    with torch.enable_grad():
        first = _warnings_of(lambda: fast(x))
        again = _warnings_of(lambda: fast(x))
    assert [m for m in first if "no_grad" in m and "original model" in m]
    assert not [m for m in again if "no_grad" in m]
    assert not [m for m in _warnings_of(lambda: _optimize(_Two().eval(), (x.detach(),))(x.detach()))
                if "no_grad" in m]


# -- 5. messages that name what is wrong and how to fix it ------------------------------------
@pytest.fixture(scope="module")
def cached(llama):
    model, ids = llama
    return _optimize(model, (ids,), kv_cache=True)


def test_generate_with_inputs_embeds_says_it_takes_token_ids(llama, cached):
    model, ids = llama
    emb = model.model.embed_tokens(ids[:1]).detach()
    with pytest.raises(ValueError, match=r"generate\(\) does not take inputs_embeds[\s\S]*input_ids"):
        cached.generate(inputs_embeds=emb, max_new_tokens=3)
    with pytest.raises(TypeError, match=r"generate\(\) needs input_ids"):
        cached.generate(max_new_tokens=3)


@pytest.mark.parametrize("name, says", [("token_type_ids", "input_ids only"), ("position_ids", "positions itself"),
                                        ("pixel_values", "looks like a model input")])
def test_generate_does_not_take_model_inputs_for_settings(llama, cached, name, says):
    _, ids = llama
    with pytest.raises(ValueError, match=f"does not support these arguments: {name}") as err:
        cached.generate(ids[:1], 2, **{name: torch.zeros_like(ids[:1])})
    assert says in str(err.value) and "did you mean" not in str(err.value)


def test_generate_still_suggests_a_misspelled_setting(llama, cached):
    _, ids = llama
    with pytest.raises(ValueError, match=r"temprature: did you mean temperature\?"):
        cached.generate(ids[:1], 2, temprature=0.5)


@pytest.mark.parametrize("shape", [(0, 6), (2, 0)])
def test_a_paged_model_called_with_an_empty_input_says_so(llama, shape):
    model, ids = llama
    paged = _optimize(model, (ids,), kv_cache=fxforge.KVCacheConfig(layout="paged", block_size=4))
    with pytest.raises(ValueError, match=r"input 0 \(input_ids\) has size 0 in dim \d .*: the optimized graph serves "
                                         r"sizes of at least 1"):
        paged(torch.zeros(*shape, dtype=torch.long))


def test_a_mask_of_another_batch_is_refused_naming_both(llama):
    model, ids = llama
    mask = torch.ones_like(ids)
    masked = _optimize(model, example_kwargs=dict(input_ids=ids, attention_mask=mask))
    with pytest.raises(ValueError, match=r"attention_mask has batch 1 but input_ids has batch 2[\s\S]*expand\(2, -1\)"):
        masked(input_ids=ids, attention_mask=mask[:1])


def test_a_dict_in_another_key_order_is_refused_saying_why():
    class Ordered(torch.nn.Module):
        def forward(self, batch):
            return torch.cat(list(batch.values()), 1)  # the keys' order is the result's
    x, y = torch.randn(2, 3), torch.randn(2, 3)
    fast = _optimize(Ordered(), ({"x": x, "y": y},))
    with pytest.raises(TypeError, match=r"same keys in another order: pass them in the captured order"):
        fast({"y": y, "x": x})
