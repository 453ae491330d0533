"""Whether a model is a decoder-only causal LM, the only kind kv_cache and generate() serve.

A transformers model says so itself: an encoder-decoder config (T5, BART, Whisper), or a
class whose can_generate() is False (BERT's masked LM, a sequence classifier). Such models
optimize and run their forward as any other; asking them for a cache would otherwise fail
deep in the kv_cache pass with advice about masks that cannot help."""
from __future__ import annotations


def not_a_causal_lm(model) -> str | None:
    """Why `model` cannot generate token by token with a KV cache, or None (a causal LM, or
    not a transformers model: the kv_cache pass then judges the graph itself)."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return (f"{name} is an encoder-decoder model (its config says is_encoder_decoder=True): kv_cache and "
                "generate() serve decoder-only causal LMs, whose one stack of layers attends to the tokens "
                "before each one. Optimize it without kv_cache to run its forward (encoder and decoder "
                "inputs), and generate with transformers' model.generate()")
    can_generate = getattr(model, "can_generate", None)
    # a decoder's base model (LlamaModel) or classifier cannot generate either, but its
    # attention is causal (transformers marks it is_causal) and kv_cache serves its forward
    causal = any(getattr(m, "is_causal", None) is True for m in model.modules())
    if callable(can_generate) and config is not None and not causal:
        try:
            able = bool(can_generate())
        except Exception:  # noqa: BLE001 (a hint only: no verdict rather than a wrong one)
            return None
        if not able:
            return (f"{name} cannot generate text (transformers' can_generate() is False: an encoder, masked "
                    "LM or classifier head, whose attention sees the tokens on both sides): kv_cache and "
                    "generate() serve decoder-only causal LMs. Optimize it without kv_cache to run its forward")
    return None
