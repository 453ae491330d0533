"""fuse_attention proves what a mask built from the sequence length computes by evaluating
it at probe sizes (passes/shape_eval.py): the probes must reach every length where the
mask may change, or the fused op gives another answer there. Each model here was fused
wrongly once: causal from 5 tokens on but not below (the samples started at 5), NaN rows
at 1..3 tokens, a block-local mask past 64 x 8 tokens (the probes stopped at 256), and a
mask that drops whole rows past 300 tokens (too long to probe, yet fused as a bias without
eager's NaN rows)."""
import pytest
import torch
import torch.nn as nn

import fxforge
from fxforge.ir.capture import capture
from fxforge.passes.kv_cache import KVCacheConfig, KVCacheError
from fxforge.passes.shape_eval import mask_probes, sample_sizes

D, H, HD = 32, 4, 8
NEG_INF = float("-inf")

MASKS = {
    # full attention while T <= 4, causal from 5 tokens on
    "causal_from_5": lambda i, j, T: (j > i) & (i.max() + 1 > 4),
    # a window of T // 4 keys: no key at all for T < 4 (eager: NaN rows)
    "window_T_over_4": lambda i, j, T: (j > i) | (j <= i - T // 4),
    # its own 64-token block and the 7 before it: causal up to 512 tokens only
    "block_local": lambda i, j, T: (j > i) | (i // 64 - j // 64 >= 8),
    # rows past 300 see no key (90000 is past what the probes can reach)
    "rows_dropped_past_300": lambda i, j, T: (j > i) | (i * i > 90000),
}


class Masked(nn.Module):
    def __init__(self, mask: str):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.mask = MASKS[mask]

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, H, HD).permute(2, 0, 3, 1, 4)
        w = q @ k.mT * HD ** -0.5
        i = torch.arange(T)[:, None]
        j = torch.arange(T)[None, :]
        w = w.masked_fill(self.mask(i, j, T), NEG_INF)
        return (w.softmax(-1) @ v).transpose(1, 2).flatten(2)


def _optimized(mask: str, example_length: int = 8):
    torch.manual_seed(0)
    model = Masked(mask).eval()
    return model, fxforge.optimize(model, (torch.randn(2, example_length, D),), verbose=False)


def _assert_eager_answer(model, fast, lengths):
    """fast equals eager at each length, NaN where eager is NaN (and only there)."""
    for t in lengths:
        x = torch.randn(1, t, D)
        with torch.no_grad():
            ref = model(x)
        out = fast(x)
        assert torch.equal(ref.isnan(), out.isnan()), f"T={t}: eager NaN {int(ref.isnan().sum())}, " \
                                                      f"fused NaN {int(out.isnan().sum())}"
        ok = ~ref.isnan()
        torch.testing.assert_close(out[ok], ref[ok], rtol=1e-5, atol=1e-5, msg=f"T={t}")


def _causal_attentions(fast) -> int:
    return sum(1 for n in fast.graph.nodes if n.op == "attention" and n.attrs["causal"])


@pytest.mark.parametrize("example_length", [8, 3])
def test_a_mask_causal_only_from_five_tokens_is_not_fused_causal(example_length):
    """Was attention{causal=true}, 0.85 off at T=2..4 (whatever the example's length)."""
    model, fast = _optimized("causal_from_5", example_length)
    assert _causal_attentions(fast) == 0
    _assert_eager_answer(model, fast, (1, 2, 3, 4, 5, 8))


def test_a_window_empty_below_four_tokens_keeps_eagers_nan_rows():
    """Was 0 where eager's softmax over all -inf is NaN (T = 1, 2, 3)."""
    model, fast = _optimized("window_T_over_4")
    _assert_eager_answer(model, fast, (1, 2, 3, 4, 8))


def test_a_block_local_mask_is_not_causal_past_its_blocks():
    """Was attention{causal=true} from probes <= 256 tokens; 0.03 off at T=600."""
    model, fast = _optimized("block_local")
    assert _causal_attentions(fast) == 0
    _assert_eager_answer(model, fast, (16, 600))


def test_rows_dropped_past_what_the_probes_reach_are_nan_as_in_eager():
    """Was fused as a bias without NaN rows: 0 where eager is NaN (T=310, rows 301..309)."""
    model, fast = _optimized("rows_dropped_past_300")
    _assert_eager_answer(model, fast, (16, 300, 310))


def test_short_lengths_are_sampled_and_block_products_probed():
    graph = capture(Masked("block_local").eval(), (torch.randn(2, 8, D),))
    length = next(s for s in sample_sizes(graph)[0] if str(s) == "T")
    assert {1, 2, 3, 4} <= {sizes[length] for sizes in sample_sizes(graph)}
    mask = next(n for n in graph.nodes if n.op == "where").inputs[0]
    probes = mask_probes(graph, [mask], graph.producers())
    # one past 64 x 8, the first length whose mask is not causal
    assert probes.complete and 514 in {sizes[length] for sizes in probes.sizes[probes.required:]}


class CausalFrom5LM(nn.Module):
    """A causal LM whose mask lets every token see every other while T <= 4."""

    def __init__(self, vocab=50):
        super().__init__()
        self.emb = nn.Embedding(vocab, D)
        self.qkv = nn.Linear(D, 3 * D)
        self.head = nn.Linear(D, vocab)

    def forward(self, ids):
        B, T = ids.shape
        q, k, v = self.qkv(self.emb(ids)).view(B, T, 3, H, HD).permute(2, 0, 3, 1, 4)
        i = torch.arange(T)[:, None]
        j = torch.arange(T)[None, :]
        w = (q @ k.mT * HD ** -0.5).masked_fill(MASKS["causal_from_5"](i, j, T), NEG_INF)
        return self.head((w.softmax(-1) @ v).transpose(1, 2).flatten(2))


def test_kv_cache_with_max_seq_len_does_not_prove_it_causal():
    """kv_cache's proof up to max_seq_len took the samples (5 tokens and up) as every
    length: it cached the mask as causal, and generate() from a 2-token prompt differed."""
    torch.manual_seed(0)
    model = CausalFrom5LM().eval()
    with pytest.raises(KVCacheError, match="not plain causal"):
        fxforge.optimize(model, (torch.randint(0, 50, (1, 8)),), kv_cache=KVCacheConfig(max_seq_len=64),
                         verbose=False)
