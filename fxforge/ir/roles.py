"""The graph's signature beyond types: what its inputs, state buffers and outputs mean.

The runtime, generate() (and later a serving engine or a sharded runtime) read these from
the graph, never from a pass report or a naming convention, so a dumped and hand-edited
`.ir` file runs (`fxforge.load_ir`). In the text form:

    graph(%input_ids: i64[B, T], %L: int {role="cache_len"},
          %kv_positions: i64[B, T] {role="positions"}, %kv_bias: f32[B, 1, 1, L + T] {role="key_bias"},
          %p0: param "..." f32[...],
          %s0: state "layer0.k_cache" f32[B, 2, S, 16] {layer=0, kind="k", layout="dense"}, ...) {
      signature {outputs=("logits",), max_seq_len=128}
      ...

Input roles: `input` (the model's own; the default, not printed), `cache_len` (an int:
positions already in the cache), `positions` (i64[B, T] per-row positions), `key_bias`
(additive key mask over the cache and the new tokens). A paged cache adds `block_table`
(int [B, blocks per row]: the cache blocks of each row, in order), `row_start` (int [B]: the
key index of each row's first token, its left padding) and `slot_mapping` (int [B, T]: the
cache slot each new token is written to, -1 for none); tensor parallelism needs no input role.
State buffers: `layer`, `kind` (k | v) and `layout`; `dense` is [batch, kv heads, capacity,
head dim], sized by the runtime per request; `paged` is [blocks, block size, kv heads, head
dim], a pool of blocks the runtime hands out to rows (runtime/paged_cache.py).
Graph signature: `outputs` gives each output's role (`logits` [B, T, vocab], or the last
token's alone, [B, 1, vocab] or [B, vocab], for a model whose head reads only that token, as
nanoGPT's does without targets; or `output`), `source_positions="shared"` on a captured graph
that the source model's generate gives the batch's positions even in left-padded rows (a
transformers decoder with no position_ids argument: kv_cache keeps them shared, for parity),
`max_seq_len` / `max_batch` the limits generate() checks (absent: none), `num_blocks` the
default pool size of a paged cache (absent: sized per call), `fixed_dtypes` the float dtypes
the graph must keep though no node shows them, each a (dtype, kind, why) entry
(`((f32, "cast", "x.float() in model.norm (RMSNorm)"),)`) of one of the FIXED_KINDS: a cast
the model's code makes that was a no-op at capture and so left no node, a float constant
tensor it reads that model.to(dtype) would not convert (ir/capture.py), a compute dtype the
user asked for (QuantConfig(compute_dtype=...), passes/quantize.py), a KV cache dtype the user
asked for (KVCacheConfig(dtype=...), passes/kv_cache.py). `OptimizedModel.to(dtype)`
refuses another dtype where there are any, as for a cast node, saying why by kind
(runtime/retarget.py). A `fill` entry is the other way round: it names a dtype that to()
refuses, one that cannot hold a masked_fill value of the model that fuse_attention folded
into the fused op (`((f16, "fill", "masked_fill's value -1000000000.0 does not fit ..."),)`).
"""
from __future__ import annotations

import torch

INPUT, CACHE_LEN, POSITIONS, KEY_BIAS = "input", "cache_len", "positions", "key_bias"
BLOCK_TABLE, ROW_START, SLOT_MAPPING = "block_table", "row_start", "slot_mapping"
INPUT_ROLES = (INPUT, CACHE_LEN, POSITIONS, KEY_BIAS, BLOCK_TABLE, ROW_START, SLOT_MAPPING)
OUTPUT, LOGITS = "output", "logits"
OUTPUT_ROLES = (OUTPUT, LOGITS)
STATE_KINDS = ("k", "v")
LAYOUTS = ("dense", "paged")
# A param value captured from a buffer (register_buffer, a constant tensor), not an
# nn.Parameter: `%p: param "rope.inv_freq" f32[32] {buffer=true}`. Passes that rewrite
# weights (quantize) leave buffers: their values are the model's constants.
BUFFER = "buffer"
SIGNATURE_KEYS = ("outputs", "max_seq_len", "max_batch", "num_blocks", "fixed_dtypes", "source_positions")
# signature source_positions: the source model's own positions are shared by the batch
SOURCE_POSITIONS = "source_positions"
# The kinds of a fixed_dtypes entry: what fixes the dtype
FIXED_CAST = "cast"  # a cast in the model's code, a no-op at capture
FIXED_CONSTANT = "constant"  # a float constant tensor that model.to() does not convert
FIXED_COMPUTE_DTYPE = "compute_dtype"  # a compute dtype asked for at optimize
FIXED_CACHE_DTYPE = "cache_dtype"  # a KV cache dtype asked for at optimize (KVCacheConfig(dtype=...))
# a dtype the graph cannot take, the one kind whose entry names a refused dtype rather than a
# kept one: it cannot hold a masked_fill value that fuse_attention folded into the fused op
# (-1e9 in float16; torch's masked_fill raises on it), so no IR line holds the number any more
FIXED_FILL = "fill"
FIXED_KINDS = (FIXED_CAST, FIXED_CONSTANT, FIXED_COMPUTE_DTYPE, FIXED_CACHE_DTYPE, FIXED_FILL)


def is_paged(graph) -> bool:
    """Whether the graph's KV cache is paged (its state buffers have layout paged)."""
    return any((v.attrs or {}).get("layout") == "paged" for v in graph.state_values)


def role_of(value) -> str:
    return (value.attrs or {}).get("role", INPUT)


def input_index(graph, role: str) -> int | None:
    """The position of the graph input with `role` (the first, for `input`), or None."""
    return next((i for i, v in enumerate(graph.inputs) if role_of(v) == role), None)


def user_inputs(graph) -> list:
    return [v for v in graph.inputs if role_of(v) == INPUT]


def token_vocabulary(graph) -> int | None:
    """The rows of the embedding table that an integer user input (the token ids) indexes,
    directly or through casts: the vocabulary. None where there is no such lookup, or
    lookups of tables of several sizes."""
    from .types import TensorType

    ids = {v for v in user_inputs(graph) if isinstance(v.type, TensorType) and not v.dtype.is_floating_point}
    producers = graph.producers()
    rows = set()
    for n in graph.nodes:
        if n.op != "embedding":
            continue
        x = n.inputs[1]
        while x not in ids and x in producers and producers[x].op == "cast":
            x = producers[x].inputs[0]
        if x in ids and n.inputs[0].shape[0].is_number:
            rows.add(int(n.inputs[0].shape[0]))
    return rows.pop() if len(rows) == 1 else None


def output_roles(graph) -> tuple[str, ...]:
    return tuple(graph.signature.get("outputs") or (OUTPUT,) * len(graph.outputs))


def output_index(graph, role: str) -> int | None:
    return next((i for i, r in enumerate(output_roles(graph)) if r == role), None)


def roles_problem(graph) -> str | None:
    """Why the graph's roles and signature are malformed, or None."""
    from .types import SymType

    seen = set()
    for v in graph.inputs:
        role = role_of(v)
        extra = set(v.attrs or {}) - {"role"}
        if extra:
            return f"graph input {v.hint!r} has unknown attribute(s) {sorted(extra)}; inputs take only role"
        if role not in INPUT_ROLES:
            return f"graph input {v.hint!r} has role {role!r}; roles are {', '.join(INPUT_ROLES)}"
        if role != INPUT and role in seen:
            return f"two graph inputs have role {role!r}"
        seen.add(role)
        if (role == CACHE_LEN) != isinstance(v.type, SymType):
            return f"graph input {v.hint!r}: an int input must have role cache_len and only it"
    for v in graph.state_values:
        a = v.attrs or {}
        if set(a) != {"layer", "kind", "layout"}:
            return f"state {v.state!r} needs attributes layer, kind and layout, has {sorted(a)}"
        if a["kind"] not in STATE_KINDS or a["layout"] not in LAYOUTS or not isinstance(a["layer"], int):
            return f"state {v.state!r}: kind must be one of {STATE_KINDS}, layout one of {LAYOUTS}, layer an int"
        if a["layout"] == "dense" and v.type.rank != 4:
            return f"state {v.state!r}: a dense cache is [batch, kv heads, capacity, head dim], got {v.type}"
        if a["layout"] == "paged" and (v.type.rank != 4 or not v.type.shape[1].is_number):
            return f"state {v.state!r}: a paged cache is [blocks, block size (a number), kv heads, head dim], got {v.type}"
    sig = graph.signature
    unknown = set(sig) - set(SIGNATURE_KEYS)
    if unknown:
        return f"unknown signature key(s) {sorted(unknown)}; known: {', '.join(SIGNATURE_KEYS)}"
    roles = sig.get("outputs")
    if roles is not None:
        if not isinstance(roles, tuple) or len(roles) != len(graph.outputs):
            return f"signature outputs={roles!r} must name one role per output ({len(graph.outputs)})"
        if any(r not in OUTPUT_ROLES for r in roles):
            return f"output roles are {', '.join(OUTPUT_ROLES)}, got {roles}"
    if sig.get(SOURCE_POSITIONS, "shared") != "shared":
        return f"signature source_positions must be \"shared\" (or absent), got {sig[SOURCE_POSITIONS]!r}"
    fixed = sig.get("fixed_dtypes", ())
    if not isinstance(fixed, tuple) or not all(
            isinstance(f, tuple) and len(f) == 3 and isinstance(f[0], torch.dtype) and f[0].is_floating_point
            and f[1] in FIXED_KINDS and isinstance(f[2], str) for f in fixed):
        return (f"signature fixed_dtypes must be a tuple of (float dtype, kind, \"why\") entries, the kind one of "
                f"{', '.join(FIXED_KINDS)}; got {fixed!r}")
    for key in ("max_seq_len", "max_batch", "num_blocks"):
        limit = sig.get(key)
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            return f"signature {key} must be a positive int, got {limit!r}"
    return None


def with_fixed_dtype_kinds(signature: dict) -> dict:
    """`signature` with each fixed_dtypes entry of the earlier two-field form, (dtype, why),
    given its kind, so that IR text written before kinds were recorded (a model saved by
    fast.save, a dump) still loads. Those entries were told apart by their text, as the
    code that wrote them worded it. Anything else is left for roles_problem to judge."""
    fixed = signature.get("fixed_dtypes")
    if not isinstance(fixed, tuple) or not any(_two_field_entry(f) for f in fixed):
        return signature
    return {**signature, "fixed_dtypes": tuple((f[0], _old_entry_kind(f[1]), f[1]) if _two_field_entry(f) else f
                                               for f in fixed)}


def _two_field_entry(entry) -> bool:
    return isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], str)


def _old_entry_kind(why: str) -> str:
    if why.startswith("the constant tensor"):
        return FIXED_CONSTANT
    if why.startswith("QuantConfig(compute_dtype="):
        return FIXED_COMPUTE_DTYPE
    return FIXED_CAST
