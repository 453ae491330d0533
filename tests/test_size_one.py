"""Sizes of one (ir/size_one.py): a model whose code looks at a size being 1 computes
something else at batch 1 or at one token than the graph traced at >= 2. The graph is
probed there against the model: guarded (GuardError at size 1) or refused, never a
different answer; an ordinary model gets no guard."""
import pytest
import torch

import fxforge
from helpers import FunctionModule
import zoo
from fxforge.ir.guards import GuardError


class Squeeze(torch.nn.Module):
    def forward(self, x):
        return x.squeeze(0) * 2


class BranchOnBatch(torch.nn.Module):
    def forward(self, x):
        return x * 2 if x.shape[0] == 1 else x * 3


class BranchOnLength(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x):
        y = self.proj(x)
        return y.mean(1, keepdim=True).expand_as(y) if x.shape[1] > 1 else y * 0.5


def test_an_example_of_size_one_that_the_graph_cannot_be_is_refused():
    # captured at batch 2 the squeeze is a no-op: the graph used to give [1, 8, 4] at the
    # example itself, where the model gives [8, 4]
    with pytest.raises(fxforge.CaptureError, match=r"B == 1 \(output 0 has shape \(8, 4\)"):
        fxforge.optimize(Squeeze(), (torch.randn(1, 8, 4),))
    fast = fxforge.optimize(Squeeze(), (torch.randn(1, 8, 4),), dynamic=False)
    x = torch.randn(1, 8, 4)
    assert torch.equal(fast(x), Squeeze()(x))


@pytest.mark.parametrize("model,sym,example,ok,refused", [
    (BranchOnBatch(), "B", (2, 8, 4), [(2, 8, 4), (3, 5, 4)], (1, 8, 4)),
    (BranchOnLength(), "T", (2, 6, 4), [(1, 6, 4), (3, 2, 4)], (2, 1, 4)),
])
def test_a_branch_on_size_one_is_guarded(model, sym, example, ok, refused):
    torch.manual_seed(0)
    fast = fxforge.optimize(model.eval(), (torch.randn(*example),))
    assert f"guard {sym} >= 2" in fast.ir
    for shape in ok:
        x = torch.randn(*shape)
        with torch.no_grad():
            assert torch.allclose(fast(x), model(x), atol=1e-6)
    with pytest.raises(GuardError, match=f"{sym} >= 2"):
        fast(torch.randn(*refused))


def test_an_ordinary_model_gets_no_size_guard_and_runs_at_one():
    torch.manual_seed(0)
    model, vocab = zoo.llama()
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (1, 5)),), kv_cache=True)
    assert ">= 2" not in fast.ir
    ids = torch.randint(0, vocab, (1, 1))
    with torch.no_grad():
        assert torch.allclose(fast(ids).logits, model(ids).logits, atol=1e-5)


def test_a_length_equal_to_a_sliced_buffer_is_probed_and_allowed():
    """nanoGPT slices its block_size x block_size mask buffer by the length: export writes
    Ne(T, block_size) (the whole buffer is a case apart to it), which refused generating
    up to the block size, where eager runs. The graph equals the model there, so that
    guard goes; T <= block_size stays."""
    torch.manual_seed(0)
    model = zoo.NanoGPT().eval()
    block = model.wpe.num_embeddings
    fast = fxforge.optimize(model, (torch.randint(0, 96, (2, 7)),))
    assert not any("Ne(" in str(g) for g in fast.graph.guards), fast.graph.guards
    assert f"T <= {block}" in [str(g) for g in fast.graph.guards]
    ids = torch.randint(0, 96, (1, block))
    with torch.no_grad():
        assert torch.allclose(fast(ids), model(ids), atol=1e-5)
    with pytest.raises(GuardError):
        fast(torch.randint(0, 96, (1, block + 1)))


def test_a_range_guard_that_excludes_one_size_beside_another_guard_is_probed():
    """MPT slices its ALiBi table of max_seq_len columns from max(0, max_seq_len - T): export
    writes Ne(16 - Max(0, 16 - T), 16), false at every T >= 16 (a range, kept), beside
    Eq(T, 16 - Max(0, 16 - T)), which refuses T > 16 already. So it excluded T = 16 alone,
    the full context eager runs: refused at the forward, and at generate's last position."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.MptForCausalLM(transformers.MptConfig(
        vocab_size=64, d_model=32, n_layers=1, n_heads=4, max_seq_len=16, attn_config={"alibi": True})).eval()
    fast = fxforge.optimize(model, (torch.randint(3, 64, (1, 10)),), verbose=False)
    ids = torch.randint(3, 64, (1, 16))
    with torch.no_grad():
        assert torch.allclose(fast(ids).logits, model(ids).logits, atol=1e-5)
    with pytest.raises(GuardError):
        fast(torch.randint(3, 64, (1, 17)))


@pytest.mark.parametrize("fn, ok, refused", [
    (lambda x: x[:, -3:].sum(1), [3, 4, 9], [2]),   # export: Ne(8*T, 24) (and -T <= -3)
    (lambda x: x[:, ::2] * 2, [1, 2, 3, 9], []),     # Ne(8*T, 16)
    (lambda x: x[:, 1::3].exp(), [3, 4, 9], [2]),   # Ne(8*T, 24)
], ids=["tail", "step", "step_from_1"])
def test_a_size_a_scaled_inequality_excludes_is_probed_like_ne_t_c(fn, ok, refused):
    """export excludes a size with a scaled inequality (`Ne(8*T, 24)` is T != 3) where a
    slice's bounds meet the length; solved for T, it is probed as Ne(T, c) is: eager runs
    there, and so does the graph."""
    model = FunctionModule(fn)
    fast = fxforge.optimize(model, (torch.randn(2, 6, 8),), verbose=False)
    assert not any("Ne(" in str(g) for g in fast.graph.guards), fast.graph.guards
    assert "-T <= -3" not in fast.ir  # the range read twice is one line, T >= 3
    for t in ok:
        x = torch.randn(2, t, 8)
        assert torch.equal(fast(x), model(x)), t
    for t in refused:  # the graph has 3 rows where eager has t: a clear error
        with pytest.raises(GuardError):
            fast(torch.randn(2, t, 8))
