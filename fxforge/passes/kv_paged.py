"""The paged layout of the kv_cache pass (KVCacheConfig(layout="paged")): the keys and
values of every row live in fixed-size blocks of one pool per layer, handed out per row by
the runtime (runtime/block_allocator.py), instead of one [B, Hkv, S, D] buffer.

The logical index space is the dense layout's: the step's keys are 0..L+T-1, a row's left
padding is masked by kv_bias, and positions are unchanged, so nothing outside attention
differs. What changes is where a key lives. Row b's tokens are packed from the start of
its own first block: key j is the row's token j - row_start[b], stored at

    block_table[b, (j - row_start[b]) // block_size] * block_size + (j - row_start[b]) % block_size

so when the batch's L grows (a longer request joins a serving batch) no data moves: only
row_start changes. Inputs appended after the dense layout's (roles in ir/roles.py):

    %kv_block_table: i32[B, MB] {role="block_table"}   the blocks of each row, in order
    %kv_row_start:   i32[B]     {role="row_start"}     key index of each row's first token
    %kv_slots:       i64[B, T]  {role="slot_mapping"}  the slot each new token goes to (-1: none)
    state "layer0.k_cache" f32[NB, 16, Hkv, D] {layout="paged"}, ...

Rewrite (per attention, after the dense pass has placed positions):
  attention(q, k, v, [slopes]) {causal, ...}
    -> paged_attention(q, paged_kv_write(kc, k, kv_slots), paged_kv_write(vc, v, kv_slots),
                       kv_block_table, kv_row_start, kv_bias, [slopes]) {causal, ...}
then the layer's two writes, which share the slots, become one (one launch on the Triton
backends, codegen/kernels/paged_kv_write.py):
  %kw = paged_kv_write(kc, k, s); %vw = paged_kv_write(vc, v, s)
    -> %kw, %vw = paged_kv_write(kc, vc, k, v, s)
"""
from __future__ import annotations

import torch

from ..ir import roles
from ..ir.graph import Graph, Node, Value
from ..ir.types import TensorType

BLOCK_TABLE, ROW_START, SLOTS = "kv_block_table", "kv_row_start", "kv_slots"
NUM_BLOCKS, BLOCKS_PER_ROW = "NB", "MB"  # the symbolic pool size and table width


def rewrite_attention_paged(graph: Graph, seq, batch, cache_len, config):
    """The attention rewrite of the paged layout; returns (graph, layers, bytes per token)
    like the dense rewrite in kv_cache.py (both through kv_cache.cache_each_attention)."""
    from .kv_cache import KV_BIAS, _fresh_symbol, cache_each_attention, key_bias_input

    num_blocks = _fresh_symbol(graph, NUM_BLOCKS)
    per_row = _fresh_symbol(graph, BLOCKS_PER_ROW)
    kv_bias = key_bias_input(graph, batch, cache_len, seq)
    table = Value(TensorType((batch, per_row), torch.int32), hint=BLOCK_TABLE, attrs={"role": roles.BLOCK_TABLE})
    row_start = Value(TensorType((batch,), torch.int32), hint=ROW_START, attrs={"role": roles.ROW_START})
    slots = Value(TensorType((batch, seq), torch.int64), hint=SLOTS, attrs={"role": roles.SLOT_MAPPING})
    out, layers, bytes_per_token = cache_each_attention(
        graph, "cache_attention_paged", config, "paged",
        state_shape=lambda x: (num_blocks, config.block_size, x.shape[1], x.shape[3]),
        write=lambda b, state, x, q: b.emit("paged_kv_write", state, x, slots),
        attend=lambda b, node, q, reads, slopes: b.emit("paged_attention", q, *reads, table, row_start, kv_bias,
                                                        *slopes, **node.attrs))
    out = pair_writes(out)
    out.inputs += [kv_bias, table, row_start, slots]
    out.input_names += [KV_BIAS, BLOCK_TABLE, ROW_START, SLOTS]
    return out, layers, bytes_per_token


def pair_writes(graph: Graph) -> Graph:
    """Each paged_attention's K and V writes, when both are single writes with the same
    slots, as one paged_kv_write of both, placed where the V write was. The K write's
    result must have no use before that place (the rewrite emits K, V, then attention)."""
    nodes = list(graph.nodes)
    made = {id(n.outputs[0]): i for i, n in enumerate(nodes) if n.op == "paged_kv_write" and len(n.inputs) == 3}
    pairs = {}  # position of the V write -> position of the K write
    for n in nodes:
        if n.op != "paged_attention":
            continue
        k_at, v_at = made.get(id(n.inputs[1])), made.get(id(n.inputs[2]))
        if k_at is None or v_at is None or not k_at < v_at or nodes[k_at].inputs[2] is not nodes[v_at].inputs[2]:
            continue
        k_out = nodes[k_at].outputs[0]
        if any(x is k_out for m in nodes[k_at + 1:v_at + 1] for x in m.inputs):
            continue
        pairs[v_at] = k_at
    if not pairs:
        return graph
    dropped = set(pairs.values())
    out = []
    for i, n in enumerate(nodes):
        if i in dropped:
            continue
        if i in pairs:
            k = nodes[pairs[i]]
            n = Node("paged_kv_write", (k.inputs[0], n.inputs[0], k.inputs[1], n.inputs[1], n.inputs[2]), {},
                     (k.outputs[0], n.outputs[0]), {**n.meta, "rule": "pair_kv_writes"})
        out.append(n)
    return graph.with_nodes(out)
