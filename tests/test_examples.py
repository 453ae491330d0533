"""Every example runs (on CPU, as a user would run it), so none can rot. The SmolLM2 ones
are slow; they run in CI too."""
import os
import re
import subprocess
import sys

import pytest

import zoo

ROOT = os.path.join(os.path.dirname(__file__), "..")
NEEDS_SMOLLM2 = zoo.needs_smollm2()


def run_example(name, *args, timeout=300, env=None):
    env = {**(env or os.environ), "PYTHONPATH": ROOT}
    env.pop("TRITON_INTERPRET", None)  # examples run as users run them
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", name), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_custom_pass_example(tmp_path):
    out = run_example("custom_pass.py", "--dump", str(tmp_path))
    assert "swish_to_silu fired 1 time(s)" in out and "outputs equal eager: True" in out
    assert (tmp_path / "02_fold_swish.ir").exists()


def test_inspect_ir_example(tmp_path):
    out = run_example("inspect_ir.py", "--out", str(tmp_path))
    assert (tmp_path / "block.dot").read_text().startswith("digraph")
    assert "01_cleanup.ir" in out and "max |fxforge - eager|" in out


@pytest.mark.slow
@NEEDS_SMOLLM2
def test_quickstart_example(smollm2_env):
    out = run_example("quickstart.py", "--new-tokens", "16", env=smollm2_env)
    assert "tokens identical to transformers' generate: yes" in out


@pytest.mark.slow
@NEEDS_SMOLLM2
def test_quantize_and_generate_example(smollm2_env):
    out = run_example("quantize_and_generate.py", "--new-tokens", "12", "--eval-tokens", "64", env=smollm2_env)
    assert "int8: 210 layers quantized" in out and "Paris" in out
    assert "perplexity on 64 tokens" in out


@pytest.mark.slow
@NEEDS_SMOLLM2
def test_gqa_convert_example(smollm2_env):
    # SmolLM2's first 6 layers (of 30): every layer converts the same way, and the three
    # optimize() calls of the whole model took over a minute of the suite. A cut model's
    # perplexity is not SmolLM2's: what is checked is what each layer shows
    out = run_example("gqa_convert.py", "--calibration-tokens", "128", "--held-out-tokens", "128", "--layers", "6",
                      env=smollm2_env)
    assert "aligned: perplexity" in out and "mean: perplexity" in out
    # 3 KV heads -> 1: a third of the cache, whichever merge
    unconverted, mean, aligned = map(int, re.findall(r"KV cache (\d+) bytes/token", out))
    assert unconverted == 3 * mean == 3 * aligned == 6 * 2 * 3 * 64 * 4, out
    # calibrated merging loses less of each layer's attention than pooling
    errors = dict(re.findall(r"(mean|aligned): .*attention error per layer .*\(mean (\S+)\)", out))
    assert float(errors["aligned"]) < float(errors["mean"]), out


def test_serve_example_tiny():
    out = run_example("serve.py", "--tiny", "--new-tokens", "12")
    assert "answers identical to generate() alone: 6 of 6" in out
    assert "tokens identical to greedy: yes" in out


def test_tensor_parallel_example():
    """Launches torchrun itself: 2 ranks (gloo) on a small random Llama, vocabulary split too."""
    out = run_example("tensor_parallel.py", "--vocab", "--new-tokens", "6")
    assert out.count("heads 4 -> 2, KV heads 2 -> 1") == 2, out
    assert "tokens identical on every rank: yes" in out
    errors = [float(e) for e in re.findall(r"max \|logits - unsharded\| = (\S+)", out)]
    assert len(errors) == 2 and max(errors) < 1e-4
