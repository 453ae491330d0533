"""The Triton backend works out a kernel's launch (kernel, grid, output shapes) once per node
and input signature. The program passed each node's fused body as a tuple built anew on every
call, and the plans, keyed by the body's identity, were missed every time: a same-shape call
re-ran IR type inference for every fused node (a 2-layer Llama: 55 ms of host time per call
against 9 after) and kept one more plan each time, without bound."""
import torch

import fxforge
from fxforge.codegen.kernels.decode_gemv import GemvKernels
from fxforge.codegen.pointwise import PointwiseKernels

import zoo


def _counting(monkeypatch, cls):
    calls = []
    real = cls._plan

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)
    monkeypatch.setattr(cls, "_plan", counted)
    return calls


def test_a_same_shape_call_plans_no_launch_again(monkeypatch):
    torch.manual_seed(0)
    model, vocab = zoo.llama(n_layer=1)
    ids = torch.randint(0, vocab, (1, 6))
    fast = fxforge.optimize(model, example_inputs=(ids,), backend="interpret")
    pointwise_plans = _counting(monkeypatch, PointwiseKernels)
    gemv_plans = _counting(monkeypatch, GemvKernels)
    with torch.no_grad():
        first = fast(ids)
        planned = len(pointwise_plans), len(gemv_plans)
        assert planned[0] > 0 and planned[1] > 0  # (the model has fused nodes to plan)
        again = [fast(ids) for _ in range(3)]
    assert (len(pointwise_plans), len(gemv_plans)) == planned
    for out in again:
        assert torch.equal(out.logits, first.logits)


def test_a_program_passes_one_body_object_per_node_on_every_call():
    from fxforge.runtime.program import build_program
    from fxforge.ir.ops import OPS

    torch.manual_seed(0)
    model, vocab = zoo.llama(n_layer=1)
    ids = torch.randint(0, vocab, (1, 6))
    fast = fxforge.optimize(model, example_inputs=(ids,))
    graph = fast.graph
    seen = []

    def record(*tensors, **attrs):
        seen.append(attrs["body"])
        return OPS["fused_pointwise"].reference(*tensors, **attrs)
    ops = {n: OPS[n].reference for n in OPS if OPS[n].reference is not None}
    program = build_program(graph, {**ops, "fused_pointwise": record}, inline_fused=False)
    fused = sum(n.op == "fused_pointwise" for n in graph.nodes)
    assert fused > 0
    with torch.no_grad():
        program(ids)
        program(ids)
    assert len(seen) == 2 * fused
    assert all(a is b for a, b in zip(seen[:fused], seen[fused:]))


def test_the_plans_kept_are_bounded(monkeypatch):
    # a server sees every prompt length: one plan per node and length would grow forever
    import fxforge.codegen.pointwise as pointwise

    monkeypatch.setattr(pointwise, "MAX_PLANS", 8)
    plans = {}
    for i in range(20):
        pointwise.remember(plans, i, str(i))
        assert len(plans) <= 8 and plans[i] == str(i)
    assert 0 not in plans  # the oldest went first
