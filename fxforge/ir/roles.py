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
(additive key mask over the cache and the new tokens). A paged cache will add
`block_table` and `slot_mapping`; tensor parallelism needs no input role.
State buffers: `layer`, `kind` (k | v) and `layout`; `dense` is [batch, kv heads, capacity,
head dim], sized by the runtime per request (a paged layout will be [blocks, ...]).
Graph signature: `outputs` gives each output's role (`logits` [B, T, vocab] or `output`),
`max_seq_len` / `max_batch` the limits generate() checks (absent: none).
"""
from __future__ import annotations

INPUT, CACHE_LEN, POSITIONS, KEY_BIAS = "input", "cache_len", "positions", "key_bias"
INPUT_ROLES = (INPUT, CACHE_LEN, POSITIONS, KEY_BIAS)
OUTPUT, LOGITS = "output", "logits"
OUTPUT_ROLES = (OUTPUT, LOGITS)
STATE_KINDS = ("k", "v")
LAYOUTS = ("dense",)
SIGNATURE_KEYS = ("outputs", "max_seq_len", "max_batch")


def role_of(value) -> str:
    return (value.attrs or {}).get("role", INPUT)


def input_index(graph, role: str) -> int | None:
    """The position of the graph input with `role` (the first, for `input`), or None."""
    return next((i for i, v in enumerate(graph.inputs) if role_of(v) == role), None)


def user_inputs(graph) -> list:
    return [v for v in graph.inputs if role_of(v) == INPUT]


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
    for key in ("max_seq_len", "max_batch"):
        limit = sig.get(key)
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            return f"signature {key} must be a positive int, got {limit!r}"
    return None
