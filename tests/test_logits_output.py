"""Which output generate() samples from, and what it feeds: kv_cache marks as the logits the
output the model names `logits` (a dict key, a ModelOutput field), else its one float
[B, T, V] output whose V is the token embedding's rows (a hidden state of another width is
not it, wherever it sits), and none when two fit equally (generate() then says how to
choose). generate() and the engines feed the token ids alone, [batch, length]: a model
captured with more inputs, or sequence-first ids, is refused by name."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxforge

VOCAB, WIDTH = 96, 48


class Tiny(nn.Module):
    """One causal attention layer with learned positions; `outputs` spells what forward returns."""

    def __init__(self, outputs: str, head_rows: int = VOCAB):
        super().__init__()
        torch.manual_seed(0)
        self.wte, self.wpe = nn.Embedding(VOCAB, WIDTH), nn.Embedding(64, WIDTH)
        self.qkv, self.proj, self.ln = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH), nn.LayerNorm(WIDTH)
        self.head, self.early = nn.Linear(WIDTH, head_rows, bias=False), nn.Linear(WIDTH, head_rows, bias=False)
        self.outputs = outputs

    def forward(self, idx, targets=None, position_ids=None):
        b, t = idx.shape
        pos = torch.arange(t, device=idx.device) if position_ids is None else position_ids
        x = self.wte(idx) + self.wpe(pos)
        q, k, v = (z.view(b, t, 4, WIDTH // 4).transpose(1, 2) for z in self.qkv(x).split(WIDTH, 2))
        early = self.early(x)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, WIDTH))
        h = self.ln(x)
        logits = self.head(h)
        if self.outputs == "hidden_first":
            return h, logits
        if self.outputs == "named":  # another vocabulary-wide output first: the name decides
            return {"early": early, "logits": logits}
        if self.outputs == "ambiguous":
            return early, logits
        if self.outputs == "nested":  # an auxiliary head's logits inside: the top-level name decides
            return {"aux": {"logits": early}, "logits": logits}
        if self.outputs == "misnamed":  # the name says the hidden state, the vocabulary's width the head
            return {"logits": h, "scores": logits}
        if self.outputs == "last_and_hidden":
            return self.head(h[:, [-1], :]), (x, h)
        if targets is not None:  # "loss": nanoGPT's training call
            return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits


def _greedy(model, ids, n: int, pick) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, pick(model(ids))[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


PROMPT = torch.tensor([[3, 17, 5, 40, 2]])


@pytest.mark.parametrize("outputs, pick, index", [
    ("hidden_first", lambda out: out[1], 1),
    ("named", lambda out: out["logits"], 1),
    ("nested", lambda out: out["logits"], 1),
    ("last_and_hidden", lambda out: out[0], 0),
])
def test_generate_samples_from_the_logits_wherever_they_sit(outputs, pick, index):
    model = Tiny(outputs).eval()
    fast = fxforge.optimize(model, (torch.randint(0, VOCAB, (1, 8)),), kv_cache=True)
    assert fast.graph.signature["outputs"].index("logits") == index
    assert f"logits: output {index}" in fast.report()
    assert torch.equal(fast.generate(PROMPT, 8), _greedy(model, PROMPT, 8, pick))
    engine = fxforge.Engine(fast, max_batch=2, max_seq_len=32)
    assert torch.equal(engine.generate_many([PROMPT[0]], max_new_tokens=8)[0], _greedy(model, PROMPT, 8, pick)[0, 5:])


def test_two_outputs_that_could_each_be_the_logits_mark_none():
    # an early-exit head beside the final one: taking the first sampled from the early head
    model = Tiny("ambiguous").eval()
    fast = fxforge.optimize(model, (torch.randint(0, VOCAB, (1, 8)),), kv_cache=True)
    assert "logits" not in fast.graph.signature["outputs"]
    assert "could each be the logits" in fast.report()
    with pytest.raises(ValueError, match="under the name 'logits'"):
        fast.generate(PROMPT, 4)
    out = fast(PROMPT)  # plain calls run as eager
    torch.testing.assert_close(out[1], model(PROMPT)[1], rtol=1e-4, atol=1e-5)


def test_a_name_the_vocabulary_contradicts_marks_no_logits():
    model = Tiny("misnamed").eval()
    fast = fxforge.optimize(model, (torch.randint(0, VOCAB, (1, 8)),), kv_cache=True)
    assert "logits" not in fast.graph.signature["outputs"] and "is named logits but" in fast.report()
    with pytest.raises(ValueError, match="under the name 'logits'"):
        fast.generate(PROMPT, 2)


def test_a_model_with_a_config_and_generate_of_its_own_is_not_taken_for_transformers():
    # nanoGPT's GPT has self.config and its own generate(), and no position_ids argument: it
    # was taken for a transformers decoder whose left-padded rows transformers shifts, and
    # so kept shared positions (left padding shifted a row's, the engine was refused)
    class OwnGenerate(Tiny):
        def __init__(self):
            super().__init__("plain")
            self.config = {"block_size": 64}

        def generate(self, idx, n):
            return _greedy(self, idx, n, lambda out: out)

    model = OwnGenerate().eval()
    fast = fxforge.optimize(model, (torch.randint(0, VOCAB, (1, 8)),), kv_cache=True)
    assert fast.kv_layout.per_row_positions and not fast.left_padding_shifts_positions
    ids = torch.tensor([[0, 0, 3, 17, 5], [9, 4, 40, 2, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    batched = fast.generate(ids, 5, attention_mask=mask)
    assert torch.equal(batched[0, 2:], model.generate(ids[:1, 2:], 5)[0])


def test_a_model_captured_with_targets_runs_and_generate_names_the_extra_input():
    model = Tiny("loss").eval()
    ids = torch.randint(0, VOCAB, (1, 8))
    fast = fxforge.optimize(model, (ids, ids), kv_cache=True)  # a 0-d loss output crashed the pass
    logits, loss = fast(ids, ids)
    ref_logits, ref_loss = model(ids, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"captured with 2 inputs \(idx, targets\)"):
        fast.generate(PROMPT, 3)


def test_positions_given_as_an_input_are_refused_by_generate_and_the_engine():
    model = Tiny("plain").eval()
    ids = torch.randint(0, VOCAB, (1, 8))
    fast = fxforge.optimize(model, (ids,), example_kwargs={"position_ids": torch.arange(8)[None]}, kv_cache=True)
    with pytest.raises(ValueError, match="the token ids as the only example input"):
        fast.generate(PROMPT, 3)  # a bare StopIteration before
    with pytest.raises(ValueError, match="2 inputs"):
        fxforge.Engine(fast, max_batch=2, max_seq_len=32)


def test_a_prompt_id_past_the_embedding_is_refused_though_the_logits_are_wider():
    # nanoGPT pads its head past the tokenizer's vocabulary; the embedding here has fewer rows
    model = Tiny("plain", head_rows=128).eval()
    fast = fxforge.optimize(model, (torch.randint(0, VOCAB, (1, 8)),), kv_cache=True)
    with pytest.raises(ValueError, match=r"token id 100 .* vocabulary \[0, 96\)"):
        fast.generate(torch.tensor([[3, 100]]), 2)


def test_sequence_first_ids_are_refused_by_name():
    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Tiny("plain")

        def forward(self, idx_tb):  # [T, B]
            return self.inner(idx_tb.t()).transpose(0, 1)

    model = SeqFirst().eval()
    fast = fxforge.optimize(model, (torch.randint(0, VOCAB, (8, 2)),), kv_cache=True)
    with pytest.raises(ValueError, match="in dim 1, not dim 0: sequence-first ids"):
        fast.generate(PROMPT, 2)
