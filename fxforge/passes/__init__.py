"""Rewrite passes, the pattern DSL they are written in, and the pipeline that runs them."""
from .manager import PassContext, PassError, PassInfo, PassRegistry, PassStats, run_pipeline


def default_registry() -> PassRegistry:
    """A fresh registry holding the built-in passes in the default pipeline order:
    cleanup, fuse_attention, gqa?, shard?, kv_cache?, quantize?, fuse_linear, fuse_rope_attention?, fuse_elementwise, fuse_linear_pointwise, cleanup_final
    (a `?` pass runs only when its option is given to optimize())."""
    from .cleanup import cleanup
    from .fuse_attention import fuse_attention
    from .fuse_elementwise import fuse_elementwise
    from .fuse_linear import fuse_linear
    from .fuse_linear_pointwise import fuse_linear_pointwise
    from .fuse_rope_attention import fuse_rope_attention
    from .gqa import gqa, parse_option as parse_gqa
    from .kv_cache import kv_cache, parse_option as parse_kv_cache
    from .quantize import parse_option as parse_quantize, quantize
    from .shard import parse_option as parse_shard, shard

    reg = PassRegistry()
    reg.add(PassInfo("cleanup", cleanup, doc="DCE, CSE, constant folding, no-op removal"), append=True)
    reg.add(PassInfo("fuse_attention", fuse_attention, doc="attention subgraphs -> one fused op"), append=True)
    # each option's parser rejects a value that means nothing (gqa=0, kv_cache="yes") before capture
    reg.add(PassInfo("gqa", gqa, option="gqa", parse=parse_gqa, needs_option=True,
                     runs_before=("kv_cache",),
                     doc="multi-head -> grouped-query attention (approximate)"), append=True)
    reg.add(PassInfo("shard", shard, option="tensor_parallel", parse=parse_shard, needs_option=True,
                     doc="tensor parallelism: weights split by heads/columns across ranks, all_reduce after"),
            append=True)
    reg.add(PassInfo("kv_cache", kv_cache, option="kv_cache", parse=parse_kv_cache,
                     doc="a KV cache: one graph for prefill and decode, O(context) per token"), append=True)
    reg.add(PassInfo("quantize", quantize, option="quantize", parse=parse_quantize, needs_option=True,
                     doc="linear layers -> int8/int4/nf4/w8a8"), append=True)
    reg.add(PassInfo("fuse_linear", fuse_linear, doc="linears reading the same input -> one wider linear"),
            append=True)
    # part of the KV cache: it takes the appends kv_cache made (so it runs with that option)
    reg.add(PassInfo("fuse_rope_attention", fuse_rope_attention, option="kv_cache", parse=parse_kv_cache,
                     doc="a cached layer's rotary, K/V appends and attention -> one op (one kernel at decode)"),
            append=True)
    reg.add(PassInfo("fuse_elementwise", fuse_elementwise, doc="pointwise chains -> generated kernels"),
            append=True)
    reg.add(PassInfo("fuse_linear_pointwise", fuse_linear_pointwise,
                     doc="a float linear with the pointwise groups before and after it -> one op (a GEMV at decode)"),
            append=True)
    reg.add(PassInfo("cleanup_final", cleanup, doc="the same cleanup, after the rewrites"), append=True)
    for info in reg.passes.values():
        info.builtin = True  # fxforge's own: typechecked after each run only under FXFORGE_CHECK
    return reg


# The explicit registry behind fxforge.register_pass (the only module-level state).
registry = default_registry()

__all__ = ["PassContext", "PassError", "PassInfo", "PassRegistry", "PassStats", "run_pipeline", "default_registry", "registry"]
