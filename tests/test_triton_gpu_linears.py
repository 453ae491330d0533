"""On a GPU the Triton backend runs float linear_fused nodes as their steps (cuBLAS matmul
and generated pointwise kernels): in a CUDA-graph decode step on an H200 the fused GEMV and
decode-MLP kernels were slower (1.49 ms against 0.86 ms a SmolLM2-shape step, bf16). The
interpreter keeps the fused kernels (so they stay tested on the CPU), and quantized nodes keep
theirs. Checked here on the graph: the backend for a CUDA device is built without a GPU."""
import torch

import fxforge
import zoo
from fxforge.ir.typecheck import typecheck
from fxforge.runtime.backends.triton_backend import TritonBackend


def _tiny_llama():
    torch.manual_seed(0)
    model, vocab = zoo.llama(n_layer=1)
    return model, torch.randint(0, vocab, (1, 5))


def _fused(graph, quantized):
    return [n for n in graph.nodes if n.op == "linear_fused" and bool(n.attrs.get("parts")) == quantized]


def test_a_gpu_runs_float_linear_fused_nodes_as_matmuls_and_says_so():
    model, ids = _tiny_llama()
    fast = fxforge.optimize(model, (ids,), kv_cache=True, backend="interpret", verbose=False)
    assert len(_fused(fast.graph, quantized=False)) == 3  # q/k/v with the norm, gate/up + SwiGLU + down, lm_head
    graph, overrides, stats = TritonBackend(torch.device("cuda")).prepare(fast.graph)
    assert not [n for n in graph.nodes if n.op == "linear_fused"]
    assert sum(n.op == "linear" for n in graph.nodes) == 5  # q/k/v concatenated, o, gate/up, down, lm_head
    typecheck(graph)
    (stat,) = stats
    assert stat.rules["linear_fused_unfused"] == 3 and "cuBLAS" in stat.notes[0]
    # the interpreter (the CPU's way to run the kernels) keeps them
    graph, _, stats = TritonBackend(torch.device("cpu"), interpret=True).prepare(fast.graph)
    assert len(_fused(graph, quantized=False)) == 3 and stats == []


def test_quantized_linear_fused_nodes_keep_their_kernels_on_a_gpu():
    model, ids = _tiny_llama()
    fast = fxforge.optimize(model, (ids,), kv_cache=True, quantize="w8a8", backend="interpret", verbose=False)
    quantized = len(_fused(fast.graph, quantized=True))
    assert quantized >= 2
    graph, _, _ = TritonBackend(torch.device("cuda")).prepare(fast.graph)
    assert len(_fused(graph, quantized=True)) == quantized and not _fused(graph, quantized=False)
    typecheck(graph)
