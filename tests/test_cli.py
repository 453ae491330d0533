"""python -m fxforge inspect | generate, on the tiny models of tests/zoo.py."""
import os
import subprocess
import sys

import torch

import fxforge
from fxforge.cli import main

ZOO = os.path.join(os.path.dirname(__file__), "zoo.py")


def test_inspect_prints_the_report_and_the_ir_and_saves(tmp_path, capsys):
    assert main(["inspect", f"{ZOO}:llama", "--kv-cache", "--save", str(tmp_path / "saved")]) == 0
    out = capsys.readouterr().out
    assert "fxforge report for LlamaForCausalLM" in out and "kv_cache" in out
    assert 'signature {outputs=("logits",)}' in out  # the IR, whole
    assert fxforge.load(str(tmp_path / "saved")).kv_layout is not None
    # a saved model inspects too, without its factory
    assert main(["inspect", str(tmp_path / "saved"), "--ir-lines", "3"]) == 0
    out = capsys.readouterr().out
    assert "# loaded in" in out and "(first 3 of" in out


def _generated(capsys, *args) -> list[int]:
    assert main(["generate", f"{ZOO}:llama", "--prompt", "1 2 3", "--max-new-tokens", "6", *args]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("output: "))
    return [int(t) for t in line[len("output: "):].strip("'").split()]


def test_generate_with_and_without_the_kv_cache_agree(capsys):
    torch.manual_seed(0)
    cached = _generated(capsys)
    torch.manual_seed(0)  # the factory makes the same random model again
    recomputed = _generated(capsys, "--no-kv-cache")
    assert len(cached) == 6 and cached == recomputed
    torch.manual_seed(0)
    assert len(_generated(capsys, "--quantize", "int8")) == 6


def test_python_dash_m_runs_and_bad_models_are_clear_errors():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    ok = subprocess.run([sys.executable, "-m", "fxforge", "--help"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and "inspect" in ok.stdout and "generate" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "fxforge", "inspect", "no_such_thing"], capture_output=True,
                         text=True, env=env)
    assert bad.returncode != 0 and "neither a saved model's directory nor module:factory" in bad.stderr
