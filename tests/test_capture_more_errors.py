"""Capture of models that replace a buffer inside forward (a lazily grown rotary cache) and of
control flow fxforge does not capture: a graph that gives the eager answer, or a CaptureError
that names the problem and how to fix it, never torch's raw error."""
import pytest
import torch
import torch.nn as nn

import fxforge
from fxforge.ir.guards import GuardError

from helpers import assert_close_to_eager


class LazyRotary(nn.Module):
    """transformers < 4.38's (and many remote-code models') rotary cache: grown inside forward
    by register_buffer when an input is longer than it."""

    def __init__(self, dim=8, max_pos=4):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)), persistent=False)
        self._set_cache(max_pos)

    def _set_cache(self, n):
        self.max_seq_len_cached = n
        t = torch.arange(n, dtype=self.inv_freq.dtype)
        emb = torch.cat([torch.outer(t, self.inv_freq)] * 2, -1)
        self.register_buffer("cos_cached", emb.cos(), persistent=False)

    def forward(self, x):
        T = x.shape[1]
        if T > self.max_seq_len_cached:
            self._set_cache(T)
        return x * self.cos_cached[:T]


@pytest.mark.parametrize("dynamic", [True, False])
def test_a_cache_grown_in_forward_gives_the_eager_answer(dynamic):
    model = LazyRotary().eval()
    cache = model.cos_cached
    fast = fxforge.optimize(model, (torch.randn(2, 6, 8),), cpu_linear=False, dynamic=dynamic)
    # optimize ran the model (its checks), and left it as it was
    assert model.max_seq_len_cached == 4 and model.cos_cached is cache and tuple(cache.shape) == (4, 8)
    for t in ((3, 5, 6, 9) if dynamic else (6,)):
        x = torch.randn(1 if dynamic else 2, t, 8)
        with torch.no_grad():
            ref = LazyRotary().eval()(x)
        try:
            out = fast(x)
        except GuardError:
            assert t < 5, f"T={t} refused"  # the graph is the branch that grows the cache
            continue
        assert_close_to_eager(ref, out)


class History(nn.Module):
    """Replaces a buffer by one built from it: each call's answer depends on the calls before."""

    def __init__(self):
        super().__init__()
        self.register_buffer("hist", torch.zeros(1, 8))

    def forward(self, x):
        self.register_buffer("hist", torch.cat([self.hist, x[0]]))
        return x * self.hist.sum()


def test_a_buffer_replaced_after_being_read_is_refused_by_name():
    with pytest.raises(fxforge.CaptureError) as err:
        fxforge.optimize(History().eval(), (torch.randn(2, 3, 8),), cpu_linear=False)
    text = str(err.value)
    assert "'hist'" in text and "fix:" in text and "__init__" in text
    assert "tlparse" not in text


class ByValue(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 1


class ByCond(nn.Module):
    def forward(self, x):
        return torch.cond(x.sum() > 0, lambda x: x * 2, lambda x: x - 1, (x,))


def test_data_dependent_branch_advice_is_torch_where_not_cond():
    with pytest.raises(fxforge.CaptureError) as err:
        fxforge.optimize(ByValue(), (torch.randn(2, 5, 8),), cpu_linear=False)
    fix = [line for line in str(err.value).splitlines() if "fix:" in line][0]
    assert "torch.where" in fix and "torch.where / torch.cond" not in fix


def test_torch_cond_is_refused_with_a_fix():
    with pytest.raises(fxforge.CaptureError) as err:
        fxforge.optimize(ByCond(), (torch.randn(2, 5, 8),), cpu_linear=False)
    text = str(err.value)
    assert "higher-order op cond" in text
    fix = [line for line in text.splitlines() if "fix:" in line]
    assert fix and "torch.where" in fix[0]
    # the advice works: both results computed, one picked, is captured and exact
    class Rewritten(nn.Module):
        def forward(self, x):
            return torch.where(x.sum() > 0, x * 2, x - 1)

    fast = fxforge.optimize(Rewritten(), (torch.randn(2, 5, 8),), cpu_linear=False)
    for sign in (1, -1):
        x = sign * torch.rand(2, 5, 8)
        assert_close_to_eager(ByCond()(x), fast(x))
