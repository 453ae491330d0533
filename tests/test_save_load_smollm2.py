"""SmolLM2-135M-Instruct optimized with a KV cache, saved, and loaded in a new process
that never imports the model class (slow; runs in CI): same logits, same greedy tokens,
and loading takes less time than optimize() did."""
import json
import os
import subprocess
import sys
import time

import torch

import fxforge

import zoo

pytestmark = zoo.smollm2_marks()

LOADER = """
import json, sys, time, torch
start = time.perf_counter()
import fxforge
loaded = fxforge.load(sys.argv[1])
load_seconds = time.perf_counter() - start
expected = torch.load(sys.argv[2])
logits_equal = torch.equal(loaded(expected["ids"]).logits, expected["logits"])
tokens_equal = torch.equal(loaded.generate(expected["ids"], 24), expected["tokens"])
model_code = [m for m in sys.modules if m.endswith("modeling_llama")]  # where the model class lives
print(json.dumps({"load_seconds": load_seconds, "logits_equal": logits_equal, "tokens_equal": tokens_equal,
                  "model_code": model_code}))
"""


def test_smollm2_saved_loads_in_a_new_process_faster_than_optimize(tmp_path):
    model, tok = zoo.smollm2()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    start = time.perf_counter()
    fast = fxforge.optimize(model, (ids,), kv_cache=True)
    optimize_seconds = time.perf_counter() - start
    fast.save(str(tmp_path / "smollm2"))
    torch.save({"ids": ids, "logits": fast(ids).logits, "tokens": fast.generate(ids, 24)}, tmp_path / "expected.pt")

    result = subprocess.run([sys.executable, "-c", LOADER, str(tmp_path / "smollm2"), str(tmp_path / "expected.pt")],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"optimize() {optimize_seconds:.2f}s, fxforge.load() in a new process {report['load_seconds']:.2f}s "
          "(import of fxforge included)")
    assert report["logits_equal"] and report["tokens_equal"]
    assert report["model_code"] == [], f"the loader imported the model class: {report['model_code']}"
    assert report["load_seconds"] < optimize_seconds
