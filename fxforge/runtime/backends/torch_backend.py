"""The torch backend: PyTorch library calls for every op; the default on CPU.

Fused attention runs through SDPA, quantized linears through PyTorch's packed kernels
(runtime/torch_kernels.py). On the CPU, `prepare` runs the two planners that choose
library kernels per weight: cpu_linear (float32 linears), cpu_int4 (int4 weights) and
cpu_quant (per call shape: packed kernel or dequantize + one GEMM, for every quantized weight).
Nothing here imports triton, so a CPU install without it optimizes and runs any model.
"""
from __future__ import annotations

from ...ir.graph import Graph
from .base import Backend


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, device, cpu_linear: bool | str | None = True, process_group=None,
                 keep_dequantized_mb: float | None = 0, few_rows_packed_mb: float | None = 0):
        """keep_dequantized_mb: MiB of dequantized float weights the CPU keeps between calls
        of quantized products (runtime/cpu_dequant.py). Opt-in: 0 (the default) keeps none,
        so quantized weights save their memory; enough for all of them makes a quantized
        prompt as fast as the float model's (a weight is kept when a long input first
        dequantizes it; in float32 later calls of any length then use it).
        few_rows_packed_mb: MiB of oneDNN-packed copies of float32 linear weights for
        products of 2-32 rows, a speculative decoding's verification steps and an engine's
        decoding steps of 9-15 and 16-32 requests (runtime/cpu_linear.py's ROW_BUCKETS: one copy per
        weight, read by every bucket whose timing chose it). Opt-in for the same reason: 0
        (the default) packs none; SmolLM2's lm_head and MLP up-projections, what gains
        most, take about 320 (the lm_head alone 108)."""
        from ..cpu_dequant import dequantized_cache_bytes
        from ..cpu_linear import cpu_linear_mode

        super().__init__(device, process_group=process_group)
        self.cpu_linear = cpu_linear if cpu_linear is None else cpu_linear_mode(cpu_linear)  # "cached" | "measure" | None
        self.keep_dequantized_bytes = dequantized_cache_bytes(keep_dequantized_mb)
        self.few_rows_packed_bytes = dequantized_cache_bytes(few_rows_packed_mb, "few_rows_packed_mb")

    def kernel_ops(self) -> dict:
        from ..torch_kernels import PagedAttentionSDPA, attention_sdpa, quant_linear_op

        return {"attention": attention_sdpa, "paged_attention": PagedAttentionSDPA(),
                "quant_linear": quant_linear_op}

    def prepare(self, graph: Graph) -> tuple[Graph, dict, list]:
        # a linear_fused node is a GEMV kernel's work; here its steps run (and the CPU
        # planners below see its linear)
        graph = self.composed(graph)
        if self.device.type != "cpu":
            return graph, {}, []
        from ..cpu_int4 import plan_cpu_int4
        from ..cpu_linear import plan_cpu_linears
        from ..cpu_quant import plan_cpu_quant

        overrides, stats = {}, []
        if self.cpu_linear:
            graph, plan, linear_stats = plan_cpu_linears(graph, self.cpu_linear, self.few_rows_packed_bytes)
            overrides["linear"] = plan.linear
            stats.append(linear_stats)
        int4_plan, int4_stats = plan_cpu_int4(graph)
        if int4_stats is not None:
            stats.append(int4_stats)
        quant_plan, quant_stats = plan_cpu_quant(graph, int4_plan, self.keep_dequantized_bytes)
        if quant_stats is not None:
            overrides["quant_linear"] = quant_plan.wrap(self.kernel_ops()["quant_linear"])
            stats.append(quant_stats)
        return graph, overrides, stats
