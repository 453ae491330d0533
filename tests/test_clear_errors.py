"""Bad input gets a clear error that names what is wrong and how to fix it, never a raw
traceback from inside torch: calls that do not match the capture, empty example inputs,
data-dependent sizes (a hand-written MoE), gqa on interleaved rotary, and plain calls
longer than the KV cache."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxforge
from fxforge.ir.capture import CaptureError
from fxforge.passes.gqa import GQAConfig, GQAError

import zoo
from helpers import assert_close_to_eager


# -- 1. calls that do not match the captured call ------------------------------------------------
def test_a_keyword_capture_may_be_called_positionally_and_a_mismatch_names_the_argument():
    torch.manual_seed(0)
    model, vocab = zoo.llama(n_layer=1)
    ids = torch.randint(0, vocab, (1, 8))
    mask = torch.ones(1, 8, dtype=torch.long)
    fast = fxforge.optimize(model, example_kwargs=dict(input_ids=ids, attention_mask=mask))
    # input_ids captured by keyword, passed by position: forward()'s parameter names map it
    assert_close_to_eager(model(ids, attention_mask=mask), fast(ids, attention_mask=mask))
    assert_close_to_eager(model(ids, attention_mask=mask), fast(ids, mask))
    with pytest.raises(TypeError, match=r"captured as forward\(input_ids=\.\.\., attention_mask=\.\.\.\); "
                                        r"the call is missing attention_mask"):
        fast(input_ids=ids)
    with pytest.raises(TypeError, match="multiple values for argument 'input_ids'"):
        fast(ids, input_ids=ids, attention_mask=mask)
    with pytest.raises(TypeError, match=r"keyword argument\(s\) \['position_ids'\] were not given .* as "
                                        r"forward\(input_ids=\.\.\., attention_mask=\.\.\.\)"):
        fast(ids, attention_mask=mask, position_ids=ids)


def test_an_extra_positional_argument_is_named_with_the_captured_signature():
    model, vocab = zoo.llama(n_layer=1)
    tokens = torch.randint(0, vocab, (1, 8))
    fast = fxforge.optimize(model, (tokens,))
    assert_close_to_eager(model(tokens), fast(input_ids=tokens))
    with pytest.raises(TypeError, match=r"captured as forward\(input_ids\); got an extra positional argument 0 "
                                        r"at position 1 \(forward\(\)'s attention_mask"):
        fast(tokens, 0)
    with pytest.raises(TypeError, match=r"missing input_ids"):
        fast()
    # a spec saved before the names of every positional parameter were kept
    fast.spec = dataclasses.replace(fast.spec, positional_names=("input_ids",))
    assert_close_to_eager(model(tokens), fast(tokens))
    with pytest.raises(TypeError, match=r"forward\(input_ids\); got an extra positional argument 0 at position 1"):
        fast(tokens, 0)


# -- 2. empty example inputs ---------------------------------------------------------------------
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.out = nn.Embedding(50, 16), nn.Linear(16, 50)

    def forward(self, tokens):
        return self.out(self.emb(tokens))


@pytest.mark.parametrize("shape, says", [((0, 8), "at least one row"), ((2, 0), "at least one token")])
def test_an_empty_example_input_is_named(shape, says):
    with pytest.raises(ValueError, match=rf"example input example_inputs\[0\] has shape \[{shape[0]}, {shape[1]}\]"
                                         rf".*{says}"):
        fxforge.optimize(_Tiny().eval(), (torch.zeros(shape, dtype=torch.long),))
    with pytest.raises(ValueError, match=r"example_kwargs\['tokens'\].*at least one row"):
        fxforge.optimize(_Tiny().eval(), example_kwargs={"tokens": torch.zeros(0, 8, dtype=torch.long)})


# -- 3. a size that depends on tensor data -------------------------------------------------------
class _SparseMoE(nn.Module):
    """Top-2 MoE with per-expert token selection (torch.where(idx == e)), as hand-written ones do."""

    def __init__(self, vocab=50, dim=16, experts=4):
        super().__init__()
        self.emb, self.gate = nn.Embedding(vocab, dim), nn.Linear(dim, experts, bias=False)
        self.experts = nn.ModuleList([nn.Linear(dim, dim, bias=False) for _ in range(experts)])
        self.out = nn.Linear(dim, vocab)

    def forward(self, tok):
        x = self.emb(tok).flatten(0, 1)
        w, idx = torch.topk(self.gate(x), 2, dim=-1)
        w = F.softmax(w, dim=-1)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            t, k = torch.where(idx == e)
            y[t] += w[t, k, None] * expert(x[t])
        return self.out(y).view(*tok.shape, -1)


def test_a_data_dependent_size_names_the_op_the_line_and_a_remedy():
    with pytest.raises(CaptureError) as info:
        fxforge.optimize(_SparseMoE().eval(), (torch.randint(0, 50, (2, 7)),))
    text = str(info.value)
    assert "a size depends on tensor data" in text
    assert "op: aten." in text
    assert "code: t, k = torch.where(idx == e)" in text, text
    assert "test_clear_errors.py:" in text, text
    assert "run every expert on every token" in text and "batched_mm" in text and "boolean-mask indexing" in text


# -- 4. gqa on an interleaved rotary -------------------------------------------------------------
class _InterleavedRotary(nn.Module):
    """One attention layer with rotary on adjacent pairs of dims: llama2.c's reshape(..., -1, 2)
    and stack, or Meta llama's view_as_complex."""

    def __init__(self, complex_rotary: bool, vocab=50, dim=32, heads=4, kv_heads=2):
        super().__init__()
        self.complex_rotary, self.heads, self.kv_heads, self.hd = complex_rotary, heads, kv_heads, dim // heads
        self.emb = nn.Embedding(vocab, dim)
        self.wq, self.wo = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, kv_heads * self.hd, bias=False)
        self.wv = nn.Linear(dim, kv_heads * self.hd, bias=False)
        self.out = nn.Linear(dim, vocab, bias=False)
        freqs = torch.outer(torch.arange(64).float(), 1.0 / 10000 ** (torch.arange(0, self.hd, 2).float() / self.hd))
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def rotate(self, x, t):
        cos, sin = self.cos[:t].view(1, t, 1, -1), self.sin[:t].view(1, t, 1, -1)
        if self.complex_rotary:
            xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
            return torch.view_as_real(xc * torch.complex(cos, sin)).flatten(3)
        re, im = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
        return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(3)

    def forward(self, tokens):
        b, t = tokens.shape
        h = self.emb(tokens)
        q = self.rotate(self.wq(h).view(b, t, self.heads, self.hd), t).transpose(1, 2)
        k = self.rotate(self.wk(h).view(b, t, self.kv_heads, self.hd), t).transpose(1, 2)
        v = self.wv(h).view(b, t, self.kv_heads, self.hd).transpose(1, 2)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(h + self.wo(a.transpose(1, 2).reshape(b, t, -1)))


@pytest.mark.parametrize("complex_rotary, op", [(False, "aten.stack"), (True, "aten.view_as_complex")])
def test_gqa_on_an_interleaved_rotary_names_the_op_in_the_way(complex_rotary, op):
    model = _InterleavedRotary(complex_rotary).eval()
    ids = torch.randint(0, 50, (2, 7))
    assert_close_to_eager(model(ids), fxforge.optimize(model, (ids,))(ids))  # it captures; gqa refuses
    with pytest.raises(GQAError, match=rf"the op {op}\S* .*between the Q projection and the attention is an "
                                       r"interleaved rotary embedding"):
        fxforge.optimize(model, (ids,), gqa=GQAConfig(1))


# -- 5. a plain call longer than the KV cache ----------------------------------------------------
def test_a_plain_call_past_max_seq_len_says_how_to_raise_it():
    model, vocab = zoo.llama(n_layer=1)
    fast = fxforge.optimize(model, (torch.randint(1, vocab, (1, 8)),), kv_cache=fxforge.KVCacheConfig(max_seq_len=32))
    with pytest.raises(ValueError, match=r"optimized with a KV cache of max_seq_len=32 positions.*"
                                         r"kv_cache=fxforge\.KVCacheConfig\(max_seq_len=40\)"):
        fast(torch.randint(1, vocab, (1, 40)))


def test_a_tensor_example_kwarg_taken_through_var_keyword_is_named():
    """torch.export cannot give dynamic sizes to a tensor that reaches forward() through
    **kwargs (Bloom's position_ids): its error was an internal AssertionError ("Must
    provide a tree_name ...", where: unknown)."""
    class TakesKwargs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(32, 8)

        def forward(self, input_ids, attention_mask=None, **kwargs):
            return self.emb(input_ids) * 2

    ids = torch.randint(0, 32, (2, 7))
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(7).expand(2, 7).clone())
    with pytest.raises(fxforge.CaptureError, match=r"position_ids reaches forward\(\) only through \*\*kwargs"
                                                   r"[\s\S]*fix: leave position_ids out of example_kwargs"):
        fxforge.optimize(TakesKwargs(), example_kwargs=kw, verbose=False)


@pytest.mark.parametrize("config, says", [
    (fxforge.GQAConfig(2, "aligned"), "needs calibration"),
    (fxforge.GQAConfig(2, "aligned", calibration="some text"), "calibration must be token ids"),
])
def test_gqa_aligned_without_usable_calibration_fails_before_capture(config, says):
    class Untraceable(torch.nn.Module):  # capturing it would fail: the option must fail first
        def forward(self, x):
            raise AssertionError("captured before the options were checked")

    from fxforge.passes.gqa import GQAError

    with pytest.raises(GQAError, match=says):
        fxforge.optimize(Untraceable(), (torch.randint(0, 8, (2, 4)),), gqa=config)


# -- sizes torch.export fixes, buffers forward() writes, data-dependent branches ------------------
class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(8, 5, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0]


class Linspace(nn.Module):
    def forward(self, x):
        return x * torch.linspace(0, 1, x.shape[1])[:, None]


@pytest.mark.parametrize("model, op", [(Recurrent(), r"aten\.gru\.input \(at rnn\)"),
                                       (Linspace(), r"aten\.linspace\.default")], ids=["gru", "linspace"])
def test_a_length_fixed_by_an_op_names_that_op(model, op):
    with pytest.warns(UserWarning, match=rf"torch.export fixed the length = 6 .*: {op} ran at the example's size"):
        fxforge.optimize(model.eval(), (torch.randn(2, 6, 8),), verbose=False)


class ScanLoop(nn.Module):
    """A recurrence written as a Python loop over the sequence (transformers' Mamba
    layers without their CUDA kernels): export unrolls it at the example's length."""

    def forward(self, x):
        state, outs = torch.zeros_like(x[:, 0]), []
        for t in range(x.shape[1]):
            state = 0.5 * state + x[:, t]
            outs.append(state)
        return torch.stack(outs, 1)


def test_a_python_loop_over_the_sequence_is_named_among_the_causes():
    with pytest.warns(UserWarning, match=r"torch.export fixed the length = 6 [\s\S]*loops over the sequence in "
                                         r"Python[\s\S]*optimize once per length"):
        fxforge.optimize(ScanLoop(), (torch.randn(2, 6, 8),), verbose=False)


def test_batchnorm_in_training_mode_is_told_to_call_eval():
    model = nn.BatchNorm1d(6).train()
    with pytest.raises(CaptureError, match=r"running_mean.*call model\.eval\(\) before optimize\(\) \(BatchNorm"):
        fxforge.optimize(model, (torch.randn(2, 6, 8),), verbose=False)


class BranchOnValue(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum().item() > 0 else x - 1


def test_a_branch_on_a_value_prints_no_fx_graph_before_the_error(capfd):
    with pytest.raises(CaptureError, match="data-dependent"):
        fxforge.optimize(BranchOnValue(), (torch.randn(2, 6, 8).abs(),), verbose=False)
    out, err = capfd.readouterr()
    assert "def forward" not in out + err, err  # torch.export's partial graph dump


# -- an in-place write to a buffer registered under two names -------------------------------------
class _SharedBufferWrite(nn.Module):
    """One tensor registered as a buffer of two submodules; forward writes it through one
    name. torch.export drops that write and its functionalization fails on an assertion."""

    def __init__(self):
        super().__init__()
        shared = torch.zeros(4)
        self.a, self.b = nn.Module(), nn.Module()
        self.a.register_buffer("buf", shared)
        self.b.register_buffer("buf", shared)
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        self.a.buf.add_(1)
        return self.lin(x) + self.b.buf


def test_a_write_to_a_buffer_registered_under_two_names_is_refused_naming_both():
    with pytest.raises(CaptureError, match=r"writes in place .* to the buffer 'a\.buf', which is one tensor "
                                           r"registered under 2 names \('a\.buf', 'b\.buf'\)"):
        fxforge.optimize(_SharedBufferWrite().eval(), (torch.randn(2, 4),))


# -- calls the graph was not captured for: an empty size, another device ------------------------
class _EmptySequenceSentinel(nn.Module):
    """Answers an empty sequence itself; torch.export assumes sizes >= 2 and records no guard."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        h = self.lin(x)
        if h.shape[1] == 0:
            return torch.full((h.shape[0], 8), -1.0)
        return h.mean(1)


def test_a_call_with_an_empty_size_or_on_another_device_is_refused_by_name():
    model = _EmptySequenceSentinel().eval()
    x = torch.randn(2, 5, 8)
    fast = fxforge.optimize(model, (x,))
    assert_close_to_eager(model(x[:, :3]), fast(x[:, :3]))
    # the graph ran the T > 0 branch at T = 0: NaN where the model answers -1
    with pytest.raises(ValueError, match=r"input 0 \(x\) has size 0 in dim 1 \(T in f32\[B, T, 8\]\): the optimized "
                                         r"graph serves sizes of at least 1"):
        fast(x[:, :0])
    with pytest.raises(ValueError, match=r"has size 0 in dim 0"):
        fast(x[:0])
    with pytest.raises(ValueError, match=r"input 0 \(x\) is on meta, the model on cpu: move it there"):
        fast(x.to("meta"))


def test_a_size_fixed_at_one_by_the_example_says_how_to_free_it():
    """A [1, 1, T, T] bias example keeps batch 1 (torch.export fixes a size-1 dim): the
    call with a batch of 3 biases is told to optimize with an example of batch 2."""

    class BiasedAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 48)

        def forward(self, x, bias):
            B, T, _ = x.shape
            q, k, v = self.qkv(x).view(B, T, 3, 2, 8).permute(2, 0, 3, 1, 4)
            return ((q @ k.transpose(-1, -2) / 8 ** 0.5 + bias).softmax(-1) @ v).transpose(1, 2).reshape(B, T, 16)

    model = BiasedAttention().eval()
    fast = fxforge.optimize(model, (torch.randn(1, 6, 16), torch.randn(1, 1, 6, 6)))
    with pytest.raises(ValueError, match=r"input 1 \(bias\) must have size 1 in dim 0 .*, got 3; the example had "
                                         r"size 1 there, .* optimize with an example whose size there is more than 1"):
        fast(torch.randn(3, 5, 16), torch.randn(3, 1, 5, 5))


class _PlainAttributeCache(nn.Module):
    """Meta's llama keeps its KV cache as plain tensor attributes and writes them in forward."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.cache = torch.zeros(2, 16, 8)

    def forward(self, x, start_pos: int = 0):
        self.cache[:x.shape[0], start_pos:start_pos + x.shape[1]] = self.lin(x)
        return self.cache[:x.shape[0], :start_pos + x.shape[1]].sum(-1)


def test_a_plain_tensor_attribute_written_in_forward_is_refused_by_name():
    with pytest.raises(CaptureError, match=r"the model mutates cache inside forward \(a plain tensor attribute"):
        fxforge.optimize(_PlainAttributeCache().eval(), (torch.randn(2, 4, 8), 0))


def test_an_unregistered_dataclass_output_is_told_how_to_register_it():
    @dataclasses.dataclass
    class Out:
        logits: torch.Tensor

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return Out(self.lin(x))

    with pytest.raises(CaptureError, match=r"register_dataclass\(YourClass\)"):
        fxforge.optimize(M().eval(), (torch.randn(2, 4),))
