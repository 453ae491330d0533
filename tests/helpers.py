"""Shared assertions for differential tests."""

import os

import torch

from fxforge.ir import parse, structurally_equal

from zoo import logits_of

# The backend that runs the Triton kernels in this test session (tests/conftest.py):
# the interpreter on CPU, or the compiled kernels with FXFORGE_TEST_DEVICE=cuda.
KERNEL_BACKEND = "triton" if os.environ.get("FXFORGE_TEST_DEVICE") == "cuda" else "interpret"
KERNEL_DEVICE = "cuda" if KERNEL_BACKEND == "triton" else "cpu"


def assert_close_to_eager(ref, out, rel=1e-4):
    """Max abs error within `rel` of the output's scale (float32 tolerance of the issue)."""
    ref, out = logits_of(ref), logits_of(out)
    assert ref.shape == out.shape, (ref.shape, out.shape)
    scale = max(1.0, ref.abs().max().item())
    err = (ref.float() - out.float()).abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel} x scale {scale:.3g}"


def assert_matches_eager(model, fast, vocab: int, sizes, rel=1e-4):
    """fast(ids) close to model(ids) for random token ids of each (batch, length) in `sizes`."""
    import torch

    for b, t in sizes:
        ids = torch.randint(0, vocab, (b, t))
        with torch.no_grad():
            assert_close_to_eager(model(ids), fast(ids), rel)


def assert_round_trips(graph):
    text = str(graph)
    again = parse(text)
    assert structurally_equal(graph, again), "parse(str(g)) differs from g"
    assert str(again) == text


def eager_greedy(model, ids, steps: int, logits=lambda out: out):
    """Greedy decoding the plain way: the model's logits over the whole sequence at each
    step (`logits` picks them from its output), the argmax of the last position appended."""
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, logits(model(ids))[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


def prompts(vocab: int, padded: bool, lowest: int = 1):
    """Seeded prompts for generate tests: one row of 6 tokens, or a left-padded batch of 3
    (lengths 5, 9, 2) with its attention mask; token ids from `lowest` up (below it: ids a
    model may treat specially, e.g. pad/bos/eos)."""
    import torch

    gen = torch.Generator().manual_seed(3)
    if not padded:
        return torch.randint(lowest, vocab, (1, 6), generator=gen), None
    lengths = [5, 9, 2]
    ids = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, 9 - n:] = torch.randint(lowest, vocab, (n,), generator=gen)
        mask[i, 9 - n:] = 1
    return ids, mask


def run_gemv(tensors, attrs):
    """A linear_fused node's tensors and attrs through the decode GEMV kernels, which must take it."""
    from fxforge.codegen.kernels.decode_gemv import GemvKernels
    from fxforge.codegen.pointwise import PointwiseKernels

    out = GemvKernels(PointwiseKernels()).run(*tensors, **attrs)
    assert out is not None, "the GEMV declined a decode shape"
    return out


def benchmark_table(script: str, *args: str, timeout: int = 300) -> list[list[str]]:
    """Run benchmarks/<script> in a fresh process with `args` and return the cells of its
    markdown table's body rows (the header and its rule left out); fails on a non-zero exit."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(root, "benchmarks", script), *args],
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.strip().strip("|").split("|") for line in done.stdout.splitlines() if line.startswith("|")]
    return [[c.strip() for c in row] for row in rows[2:]]


class FunctionModule(torch.nn.Module):
    """A module whose forward is `fn(x)`: one-line models for capture tests."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def compile_count(monkeypatch) -> list:
    """How many times fxforge's torch.compile backend compiles a subgraph from here on:
    calls[0]."""
    from fxforge.dynamo import FxforgeBackend

    calls = [0]
    original = FxforgeBackend.compile

    def counting(self, *args):
        calls[0] += 1
        return original(self, *args)

    monkeypatch.setattr(FxforgeBackend, "compile", counting)
    return calls
