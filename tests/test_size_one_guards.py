"""Sizes of one beside other guards (ir/size_one.py): every dynamic size that a call may
give as 1 is probed at 1 at sizes the graph's guards allow, or guarded >= 2. The probe of
all sizes at 1 together was refused by another guard on T (T % 2 == 0, T >= 4), read as
"the model and the graph agree", and the batch got no guard: batch 1 was answered by the
graph of batch >= 2 (a wrong answer, a wrong shape)."""
import pytest
import torch

import fxforge
from fxforge.ir import size_one
from fxforge.ir.guards import GuardError

D = 8


class BranchBesideModulo(torch.nn.Module):
    """A branch on batch 1 beside a branch on T % 2 (guard Eq(Mod(T, 2), 0))."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(D, D)

    def forward(self, x):
        y = self.lin(x)
        if x.shape[0] == 1:
            return y * 2
        if x.shape[1] % 2 == 0:
            return y + 1
        return y


class PairsSqueezed(torch.nn.Module):
    """squeeze(0) of the batch beside a reshape that needs T even."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2 * D, D)

    def forward(self, x):
        B, T, _ = x.shape
        return self.lin(x.reshape(B, T // 2, 2 * D)).squeeze(0)


class BranchBesidePosition(torch.nn.Module):
    """A branch on batch 1 beside a read at position 3 (guard T >= 4)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(D, D)

    def forward(self, x):
        y = self.lin(x)[:, 3]
        return y * 2 if x.shape[0] == 1 else y


class BranchBesideFlatRow(torch.nn.Module):
    """A branch on batch 1 beside a read of the 6th row of B*T (guard B*T >= 6): at the
    example's T = 3, batch 1 is refused by that guard, at T >= 6 it is not."""

    def forward(self, x):
        row = x.reshape(-1, D)[5]
        out = x + row
        return out * 2 if x.shape[0] == 1 else out


class BothAtOne(torch.nn.Module):
    """Computes otherwise only where the batch and the length are both 1."""

    def forward(self, x):
        return x * 2 if x.shape[0] == 1 and x.shape[1] == 1 else x + 1


def _eager_or_refused(fast, model, x):
    """fast(x) is model(x) (shape and values), or a GuardError."""
    try:
        out = fast(x)
    except GuardError:
        return "refused"
    with torch.no_grad():
        ref = model(x)
    assert out.shape == ref.shape, (tuple(out.shape), tuple(ref.shape))
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    return "same"


@pytest.mark.parametrize("model,example,batch_one", [
    (BranchBesideModulo, (2, 6, D), (1, 6, D)),
    (PairsSqueezed, (2, 8, D), (1, 8, D)),
    (BranchBesidePosition, (2, 8, D), (1, 8, D)),
    (BranchBesideFlatRow, (2, 3, D), (1, 6, D)),
])
def test_batch_one_beside_a_guard_that_refuses_t_one_is_guarded(model, example, batch_one):
    torch.manual_seed(0)
    model = model().eval()
    fast = fxforge.optimize(model, (torch.randn(*example),), verbose=False)
    assert "guard B >= 2" in fast.ir, fast.ir
    with pytest.raises(GuardError, match="B >= 2"):
        fast(torch.randn(*batch_one))
    assert _eager_or_refused(fast, model, torch.randn(*example)) == "same"
    assert _eager_or_refused(fast, model, torch.randn(3, *example[1:])) == "same"


def test_sizes_that_differ_only_together_are_refused_together():
    """Batch 1 alone and one token alone agree; both at 1 differ: that combination is
    refused, each alone still served."""
    model = BothAtOne().eval()
    fast = fxforge.optimize(model, (torch.randn(2, 6, D),), verbose=False)
    assert _eager_or_refused(fast, model, torch.randn(1, 1, D)) == "refused"
    for shape in [(1, 6, D), (2, 1, D), (3, 5, D)]:
        assert _eager_or_refused(fast, model, torch.randn(*shape)) == "same", shape


def test_a_size_refused_at_one_by_its_own_guard_costs_no_probe(monkeypatch):
    """T % 2 == 0 refuses T = 1 whatever the batch: T is not probed at 1, the batch is, once
    per draw (the example's data and its random draws), and an ordinary model gets no guard."""
    class Pairs(torch.nn.Module):
        def forward(self, x):
            B, T, _ = x.shape
            return x.reshape(B, T // 2, 2 * D).sum(-1)

    probed = []
    compare = size_one._difference

    def spy(model, graph, spec, probe, inputs, **kwargs):
        probed.append(tuple(inputs[0].shape))
        return compare(model, graph, spec, probe, inputs, **kwargs)

    monkeypatch.setattr(size_one, "_difference", spy)
    model = Pairs().eval()
    fast = fxforge.optimize(model, (torch.randn(2, 6, D),), verbose=False)
    assert "guard B >= 2" not in fast.ir and "guard T >= 2" not in fast.ir, fast.ir
    assert all(shape[1] % 2 == 0 for shape in probed), probed
    assert len([s for s in probed if s[:2] == (1, 6)]) == len(size_one._Draws.FLOAT_KINDS) + 1, probed
    assert _eager_or_refused(fast, model, torch.randn(1, 4, D)) == "same"


class FlatRow(torch.nn.Module):
    """The 6th row of B*T (guard B*T >= 6), no branch: batch 1 is the same computation."""

    def forward(self, x):
        return x + x.reshape(-1, D)[5]


def test_batch_one_is_probed_at_a_length_the_guards_allow_or_refused(monkeypatch):
    """At the example's T = 3 the guard B*T >= 6 refuses batch 1; the probe is made at a
    length it allows (T = 6), where the model agrees: batch 1 is served. Where no allowed
    length is among the sizes searched, batch 1 cannot be probed and is refused."""
    model = FlatRow().eval()
    fast = fxforge.optimize(model, (torch.randn(2, 3, D),), verbose=False)
    assert "guard B >= 2" not in fast.ir, fast.ir
    assert _eager_or_refused(fast, model, torch.randn(1, 7, D)) == "same"
    monkeypatch.setattr(size_one, "SEARCH_SIZES", range(1, 3))
    fast = fxforge.optimize(model, (torch.randn(2, 3, D),), verbose=False)
    assert "guard B >= 2" in fast.ir, fast.ir
    assert _eager_or_refused(fast, model, torch.randn(1, 7, D)) == "refused"


class ShiftedPair(torch.nn.Module):
    """Inputs of T and T + 1 tokens, and a branch on batch 1: the probes at 1 make the
    T + 1 dim follow T (it was 'cannot be made', read as 'agrees')."""

    def forward(self, x, y):
        out = y[:, 1:] + x
        return out * 2 if x.shape[0] == 1 else out


def test_a_size_that_another_input_holds_plus_one_is_probed_with_it():
    model = ShiftedPair().eval()
    fast = fxforge.optimize(model, (torch.randn(2, 5, D), torch.randn(2, 6, D)), verbose=False)
    assert "T + 1" in fast.ir and "guard B >= 2" in fast.ir and "guard T >= 2" not in fast.ir, fast.ir
    with pytest.raises(GuardError, match="B >= 2"):
        fast(torch.randn(1, 5, D), torch.randn(1, 6, D))
    x, y = torch.randn(3, 1, D), torch.randn(3, 2, D)
    assert torch.allclose(fast(x, y), model(x, y))


# --- every set of sizes at 1 together, and outputs that are not tensors -------------------


def _same_or_refused(fast, model, *args):
    """fast(*args) is model(*args), every output (tensors: shape and values; numbers: the
    same number), or a GuardError."""
    try:
        out = fast(*args)
    except GuardError:
        return "refused"
    with torch.no_grad():
        ref = model(*args)
    outs, refs = (out, ref) if isinstance(ref, tuple) else ((out,), (ref,))
    assert len(outs) == len(refs)
    for o, r in zip(outs, refs):
        if isinstance(r, torch.Tensor):
            assert o.shape == r.shape, (tuple(o.shape), tuple(r.shape))
            assert torch.allclose(o, r, atol=1e-5), (o - r).abs().max()
        else:
            assert type(o) is type(r) and o == r, (o, r)
    return "same"


class SqueezeBatch(torch.nn.Module):
    """`x.squeeze(0)` (the README's example): at batch 1 the softmax runs over the length.
    At B = T = 1 both ways give the same, so the probe of all sizes at 1 agrees: only the
    batch at 1 beside a length >= 2 shows it."""

    def forward(self, x):
        return x.squeeze(0).softmax(0).reshape(x.shape)


class BatchOnePrefill(torch.nn.Module):
    """Computes otherwise at batch 1 with more than one token only."""

    def forward(self, x):
        return x * 2 if x.shape[0] == 1 and x.shape[1] > 1 else x + 1


@pytest.mark.parametrize("model", [SqueezeBatch, BatchOnePrefill])
def test_batch_one_beside_a_longer_length_is_probed_though_all_at_one_agree(model):
    torch.manual_seed(0)
    model = model().eval()
    fast = fxforge.optimize(model, (torch.randn(2, 3, D),), verbose=False)
    assert _same_or_refused(fast, model, torch.randn(1, 5, D)) == "refused", fast.ir
    for shape in [(1, 1, D), (2, 5, D), (3, 1, D)]:
        _same_or_refused(fast, model, torch.randn(*shape))
    for shape in [(2, 5, D), (3, 1, D)]:
        assert _same_or_refused(fast, model, torch.randn(*shape)) == "same", shape


class TwoOfThree(torch.nn.Module):
    """Three sizes (B, T of x, S of y); computes otherwise where B and T are both 1, whatever S."""

    def forward(self, x, y):
        out = x.sum(1) + y.sum(0)
        return out * 2 if x.shape[0] == 1 and x.shape[1] == 1 else out


def test_two_of_three_sizes_at_one_are_refused_whatever_the_third():
    """The guard refuses B == T == 1 (B + T >= 3), not only all three at 1 (B + T + S >= 4:
    at S = 5 batch-1 one-token calls were answered off by the model's factor)."""
    torch.manual_seed(0)
    model = TwoOfThree().eval()
    fast = fxforge.optimize(model, (torch.randn(2, 3, 4), torch.randn(5, 4)), verbose=False)
    for s in (1, 5):
        assert _same_or_refused(fast, model, torch.randn(1, 1, 4), torch.randn(s, 4)) == "refused", fast.ir
    for shape, s in [((1, 3, 4), 5), ((2, 1, 4), 5), ((2, 3, 4), 1), ((1, 3, 4), 1), ((2, 1, 4), 1)]:
        assert _same_or_refused(fast, model, torch.randn(*shape), torch.randn(s, 4)) == "same", (shape, s)


def test_every_set_of_sizes_is_probed_at_one_the_others_at_two_or_more(monkeypatch):
    """With three sizes, each of the 7 sets of them is probed at 1 (the others >= 2), smallest
    first; a model that is the same everywhere gets no guard."""
    class Plain(torch.nn.Module):
        def forward(self, x, y):
            return x.sum(1) + y.sum(0)

    probed = []
    compare = size_one._difference

    def spy(model, graph, spec, probe, inputs, **kwargs):
        probed.append((*inputs[0].shape[:2], inputs[1].shape[0]))
        return compare(model, graph, spec, probe, inputs, **kwargs)

    monkeypatch.setattr(size_one, "_difference", spy)
    model = Plain().eval()
    fast = fxforge.optimize(model, (torch.randn(2, 3, 4), torch.randn(5, 4)), verbose=False)
    assert "guard" not in fast.ir, fast.ir
    at_one = {tuple(n == 1 for n in p) for p in probed}
    assert at_one >= {(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)} - {(0, 0, 0)}, probed


class FiveLengths(torch.nn.Module):
    """Five inputs of a size each; computes otherwise where the first two are 1 together."""

    def forward(self, a, b, c, d, e):
        out = a.sum(0) + b.sum(0) + c.sum(0) + d.sum(0) + e.sum(0)
        return out * 2 if a.shape[0] == 1 and b.shape[0] == 1 else out


def test_beyond_four_sizes_all_at_one_differing_refuses_every_two_at_one():
    """Five sizes: each alone and all together are probed; all at 1 differ, each alone
    agree, the sets between are not probed: every two at 1 together are refused (a
    conservative guard), each alone still served."""
    torch.manual_seed(0)
    model = FiveLengths().eval()
    example = [torch.randn(n, 4) for n in (2, 3, 4, 5, 6)]
    fast = fxforge.optimize(model, tuple(example), verbose=False)

    def call(*ones):
        return _same_or_refused(fast, model, *[torch.randn(1 if i in ones else n, 4)
                                                for i, n in enumerate((2, 3, 4, 5, 6))])

    assert call(0, 1) == "refused" and call(0, 1, 2, 3, 4) == "refused", fast.ir
    for i in range(5):
        assert call(i) == "same", (i, fast.ir)
    assert call() == "same"


class ConstantAtOne(torch.nn.Module):
    def forward(self, x):
        return x * 2, (1.0 if x.shape[1] == 1 else 0.5)


class SizeOrSeven(torch.nn.Module):
    """A size output that is the length, but 7 at one token (the graph's: the length)."""

    def forward(self, x):
        return x * 2, (x.shape[1] if x.shape[1] > 1 else 7)


class Length(torch.nn.Module):
    def forward(self, x):
        return x * 2, x.shape[1]


@pytest.mark.parametrize("model", [ConstantAtOne, SizeOrSeven])
def test_an_output_that_is_a_number_is_compared_at_one(model):
    """A Python number among the outputs (a constant, or a size) that is another at one
    token: T == 1 is refused, not given the number of T >= 2."""
    torch.manual_seed(0)
    model = model().eval()
    fast = fxforge.optimize(model, (torch.randn(2, 3, D),), verbose=False)
    assert _same_or_refused(fast, model, torch.randn(2, 1, D)) == "refused", fast.ir
    for shape in [(1, 3, D), (2, 5, D)]:
        assert _same_or_refused(fast, model, torch.randn(*shape)) == "same", shape


def test_a_size_output_that_is_the_same_at_one_gets_no_guard():
    model = Length().eval()
    fast = fxforge.optimize(model, (torch.randn(2, 3, D),), verbose=False)
    assert "guard" not in fast.ir, fast.ir
    for shape in [(1, 1, D), (2, 1, D), (1, 4, D)]:
        assert _same_or_refused(fast, model, torch.randn(*shape)) == "same", shape


class MaskOfItsOwnBatch(torch.nn.Module):
    """ids [B, T] and a mask whose batch export names apart (B1: the model would broadcast a
    mask of batch 1), read by batch index the way HF's padding code does: a mask of batch 1
    beside ids of batch 2 fails in the graph (an index past the mask's batch), while with
    ids of batch 1 the two agree. Refusing every mask of batch 1 refused the commonest call
    (one prompt and its mask)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(16, D)

    def forward(self, ids, mask):
        rows = torch.arange(ids.shape[0])
        keep = mask[rows] if mask.shape[0] > 1 else mask.expand(ids.shape[0], -1)
        return self.emb(ids) * keep[..., None]


def test_a_size_that_differs_at_one_only_beside_another_at_two_is_refused_only_there():
    torch.manual_seed(0)
    model = MaskOfItsOwnBatch().eval()
    ids, mask = torch.randint(0, 16, (2, 5)), torch.ones(2, 5)
    fast = fxforge.optimize(model, (ids, mask), verbose=False)
    one, one_mask = ids[:1], torch.tensor([[0.0, 1, 1, 1, 1]])
    torch.testing.assert_close(fast(one, one_mask), model(one, one_mask))
    torch.testing.assert_close(fast(ids, torch.ones(2, 5)), model(ids, torch.ones(2, 5)))
    assert str(fast.graph.inputs[1].shape[0]) != str(fast.graph.inputs[0].shape[0])  # (B1 and B: the form tested)
    with pytest.raises(GuardError):
        fast(ids, one_mask)  # eager broadcasts; the graph reads row 1 of the mask


def test_hf_llama_with_a_mask_answers_batch_one():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(1, 64, (2, 6))
    fast = fxforge.optimize(model, (ids,), example_kwargs=dict(attention_mask=torch.ones_like(ids)), verbose=False)
    one, mask = ids[:1, :4], torch.tensor([[0, 1, 1, 1]])
    torch.testing.assert_close(fast(one, attention_mask=mask).logits, model(one, attention_mask=mask).logits)


class IgnoresTheMaskAtBatchOne(torch.nn.Module):
    """`if B == 1: mask = ones_like(mask)`: with the usual all-ones example mask, draws of
    the mask's own one value agreed at batch 1 and the batch got no guard."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, D)

    def forward(self, ids, mask):
        if ids.shape[0] == 1:
            mask = torch.ones_like(mask)
        return (self.emb(ids) * mask[..., None]).sum(1)


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.int64])
def test_an_all_ones_example_mask_is_drawn_with_zeros(mask_dtype):
    torch.manual_seed(0)
    model = IgnoresTheMaskAtBatchOne().eval()
    ids = torch.randint(0, 50, (2, 5))
    fast = fxforge.optimize(model, (ids, torch.ones(2, 5, dtype=mask_dtype)), verbose=False)
    mask = torch.tensor([[0, 0, 1, 1, 1]], dtype=mask_dtype)
    with pytest.raises(GuardError):
        fast(ids[:1], mask)
    two = torch.tensor([[0, 1, 1, 1, 1], [1] * 5], dtype=mask_dtype)
    torch.testing.assert_close(fast(ids, two), model(ids, two))
