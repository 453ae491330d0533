"""benchmarks/gpu_suite.sh, the one command a lent GPU machine runs, works end to end
here with no GPU: its steps are recorded and summarised, a failing step does not stop the
suite, and the test session refuses FXFORGE_TEST_DEVICE=cuda without a GPU, clearly."""
import os
import subprocess
import sys

import torch
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_suite_records_each_step_and_writes_one_summary(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "FXFORGE_GPU_STEPS": "attention tests"}
    env.pop("FXFORGE_TEST_DEVICE", None)
    run = subprocess.run(["bash", "benchmarks/gpu_suite.sh", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    summary = (tmp_path / "summary.md").read_text()
    assert "NO CUDA GPU" in summary and f"torch {torch.__version__}" in summary
    rows = [ln for ln in summary.splitlines() if ln.startswith("| tests ") or ln.startswith("| attention ")]
    assert len(rows) == 2
    # no GPU: the test step refuses (pytest usage error), the benchmark says it measured nothing
    assert "failed (exit 4)" in rows[0] + rows[1] and "torch sees no CUDA GPU" in summary
    assert "needs a CUDA GPU; none is available here" in summary


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_cuda_test_device_without_a_gpu_is_a_clear_usage_error():
    env = {**os.environ, "FXFORGE_TEST_DEVICE": "cuda"}
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_gpu_e2e.py"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 4
    assert "FXFORGE_TEST_DEVICE=cuda, but torch sees no CUDA GPU" in run.stdout + run.stderr
