"""A call whose arguments are structured otherwise than the capture's is refused naming the
place inside the argument that differs (batch['others'], a list of 2 that is now 3), not a
dict whose keys are "in another order" when they are in the same order."""
import re

import pytest
import torch

import fxforge


class Batch(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, batch):
        return self.lin(batch["x"]) + sum(t.sum() for t in batch["others"])


@pytest.fixture(scope="module")
def fast():
    example = {"x": torch.randn(2, 4), "others": [torch.randn(3), torch.randn(2)]}
    return fxforge.optimize(Batch().eval(), (example,), verbose=False)


def test_a_list_of_another_length_inside_a_dict_is_named(fast):
    with pytest.raises(TypeError) as info:
        fast({"x": torch.randn(2, 4), "others": [torch.randn(3), torch.randn(2), torch.randn(1)]})
    message = str(info.value)
    assert "batch['others'] was captured as a list of 2, but is a list of 3" in message
    assert "another order" not in message
    assert "optimize again" in message


def test_a_tuple_in_place_of_a_list_is_named(fast):
    with pytest.raises(TypeError, match=re.escape("batch['others'] was captured as a list of 2, but is a tuple of 2")):
        fast({"x": torch.randn(2, 4), "others": (torch.randn(3), torch.randn(2))})


def test_a_nested_list_in_place_of_a_tensor_is_named(fast):
    with pytest.raises(TypeError, match=re.escape("batch['others'][1] was captured as a tensor or value, but is "
                                                  "a list of 2")):
        fast({"x": torch.randn(2, 4), "others": [torch.randn(3), [torch.randn(1), torch.randn(1)]]})


def test_keys_in_another_order_are_still_said_so(fast):
    with pytest.raises(TypeError, match=r"batch was captured as a dict with keys \['x', 'others'\], but is a dict "
                                        r"with keys \['others', 'x'\] \(the same keys in another order"):
        fast({"others": [torch.randn(3), torch.randn(2)], "x": torch.randn(2, 4)})


class Tokens(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(300, 8)
        self.head = torch.nn.Linear(8, 300)

    def forward(self, ids):
        return self.head(self.emb(ids))


@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8, torch.int8])
def test_index_dtypes_eager_refuses_are_refused_clearly(dtype):
    model = Tokens().eval()
    ids = torch.randint(0, 120, (2, 5))
    fast = fxforge.optimize(model, (ids,), verbose=False)
    with pytest.raises(RuntimeError):
        model(ids.to(dtype))  # eager's embedding takes int32 and int64 only
    with pytest.raises(ValueError, match=rf"input 0 \(ids\) is a {dtype} tensor, but the model reads it as indices"
                                         r"[\s\S]*int32 or int64 only[\s\S]*\.to\(torch\.long\)"):
        fast(ids.to(dtype))
    with torch.no_grad():  # int32, which eager takes, still runs as the captured int64
        assert torch.equal(fast(ids.int()), model(ids.int()))


@pytest.fixture(scope="module")
def cached_llama():
    import zoo
    model, _ = zoo.llama()
    ids = torch.randint(0, 100, (1, 5))
    return model, ids, fxforge.optimize(model, (ids,), kv_cache=True, verbose=False)


@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8])
def test_generate_refuses_the_ids_eager_s_embedding_refuses(cached_llama, dtype):
    model, ids, fast = cached_llama
    with pytest.raises((RuntimeError, IndexError)):
        model(ids.to(dtype))  # transformers' embedding takes int32 and int64 only
    with pytest.raises(ValueError, match=r"int64 \(or int32\)[\s\S]*input_ids\.long\(\)"):
        fast.generate(ids.to(dtype), max_new_tokens=2)
    assert torch.equal(fast.generate(ids.int(), max_new_tokens=2), fast.generate(ids, max_new_tokens=2))
