"""kv_cache and generate() serve decoder-only causal LMs: an encoder (BERT) or an
encoder-decoder (T5) asked for them is told so, before capture, instead of a chain of
hints about masks and inputs that each fail next."""
import pytest
import torch
import transformers as tr

import fxforge
from fxforge.passes.kv_cache import KVCacheError
from fxforge.runtime.model_kind import not_a_causal_lm


def _bert():
    torch.manual_seed(0)
    config = tr.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=64)
    return tr.BertForMaskedLM(config).eval()


def test_an_encoder_asked_for_a_cache_is_told_it_is_not_a_causal_lm():
    bert = _bert()
    ids = torch.randint(3, 64, (1, 6))
    with pytest.raises(KVCacheError, match="BertForMaskedLM cannot generate text .* decoder-only causal LMs"):
        fxforge.optimize(bert, (ids,), kv_cache=True, verbose=False)
    fast = fxforge.optimize(bert, (ids,), verbose=False)
    with pytest.raises(RuntimeError, match="generate\\(\\) needs a KV cache, which this model cannot have"):
        fast.generate(ids, max_new_tokens=2)
    torch.testing.assert_close(fast(ids).logits, bert(ids).logits)  # its forward runs as any other


def test_an_encoder_decoder_asked_for_a_cache_is_told_so():
    config = tr.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                         decoder_start_token_id=0)
    t5 = tr.T5ForConditionalGeneration(config).eval()
    ids = torch.randint(3, 64, (1, 6))
    with pytest.raises(KVCacheError, match="T5ForConditionalGeneration is an encoder-decoder model"):
        fxforge.optimize(t5, example_kwargs=dict(input_ids=ids, decoder_input_ids=ids[:, :2]), kv_cache=True,
                         verbose=False)


def test_decoders_without_a_head_are_causal():
    """LlamaModel and a sequence classifier cannot generate(), but their attention is
    causal, and kv_cache serves their forward: no verdict from the model kind."""
    config = tr.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                            intermediate_size=64)
    for cls in (tr.LlamaModel, tr.LlamaForSequenceClassification, tr.LlamaForCausalLM):
        assert not_a_causal_lm(cls(config)) is None
    assert not_a_causal_lm(torch.nn.Linear(2, 2)) is None
