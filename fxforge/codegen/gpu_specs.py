"""Every kernel specialization fxforge can launch on a GPU, as `KernelSpec`s for
`gpu_compile`: kernel x dtype x head dim x quant format x config.

The configs come from the kernel modules themselves (`attention.launch_configs`,
`decode_attention.split_launch`, `quant_matmul.launch_configs`, `pointwise.row_block`), the
functions their launch wrappers call, so what is compiled here is what would run. Import
this only with TRITON_INTERPRET unset: the kernel modules pick their GPU configs at import.

Arguments are typed as a launch on contiguous tensors would specialize them: unit strides
are the constant 1. Whether pointers and integers are 16-divisible (what lets Triton
vectorize loads and pipeline them through shared memory, and so what decides registers and
shared memory) is `KernelSpec.aligned`; `gpu_compile.compile_all` compiles both.
"""
from __future__ import annotations

import os
import tempfile

import torch

from .gpu_compile import KernelSpec

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HEAD_DIMS = (16, 32, 64, 128, 256)  # padded head dims (non powers of two pad up to one of these)
QUANT_FORMATS = (("int8", 0, 1), ("int4", 1, 128), ("nf4", 2, 64))  # name, FORMAT, default GROUP_SIZE
ROW_LENGTHS = (1024, 4096, 8192, 16384, 65536)


def _signature(arg_names, pointers: dict, floats=(), unit=(), constexprs=()) -> tuple[dict, dict]:
    """(signature, constexprs-for-unit-strides): pointers get their element type, `floats`
    fp32, the `unit` strides become the constant 1, constexprs are marked, the rest i32."""
    sig, ones = {}, {}
    for name in arg_names:
        if name in pointers:
            sig[name] = "*" + pointers[name]
        elif name in floats:
            sig[name] = "fp32"
        elif name in unit or name in constexprs:
            sig[name] = "constexpr"
            if name in unit:
                ones[name] = 1
        else:
            sig[name] = "i32"
    return sig, ones


def _spec(kernel, fn_ref, arg_names, pointers, constexprs, *, floats=(), unit=(), num_warps=4, num_stages=3,
          tuned=False, **labels) -> KernelSpec:
    sig, ones = _signature(arg_names, pointers, floats, unit, constexprs)
    return KernelSpec(kernel=kernel, fn=fn_ref, signature=sig, constexprs={**ones, **constexprs},
                      num_warps=num_warps, num_stages=num_stages, tuned=tuned, labels=labels)


# --------------------------------------------------------------------------- attention
_ATTN_REF = "fxforge.codegen.kernels.attention:_attention_kernel"
_ATTN_ARGS = ["q_ptr", "k_ptr", "v_ptr", "bias_ptr", "slopes_ptr", "sinks_ptr", "out_ptr", "table_ptr", "start_ptr",
              "H", "GROUPS", "TQ", "TK", "TQ_BUCKET", "TK_BUCKET", "qk_scale", "softcap", "window", "pages",
              "sqb", "sqh", "sqm", "sqd", "skb", "skh", "skn", "skd", "svb", "svh", "svn", "svd",
              "sbb", "sbh", "sbm", "sbn", "sob", "soh", "som", "sod", "stb",
              "HEAD_DIM", "D_PAD", "CAUSAL", "HAS_BIAS", "DOT_F32", "PRECISION", "BLOCK_M", "BLOCK_N",
              "SOFTCAP", "WINDOW", "ALIBI", "PAGED", "PAGE", "WIDE", "SINKS"]
# The attention variants (op attributes softcap / window / alibi): "plain" is causal attention
# without them, "all" every variant flag and a bias at once (the superset of their code),
# "paged" every flag with K/V read through a block table (the paged KV cache layout).
ATTN_VARIANTS = {"plain": dict(HAS_BIAS=False, SOFTCAP=False, WINDOW=False, ALIBI=False, PAGED=False, PAGE=1,
                               SINKS=False),
                 "all": dict(HAS_BIAS=True, SOFTCAP=True, WINDOW=True, ALIBI=True, PAGED=False, PAGE=1, SINKS=True),
                 "paged": dict(HAS_BIAS=True, SOFTCAP=True, WINDOW=True, ALIBI=True, PAGED=True, PAGE=16, SINKS=True)}
_PAGED_POINTERS = {"table_ptr": "i32", "start_ptr": "i32"}


def attention_specs(dtypes=DTYPES, head_dims=HEAD_DIMS, all_configs=False, variants=tuple(ATTN_VARIANTS),
                    wide=False) -> list[KernelSpec]:
    """The prefill kernel, causal, for each config the autotuner tries and each variant
    (`all_configs`: every config in the module's list, pruned or not, for the report)."""
    from .kernels import attention

    specs = []
    for dname, dtype in dtypes.items():
        for d in head_dims:
            configs = attention.GPU_CONFIGS if all_configs else attention.launch_configs(dtype, d)
            for variant in variants:
                for bm, bn, w, s in configs:
                    specs.append(_spec(
                        "attention", _ATTN_REF, _ATTN_ARGS,
                        {**{p: dname for p in ("q_ptr", "k_ptr", "v_ptr", "bias_ptr", "out_ptr")},
                         "slopes_ptr": "fp32", "sinks_ptr": "fp32", **_PAGED_POINTERS},
                        dict(HEAD_DIM=d, D_PAD=d, CAUSAL=True, DOT_F32=False, **ATTN_VARIANTS[variant], WIDE=wide,
                             PRECISION="ieee" if dtype == torch.float32 else "tf32", BLOCK_M=bm, BLOCK_N=bn),
                        floats=("qk_scale", "softcap"), unit=("sqd", "skd", "svd", "sod"), num_warps=w,
                        num_stages=s, tuned=True, dtype=dname, head_dim=d, variant=variant, wide=wide,
                        launched=(bm, bn, w, s) in attention.launch_configs(dtype, d)))
    return specs


# --------------------------------------------------------------------------- decode attention
_SPLIT_REF = "fxforge.codegen.kernels.decode_attention:_decode_split_kernel"
_SPLIT_ARGS = ["q_ptr", "k_ptr", "v_ptr", "bias_ptr", "slopes_ptr", "sinks_ptr", "m_ptr", "l_ptr", "acc_ptr", "out_ptr",
               "table_ptr", "start_ptr", "H", "GROUPS", "TK", "CHUNK", "NUM_SPLITS", "qk_scale", "softcap", "pages",
               "start_shift", "sqb", "sqh", "sqd", "skb", "skh", "skn", "skd", "svb", "svh", "svn", "svd", "sbb", "sbh",
               "sbn", "stb", "HEAD_DIM", "D_PAD", "BLOCK_G", "BLOCK_N", "HAS_BIAS", "DOT_F32",
               "PRECISION", "SOFTCAP", "ALIBI", "PAGED", "PAGE", "ONE_SPLIT", "WIDE", "SINKS"]
# decode's variants: a sliding window is a view of the cache, not a flag of the kernel
DECODE_VARIANTS = {"plain": dict(SOFTCAP=False, ALIBI=False, PAGED=False, PAGE=1, SINKS=False),
                   "all": dict(SOFTCAP=True, ALIBI=True, PAGED=False, PAGE=1, SINKS=True),
                   "paged": dict(SOFTCAP=True, ALIBI=True, PAGED=True, PAGE=16, SINKS=True)}  # the default block size
_COMBINE_REF = "fxforge.codegen.kernels.decode_attention:_decode_combine_kernel"
_COMBINE_ARGS = ["m_ptr", "l_ptr", "acc_ptr", "out_ptr", "sinks_ptr", "H", "NUM_SPLITS", "sob", "soh", "sod",
                 "HEAD_DIM", "D_PAD", "BLOCK_S", "WIDE", "SINKS"]


def decode_specs(dtypes=DTYPES, head_dims=HEAD_DIMS, splits=(2, 10 ** 6), variants=tuple(DECODE_VARIANTS),
                 one_split=(False, True), wide=False, combine_sinks=(False, True)) -> list[KernelSpec]:
    """The split kernel (the one config its wrapper launches, with a bias: the superset),
    plain and with every variant flag, writing partials and (ONE_SPLIT) the output itself,
    and the combine kernel for a few and for very many splits."""
    from .kernels import decode_attention

    split_blocks = sorted({decode_attention.combine_block(s) for s in splits})
    specs = []
    for dname, dtype in dtypes.items():
        for d in head_dims:
            for variant, one in ((v, o) for v in variants for o in one_split):
                launch = decode_attention.split_launch(dtype, d, DECODE_VARIANTS[variant]["PAGED"])
                # with ONE_SPLIT the wrapper passes the output for the (unused) partials
                partials = dname if one else "fp32"
                specs.append(_spec(
                    "decode_split", _SPLIT_REF, _SPLIT_ARGS,
                    {**{p: dname for p in ("q_ptr", "k_ptr", "v_ptr", "bias_ptr", "out_ptr")}, "slopes_ptr": "fp32",
                     "sinks_ptr": "fp32", **{p: partials for p in ("m_ptr", "l_ptr", "acc_ptr")}, **_PAGED_POINTERS},
                    dict(HEAD_DIM=d, D_PAD=d, BLOCK_G=16, BLOCK_N=launch["BLOCK_N"], HAS_BIAS=True, DOT_F32=False,
                         PRECISION="ieee" if dtype == torch.float32 else "tf32", ONE_SPLIT=one, WIDE=wide,
                         **DECODE_VARIANTS[variant]),
                    floats=("qk_scale", "softcap"), unit=("sqd", "skd", "svd"), num_warps=launch["num_warps"],
                    num_stages=launch.get("num_stages", 3), dtype=dname, head_dim=d, variant=variant, one_split=one,
                    wide=wide))
    for d in head_dims:
        for block_s in split_blocks:
            # plain, and with the sinks (which it adds once, after the splits)
            for sinks in combine_sinks:
                specs.append(_spec(
                    "decode_combine", _COMBINE_REF, _COMBINE_ARGS,
                    {"m_ptr": "fp32", "l_ptr": "fp32", "acc_ptr": "fp32", "out_ptr": "bf16", "sinks_ptr": "fp32"},
                    dict(HEAD_DIM=d, D_PAD=d, BLOCK_S=block_s, WIDE=wide, SINKS=sinks), unit=("sod",), dtype="any",
                    head_dim=d, wide=wide, sinks=sinks))
    return specs


# --------------------------------------------------------------------------- rope decode attention
_ROPE_REF = "fxforge.codegen.kernels.rope_decode_attention:_rope_decode_kernel"
_ROPE_ARGS = ["q_ptr", "k_ptr", "v_ptr", "cos_ptr", "sin_ptr", "kc_ptr", "vc_ptr", "bias_ptr", "m_ptr", "l_ptr",
              "acc_ptr", "out_ptr", "start_ptr", "H", "GROUPS", "T", "TK", "CHUNK", "NUM_SPLITS", "start_int",
              "qk_scale", "sqb", "sqh", "sqt", "sqd", "skb", "skh", "skt", "skd", "svb", "svh", "svt", "svd", "scb",
              "sct", "scd", "ssb", "sst", "ssd", "skcb", "skch", "skcn", "skcd", "svcb", "svch", "svcn", "svcd",
              "sbb", "sbh", "sbt", "sbn", "HEAD_DIM", "D_PAD", "BLOCK_M", "BLOCK_N", "BLOCK_T", "HAS_BIAS", "CAUSAL",
              "START_PTR", "DOT_F32", "PRECISION", "ONE_SPLIT"]
# the wrapper's launches: an eager step (start a Python int) with and without a key bias, and
# the static step (bias, start read from a device tensor). Causal: the non-causal kernel is
# the same code less one mask.
ROPE_VARIANTS = {"plain": dict(HAS_BIAS=False, START_PTR=False), "bias": dict(HAS_BIAS=True, START_PTR=False),
                 "static": dict(HAS_BIAS=True, START_PTR=True)}
ROPE_HEAD_DIMS = (16, 32, 64, 128)  # `supports`: head dims up to 128 (padded to these)


def rope_decode_specs(dtypes=DTYPES, head_dims=ROPE_HEAD_DIMS, variants=tuple(ROPE_VARIANTS),
                      one_split=(False, True)) -> list[KernelSpec]:
    """The fused rotary + KV append + decode attention kernel at `rope_launch`'s config,
    writing partials and (ONE_SPLIT) the output. BLOCK_M and BLOCK_T are 16 for every
    launch (`supports` caps G x T at MAX_ROWS = 16), so GQA group sizes and query counts
    are runtime values, not specializations. Its combine launch is decode_combine's."""
    from .kernels import rope_decode_attention as rope

    assert rope.MAX_ROWS <= 16, "BLOCK_M / BLOCK_T below assume at most 16 rows a program"
    specs = []
    for dname, dtype in dtypes.items():
        for d in head_dims:
            launch = rope.rope_launch(dtype, d)
            for variant, one in ((v, o) for v in variants for o in one_split):
                flags = ROPE_VARIANTS[variant]
                partials = dname if one else "fp32"  # with ONE_SPLIT the wrapper passes the output
                specs.append(_spec(
                    "rope_decode", _ROPE_REF, _ROPE_ARGS,
                    {**{p: dname for p in ("q_ptr", "k_ptr", "v_ptr", "cos_ptr", "sin_ptr", "kc_ptr", "vc_ptr",
                                           "bias_ptr", "out_ptr")},
                     **{p: partials for p in ("m_ptr", "l_ptr", "acc_ptr")},
                     "start_ptr": "i64" if flags["START_PTR"] else dname},
                    dict(HEAD_DIM=d, D_PAD=d, BLOCK_M=16, BLOCK_N=launch["BLOCK_N"], BLOCK_T=16, CAUSAL=True,
                         DOT_F32=False, PRECISION="ieee" if dtype == torch.float32 else "tf32", ONE_SPLIT=one,
                         **flags),
                    floats=("qk_scale",), unit=("sqd", "skd", "svd", "scd", "ssd", "skcd", "svcd", "sbn"),
                    num_warps=launch["num_warps"], dtype=dname, head_dim=d, variant=variant, one_split=one))
    return specs


# --------------------------------------------------------------------------- step inputs
_STEP_REF = "fxforge.codegen.kernels.step_inputs:_step_inputs_kernel"
_STEP_ARGS = ["pad_ptr", "start_ptr", "positions_ptr", "bias_ptr", "table_ptr", "row_start_ptr", "slots_ptr",
              "start_arg", "new", "keys", "lowest", "block_size", "stride_pb", "stride_bb", "stride_tb", "stride_sb",
              "START_IN_MEMORY", "PAGED", "BLOCK_NEW", "BLOCK_K"]
# (variant, START_IN_MEMORY, PAGED, new tokens): the eager step (a decode token, a speculative
# draft of 16, an 8k prompt) and the static step (one token, dense or paged cache)
STEP_LAUNCHES = (("eager", False, False, 1), ("eager", False, False, 16), ("eager", False, False, 8192),
                 ("static", True, False, 1), ("static_paged", True, True, 1))


def step_inputs_specs(dtypes=DTYPES, launches=STEP_LAUNCHES, keys=8192) -> list[KernelSpec]:
    """The positions + key bias (+ paged row starts and slots) kernel, with the blocks its
    wrapper picks for `keys` keys. Integer arguments equal to 1 are specialized by Triton as
    constants, as they are at those launches: `new` and the unit strides of one-token
    buffers, and without PAGED the block size 1 and the table stride (the wrapper passes the
    1-d pad for the unused table)."""
    from .kernels import step_inputs

    block_k = min(step_inputs.BLOCK_KEYS, 1 << (keys - 1).bit_length())
    specs = []
    for dname in dtypes:
        for variant, in_memory, paged, new in launches:
            unit = (("new", "stride_pb", "stride_sb") if new == 1 else ()) + \
                (() if paged else ("block_size", "stride_tb"))
            specs.append(_spec(
                "step_inputs", _STEP_REF, _STEP_ARGS,
                {"pad_ptr": "i64", "start_ptr": "i64", "positions_ptr": "i64", "bias_ptr": dname,
                 "table_ptr": "i32" if paged else "i64", "row_start_ptr": "i32" if paged else "i64",
                 "slots_ptr": "i64"},
                dict(START_IN_MEMORY=in_memory, PAGED=paged, BLOCK_NEW=1 << (new - 1).bit_length(), BLOCK_K=block_k),
                floats=("lowest",), unit=unit, dtype=dname, variant=variant, new=new))
    return specs


# --------------------------------------------------------------------------- paged KV write
_PAGED_WRITE_REF = "fxforge.codegen.kernels.paged_kv_write:_paged_kv_write_kernel"
_PAGED_WRITE_ARGS = ["cache_ptr", "new_ptr", "v_cache_ptr", "v_new_ptr", "slots_ptr", "T", "H", "D", "num_slots",
                     "block_size", "stride_nb", "stride_nh", "stride_nt", "stride_nd", "stride_vnb", "stride_vnh",
                     "stride_vnt", "stride_vnd", "stride_sb", "stride_st", "stride_cblock", "stride_coff",
                     "stride_ch", "stride_cd", "stride_vcblock", "stride_vcoff", "stride_vch", "stride_vcd",
                     "BLOCK_H", "BLOCK_D", "ROUND_BF16", "PAIR"]
# (cache dtype, new dtype): the same type, or new wider than the cache (rounded in the kernel)
PAGED_WRITE_DTYPES = (("fp32", "fp32"), ("fp16", "fp16"), ("bf16", "bf16"), ("fp16", "fp32"), ("bf16", "fp32"),
                      ("bf16", "fp16"))


def paged_kv_write_specs(dtypes=PAGED_WRITE_DTYPES, head_dims=HEAD_DIMS, kv_heads=32,
                         pair=(False, True)) -> list[KernelSpec]:
    """The paged cache write (K alone, or K and V in one program: PAIR) at the tile `tile`
    and the warps `warps` pick for `kv_heads` heads: with 32 the largest it launches at head dims of 128 and
    more (MAX_TILE elements); fewer heads only shrink BLOCK_H."""
    from .kernels import paged_kv_write

    specs = []
    for cache, new in dtypes:
        for d in head_dims:
            block_h, block_d = paged_kv_write.tile(kv_heads, d)
            for both in pair:
                specs.append(_spec(
                    "paged_kv_write", _PAGED_WRITE_REF, _PAGED_WRITE_ARGS,
                    {"cache_ptr": cache, "v_cache_ptr": cache, "new_ptr": new, "v_new_ptr": new, "slots_ptr": "i64"},
                    dict(BLOCK_H=block_h, BLOCK_D=block_d, ROUND_BF16=cache == "bf16" and new != "bf16", PAIR=both),
                    unit=("stride_nd", "stride_vnd", "stride_st", "stride_cd", "stride_vcd"),
                    num_warps=paged_kv_write.warps(block_h, block_d),
                    dtype=cache if cache == new else f"{new}->{cache}", head_dim=d, pair=both))
    return specs


# --------------------------------------------------------------------------- quantized matmul
_WO_REF = "fxforge.codegen.kernels.quant_matmul:_weight_only_kernel"
_WO_ARGS = ["x_ptr", "w_ptr", "scale_ptr", "zero_ptr", "bias_ptr", "out_ptr", "M", "N", "K", "M_BUCKET",
            "stride_xm", "stride_xk", "stride_wn", "stride_wk", "stride_sn", "stride_sg", "stride_zn", "stride_zg",
            "stride_om", "stride_on", "FORMAT", "GROUP_SIZE", "HAS_BIAS", "DOT_F32", "WIDE", "BLOCK_M", "BLOCK_N",
            "BLOCK_K"]
_W8A8_REF = "fxforge.codegen.kernels.quant_matmul:_w8a8_kernel"
_W8A8_ARGS = ["a_ptr", "a_scale_ptr", "w_ptr", "w_scale_ptr", "bias_ptr", "xo_ptr", "cm_ptr", "out_ptr", "M", "N",
              "K", "M_BUCKET", "stride_am", "stride_ak", "stride_wn", "stride_wk", "stride_xom", "stride_xok",
              "stride_om", "stride_on", "threshold", "HAS_BIAS", "HAS_OUTLIERS", "SPLIT", "WIDE", "BLOCK_M",
              "BLOCK_N", "BLOCK_K"]


def _quant_configs(dtype, all_configs):
    from .kernels import quant_matmul

    if all_configs:
        return quant_matmul._SMALL_M_CONFIGS + quant_matmul._LARGE_M_CONFIGS
    # dict.fromkeys: without duplicates (fp32 takes the small-M tiles at large M too)
    return list(dict.fromkeys(quant_matmul.launch_configs(True, dtype) + quant_matmul.launch_configs(False, dtype)))


def quant_specs(dtypes=DTYPES, formats=QUANT_FORMATS, all_configs=False, w8a8=True) -> list[KernelSpec]:
    """The weight-only kernel per format and activation dtype, and the W8A8 kernel, for
    every config of both M size classes."""
    from .kernels import quant_matmul

    specs = []
    for dname, dtype in dtypes.items():
        launched = set(quant_matmul.launch_configs(True, dtype) + quant_matmul.launch_configs(False, dtype))
        for fname, fmt, group in formats:
            w_type = "i8" if fmt == 0 else "u8"
            for bm, bn, bk, w, s in _quant_configs(dtype, all_configs):
                specs.append(_spec(
                    f"quant_{fname}", _WO_REF, _WO_ARGS,
                    {"x_ptr": dname, "w_ptr": w_type, "scale_ptr": "fp32", "zero_ptr": "fp32" if fmt else "fp32",
                     "bias_ptr": dname, "out_ptr": dname},
                    dict(FORMAT=fmt, GROUP_SIZE=group, HAS_BIAS=True, DOT_F32=dtype == torch.float32, WIDE=False,
                         BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk),
                    unit=("stride_xk", "stride_wk", "stride_on"), num_warps=w, num_stages=s, tuned=True,
                    dtype=dname, format=fname, launched=(bm, bn, bk, w, s) in launched))
    if w8a8:
        for bm, bn, bk, w, s in _quant_configs(torch.float16, all_configs):
            specs.append(_spec(
                "quant_w8a8", _W8A8_REF, _W8A8_ARGS,
                {"a_ptr": "i8", "a_scale_ptr": "fp32", "w_ptr": "i8", "w_scale_ptr": "fp32", "bias_ptr": "fp16",
                 "xo_ptr": "fp32", "cm_ptr": "i8", "out_ptr": "fp16"},
                dict(HAS_BIAS=True, HAS_OUTLIERS=True, SPLIT=False, WIDE=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk),
                floats=("threshold",),
                unit=("stride_ak", "stride_wk", "stride_xok", "stride_on"), num_warps=w, num_stages=s, tuned=True,
                dtype="int8", format="w8a8", launched=True))
        for dname in dtypes:  # the decode step's launch: x (float) split inside the kernel
            for bm, bn, bk, w, s in quant_matmul.launch_configs(True, DTYPES[dname]):
                specs.append(_spec(
                    "quant_w8a8_split", _W8A8_REF, _W8A8_ARGS,
                    {"a_ptr": dname, "a_scale_ptr": "fp32", "w_ptr": "i8", "w_scale_ptr": "fp32", "bias_ptr": dname,
                     "xo_ptr": "fp32", "cm_ptr": "i8", "out_ptr": dname},
                    dict(HAS_BIAS=True, HAS_OUTLIERS=True, SPLIT=True, WIDE=False, BLOCK_M=bm, BLOCK_N=bn,
                         BLOCK_K=bk), floats=("threshold",),
                    unit=("stride_ak", "stride_wk", "stride_xok", "stride_on"), num_warps=w, num_stages=s,
                    tuned=True, dtype=dname, format="w8a8", launched=True))
    return specs


_GEMV_REF = "fxforge.codegen.kernels.quant_gemv:_gemv_kernel"
_GEMV_ARGS = ["x_ptr", "w_ptr", "scale_ptr", "zero_ptr", "bias_ptr", "lut_ptr", "out_ptr", "part_ptr", "count_ptr",
              "M", "N", "K", "GROUP", "SPLIT_K", "K_PER_SPLIT", "stride_xm", "stride_xk", "stride_wn", "stride_wk",
              "stride_sn", "stride_sg", "stride_zn", "stride_zg", "stride_om", "stride_on", "threshold",
              "FORMAT", "HAS_BIAS", "HAS_OUTLIERS", "DOT_F32", "BLOCK_M", "BLOCK_N", "BLOCK_K"]
GEMV_FORMATS = (("int8", 0), ("int4", 1), ("nf4", 2), ("w8a8", 3))


def quant_gemv_specs(dtypes=DTYPES, formats=GEMV_FORMATS, rows=(1, 16)) -> list[KernelSpec]:
    """The decode split-K GEMV (quant_gemv) per format, activation dtype and row class
    (BLOCK_M 1 or 16), with the configs `gemv_plan` launches (no autotuning: untuned);
    4-bit formats at each BLOCK_K a supported group size gives."""
    from ..ir.quant_formats import SUPPORTED_GROUP_SIZES
    from .kernels import quant_gemv

    specs = []
    for dname, dtype in dtypes.items():
        fp32 = dtype == torch.float32
        for fname, fmt in formats:
            four_bit = fmt in (quant_gemv.FMT_INT4, quant_gemv.FMT_NF4)
            for bm in rows:
                bn, bk_max, warps = quant_gemv.GEMV_CONFIGS[(quant_gemv._CONFIG_FORMAT[fmt], bm, fp32)]
                bks = sorted({min(g, bk_max) for g in SUPPORTED_GROUP_SIZES}) if four_bit else [bk_max]
                for bk in bks:
                    specs.append(_spec(
                        f"quant_gemv_{fname}", _GEMV_REF, _GEMV_ARGS,
                        {"x_ptr": dname, "w_ptr": "i8" if fmt in (0, 3) else "u8", "scale_ptr": "fp32",
                         "zero_ptr": "fp32", "bias_ptr": dname, "lut_ptr": "fp32", "out_ptr": dname,
                         "part_ptr": "fp32", "count_ptr": "i32"},
                        dict(FORMAT=fmt, HAS_BIAS=True, HAS_OUTLIERS=fmt == 3, DOT_F32=fp32, BLOCK_M=bm,
                             BLOCK_N=bn, BLOCK_K=bk), floats=("threshold",),
                        unit=("stride_xk", "stride_wk", "stride_on"), num_warps=warps,
                        dtype=dname, format=fname, rows=bm, launched=True))
    return specs


# --------------------------------------------------------------------------- generated kernels
def _row_body(kind: str):
    """A one-op row group (body, outputs, input count): softmax, layer_norm or rms_norm."""
    if kind == "softmax":
        return [("softmax", ("in0",), (("dim", -1), ("dtype", None)))], ["t0"], 1
    if kind == "layer_norm":
        return [("layer_norm", ("in0", "in1", "in2"), (("eps", 1e-5), ("weight", True), ("bias", True)))], ["t0"], 3
    return [("rms_norm", ("in0", "in1"), (("eps", 1e-6), ("weight", True)))], ["t0"], 2


def row_specs(lengths=ROW_LENGTHS, kinds=("softmax", "layer_norm", "rms_norm"), dtype="bf16",
              folder: str | None = None) -> list[KernelSpec]:
    """Generated row kernels (one row of N per program) for long rows: the widths that
    decide their registers and shared memory. The sources are written to `folder`."""
    from . import pointwise
    from .row_loop import generate_looped_row_source

    folder = folder or os.path.join(tempfile.gettempdir(), "fxforge_aot_kernels")
    os.makedirs(folder, exist_ok=True)
    torch_dtype = DTYPES[dtype]
    specs = []
    for kind in kinds:
        body, outputs, n_in = _row_body(kind)
        args = [f"in{i}_ptr" for i in range(n_in)] + ["out0_ptr", "N", "size0"] + \
               [f"in{i}_stride{d}" for i in range(n_in) for d in range(2)]
        for n in lengths:
            # the generator the launch would pick: one block, or a loop over chunks
            looped = pointwise.row_is_looped(n)
            generate = generate_looped_row_source if looped else pointwise.generate_row_source
            name = f"row_{kind}_{dtype}_{'looped' if looped else 'block'}"
            path = os.path.join(folder, f"{name}.py")
            with open(path, "w") as f:
                f.write(generate(name, body, outputs, [torch_dtype] * n_in, [True] * n_in, [torch_dtype], 1))
            specs.append(_spec(
                f"row:{kind}", f"file:{path}:{name}", args + ["BLOCK_N"],
                {**{f"in{i}_ptr": dtype for i in range(n_in)}, "out0_ptr": dtype},
                {"BLOCK_N": pointwise.row_block(n)}, unit=tuple(f"in{i}_stride1" for i in range(n_in)),
                dtype=dtype, row=n))
    return specs


# --------------------------------------------------------------------------- decode GEMV
# (K, columns of the output, column ranges the epilogue reads): SmolLM2's q/k/v with its norm,
# gate/up with norm and SwiGLU, the lm_head with the final norm, and a wide model's rows
GEMV_SHAPES = ((576, 960, 1), (576, 1536, 2), (576, 49152, 1), (4096, 14336, 2), (8192, 8192, 1))
GEMV_ROWS = (1, 16)
# a llama layer's prologue (residual add + RMSNorm, the sum as an extra output) and SwiGLU
# epilogue, as fuse_linear_pointwise writes them
LLAMA_RMS_ADD = (("add", ("in0", "in1"), ()), ("mul", ("t0", "t0"), ()),
                 ("mean", ("t1",), (("dims", (-1,)), ("keepdim", True), ("dtype", None))),
                 ("const", (), (("value", 1e-5), ("dtype", torch.float32))), ("add", ("t2", "t3"), ()),
                 ("rsqrt", ("t4",), ()), ("mul", ("t0", "t5"), ()), ("mul", ("in2", "t6"), ()))
LLAMA_SWIGLU = (("silu", ("in0",), ()), ("mul", ("t0", "in1"), ()))


def gemv_specs(dtypes=DTYPES, shapes=GEMV_SHAPES, rows=GEMV_ROWS, folder: str | None = None) -> list[KernelSpec]:
    """The decode GEMV of linear_fused (codegen/kernels/decode_gemv.py) as the llama layers
    generate it: add + RMSNorm prologue (with the residual sum as an extra output), SwiGLU
    epilogue when it reads two column ranges, at the blocks `launch_blocks` picks."""
    from .kernels import decode_gemv

    folder = folder or os.path.join(tempfile.gettempdir(), "fxforge_aot_kernels")
    os.makedirs(folder, exist_ok=True)
    rms_add, swiglu = LLAMA_RMS_ADD, LLAMA_SWIGLU
    specs = []
    for dname, dtype in dtypes.items():
        for k, n_out, parts in shapes:
            spec = decode_gemv.GemvSpec(rms_add, ("t7", "t0"), (True, True, True), (dtype,) * 3, dtype, dtype, False,
                                        parts, swiglu if parts == 2 else (), ("t1",) if parts == 2 else (), (),
                                        (dtype,), (dtype,), (True,))
            name = f"gemv_{dname}_{parts}"
            path = os.path.join(folder, f"{name}.py")
            with open(path, "w") as f:
                f.write(decode_gemv.generate_gemv_source(name, spec))
            args = (["in0_ptr", "in1_ptr", "in2_ptr", "w_ptr", "out0_ptr", "side0_ptr", "M", "K", "N_OUT"]
                    + [f"col{p}" for p in range(parts)]
                    + ["in0_sm", "in0_sk", "in1_sm", "in1_sk", "in2_sm", "in2_sk", "swn", "swk"])
            for m in rows:
                blocks = decode_gemv.launch_blocks(m, n_out, k, parts)
                specs.append(_spec(
                    "decode_gemv", f"file:{path}:{name}", args + list(blocks),
                    {p: dname for p in ("in0_ptr", "in1_ptr", "in2_ptr", "w_ptr", "out0_ptr", "side0_ptr")}, blocks,
                    unit=("in0_sk", "in1_sk", "in2_sk", "swk"), dtype=dname, k=k, n=n_out, parts=parts, rows=m))
    return specs


# quantized formats of the decode GEMV: (name, scheme, w8a8 outlier columns)
QUANT_GEMV_FUSED = (("w8a8", "w8a8", True), ("w8a8_no_outliers", "w8a8", False), ("int8", "int8", False))


def quant_fused_gemv_specs(dtypes=DTYPES, shapes=GEMV_SHAPES, rows=GEMV_ROWS, formats=QUANT_GEMV_FUSED,
                           folder: str | None = None) -> list[KernelSpec]:
    """The decode GEMV of a quantized linear_fused (parts: int8 qweight, float32 scale) as the
    w8a8/int8 llama layers generate it: add + RMSNorm, x split and quantized per token inside
    (w8a8), SwiGLU on two column ranges, at `launch_blocks`' blocks."""
    from .kernels import decode_gemv

    folder = folder or os.path.join(tempfile.gettempdir(), "fxforge_aot_kernels")
    os.makedirs(folder, exist_ok=True)
    specs = []
    for dname, dtype in dtypes.items():
        for fname, scheme, outliers in formats:
            for k, n_out, parts in shapes:
                spec = decode_gemv.GemvSpec(LLAMA_RMS_ADD, ("t7", "t0"), (True, True, True), (dtype,) * 3, dtype,
                                            torch.int8, False, parts, LLAMA_SWIGLU if parts == 2 else (),
                                            ("t1",) if parts == 2 else (), (), (dtype,), (dtype,), (True,),
                                            quant=scheme, outliers=outliers)
                name = f"qgemv_{fname}_{dname}_{parts}"
                path = os.path.join(folder, f"{name}.py")
                with open(path, "w") as f:
                    f.write(decode_gemv.generate_gemv_source(name, spec))
                pointers = {"in0_ptr": dname, "in1_ptr": dname, "in2_ptr": dname, "w_ptr": "i8", "ws_ptr": "fp32",
                            "out0_ptr": dname, "side0_ptr": dname}
                args = (list(pointers) + ["M", "K", "N_OUT"] + [f"col{p}" for p in range(parts)]
                        + (["thr"] if outliers else [])
                        + ["in0_sm", "in0_sk", "in1_sm", "in1_sk", "in2_sm", "in2_sk", "swn", "swk"])
                for m in rows:
                    blocks = decode_gemv.launch_blocks(m, n_out, k, parts)
                    specs.append(_spec(
                        "decode_gemv_quant", f"file:{path}:{name}", args + list(blocks), pointers, blocks,
                        floats=("thr",), unit=("in0_sk", "in1_sk", "in2_sk", "swk"), dtype=dname, format=fname,
                        k=k, n=n_out, parts=parts, rows=m))
    return specs


# (K, intermediate columns, H): SmolLM2's MLP and a wide model's (Llama-3-8B's)
MLP_SHAPES = ((576, 1536, 576), (4096, 14336, 4096))


def mlp_specs(dtypes=DTYPES, shapes=MLP_SHAPES, rows=GEMV_ROWS, folder: str | None = None) -> list[KernelSpec]:
    """The decode MLP (linear_fused with down=true, codegen/kernels/decode_mlp.py) as the
    llama layers generate it: add + RMSNorm, gate/up, SwiGLU, down, at `launch_blocks`' blocks."""
    from .kernels import decode_gemv, decode_mlp

    folder = folder or os.path.join(tempfile.gettempdir(), "fxforge_aot_kernels")
    os.makedirs(folder, exist_ok=True)
    rms_add, swiglu = LLAMA_RMS_ADD, LLAMA_SWIGLU
    specs = []
    for dname, dtype in dtypes.items():
        spec = decode_gemv.GemvSpec(rms_add, ("t7", "t0"), (True, True, True), (dtype,) * 3, dtype, dtype, False, 2,
                                    swiglu, ("t1",), (), (dtype,), (dtype,), (True,), True, False, dtype)
        name = f"mlp_{dname}"
        path = os.path.join(folder, f"{name}.py")
        with open(path, "w") as f:
            f.write(decode_gemv.generate_gemv_source(name, spec))
        pointers = {p: dname for p in ("in0_ptr", "in1_ptr", "in2_ptr", "w_ptr", "dw_ptr", "out0_ptr", "side0_ptr")}
        pointers.update(part_ptr="fp32", count_ptr="i32")
        args = (list(pointers) + ["M", "K", "N_OUT", "col0", "col1", "in0_sm", "in0_sk", "in1_sm", "in1_sk", "in2_sm",
                                  "in2_sk", "swn", "swk", "H", "PROGRAMS", "GROUP", "sdh", "sdi"])
        for k, n_mid, h in shapes:
            for m in rows:
                blocks = decode_mlp.launch_blocks(m, n_mid, k, h, 2, dtype.itemsize)
                specs.append(_spec("decode_mlp", f"file:{path}:{name}", args + list(blocks), pointers, blocks,
                                   unit=("in0_sk", "in1_sk", "in2_sk", "swk", "sdi"), dtype=dname, k=k, n=n_mid, h=h,
                                   rows=m))
    return specs


def generated_specs(launches: list[dict], label: str) -> list[KernelSpec]:
    """Specs for the generated kernels a model launched (`PointwiseKernels.launches`)."""
    specs = []
    for launch in launches:
        kind = "gemv" if "BLOCK_K" in launch["constexprs"] else "row" if "BLOCK_N" in launch["constexprs"] else \
            "pointwise"
        specs.append(KernelSpec(kernel=f"{label}:{kind}", fn=f"file:{launch['path']}:{launch['name']}",
                                signature=launch["signature"], constexprs=launch["constexprs"], num_warps=4,
                                num_stages=3, labels={"model": label, "kernel": launch["name"]}))
    return specs


def _largest(specs, blocks, labels, count=2) -> list[KernelSpec]:
    """The `count` configs with the largest tiles (product of `blocks`, then stages) per group."""
    groups: dict[tuple, list] = {}
    for s in specs:
        groups.setdefault(tuple(s.labels[k] for k in labels), []).append(s)

    def size(s):
        area = 1
        for b in blocks:
            area *= s.constexprs[b]
        return area, s.num_stages

    return [s for group in groups.values() for s in sorted(group, key=size, reverse=True)[:count]]


def launchable_specs(quick: bool = False) -> list[KernelSpec]:
    """Everything the hand-written kernels and long row kernels can launch (`quick`: the
    worst cases only, for CI: fp32 and bf16 at head dims 64 and 256, and the largest tiles)."""
    if not quick:
        return (attention_specs() + decode_specs() + quant_specs() + quant_gemv_specs() + row_specs()
                + gemv_specs() + mlp_specs() + quant_fused_gemv_specs() + rope_decode_specs() + step_inputs_specs()
                + paged_kv_write_specs())
    worst = {"fp32": DTYPES["fp32"], "bf16": DTYPES["bf16"]}
    bf16 = {"bf16": DTYPES["bf16"]}
    # What the quick set leaves to the full sweep is what another spec of the same kernel
    # bounded in the compiles of 2026-11-30 (docs/gpu-compile.md, "The CI subset").
    # "all" turns every feature flag on and "paged" adds the block table to that: "plain"
    # (no flag) is the same code with less in it, so the quick set leaves it to the full sweep
    featured = ("all", "paged")
    # attention: "paged" needs at most the shared memory of "all" at each dtype and head dim
    # (equal, or 113 of 144 KB for bf16 at 64 aligned): its code is compiled by attn_wide below
    attn = _largest(attention_specs(worst, (64, 256), variants=("all",)), ("BLOCK_M", "BLOCK_N"),
                    ("dtype", "head_dim", "variant"), 1)
    # the int4 GEMM's largest tile per dtype (the second largest had less shared memory)
    quant = _largest(quant_specs(worst, QUANT_FORMATS[1:2], w8a8=False), ("BLOCK_N", "BLOCK_K"), ("dtype",), 1)
    w8a8 = _largest([s for s in quant_specs(worst, ()) if s.kernel.startswith("quant_w8a8")], ("BLOCK_N", "BLOCK_K"),
                    ("dtype",), 1)
    # the 64-bit-offset specializations (tensors past 2**31 elements) where they cost most
    # registers: paged reads, the widest heads, the largest tiles
    attn_wide = _largest(attention_specs(worst, (256,), variants=("paged",), wide=True), ("BLOCK_M", "BLOCK_N"),
                         ("dtype",), 1)
    decode_wide = decode_specs(worst, (64, 256), splits=(10 ** 6,), variants=("paged",), one_split=(False,),
                               wide=True, combine_sinks=(True,))
    # ...but ptxas allocates each variant on its own: "plain" at head dim 128 spilled with 4
    # warps on sm_90 where "all" did not (docs/gpu-compile.md), so that point stays in
    decode_plain = [s for s in decode_specs(worst, (128,), splits=(10 ** 6,), variants=("plain",), one_split=(False,))
                    if s.kernel == "decode_split"]
    # the split kernel writing the output itself (ONE_SPLIT) in bfloat16 only: there the
    # output's type replaces the float32 partials' (up to 37 more registers); in float32 the
    # pointers are the same, and it measured the same shared memory and registers within 1
    decode_one = [s for s in decode_specs(bf16, (64, 256), splits=(10 ** 6,), variants=featured, one_split=(True,))
                  if s.kernel == "decode_split"]
    # writing partials, "paged" is left to decode_wide: the 64-bit offsets need the same
    # shared memory and at least the registers at each dtype and head dim (its 32-bit code
    # is compiled by decode_one)
    decode = decode_specs(worst, (64, 256), splits=(10 ** 6,), variants=("all",), one_split=(False,),
                          combine_sinks=(True,))
    # the split-K GEMV at the largest BLOCK_K per dtype, format and row class (a 4-bit group
    # size that caps it lower gives a smaller tile of the same code); at one row float32 x
    # launches bfloat16's blocks and needed the same shared memory and registers
    gemv = [s for s in _largest(quant_gemv_specs(worst), ("BLOCK_K",), ("dtype", "format", "rows"), 1)
            if s.labels["rows"] > 1 or s.labels["dtype"] == "bf16"]
    # (the combine kernel with SINKS only: the plain one is the same code less two lines)
    return (attn + attn_wide + decode + decode_one + decode_wide + decode_plain + quant + w8a8
            + [_wide(quant[0])] + gemv + row_specs(lengths=(4096, 65536), kinds=("layer_norm",))
            # the llama decode GEMV in bfloat16: float32 launches the same blocks, and
            # measured the same shared memory and no more registers
            + gemv_specs(bf16, GEMV_SHAPES[3:4])
            # the decode MLP and the quantized GEMV at their register-heaviest point only
            # (bfloat16, 16 rows): each compile costs seconds, the suite has 20 minutes
            + mlp_specs(bf16, MLP_SHAPES[:1], rows=(16,))
            + quant_fused_gemv_specs(bf16, GEMV_SHAPES[3:4], rows=(16,), formats=QUANT_GEMV_FUSED[:1])
            # the fused rope decode kernel where it needs most registers (bfloat16 at head dim
            # 128: 250 on sm_80) and where it spilled before rope_launch's float32 blocks
            # (float32 at 64), both the static step's, writing partials; the paged write
            # where it spilled before `warps` (K and V at head dim 256); step_inputs with
            # the most code (the paged static step)
            + rope_decode_specs(bf16, (128,), ("static",), (False,))
            + rope_decode_specs({"fp32": DTYPES["fp32"]}, (64,), ("static",), (False,))
            + paged_kv_write_specs((("fp16", "fp16"),), (256,), pair=(True,))
            + step_inputs_specs(bf16, STEP_LAUNCHES[-1:]))


def _wide(spec: KernelSpec) -> KernelSpec:
    """The 64-bit-offset specialization of a quantized matmul spec (operands past 2**31 elements)."""
    import dataclasses

    return dataclasses.replace(spec, constexprs={**spec.constexprs, "WIDE": True},
                               labels={**spec.labels, "wide": True})
