"""kv_cache: one graph that serves prefill (T >= 1 new tokens) and decode (T = 1) over a
key/value cache, so that each generated token costs O(context), not O(context^2).

Runs after fuse_attention. It adds three inputs after the model's own, and one state
buffer per cached tensor:

    graph(%input_ids: i64[B, T], %L: int, %kv_positions: i64[B, T], %kv_bias: f32[B, 1, 1, L + T],
          ..., %s0: state "layer0.k_cache" f32[B, 3, S, 64], %s1: state "layer0.v_cache" ...)

  L             how many positions the cache already holds (the new tokens go at L..L+T-1);
  kv_positions  each new token's position (L + t, minus the row's left padding);
  kv_bias       additive key mask, 0 or a very negative number (left-padding keys);
  state         [B, Hkv, S, D] per layer for K and for V, allocated by the runtime, S >= L + T.

Rewrites (each declines loudly, with the node, rather than produce wrong tokens):
  attention(q, k, v) {causal}           -> attention(q, kv_append(kc, k), kv_append(vc, v), kv_bias)
                                           (k after rotary embedding: kv_append reads what
                                           the attention read)
  unsqueeze(arange(0, T), 0)  [1, T]    -> %kv_positions [B, T]  (per-row positions, as
                                           transformers' generate computes them from the
                                           attention mask; types downstream are re-derived)
  arange(0, T) used any other way       -> arange(L, L + T)      (no per-row positions: left-
                                           padded batches are refused at generate time)
  slice(table, d, 0, T) of a fixed-size -> slice(table, d, L, L + T)
    table (a rotary cos/sin cache)

  attention(q, k, v, band mask)         -> attention(q, k, v) {causal}, when KVCacheConfig's
                                           max_seq_len is set and the mask, evaluated up to
                                           it, is plain causal (a sliding window at least
                                           max_seq_len wide)

Variants (fuse_attention's attributes) carry over: softcap, window (counted in cache slots;
the cache keeps every position), alibi (the slopes input stays after kv_bias) and sinks
(the sinks input stays last).
Positions computed from an all-ones mask (OPT's cumsum(mask) * mask - 1) are recognised by
evaluating them at sample sizes (arange(T) + c) and become kv_positions + c.

Refused: attention that is not causal (bidirectional, said first: a headless [B, T, D]
attention reaches the pass as [1, B, T, D]) or has a mask input (the cache cannot extend an
arbitrary mask; the error says whether the mask comes from the inputs or is the model's
own pattern), attention over keys that are not the new tokens, any other op that
builds a tensor from the sequence length (a leftover mask, say) or uses T as a value (a
constant T, T - 1 as an index or a fill, positions counted from the end such as
T - 1 - arange(T), a relative position arange(T) / T: with a cache T counts the new tokens
only), a position table shorter than max_seq_len, and anything that carries state along
the sequence outside attention (a scan such as cumsum, a reduction or normalization over T,
a convolution whose kernel spans several tokens, a matmul summing over the tokens as linear
attention does): the cache keeps only attention's keys and values. That last check is an
allow-list (_mixes_tokens): with an input along T, only ops known to act on each token by
itself pass (pointwise ops, views that keep each token's elements together, reductions and
norms whose dims avoid T, ATen calls listed by name); any other op, an unknown torch_call
included, is refused by name. A full() of one value with T as one of its dims (zeros(B, T)
token types) is one value per token and stays.

A registered `position_ids` buffer sliced to [1, T] is per-row positions when its values
are proven arange(N) + c (position_tables.py); a gather from a buffer holding one value
at those positions is that value.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import sympy
import torch

from ..ir import roles
from ..ir.attr_walk import attr_leaves
from ..ir.builder import Builder
from ..ir.edit import dead_code_elimination, retyped
from ..ir.graph import Graph, Node, Value
from ..ir.ops import OPS, attention_has_bias, causal_keep
from ..ir.training_mode import training_mode_nodes
from ..ir.types import SymType, TensorType, dims_equal, symbol
from .position_tables import arange_table_offset, flat_row_lookup, row_lookup, row_safe_call_type, uniform_gather_value, uniform_value

# The names of the inputs this pass appends (the runtime finds them by their roles, ir/roles.py).
CACHE_LEN, POSITIONS, KV_BIAS = "L", "kv_positions", "kv_bias"
CACHE_SIZE = "S"  # the symbolic length of the state buffers

NOT_CAUSAL = ("is not causal: it is bidirectional (every token attends to the later tokens too: no causal mask, "
              "no is_causal=True), so the earlier tokens' results would change with each new token and a cache of "
              "their keys and values cannot serve it (a decoder's self-attention is causal; encoders and "
              "cross-attention have no KV cache)")



class KVCacheError(ValueError):
    """The kv_cache pass cannot prove where positions come from, or the attention is not
    one a cache can serve. The message names the IR node."""


@dataclass(frozen=True)
class KVCacheConfig:
    """max_seq_len: the longest prompt + generation; None means the model's own limit
    (its position table), or no limit for rotary models. max_batch: the largest batch
    generate() accepts (None: any). dtype: the cache's dtype (None: the keys' dtype; a
    narrower one halves the cache, the keys are cast back for attention).
    layout: "dense" (a [B, Hkv, S, D] buffer per layer) or "paged" (a pool of blocks of
    `block_size` tokens handed out per row through a block table, passes/kv_paged.py);
    num_blocks: a paged cache's default pool size for fxforge.Engine (None: the engine's
    argument, and generate() sizes a pool per call)."""

    max_seq_len: int | None = None
    max_batch: int | None = None
    dtype: torch.dtype | None = None
    layout: str = "dense"
    block_size: int = 16
    num_blocks: int | None = None

    def __post_init__(self):
        if self.layout not in ("dense", "paged"):
            raise ValueError(f"KVCacheConfig.layout must be 'dense' or 'paged', got {self.layout!r}")
        if not _positive_int(self.block_size):
            raise ValueError(f"KVCacheConfig.block_size must be a positive int (tokens per block), "
                             f"got {self.block_size!r}")
        if self.layout == "dense" and self.num_blocks is not None:
            raise ValueError("KVCacheConfig.num_blocks is for layout='paged'; a dense cache has no blocks")
        for name in ("max_seq_len", "max_batch", "num_blocks"):
            value = getattr(self, name)
            if value is not None and not _positive_int(value):
                raise ValueError(f"KVCacheConfig.{name} must be a positive int or None (no limit), got {value!r}")
        if self.dtype is not None and not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            raise ValueError(f"KVCacheConfig.dtype must be a floating torch.dtype (e.g. torch.float16) or None "
                             f"(the keys' dtype), got {self.dtype!r}")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class KVCacheLayout:
    """What the runtime needs to drive a cached graph (also in report details)."""

    max_seq_len: int | None  # None: unbounded
    max_batch: int | None
    per_row_positions: bool  # False: left-padded batches cannot be served
    n_layers: int
    bytes_per_token: int  # K and V of every layer, for one sequence


def as_config(option) -> KVCacheConfig:
    if option is True:
        return KVCacheConfig()
    if isinstance(option, KVCacheConfig):
        return option
    if isinstance(option, dict):
        try:
            return KVCacheConfig(**option)
        except TypeError as e:  # an unknown field
            raise TypeError(f"kv_cache={option!r}: {e}; KVCacheConfig's fields are max_seq_len, max_batch, "
                            f"dtype, layout, block_size, num_blocks") from None
    raise TypeError(f"kv_cache= takes True or False, a KVCacheConfig or a dict of its fields; got {option!r} "
                    f"(1, 0 and strings such as 'yes' are not accepted: say True or False)")


def parse_option(option) -> KVCacheConfig | None:
    """optimize(kv_cache=...): None or False leaves the pass out."""
    return None if option is None or option is False else as_config(option)


def _describe(graph: Graph, node: Node) -> str:
    from ..ir.printer import Namer, format_node

    return f"{format_node(node, Namer(graph))}{node.where()}"


def _fresh_symbol(graph: Graph, name: str) -> sympy.Symbol:
    taken = {str(s) for v in graph.inputs + graph.param_values + graph.state_values
             if isinstance(v.type, TensorType) for s in v.type.free_symbols()}
    taken |= {v.hint for v in graph.inputs if isinstance(v.type, SymType)}
    base, i = name, 1
    while name in taken:
        name, i = f"{base}{i}", i + 1
    return symbol(name)


# -- the pass -------------------------------------------------------------------------------
def kv_cache(graph: Graph, ctx=None) -> Graph:
    config = as_config(ctx.options.get("kv_cache", True) if ctx is not None else True)
    if graph.state_values:
        raise KVCacheError("kv_cache: the graph already has state buffers (did kv_cache run twice?)")
    attentions = [n for n in graph.nodes if n.op == "attention"]
    if not attentions and not any(n.op in ("softmax", "log_softmax") or
                                  n.op == "sdpa" or n.op == "torch_call" and "scaled_dot_product" in n.attrs.get("target", "")
                                  for n in graph.nodes):
        raise KVCacheError("kv_cache: the model has no attention at all (no softmax, no scaled_dot_product_"
                           "attention): the cache holds attention's keys and values, and this model carries "
                           "its context otherwise (a state-space model such as Mamba keeps a recurrent state, "
                           "an RNN a hidden state). Optimize it without kv_cache")
    if not attentions and training_mode_nodes(graph):
        raise KVCacheError("kv_cache: the model is in training mode: its dropout ops stay in the graph and keep "
                           "attention from fusing, so there is nothing to cache. Call model.eval() before "
                           "fxforge.optimize")
    if not attentions:
        raise KVCacheError("kv_cache: the graph has no fused attention op, so there is nothing to cache. "
                           "Run fuse_attention first (it is in the default pipeline); if it ran, its notes "
                           "(below) say why it declined this model's attention")
    graph = _unfold_folded_heads(graph)
    attentions = [n for n in graph.nodes if n.op == "attention"]
    first_q = attentions[0].inputs[0]
    batch, seq = first_q.shape[0], first_q.shape[2]
    if not attentions[0].attrs["causal"] and not attention_has_bias(attentions[0]) \
            and sympy.sympify(seq).free_symbols:
        # said first: a plain [B, T, D] attention (no heads, no mask) reaches here as [1, B, T, D],
        # which the heads checks below would misread; its real problem is that it sees later tokens
        raise KVCacheError(f"kv_cache: this attention {NOT_CAUSAL}\n  at: {_describe(graph, attentions[0])}")
    if sympy.sympify(batch) == 1 and sympy.sympify(first_q.shape[1]).free_symbols \
            and not attention_has_bias(attentions[0]):
        # bmm's [B*H, T, D] spelling without a mask, whose fold _unfold_folded_heads could not
        # trace back to [B, H, T, D]
        raise KVCacheError(f"kv_cache: attention has its heads folded into the batch ({first_q.type}: bmm on "
                           "[B*H, T, D], fairseq / Megatron style), and the pass cannot prove the fold is a "
                           "view of [B, H, T, D] tensors (q, k and v each a reshape of one that merges its "
                           "batch and heads dims), which is what the cache keeps per layer. Build q, k and v "
                           "as x.view(B, T, H, D).transpose(1, 2) and fold them only for the bmm "
                           "(.reshape(B * H, T, D)), or use F.scaled_dot_product_attention on [B, H, T, D] "
                           "tensors\n  at: " + _describe(graph, attentions[0]))
    if sympy.sympify(batch) == 1 and sympy.sympify(first_q.shape[1]).free_symbols:
        # a batch of 1 with a dynamic head dim (2*B): bmm's [B*H, T, D] spelling, the mask added to
        # the folded [B*H, T, T] scores, which the fusion could not unfold; another length cannot help
        raise KVCacheError(f"kv_cache: attention has its heads folded with the batch ({first_q.type}: the "
                           "batch is 1 and the heads dim holds the batch), but the cache keeps [B, H, T, D] per "
                           "layer. Add the mask to the scores viewed as [B, H, T, T] (or use "
                           "F.scaled_dot_product_attention on [B, H, T, D] tensors), not to the folded "
                           "[B*H, T, T] ones\n  at: " + _describe(graph, attentions[0]))
    if sympy.sympify(seq).is_number and sympy.sympify(first_q.shape[1]).free_symbols:
        # the length in the heads dim, a fixed axis attended over: attention across heads per token
        raise KVCacheError(f"kv_cache: attention runs over a fixed axis of {seq} with the sequence length in its "
                           f"heads dim ({first_q.type}): it attends within each token (e.g. across heads), not "
                           "across tokens, so there are no keys and values of past tokens to cache; optimize "
                           "with kv_cache=False\n  at: " + _describe(graph, attentions[0]))
    if not isinstance(seq, sympy.Symbol) or not isinstance(batch, sympy.Symbol):
        raise KVCacheError(f"kv_cache: attention has a fixed batch or sequence size ({first_q.type}), so no one "
                           "graph serves every length. With dynamic=False, capture with dynamic=True (the "
                           "default); with dynamic=True, torch.export fixed the size itself: the example's length "
                           "(or batch) equals a fixed size in the model (a mask buffer or position table of that "
                           "many rows, sliced by the length): optimize with an example of another length, e.g. "
                           "one token shorter; or the model loops over the sequence in Python (transformers' "
                           "Mamba / state-space layers without their CUDA kernels), which export unrolls at any "
                           "length, and which a KV cache cannot serve; or it splits the sequence into its tokens "
                           "(x.unbind(1), x.split(1, dim=1)), which export traces as that many pieces at any "
                           "length: for the last token write x[:, -1] or x[:, [-1]]\n  at: "
                           + _describe(graph, attentions[0]))
    proof_len = config.max_seq_len
    if proof_len is None and (bound := _length_bound(graph, seq)) is not None and bound <= MAX_WINDOW_PROOF:
        # the model itself bounds the length (nanoGPT slices its [bs, bs] causal buffer by T:
        # a guard T <= bs, which generate() enforces on L + T): masks are proven up to that
        proof_len = bound
    if proof_len is not None:
        graph = _windows_wider_than_the_cache(graph, seq, proof_len)
        attentions = [n for n in graph.nodes if n.op == "attention"]
    for n in attentions:
        q, k = n.inputs[0], n.inputs[1]
        why = None
        if attention_has_bias(n):
            why = _mask_input_problem(graph, n, proof_len)
        elif not n.attrs["causal"]:
            why = NOT_CAUSAL
        elif not (q.shape[2] == seq and k.shape[2] == seq):
            why = f"attends from {q.shape[2]} queries over {k.shape[2]} keys, not over the new tokens ({seq})"
        elif q.shape[0] != batch:
            why = f"has batch {q.shape[0]}, another attention has {batch}"
        if why:
            raise KVCacheError(f"kv_cache: this attention {why}\n  at: {_describe(graph, n)}")

    cache_len = _fresh_symbol(graph, CACHE_LEN)
    cache_size = _fresh_symbol(graph, CACHE_SIZE)
    new_graph, per_row, table_limit = _rewrite_positions(graph, seq, batch, cache_len)
    new_graph = dead_code_elimination(new_graph)
    if config.layout == "paged":
        from .kv_paged import rewrite_attention_paged

        new_graph, layers, bytes_per_token = rewrite_attention_paged(new_graph, seq, batch, cache_len, config)
    else:
        new_graph, layers, bytes_per_token = _rewrite_attention(new_graph, seq, batch, cache_len, cache_size,
                                                                config)
    live = dead_code_elimination(new_graph)
    head_picks = _head_picks(live, seq)  # the three checks below read them; one walk of the graph
    _check_no_other_length_ops(new_graph, seq, batch, head_picks, cache_len)
    _check_nothing_runs_along_the_sequence(live, seq, batch, head_picks)

    # A guard on T was a condition on the sequence's length; with a cache the sequence is
    # the cached tokens and the new ones (a model that switches its rotary scaling past a
    # length, as LongRoPE does, must be refused there, not run on the short scaling)
    new_graph.guards = [g.xreplace({seq: seq + cache_len}) if seq in g.free_symbols else g for g in graph.guards]

    max_seq_len = config.max_seq_len
    if table_limit is not None:
        if max_seq_len is not None and max_seq_len > table_limit:
            raise KVCacheError(f"kv_cache: max_seq_len={max_seq_len} but the model's position table has only "
                               f"{table_limit} rows; use max_seq_len <= {table_limit}")
        max_seq_len = table_limit if max_seq_len is None else max_seq_len
    layout = KVCacheLayout(max_seq_len, config.max_batch, per_row, layers, bytes_per_token)
    # what the runtime reads: the graph itself (ir/roles.py), not this pass's report
    output_roles, logits_note = _output_roles(new_graph, batch, seq, head_picks)
    new_graph.signature = {"outputs": output_roles,
                           **({"max_seq_len": max_seq_len} if max_seq_len is not None else {}),
                           **({"max_batch": config.max_batch} if config.max_batch is not None else {}),
                           **({"num_blocks": config.num_blocks} if config.num_blocks is not None else {}),
                           **_fixed_dtypes(graph, config)}
    if ctx is not None:
        ctx.details["kv_cache"] = layout
        ctx.rules["cache_attention"] += layers
        ctx.rules["positions_per_row" if per_row else "positions_from_cache_len"] += 1
        ctx.note(f"{layers} attention layers cached ({config.layout}"
                 f"{f', blocks of {config.block_size}' if config.layout == 'paged' else ''}), "
                 f"{bytes_per_token} bytes per token per sequence; "
                 f"positions {'per row' if per_row else 'shared by the batch (no left padding)'}; "
                 f"max_seq_len {max_seq_len if max_seq_len is not None else 'unbounded'}")
        ctx.note(logits_note)
    return new_graph


def _unfolded(x: Value, producers) -> Value | None:
    """The [B, H, T, D] tensor whose batch and heads dims `x` [1, B*H, T, D] merges
    (unsqueeze(view([B, H, T, D] -> [B*H, T, D]), 0), the shape bmm-style attention
    reaches the pass in), or None where `x` is not provably that view."""
    lead = producers.get(x)
    if x.rank != 4 or not dims_equal(x.shape[0], 1) or lead is None or lead.op != "unsqueeze" \
            or lead.attrs.get("dim") not in (0, -4):
        return None
    view = producers.get(lead.inputs[0])
    if view is None or not _is_view(view):
        return None
    src = view.inputs[0]
    folded = view.outputs[0]
    if src.rank != 4 or not isinstance(src.shape[0], sympy.Symbol) or _mentions(src.shape[2], src.shape[0]) \
            or not dims_equal(src.shape[0] * src.shape[1], folded.shape[0]) \
            or not all(dims_equal(a, b) for a, b in zip(src.shape[2:], folded.shape[1:])):
        return None
    return src


def _unfold_folded_heads(graph: Graph) -> Graph:
    """attention(q, k, v) on [1, B*H, T, D] (heads folded into the batch for torch.bmm,
    fairseq / Megatron style; the fusion adds the leading 1) -> the same attention on the
    [B, H, T, D] tensors q, k and v are views of, viewed back: attention treats each (b, h)
    alone, so the result is the same, and the cache then keeps [B, H, S, D] per layer.
    Only where each of q, k and v is provably such a view, of one batch, and there is no
    mask input (a mask on the folded [B*H, T, T] scores is refused with its own message)."""
    producers = graph.producers()
    nodes, changed = [], False
    for n in graph.nodes:
        sources = [_unfolded(x, producers) for x in n.inputs[:3]] if n.op == "attention" and \
            len(n.inputs) == 3 else [None]
        if None in sources or len({src.shape[0] for src in sources}) != 1:
            nodes.append(n)
            continue
        b = Builder(meta=n.meta)
        out = b.emit("attention", *sources, **n.attrs)
        b.nodes.append(Node("view", (out,), {"shape": tuple(n.outputs[0].shape)}, n.outputs, dict(n.meta)))
        nodes += b.nodes
        changed = True
    return graph.with_nodes(nodes) if changed else graph


def _output_roles(graph: Graph, batch, seq, head_picks: set[int]) -> tuple[tuple[str, ...], str]:
    """Each output's role, and a note saying which output is the logits generate() samples
    from, and why: the output the model's own output structure names `logits` (api.py
    records it in the captured graph's signature: a ModelOutput field, a dict key); else
    the one float [B, T, V] output whose V is the vocabulary (the rows of the embedding the
    token ids index), any V where none has it. A model without such an output whose head
    reads only the last token (nanoGPT's inference path, lm_head(x[:, [-1], :])) has its
    [B, 1, V] or [B, V] output as the logits: the last token's, all that generate() and the
    engines read (speculative decoding, which needs every new token's, refuses it). Two
    outputs that fit equally (an early-exit head beside the final one) mark none: which
    one to sample from is the model's to say."""
    outs = graph.outputs

    def floats(v) -> bool:
        return isinstance(v.type, TensorType) and v.rank >= 2 and v.dtype.is_floating_point \
            and v.shape[0] == batch and v.shape[-1].is_number

    def every_token(v) -> bool:
        return floats(v) and v.rank == 3 and v.shape[1] == seq

    picks_last = bool(head_picks)

    def last_token(v) -> bool:
        return picks_last and floats(v) and (v.rank == 2 or v.rank == 3 and v.shape[1] == 1)

    def roles_with(index) -> tuple[str, ...]:
        return tuple(roles.LOGITS if i == index else roles.OUTPUT for i in range(len(outs)))

    def shape(i) -> str:
        return f"output {i} {outs[i].type}"

    every = [i for i, v in enumerate(outs) if every_token(v)]
    last = [i for i, v in enumerate(outs) if last_token(v)]
    vocab = roles.token_vocabulary(graph)
    sized = [i for i in every if int(outs[i].shape[-1]) == vocab] or \
        [i for i in last if int(outs[i].shape[-1]) == vocab]
    named = roles.output_index(graph, roles.LOGITS) if graph.signature.get("outputs") else None
    if named is not None and (every_token(outs[named]) or last_token(outs[named])):
        if sized and named not in sized:
            # the name says one thing, the vocabulary's width another: the model's to settle
            return roles_with(None), (f"{shape(named)} is named logits but is not as wide as the vocabulary "
                                      f"({vocab}), which {shape(sized[0])} is: generate() and the engines cannot "
                                      "tell which to sample from; name the logits 'logits'")
        return roles_with(named), f"logits: {shape(named)}, named logits by the model"
    pool = sized or every or last
    if not pool:
        return roles_with(None), ("no output is logits (float [B, T, vocab], or the last token's [B, 1, vocab]): "
                                  "plain calls run, generate() and the engines cannot")
    if len(pool) > 1:
        return roles_with(None), (f"{' and '.join(shape(i) for i in pool)} could each be the logits: generate() "
                                  "and the engines cannot tell which to sample from; return the logits under the "
                                  "name 'logits' (a dict or a ModelOutput), or only one such output")
    how = "the vocabulary's width" if sized else "the only float output of that shape"
    return roles_with(pool[0]), f"logits: {shape(pool[0])}, {how}"


def _length_bound(graph: Graph, seq) -> int | None:
    """The longest sequence the graph's guards allow (T <= c, T < c), if they bound it."""
    bounds = []
    for g in graph.guards:
        if isinstance(g, (sympy.LessThan, sympy.StrictLessThan)) and g.lhs == seq and g.rhs.is_number:
            bounds.append(int(g.rhs) - (1 if isinstance(g, sympy.StrictLessThan) else 0))
        elif isinstance(g, (sympy.GreaterThan, sympy.StrictGreaterThan)) and g.rhs == seq and g.lhs.is_number:
            bounds.append(int(g.lhs) - (1 if isinstance(g, sympy.StrictGreaterThan) else 0))
    return min(bounds) if bounds else None


# A mask is evaluated at max_seq_len (a [T, T] tensor) to prove it causal only up to this.
MAX_WINDOW_PROOF = 8192


def _windows_wider_than_the_cache(graph: Graph, seq, max_seq_len: int) -> Graph:
    """Sliding-window attention whose window is at least max_seq_len keys is plain causal
    for every sequence the cache can hold: its mask (built from the length alone) becomes
    causal=True. Proven by evaluating the mask at the sample lengths up to max_seq_len and
    at max_seq_len itself: at each one it must be exactly the causal pattern."""
    from .fuse_attention import MASK_FILL_MAX
    from .shape_eval import sample_sizes

    if max_seq_len > MAX_WINDOW_PROOF:
        return graph
    producers = graph.producers()
    samples = sample_sizes(graph)
    if not samples:
        return graph
    probes = [sz for sz in samples if sz.get(seq, 0) <= max_seq_len] + [{**samples[0], seq: max_seq_len}]
    replaced: dict[int, Node] = {}
    verdicts: dict[Value, bool] = {}
    for n in graph.nodes:
        if n.op != "attention" or len(n.inputs) != 4 or n.attrs["causal"]:
            continue
        bias = n.inputs[3]
        if bias not in verdicts:
            verdicts[bias] = _causal_at(bias, producers, graph, probes, MASK_FILL_MAX)
        if verdicts[bias]:
            replaced[id(n)] = Node("attention", n.inputs[:3], {**n.attrs, "causal": True}, n.outputs,
                                   {**n.meta, "pass": "kv_cache"})
    if not replaced:
        return graph
    return dead_code_elimination(graph.with_nodes([replaced.get(id(n), n) for n in graph.nodes]))


def _causal_at(bias: Value, producers, graph: Graph, probes: list[dict], fill_max: float) -> bool:
    from .shape_eval import evaluate

    for sizes in probes:
        value = evaluate(bias, producers, graph, sizes)
        if value is None or value.shape[-1] != value.shape[-2]:
            return False  # reads an input (the user's mask), or not a square [T, T] mask
        rows = value.float().reshape(-1, *value.shape[-2:])
        keep = rows[0] == 0
        if not (rows == rows[0]).all() or not (rows[0][~keep] <= fill_max).all():
            return False
        if not bool((keep == causal_keep(*keep.shape)).all()):
            return False
    return True


def _narrow_float_in(bias: Value, producers) -> str | None:
    """The half dtype ('float16' or 'bfloat16') a shape-only bias is computed in, if it is
    built from float32 values cast down (Bloom and Falcon build ALiBi so in half models)."""
    from .shape_eval import shape_only_nodes

    for node in shape_only_nodes(bias, producers) or []:
        if node.op == "cast" and node.attrs["dtype"] in (torch.float16, torch.bfloat16):
            return str(node.attrs["dtype"]).removeprefix("torch.")
    return None


def _mask_input_problem(graph: Graph, attention: Node, max_seq_len: int | None = None) -> str:
    """Why the cache cannot serve this attention's mask input, as precisely as the graph
    tells: a mask computed from the user's inputs (attention_mask) has a remedy, a mask
    computed from the length alone that fuse_attention could not prove causal is the
    model's own attention pattern (a sliding window, say), which the cache does not do."""
    from .fuse_attention import MASK_FILL_MAX
    from .shape_eval import band_width, evaluate, mask_probes

    bias, producers = attention.inputs[3], graph.producers()
    widths, other = set(), False
    for sizes in mask_probes(graph, [bias], producers).sizes:
        value = evaluate(bias, producers, graph, sizes)
        if value is None:  # reads a graph input, or is not evaluable from the sizes alone
            return _data_mask_problem(graph, bias, producers)
        if ((value != 0) & (value > MASK_FILL_MAX)).any():
            narrow = _narrow_float_in(bias, producers)
            if narrow is not None:
                return (f"adds a position bias (ALiBi: slopes times the key position) that the model computes in "
                        f"{narrow}: rounding each slope x position to {narrow} is part of what this model "
                        "computes, and fuse_attention recognises (and the cache extends) only an ALiBi bias "
                        f"computed in float32. Optimize the model in float32 for kv_cache=True (model.float()), "
                        f"or run it in {narrow} without kv_cache (the bias stays in the graph)")
            return ("adds a bias built from the positions that is not a mask (values other than 0 and a large "
                    "negative fill: a relative position bias, such as T5's, read from a learned table by the "
                    "query-key distance, or an ALiBi bias that fuse_attention did not recognise as slopes times "
                    "the distance, e.g. one computed in bfloat16 or float16, or combined with the scores in an "
                    "order it does not match, as Falcon's alibi=True models do); the cache would have to extend it "
                    "for every new key, which it does not (the ALiBi that fuse_attention recognises is the "
                    "position bias it caches: see its report note). Without kv_cache=True the model runs with "
                    "its bias in the graph")
        rows = value.float().reshape(-1, *value.shape[-2:])
        keep = rows[0] == 0
        if not (rows == rows[0]).all() or not (rows[0][~keep] <= MASK_FILL_MAX).all():
            other = True
            continue
        width = band_width(keep)
        if width is not None:
            widths.add(width)
        elif not bool((keep == causal_keep(*keep.shape)).all()):
            other = True
    if widths and not other:
        return (f"is sliding-window attention (each query sees only its last {max(widths)} keys) that "
                "fuse_attention left as a mask (a window it could not prove at every length, e.g. one over "
                "4098 keys); the cache serves windows that are the attention's window= attribute, and a band "
                "at least KVCacheConfig(max_seq_len=...) wide as causal. Without kv_cache=True the model runs "
                "with its mask in the graph")
    if max_seq_len is None:
        hint = (f"; if it is causal up to some length (a chunked mask whose chunks are longer than your "
                f"sequences, as Llama 4's), set kv_cache=KVCacheConfig(max_seq_len=N) with N within that length "
                f"(at most {MAX_WINDOW_PROOF}): the mask is then proven causal up to N and cached as causal")
    elif max_seq_len > MAX_WINDOW_PROOF:
        hint = (f"; max_seq_len={max_seq_len} is above {MAX_WINDOW_PROOF}, the longest length at which the mask "
                "is evaluated to prove it causal: a smaller max_seq_len may let it")
    else:
        hint = f"; it is not causal at max_seq_len={max_seq_len} either"
    return ("has a mask built from the sequence length that is not plain causal (not a band either: a "
            "prefix-LM or chunked pattern, say), which the KV cache does not support; it caches plain causal "
            "attention only" + hint)


def _graph_inputs_read(graph: Graph, value: Value, producers) -> list[Value]:
    """The graph inputs (not parameters) `value` is computed from, in the graph's order."""
    seen, stack, found = set(), [value], set()
    while stack:
        v = stack.pop()
        if id(v) in seen or v.param:
            continue
        seen.add(id(v))
        node = producers.get(v)
        if node is None:
            found.add(id(v))
        else:
            stack.extend(node.inputs)
    return [v for v in graph.inputs if id(v) in found]


def _input_name(graph: Graph, i: int) -> str:
    return graph.input_names[i] if i < len(graph.input_names) else f"input {i}"


def _data_mask_problem(graph: Graph, bias: Value, producers) -> str:
    """Why a mask that is not a function of the sizes cannot be cached, by what it reads:
    a mask input of the user's has a remedy; a mask computed from the tokens or the
    activations (a learned or top-k sparse attention) is the model's own and has none."""
    inputs = _graph_inputs_read(graph, bias, producers)
    users = roles.user_inputs(graph)
    others = [v for v in inputs if not users or v is not users[0]]
    if others:
        index = {id(v): i for i, v in enumerate(graph.inputs)}
        names = ", ".join(_input_name(graph, index[id(v)]) for v in others)
        return (f"has a mask computed from the input(s) {names}, which the cache cannot extend for new tokens; "
                "capture the model with input_ids only (generate() takes attention_mask itself)")
    if inputs:
        return ("has a mask computed from the token values or the activations (data-dependent: a mask from "
                "pad tokens, or a learned or top-k sparse attention that picks its keys per query), which the "
                "cache cannot extend for new tokens; it caches causal, sliding-window and ALiBi attention "
                "only. Without kv_cache=True the model runs with its mask in the graph")
    return ("has a mask the pass could not evaluate from the sizes (it is built by an op with effects or "
            "by more than a few hundred ops), so it cannot prove what the mask is or extend it for new "
            "tokens. Without kv_cache=True the model runs with its mask in the graph")


# -- positions ------------------------------------------------------------------------------
def _rewrite_positions(graph: Graph, seq, batch, cache_len) -> tuple[Graph, bool, int | None]:
    users = graph.users()
    positions = Value(TensorType((batch, seq), torch.int64), hint=POSITIONS, attrs={"role": roles.POSITIONS})
    replace: dict[Value, Value] = {}  # old value -> per-row positions
    # positions spelled without an arange (OPT: cumsum of an all-ones mask, minus 1): the
    # positions input plus the offset each one is shown to have at every sample size
    prefix: list[Node] = []
    for value, offset in _positions_from_shapes(graph, seq, batch).items():
        replace[value] = _shifted_positions(positions, offset, value.dtype, prefix)
    new_nodes: dict[int, Node] = {}  # id(old node) -> its replacement
    filled: dict[int, list[Node]] = {}  # id(old node) -> the constant it is shown to be
    table_limit = None
    shared = False
    rank_grew: set[Value] = set()  # replacements with one more (leading) dim than the value they replace
    for node in graph.nodes:
        if node.op == "arange" and _mentions(node.attrs.get("end"), seq) \
                and not _token_count(node.attrs["end"], batch, seq):
            a = node.attrs
            if not (a["start"] == 0 and a["step"] == 1 and dims_equal(a["end"], seq)):
                raise KVCacheError("kv_cache: an arange over the sequence that does not count 0..T-1; cannot "
                                   f"tell which positions it means\n  at: {_describe(graph, node)}")
            uses = users.get(node.outputs[0], [])
            as_rows = [u for u in uses if u.op == "unsqueeze" and u.attrs["dim"] in (0, -2)]
            lookups = [u for u in uses if u.op == "embedding" and u.inputs[1] is node.outputs[0]
                       and u.inputs[0].param is not None]
            if lookups and len(lookups) == len(uses) and a["dtype"] == torch.int64 \
                    and node.outputs[0] not in graph.outputs and graph.signature.get(roles.SOURCE_POSITIONS) != "shared":
                # nanoGPT's wpe(arange(T)), rows [T, C] added to the [B, T, C] token embeddings:
                # each row looks its own positions up, [B, T, C] (rank_grew: _retype lets that
                # extra leading dim flow only through pointwise ops, which broadcast it as before)
                for u in lookups:
                    rows = Value(TensorType((batch, seq) + tuple(u.outputs[0].shape[1:]), u.outputs[0].dtype),
                                 u.outputs[0].hint)
                    prefix.append(Node("embedding", (u.inputs[0], positions), {}, (rows,),
                                       {**u.meta, "pass": "kv_cache"}))
                    replace[u.outputs[0]] = rows
                    rank_grew.add(rows)
                continue
            if as_rows and a["dtype"] == torch.int64:
                # position_ids = cache_position.unsqueeze(0): per row with left padding, as
                # transformers' generate passes them
                for u in as_rows:
                    replace[u.outputs[0]] = positions
            if len(as_rows) < len(uses) or not as_rows or node.outputs[0] in graph.outputs \
                    or a["dtype"] != torch.int64:
                # cache_position itself (Llama 4's attention temperature, a mask): the same
                # index for every row, arange(L, L + T), as transformers' generate has it
                new_nodes[id(node)] = Node("arange", (), {**a, "start": cache_len, "end": cache_len + seq},
                                           node.outputs, {**node.meta, "pass": "kv_cache"})
                shared = shared or not as_rows or a["dtype"] != torch.int64
        elif node.op == "slice" and _mentions(node.attrs["end"], seq):
            a, table = node.attrs, node.inputs[0]
            dim = a["dim"] % table.rank
            if not (a["start"] == 0 and a["step"] == 1 and dims_equal(a["end"], seq) and table.shape[dim].is_number):
                continue  # a slice of an activation along T (e.g. a split): not a position
            size = int(table.shape[dim])
            table_limit = size if table_limit is None else min(table_limit, size)
            fill = uniform_value(graph, table)
            if fill is not None and node.outputs[0] not in graph.outputs:
                # every slice of a one-valued buffer (big_bird's all-zero token_type_ids
                # sliced [:, :T]) is that value: it reads no position
                filled[id(node)] = _filled_like(node, fill)
                continue
            offset = arange_table_offset(graph, node)
            if offset is not None and node.outputs[0] not in graph.outputs:
                # a registered position_ids buffer proven to hold arange(N) + c: its slice
                # [:, 0:T] is the first T positions, which per row are kv_positions + c
                replace[node.outputs[0]] = _shifted_positions(positions, offset, node.outputs[0].dtype, prefix)
                continue
            if dim == 0 and table.param is not None and table.rank >= 2 and table.dtype != torch.bool \
                    and node.outputs[0] not in graph.outputs and graph.signature.get(roles.SOURCE_POSITIONS) != "shared":
                # a rotary (or learned) table sliced [0:T] (lit-gpt's cos[:T], Meta's
                # freqs_cis[0:T]): each row looks its own positions up, [B, T, ...], if
                # _retype can carry the extra leading dim (else: shared below, as before)
                rows = _table_rows(table, positions, node, prefix)
                replace[node.outputs[0]] = rows
                rank_grew.add(rows)
                continue
            shared = True
            new_nodes[id(node)] = Node("slice", node.inputs, {**a, "start": cache_len, "end": cache_len + seq},
                                       node.outputs, {**node.meta, "pass": "kv_cache"})

    nodes = []
    producers = graph.producers()
    for n in graph.nodes:
        lookup = row_lookup(graph, n, producers)
        if lookup is not None and lookup[1] in replace:
            nodes += _embedding_rows(n, *lookup)  # GPT-J's gather of sin/cos rows at the positions
        elif (flat := flat_row_lookup(graph, n, producers)) is not None:
            nodes += _embedding_rows(n, *flat)  # XGLM's index_select of rows: the same lookup, exactly
        elif any(v in replace for v in n.inputs[1:]) and (c := uniform_gather_value(graph, n)) is not None:
            nodes += _filled_like(n, c)  # reads the positions but not their values
        elif id(n) in filled:
            nodes += filled[id(n)]
        else:
            nodes.append(new_nodes.get(id(n), n))
    out = graph.with_nodes(nodes)
    out.inputs = list(graph.inputs) + [Value(SymType(), hint=str(cache_len), attrs={"role": roles.CACHE_LEN})]
    out.input_names = list(graph.input_names) + [str(cache_len)]
    per_row = False
    if replace:
        # dead_code_elimination: what only the rewritten lookups read (GPT-J's index repeat)
        retyped = _retype(dead_code_elimination(out), replace, prefix, rank_grew) if not shared else None
        if retyped is not None:
            out, per_row = retyped, True
        else:
            # fall back to positions shared by the batch: arange(L, L + T) everywhere
            nodes = []
            for n in out.nodes:
                nodes.append(n)
                if n.op == "arange" and any(u.outputs[0] in replace for u in users.get(n.outputs[0], [])):
                    nodes[-1] = Node("arange", (), {**n.attrs, "start": cache_len, "end": cache_len + seq},
                                     n.outputs, {**n.meta, "pass": "kv_cache"})
                elif n.op == "slice" and n.outputs[0] in replace:  # a position_ids buffer's slice
                    nodes[-1] = Node("slice", n.inputs, {**n.attrs, "start": cache_len, "end": cache_len + seq},
                                     n.outputs, {**n.meta, "pass": "kv_cache"})
            out = out.with_nodes(nodes)
    elif not shared and table_limit is None and not _reads_positions(graph, seq):
        # nothing depends on positions (ALiBi models: bloom, mpt): left padding is exact, as
        # the key bias masks the padding and relative distances do not change
        per_row = True
    if per_row:
        out.inputs.append(positions)
        out.input_names.append(POSITIONS)
    table_limit = position_table_limit(out, table_limit, positions if per_row else None, seq, cache_len)
    return out, per_row, table_limit


def _table_rows(table: Value, positions: Value, node: Node, prefix: list[Node]) -> Value:
    """Rows `positions` [B, T] of a [N, ...] table, [B, T, ...]: an embedding lookup (of the
    table viewed as [N, everything else] when it has more dims), on `prefix`."""
    meta = {**node.meta, "pass": "kv_cache"}
    batch, seq = positions.shape
    rest = tuple(table.shape[1:])
    flat = table
    if len(rest) > 1:
        width = sympy.Mul(*rest)
        flat = Value(TensorType((table.shape[0], width), table.dtype))
        prefix.append(Node("view", (table,), {"shape": (table.shape[0], width)}, (flat,), meta))
    rows = Value(TensorType((batch, seq, flat.shape[1]), table.dtype), node.outputs[0].hint)
    prefix.append(Node("embedding", (flat, positions), {}, (rows,), meta))
    if len(rest) > 1:
        shaped = Value(TensorType((batch, seq) + rest, table.dtype), node.outputs[0].hint)
        prefix.append(Node("view", (rows,), {"shape": (batch, seq) + rest}, (shaped,), meta))
        rows = shaped
    return rows


def _shifted_positions(positions: Value, offset: int, dtype: torch.dtype, prefix: list[Node]) -> Value:
    """positions + offset, cast to `dtype`: the nodes that compute it go on `prefix`."""
    batch, seq = positions.shape
    new = positions
    if offset:
        const = Node("const", (), {"value": offset, "dtype": torch.int64},
                     (Value(TensorType((), torch.int64)),), {"pass": "kv_cache"})
        new = Value(TensorType((batch, seq), torch.int64))
        prefix += [const, Node("add", (positions, const.outputs[0]), {}, (new,), {"pass": "kv_cache"})]
    if dtype != torch.int64:
        cast = Value(TensorType((batch, seq), dtype))
        prefix.append(Node("cast", (new,), {"dtype": dtype}, (cast,), {"pass": "kv_cache"}))
        new = cast
    return new


def _embedding_rows(node: Node, table: Value, ids: Value) -> list[Node]:
    """`embedding(table, ids)` in place of `node` (position_tables.row_lookup); a [1, N, D]
    table is viewed as [N, D] first."""
    meta = {**node.meta, "pass": "kv_cache"}
    out = []
    if table.rank == 3:
        rows = Value(TensorType(tuple(table.shape[1:]), table.dtype))
        out.append(Node("view", (table,), {"shape": tuple(table.shape[1:])}, (rows,), meta))
        table = rows
    return out + [Node("embedding", (table, ids), {}, node.outputs, meta)]


def _filled_like(node: Node, value) -> list[Node]:
    """`expand(const(value))` to the shape and dtype of `node`'s result, in its place."""
    out = node.outputs[0]
    scalar = Value(TensorType((), out.dtype))
    meta = {**node.meta, "pass": "kv_cache"}
    return [Node("const", (), {"value": value, "dtype": out.dtype}, (scalar,), meta),
            Node("expand", (scalar,), {"shape": tuple(out.shape)}, (out,), meta)]


def _reads_positions(graph: Graph, seq) -> bool:
    """Does any op build a tensor from the sequence length (an arange, a full, a table
    slice)? Without one, the graph does not depend on positions."""
    for n in graph.nodes:
        if OPS[n.op].kind == "creation" and n.op != "const" or n.op == "slice":
            a = n.attrs
            if any(_mentions(a.get(x), seq) for x in ("start", "end")) or any(
                    _mentions(d, seq) for d in a.get("shape", ()) if isinstance(d, sympy.Basic)):
                return True
    return False


def _positions_from_shapes(graph: Graph, seq, batch) -> dict[Value, int]:
    """Integer [B, T] / [1, T] values that depend only on shapes, are not built from an
    arange (the rule above takes those), and equal arange(T) + c in every row at every
    sample size (one c for all): value -> c. transformers' positions from an all-ones
    attention mask, `cumsum(mask) * mask - 1` (OPT), are such values. Only the first of a
    chain is taken: what is computed from it follows the positions input."""
    from .shape_eval import evaluate, sample_sizes, shape_only_nodes

    producers = graph.producers()
    found: dict[Value, int] = {}
    covered: set = set()
    all_sizes = sample_sizes(graph)
    for node in graph.nodes:
        if len(node.outputs) != 1:
            continue
        v = node.outputs[0]
        if any(i in covered for i in node.inputs):
            covered.add(v)
            continue
        if (node.op in ("arange", "const") or not isinstance(v.type, TensorType) or v.rank != 2
                or v.dtype.is_floating_point or v.dtype == torch.bool or not dims_equal(v.shape[1], seq)
                or not (dims_equal(v.shape[0], batch) or v.shape[0] == 1)):
            continue
        nodes = shape_only_nodes(v, producers)
        if not nodes or any(n.op == "arange" for n in nodes):
            continue
        offset = None
        for sizes in all_sizes:
            t = evaluate(v, producers, graph, sizes)
            length = int(seq.subs(sizes))
            if t is None or t.dim() != 2 or t.shape[-1] != length:
                offset = None
                break
            shift = t.long() - torch.arange(length)
            if not bool((shift == shift.flatten()[0]).all()) or (offset is not None and int(shift[0, 0]) != offset):
                offset = None
                break
            offset = int(shift[0, 0])
        if offset is not None:
            found[v] = offset
            covered.add(v)
    return found


def _mentions(expr, sym) -> bool:
    return isinstance(expr, sympy.Basic) and sym in expr.free_symbols


def _is_length(expr, batch, seq) -> bool:
    """`expr` is a size along the sequence: it mentions T and is not a count of the step's
    tokens across the batch (_token_count)."""
    return _mentions(expr, seq) and not _token_count(expr, batch, seq)


def _token_count(expr, batch, seq) -> bool:
    """`expr` is a multiple of B*T: a size over the step's tokens flattened across the batch
    (a mixture-of-experts router's token index or scatter buffer), not a length along the
    sequence. Such a tensor means the same in prefill and decode: it indexes this step's
    tokens, whatever their positions."""
    if not (_mentions(expr, seq) and _mentions(expr, batch)):
        return False
    ratio = sympy.simplify(expr / (batch * seq))
    return not ratio.free_symbols


def _retype(graph: Graph, replace: dict[Value, Value], prefix: list[Node] = (),
            rank_grew: set[Value] = frozenset()) -> Graph | None:
    """Substitute per-row positions and re-derive types downstream. Succeeds only if every
    node whose type changes is row-safe (treats the new leading dim as a batch) and every
    node that mixes positions with activations keeps its type: then each row computes
    exactly what the [1, T] graph computed for that row's positions. A replacement in
    `rank_grew` has one more leading dim than the value it replaces ([B, T, C] for [T, C]):
    it may flow only through pointwise ops, which broadcast from the right as before (an op
    with dims, a slice or a permute, would read them shifted)."""
    renamed = dict(replace)
    grew = set(rank_grew)
    nodes = list(prefix)
    for node in graph.nodes:
        if any(o in replace for o in node.outputs):
            continue  # the unsqueeze(arange) itself: now an input
        if not any(v in renamed for v in node.inputs):
            nodes.append(node)
            continue
        inputs = tuple(renamed.get(v, v) for v in node.inputs)
        if any(v in grew for v in inputs):
            if not _carry_grown(node, inputs, grew, renamed, nodes):
                return None
            continue
        if node.op == "unsqueeze" and node.attrs["dim"] == 0 and node.inputs[0].rank \
                and node.inputs[0].shape[0] == 1 and inputs[0].shape[0] != 1:
            # [1, T, D] -> [1, 1, T, D] (NeoX's cos[:T][None, None]): the rows' batch stays first
            new_node, changed = retyped(node, inputs, renamed, attrs={**node.attrs, "dim": 1})
            nodes.append(new_node)
            continue
        if OPS[node.op].kind == "opaque":
            # its types are recorded, not derived: they cannot follow the positions, except
            # for the calls whose types position_tables derives (complex rotary)
            t = row_safe_call_type(node, inputs)
            if t is None:
                return None
            out = node.outputs[0]
            if not t.same_as(out.type):
                renamed[out] = Value(t, out.hint)
            nodes.append(Node(node.op, inputs, node.attrs, (renamed.get(out, out),), node.meta))
            continue
        try:
            new_node, changed = retyped(node, inputs, renamed)
        except Exception:
            return None
        if any(changed):
            if not OPS[node.op].has("row_safe"):  # per-row positions flow through it
                return None
            if node.op in ("cat", "repeat_interleave") and node.attrs["dim"] % node.outputs[0].rank == 0:
                return None  # along the new batch dim: not row by row
            if node.op == "permute" and node.attrs["dims"][0] % node.outputs[0].rank != 0:
                return None  # moves the rows' dim from the front, where the checks here look for it
        elif not _keeps_the_rows(node, inputs, new_node):
            return None
        nodes.append(new_node)
    if any(v in renamed for v in graph.outputs):
        return None
    return graph.with_nodes(nodes)


def _keeps_the_rows(node: Node, inputs: tuple, new_node: Node) -> bool:
    """A node whose result keeps its type though an input became per row ([1, T, C] now
    [B, T, C]) must use that input row by row: a pointwise op broadcasting it into a
    [B, ...] result, or an op whose result keeps those rows first. A sum, mean or pick over
    the rows' dim (z.sum(0, keepdim=True), z[0]) gives a [1, ...] or row-less result of the
    same type while mixing the rows: not per row."""
    rows = [new for old, new in zip(node.inputs, inputs) if new is not old and isinstance(old.type, TensorType)
            and old.rank and new.rank == old.rank and old.shape[0] == 1 and new.shape[0] != 1]
    if not rows or OPS[node.op].kind == "pointwise":
        return True
    if node.op == "amax" and not any(r.dtype.is_floating_point for r in rows):
        # the largest position over the whole batch (LongRoPE's max(position_ids) + 1), as
        # transformers computes it from its per-row position_ids (not rows of a float table)
        return True
    out = new_node.outputs[0]
    return isinstance(out.type, TensorType) and out.rank > 0 and all(dims_equal(out.shape[0], r.shape[0]) for r in rows)


def _carry_grown(node: Node, inputs: tuple, grew: set, renamed: dict, nodes: list) -> bool:
    """Carry per-row rows with an extra leading dim ([B, T, D] for [T, D]) through `node`
    (its node or nodes appended to `nodes`, `renamed` updated): False where that cannot be
    done exactly.
    - unsqueeze(0) ([T, D] -> [1, T, D]) is the rows themselves: [B, T, D];
    - a view to [1, ...] (Meta's reshape_for_broadcast, [1, T, 1, D]) views each row: [B, ...];
    - a pointwise op whose result has more dims than the rows ([B, H, T, D] from q * cos[:T])
      reads them viewed as [B, 1, ..., T, D], so that each row's batch meets the result's
      first dim; the result must have the rows' batch first."""
    old_out = node.outputs[0]
    x = inputs[0]
    if node.op == "unsqueeze" and x in grew and node.attrs["dim"] == 0:
        shape = tuple(x.shape)  # (a value of its own: it stands for [1, T, D], no longer grown)
    elif node.op == "view" and x in grew:
        shape = tuple(node.attrs["shape"])
        if not shape or shape[0] != 1:
            return False
    else:
        shape = None
    if shape is not None:
        new = Value(TensorType((x.shape[0],) + shape[1:], x.dtype), old_out.hint)
        nodes.append(Node("view", (x,), {"shape": new.shape}, (new,), node.meta))
        renamed[old_out] = new
        return True
    if OPS[node.op].kind != "pointwise":
        return False
    rank = max([old_out.rank] + [v.rank for v in inputs if v not in grew and isinstance(v.type, TensorType)])
    widened = []
    for v in inputs:
        if v in grew and v.rank < rank:
            wide = Value(TensorType((v.shape[0],) + (1,) * (rank - v.rank) + tuple(v.shape[1:]), v.dtype), v.hint)
            nodes.append(Node("view", (v,), {"shape": wide.shape}, (wide,), node.meta))
            grew.add(wide)
            v = wide
        widened.append(v)
    try:
        new_node, _ = retyped(node, tuple(widened), renamed)
    except Exception:
        return False
    out = new_node.outputs[0]
    # the rows' batch must meet the result's first dim (a [1, H, T, D] operand broadcasts to
    # it; one whose first dim is something else would put the rows against that)
    if any(v in grew and (v.rank != out.rank or not dims_equal(v.shape[0], out.shape[0])) for v in widened):
        return False
    if any(v not in grew and isinstance(v.type, TensorType) and v.rank == out.rank
           and not (v.shape[0] == 1 or dims_equal(v.shape[0], out.shape[0])) for v in widened):
        return False
    if out.rank != old_out.rank:
        grew.add(out)
    nodes.append(new_node)
    return True


def position_table_limit(graph: Graph, limit, positions, seq, cache_len) -> int | None:
    """Learned position embeddings: embedding(table, positions + c) bounds the length to
    rows - c (OPT looks its positions up 2 rows into the table)."""
    sources = set()
    if positions is not None:
        sources.add(positions)
    for n in graph.nodes:
        if n.op == "arange" and _mentions(n.attrs["end"], cache_len):
            sources.add(n.outputs[0])
    derived = dict.fromkeys(sources, 0)  # value -> constant added to the positions so far
    consts = {n.outputs[0]: n.attrs["value"] for n in graph.nodes if n.op == "const"}
    for n in graph.nodes:
        if any(v in derived for v in n.inputs):
            offset = max(derived.get(v, 0) for v in n.inputs)
            if n.op == "embedding" and n.inputs[1] in derived:
                rows = n.inputs[0].shape[0]
                if rows.is_number:
                    rows = int(rows) - max(derived[n.inputs[1]], 0)
                    limit = rows if limit is None else min(limit, rows)
            if n.op in ("add", "sub") and n.inputs[1] in consts and isinstance(consts[n.inputs[1]], int):
                c = consts[n.inputs[1]]
                offset += c if n.op == "add" else -c
            if n.op in ("unsqueeze", "view", "expand", "cast", "add", "sub", "slice", "permute"):
                derived.update(dict.fromkeys(n.outputs, offset))
    return limit


def _fixed_dtypes(graph: Graph, config: KVCacheConfig) -> dict:
    """The graph's fixed_dtypes (ir/roles.py), with the cache dtype if the user set one:
    the graph alone cannot tell it from the keys' dtype, and OptimizedModel.to(dtype) must
    not make it follow the model's."""
    fixed = tuple(graph.signature.get("fixed_dtypes", ()))
    if config.dtype is not None:
        fixed += ((config.dtype, roles.FIXED_CACHE_DTYPE, f"KVCacheConfig(dtype={config.dtype}) at optimize"),)
    return {"fixed_dtypes": fixed} if fixed else {}


# -- attention -----------------------------------------------------------------------------
def key_bias_input(graph: Graph, batch, cache_len, seq) -> Value:
    """The %kv_bias input both layouts add: [B, 1, 1, L + T] in the first attention's query
    dtype, 0 or a very negative number per key (a row's left padding)."""
    bias_dtype = next(n for n in graph.nodes if n.op == "attention").inputs[0].dtype
    return Value(TensorType((batch, 1, 1, cache_len + seq), bias_dtype), hint=KV_BIAS,
                 attrs={"role": roles.KEY_BIAS})


def cache_each_attention(graph: Graph, rule: str, config, layout: str, state_shape, write, attend):
    """The attention rewrite both layouts share: every attention node gets a k and a v
    state buffer, `state_shape(x)` for its keys or values x, in `layout`; the new entries
    are cast to the cache dtype and written by `write(b, state, x, q)` (which returns what
    attention reads), and `attend(b, node, q, reads, slopes)` emits the new attention.
    Returns (graph with the states, layers, bytes per token); the caller adds the inputs."""
    from ..ir.builder import Builder

    states: list[Value] = []
    nodes: list[Node] = []
    renamed: dict[Value, Value] = {}
    layer = bytes_per_token = 0
    for node in graph.nodes:
        node = node.with_renamed_inputs(renamed)
        if node.op != "attention":
            nodes.append(node)
            continue
        q, k, v = node.inputs[:3]
        slopes = node.inputs[3:]  # alibi's slopes and the sinks (the only inputs after v kv_cache lets through)
        b = Builder(meta={**node.meta, "pass": "kv_cache", "rule": rule})
        reads = []
        for name, x in (("k", k), ("v", v)):
            dtype = config.dtype or x.dtype
            state = Value(TensorType(state_shape(x), dtype), state=f"layer{layer}.{name}_cache",
                          attrs={"layer": layer, "kind": name, "layout": layout})
            states.append(state)
            bytes_per_token += int(x.shape[1]) * int(x.shape[3]) * dtype.itemsize
            reads.append(write(b, state, b.cast(x, dtype), q))
        out = attend(b, node, q, reads, slopes)
        nodes.extend(b.nodes)
        renamed[node.outputs[0]] = out
        layer += 1
    out = graph.with_nodes(nodes, [renamed.get(v, v) for v in graph.outputs])
    out.state_values = states
    return out, layer, bytes_per_token


def _rewrite_attention(graph: Graph, seq, batch, cache_len, cache_size, config: KVCacheConfig):
    kv_bias = key_bias_input(graph, batch, cache_len, seq)
    out, layers, bytes_per_token = cache_each_attention(
        graph, "cache_attention", config, "dense",
        state_shape=lambda x: (batch, x.shape[1], cache_size, x.shape[3]),
        write=lambda b, state, x, q: b.cast(b.emit("kv_append", state, x, start=cache_len), q.dtype),
        attend=lambda b, node, q, reads, slopes: b.emit("attention", q, *reads, kv_bias, *slopes, **node.attrs))
    out.inputs.append(kv_bias)
    out.input_names.append(KV_BIAS)
    return out, layers, bytes_per_token


# ATen scans: each output element depends on every earlier one along `dim`
SCANS = ("aten.cumsum.", "aten.cumprod.", "aten.cummax.", "aten.cummin.", "aten.logcumsumexp.", "aten.diff.")


# ATen convolutions: each output element mixes a window of inputs along the spatial dims
CONVOLUTIONS = ("aten.conv1d.", "aten.conv2d.", "aten.conv3d.", "aten.convolution.", "aten._convolution.",
                "aten.conv_transpose1d.", "aten.conv_transpose2d.", "aten.conv_transpose3d.")


# how to go on where something outside attention runs along the sequence
_WITHOUT_CACHE = "Optimize with kv_cache=False (generate() then recomputes the sequence each step)"


def _check_nothing_runs_along_the_sequence(graph: Graph, seq, batch, head_picks: set[int]):
    """With a cache, T counts only the new tokens: an op that combines values along the
    sequence outside attention (a cumulative sum of a padding mask into positions, as
    RoBERTa-family models compute them from input_ids; a reduction over T; a short causal
    convolution, as in LFM hybrids; a matmul contracting over T, as linear attention does)
    would see only those and give other numbers than over
    the whole sequence: refuse."""
    positions = _position_values(graph)
    orders = _token_orders(graph, seq, batch)
    for n in graph.nodes:
        if id(n) in head_picks:
            # the last new token is the sequence's last (new tokens go at its end), and what
            # follows sees that token alone: nanoGPT's lm_head(x[:, [-1], :]) at inference
            continue
        if n.op == "amax" and n.inputs[0] in positions:
            # the largest position is the last token's, which every step holds (positions
            # rise along the sequence): LongRoPE's choice of frequencies by max(position_ids) + 1
            continue
        if n.op == "torch_call" and n.attrs["target"].startswith(SCANS) and n.inputs:
            x = n.inputs[0]
            args = n.attrs["args"]
            dim = args[1] if len(args) > 1 and isinstance(args[1], int) else dict(n.attrs["kwargs"]).get("dim", -1)
            if isinstance(dim, int) and x.rank and _mentions(x.shape[dim % x.rank], seq):
                raise KVCacheError("kv_cache: this op runs along the sequence (each result depends on the earlier "
                                   "tokens), which with a cache are not in the step's input: the pass cannot "
                                   f"tell what it computes then. {_WITHOUT_CACHE}\n  at: {_describe(graph, n)}")
        elif n.op == "torch_call" and n.attrs["target"].startswith(CONVOLUTIONS) and len(n.inputs) >= 2:
            x, weight = n.inputs[0], n.inputs[1]
            # dims 2.. are the spatial ones; a kernel of size 1 along T mixes no tokens
            along = [d for d in range(2, min(x.rank, weight.rank)) if _mentions(x.shape[d], seq)
                     and not (weight.shape[d].is_number and int(weight.shape[d]) == 1)]
            if along:
                raise KVCacheError("kv_cache: this convolution runs along the sequence (its kernel spans "
                                   f"{weight.shape[along[0]]} tokens: a short convolution carries state from the "
                                   "earlier tokens, which with a cache are not in the step's input, and the cache "
                                   f"keeps only attention's keys and values). {_WITHOUT_CACHE}\n  at: "
                                   + _describe(graph, n))
        elif n.op == "matmul" and len(n.inputs) == 2 and n.inputs[0].rank >= 2 \
                and _mentions(n.inputs[0].shape[-1], seq) and not _token_count(n.inputs[0].shape[-1], batch, seq):
            # contracts over the tokens outside a fused attention: linear attention (MiniMax's
            # lightning attention), or an attention fuse_attention did not take
            raise KVCacheError("kv_cache: this matmul sums over the sequence outside attention (linear attention, "
                               "say); with a cache it would see only the new tokens, and the cache keeps only "
                               f"attention's keys and values. {_WITHOUT_CACHE}\n  at: {_describe(graph, n)}")
        elif OPS[n.op].kind == "reduction" and n.inputs and isinstance(n.inputs[0].type, TensorType) \
                and any(_mentions(d, seq) for d in n.inputs[0].shape):
            # (a B*T count of tokens too: a sum or a norm over all the step's tokens mixes them)
            x = n.inputs[0]
            dims = _reduced_dims(n)
            if dims is None or any(_mentions(x.shape[d], seq) for d in dims):
                raise KVCacheError(f"kv_cache: this op ({_op_name(n)}) reduces or normalizes over the sequence "
                                   "outside attention; with a cache it would see only the new tokens\n  at: "
                                   + _describe(graph, n))
        elif _moves_along_the_sequence(n, seq, batch):
            raise KVCacheError("kv_cache: this op moves values along the sequence (a shift, a slice, a flip or a "
                               "gather over token positions: RWKV's token shift, a smear of the previous token); "
                               "with a cache the step's input holds only the new tokens, so it would read other "
                               f"tokens than over the whole sequence\n  at: {_describe(graph, n)}")
        elif (why := _mixes_tokens(n, seq, batch, orders)) is not None:
            raise KVCacheError(f"kv_cache: this op ({_op_name(n)}) {why}; with a cache the step's input holds only "
                               "the new tokens (1 at decode), so it would compute other values than over the whole "
                               "sequence, and the cache keeps only attention's keys and values. Optimize with "
                               f"kv_cache=False\n  at: {_describe(graph, n)}")


def _is_last(index, seq) -> bool:
    """`index` names the last of `seq` positions: -1 or T - 1."""
    if isinstance(index, int):
        return index == -1
    return isinstance(index, sympy.Expr) and dims_equal(index, seq - 1)


def _picks_the_last_token(graph: Graph, node: Node, seq) -> bool:
    """`node` takes the last position along a dim of exactly T tokens: x[:, -1], x[:, -1:],
    x[:, [-1]], x.narrow(1, T - 1, 1) (a slice). Its result is one token's values, the same with a
    cache as over the whole sequence."""
    if not node.inputs or not isinstance(node.inputs[0].type, TensorType) or not node.inputs[0].rank:
        return False
    x, a = node.inputs[0], node.attrs

    def is_seq(dim) -> bool:
        return isinstance(dim, int) and -x.rank <= dim < x.rank and dims_equal(x.shape[dim], seq)

    if node.op == "select":
        return is_seq(a["dim"]) and _is_last(a["index"], seq)
    if node.op == "slice":
        if not (a["step"] == 1 and is_seq(a["dim"]) and _is_last(a["start"], seq)):
            return False
        end = a["end"]
        return end is None or (isinstance(end, int) and end >= 2 ** 62) or (
            isinstance(end, sympy.Expr) and dims_equal(end, seq))
    if node.op != "torch_call":
        return False
    target, args = a["target"], a["args"]
    if target.startswith("aten.index.Tensor") and len(args) == 2 and not a["kwargs"]:
        indices = list(args[1])
        picked = [d for d, ix in enumerate(indices) if ix is not None]
        if len(picked) != 1 or not is_seq(picked[0]) or len(node.inputs) != 2:
            return False
        index = node.inputs[1]
        table = graph.params.get(index.param) if index.param is not None else None
        # a constant list of -1s ([-1], as nanoGPT writes it); a tensor input could hold anything
        return (table is not None and table.dim() == 1 and table.numel() >= 1
                and not table.is_floating_point() and bool((table == -1).all()))
    return False


def _head_picks(graph: Graph, seq) -> set[int]:
    """The picks of the last token (_picks_the_last_token; their nodes' ids) whose result no value along the
    sequence reads, directly or through other ops: a head on the last token. A pick whose
    value goes back into the tokens (x + x[:, -1:], the last id's embedding added to every
    position, a scale from arange(T)[-1], a head expanded over T) would read the step's last
    token where eager reads the sequence's at every position: not exempt."""
    users = graph.users()
    picks = set()
    for n in graph.nodes:
        if not _picks_the_last_token(graph, n, seq):
            continue
        seen, todo, clean = set(), list(n.outputs), True
        while todo and clean:
            v = todo.pop()
            for u in users.get(v, []):
                if id(u) in seen:
                    continue
                seen.add(id(u))
                if u.op == "attention" or any(isinstance(o.type, TensorType) and any(_mentions(d, seq) for d in o.shape)
                                              for o in u.outputs):
                    clean = False
                    break
                todo.extend(u.outputs)
        if clean:
            picks.add(id(n))
    return picks


# ops through which a value of positions stays one per token, in the tokens' order
_KEEPS_POSITIONS = ("unsqueeze", "squeeze", "view", "reshape", "expand", "cast")


def _position_values(graph: Graph) -> set[Value]:
    """The cached graph's token positions (the positions input, or arange(L, L + T)) and
    what they are through reshapes, casts and adding or subtracting a constant: values
    that rise along the sequence, the last token's the largest."""
    found = {v for v in graph.inputs if roles.role_of(v) == roles.POSITIONS}
    consts = {n.outputs[0] for n in graph.nodes if n.op == "const"}
    for n in graph.nodes:
        if n.op == "arange" and n.attrs["step"] == 1 and isinstance(n.attrs["start"], sympy.Expr) \
                and not n.attrs["start"].is_number:
            found.add(n.outputs[0])
        elif n.inputs and n.inputs[0] in found and (
                n.op in _KEEPS_POSITIONS or n.op in ("add", "sub") and n.inputs[1] in consts):
            found.update(n.outputs)
    return found


_PADS = ("aten.constant_pad_nd.", "aten.pad.", "aten.reflection_pad", "aten.replication_pad", "aten.circular_pad")


def _moves_along_the_sequence(node: Node, seq, batch) -> bool:
    """`node` shifts, slices, picks, reorders or concatenates values along a dim of T token
    positions (not a B*T token count, whose order is the step's own): what it reads
    depends on where the new tokens sit in the sequence, which a cached step does not see.
    A slice of the whole dim (start 0, step 1, to its end) moves nothing."""
    def along(x, dim) -> bool:
        if not isinstance(dim, int) or not x.rank:
            return False
        return _is_length(x.shape[dim % x.rank], batch, seq)

    if not node.inputs or not isinstance(node.inputs[0].type, TensorType):
        return False
    x, a = node.inputs[0], node.attrs
    if node.op == "slice":
        size = x.shape[a["dim"] % x.rank]
        whole = a["start"] in (0, None) and a["step"] == 1 and (
            a["end"] is None or (isinstance(a["end"], int) and a["end"] >= 2 ** 62)
            or sympy.simplify(sympy.sympify(a["end"]) - size) == 0)
        return along(x, a["dim"]) and not whole
    if node.op in ("select", "repeat_interleave") and "dim" in a:
        return along(x, a["dim"])
    if node.op == "cat":
        out = node.outputs[0]
        return along(out, a["dim"]) and len(node.inputs) > 1
    if node.op != "torch_call":
        return False
    target, args, kwargs = a["target"], a["args"], dict(a["kwargs"])
    if target.startswith(("aten.roll.", "aten.flip.")):
        dims = args[2] if target.startswith("aten.roll.") and len(args) > 2 else \
            args[1] if target.startswith("aten.flip.") and len(args) > 1 else kwargs.get("dims", ())
        dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
        return any(along(x, d) for d in dims) or (target.startswith("aten.roll.") and not dims and x.rank > 0
                                                  and any(along(x, d) for d in range(x.rank)))
    if target.startswith(_PADS):
        pads = args[1] if len(args) > 1 else kwargs.get("pad", ())
        pairs = [tuple(pads[i:i + 2]) for i in range(0, len(pads), 2)]
        return any(p != (0, 0) and along(x, x.rank - 1 - i) for i, p in enumerate(pairs))
    if target.startswith(("aten.index.Tensor", "aten.index_put")):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(ix is not None and along(x, d) for d, ix in enumerate(indices))
    name = _aten_name(target)
    if name in _ATEN_ALONG_ONE_DIM:
        # the dim's place differs by op (topk(x, k, dim)): reading args[1] took k for the dim.
        # An unreadable or missing dim (max(x), max(x, y)) moves nothing: _mixes_tokens decides
        dims = _aten_dims(node, *_ATEN_ALONG_ONE_DIM[name], x.rank)
        return dims is not None and any(along(x, d) for d in dims)
    return False


def _one_value_per_token(node: Node, seq) -> bool:
    """A `full` of one value whose shape has T as exactly one of its dims (BERT's default
    token_type_ids, zeros [B, T]; a rotary magnitude of ones [1, T, D]): one element per new
    token and the same value whatever its position, so with a cache it means what it meant
    over the whole sequence. T in two dims ([T, T], pairwise over tokens) or inside an
    expression (T + 1, a length derived from T) is not that, and stays refused."""
    if node.op != "full":
        return False
    dims = [d for d in node.attrs["shape"] if _mentions(d, seq)]
    return len(dims) == 1 and dims[0] == seq


def _check_no_other_length_ops(graph: Graph, seq, batch, head_picks: set[int], cache_len=None):
    """A tensor built from the sequence length alone (a leftover mask, a position we did
    not place) would be wrong once T is only the new tokens: refuse. So is any other value
    computed from T (a constant T, T - 1 as an index or a fill, a clamp at T): with a cache
    T counts the step's tokens, not the sequence. Sizes that count the step's tokens across
    the batch (B*T) are not lengths (see _token_count)."""
    for n in graph.nodes:
        expr = None if id(n) in head_picks else _length_in_a_value(n, seq, batch, cache_len)
        if expr is not None:
            raise KVCacheError(f"kv_cache: this op computes a value from the sequence length T (it uses {expr} as a "
                               "value, not as the size of the sequence dim); with a cache T counts only the step's "
                               "new tokens (1 at decode), not the whole sequence. Positions that depend on the "
                               "total length (counted from the end, T - 1 - t or t - T + c; a relative position "
                               "t / T; the last position T - 1) change for every earlier token as the sequence "
                               "grows, so no cache can serve them (the pass places positions counted from the "
                               f"start, arange(T) + c). Optimize with kv_cache=False\n  at: {_describe(graph, n)}")
        if OPS[n.op].kind == "creation" and n.op != "const":
            a = n.attrs
            mentions = any(_is_length(x, batch, seq) for x in (a.get("end"), a.get("start")))
            mentions |= any(_is_length(d, batch, seq) for d in a.get("shape", ()) if isinstance(d, sympy.Basic))
            starts_at_cache = n.op == "arange" and isinstance(a.get("start"), sympy.Basic) and \
                not a["start"].is_number
            if mentions and not starts_at_cache and not _one_value_per_token(n, seq):
                raise KVCacheError("kv_cache: this op builds a tensor from the sequence length, and the pass "
                                   "cannot tell what it means once T counts only the new tokens (a mask or a "
                                   f"position it does not know)\n  at: {_describe(graph, n)}")


# -- what acts on each token by itself --------------------------------------------------------
def _op_name(node: Node) -> str:
    return node.attrs["target"] if node.op == "torch_call" else node.op


def _carries_length(v, seq, batch) -> bool:
    """`v` is a tensor with a dim along the sequence (T, or L + T after the rewrite; not a
    B*T count of the step's tokens)."""
    return isinstance(v.type, TensorType) and any(_is_length(d, batch, seq) for d in v.shape)


def _reduced_dims(node: Node) -> tuple[int, ...] | None:
    """The dims a reduction-kind IR op reduces or normalizes over, as non-negative ints
    (None: an op this pass does not know: it may touch any dim)."""
    x, a = node.inputs[0], node.attrs
    rank = x.rank
    if node.op in ("sum", "mean", "amax", "amin"):
        dims = a["dims"]
        return tuple(d % rank for d in dims) if dims else tuple(range(rank))  # () reduces every dim
    if node.op in ("softmax", "log_softmax"):
        return (a["dim"] % rank,) if rank else ()
    if node.op in ("layer_norm", "rms_norm"):
        return tuple(range(rank - len(a["shape"]), rank))  # the normalized shape: the last dims
    return None


# ATen ops whose result at one element reads only the inputs at that element (broadcast),
# that only relabel dims (transpose, stack: a new dim) or that read only their input's shape
# (new_empty): each token's result reads that token alone.
_ATEN_ELEMENTWISE = frozenset("""
    abs absolute acos acosh add addcdiv addcmul alias angle asin asinh atan atan2 atanh bitwise_and bitwise_not
    bitwise_or bitwise_xor bitwise_left_shift bitwise_right_shift __and__ __or__ __xor__ __lshift__ __rshift__
    ceil celu clamp clamp_max clamp_min clip clone complex conj conj_physical _conj contiguous copy copysign cos
    cosh deg2rad detach digamma div dropout elu empty_like eq erf erfc erfinv exp exp2 expm1 fill fix float_power
    floor floor_divide fmax fmin fmod frac full_like ge gelu gt hardshrink hardsigmoid hardswish hardtanh heaviside
    hypot i0 imag isfinite isinf isnan isneginf isposinf isreal le leaky_relu lerp lgamma lift_fresh_copy log log10
    log1p log2 logaddexp logaddexp2 logical_and logical_not logical_or logical_xor logit lt masked_fill maximum
    minimum mish mul nan_to_num native_dropout ne neg negative nextafter ones_like polar positive pow rad2deg real
    reciprocal relu relu6 remainder round rsqrt rsub selu sgn sigmoid sign signbit silu sin sinc sinh softplus
    softshrink sqrt square sub tan tanh threshold to _to_copy trunc type_as view_as_complex view_as_real where xlogy
    zeros_like expand expand_as broadcast_to transpose t permute unsqueeze squeeze movedim moveaxis swapaxes swapdims
    stack expand_copy permute_copy transpose_copy t_copy unsqueeze_copy squeeze_copy alias_copy
    new_empty new_zeros new_ones new_full empty_strided new_empty_strided outer ger
""".split())

# ATen reductions and normalizations over explicit dims: name -> (the dim argument's index,
# its keyword); a missing, None or empty dim reduces every dim
_ATEN_OVER_DIMS = {
    "sum": (1, "dim"), "mean": (1, "dim"), "amax": (1, "dim"), "amin": (1, "dim"), "nansum": (1, "dim"),
    "nanmean": (1, "dim"), "logsumexp": (1, "dim"), "prod": (1, "dim"), "any": (1, "dim"), "all": (1, "dim"),
    "var": (1, "dim"), "std": (1, "dim"), "var_mean": (1, "dim"), "std_mean": (1, "dim"),
    "count_nonzero": (1, "dim"), "aminmax": (None, "dim"), "linalg_vector_norm": (2, "dim"), "norm": (2, "dim"),
    "_softmax": (1, "dim"), "softmax": (1, "dim"), "_log_softmax": (1, "dim"), "log_softmax": (1, "dim"),
}
# ATen normalizations over the last dims, given by a normalized_shape second argument
_ATEN_OVER_LAST_DIMS = ("layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm")
# ATen reshapes: local when each token's elements stay together (_view_keeps_tokens)
_ATEN_VIEWS = ("view", "view_as", "reshape", "reshape_as", "_unsafe_view", "flatten", "unflatten", "_reshape_alias")
# ATen ops along one dim (its index, its keyword) that _moves_along_the_sequence refuses along
# T: along another dim each token's result reads that token alone (the in-place scatter_
# names too, should capture keep one as an opaque call)
_ATEN_ALONG_ONE_DIM = {name: (1, "dim") for name in (
    "index_select", "gather", "narrow", "select", "slice", "unfold", "index_add", "index_copy", "index_fill",
    "scatter", "scatter_", "scatter_add", "scatter_add_", "scatter_reduce", "scatter_reduce_", "sort", "argsort",
    "median", "max", "min", "argmax", "argmin", "unbind", "glu", "cumsum", "cumprod", "cummax", "cummin",
    "logcumsumexp", "diff")}
_ATEN_ALONG_ONE_DIM.update({name: (2, "dim") for name in (
    "topk", "kthvalue", "take_along_dim", "repeat_interleave", "split", "split_with_sizes", "chunk", "tensor_split",
    "slice_scatter", "select_scatter")})


# the dim each op takes when the call leaves it out (torch.export writes no argument that
# equals its default): x.topk(k) picks along the last dim, x.split(n) along the first. Ops
# not here have no default dim, or a default of None meaning every element (argmax, median)
_ATEN_DEFAULT_DIM = {"topk": -1, "kthvalue": -1, "sort": -1, "argsort": -1, "glu": -1, "diff": -1,
                     "split": 0, "split_with_sizes": 0, "chunk": 0, "unbind": 0, "slice": 0, "tensor_split": 0,
                     "slice_scatter": 0}


def _aten_name(target: str) -> str | None:
    """aten.topk.default -> topk (None for a call that is not an ATen op)."""
    return target.split(".")[1] if target.startswith("aten.") else None


def _aten_dims(node: Node, position, keyword, rank) -> tuple[int, ...] | None:
    """The dims named by a torch_call's dim argument, non-negative (None: every dim)."""
    args, kwargs = node.attrs["args"], dict(node.attrs["kwargs"])
    dim = args[position] if position is not None and len(args) > position else kwargs.get(keyword)
    if dim is None and keyword not in kwargs:
        dim = _ATEN_DEFAULT_DIM.get(_aten_name(str(node.attrs.get("target", ""))))
    if dim is None or (isinstance(dim, (list, tuple)) and not dim):
        return None
    dims = (dim,) if isinstance(dim, int) else tuple(dim) if isinstance(dim, (list, tuple)) else None
    if dims is None or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims) or not rank:
        return None  # not a dim this can read: taken as every dim
    return tuple(d % rank for d in dims)


def _view_keeps_tokens(x: Value, out: Value, seq, batch) -> bool:
    """A reshape of `x` to `out` keeps each token's elements together, after a dim that still
    counts the tokens (T, or B*T merged): [B, T, H, D] -> [B, T, H*D], [B*H, T, D] -> [B, H, T, D],
    [B, T, D] -> [B*T, D]. Not [B, T, D] -> [B, T*D] or a reshape of [B, T, D] to [T, B, D]."""
    def product(dims):
        return sympy.Mul(*[sympy.sympify(d) for d in dims])

    for i, d in enumerate(x.shape):
        if not _is_length(d, batch, seq):
            continue
        inner = product(x.shape[i + 1:])
        if not any(_mentions(out.shape[k - 1], seq) and sympy.simplify(product(out.shape[k:]) - inner) == 0
                   for k in range(1, out.rank + 1)):
            return False
    return True


def _product(dims):
    return sympy.Mul(*[sympy.sympify(d) for d in dims])


def _divides(a, b) -> bool:
    """The size `a` divides the size `b` for every value of their symbols (b / a is a
    polynomial: 32 divides 32*B, 64 does not divide 32*B)."""
    a, b = sympy.sympify(a), sympy.sympify(b)
    if a.is_Integer and b.is_Integer:
        return a != 0 and b % a == 0
    return sympy.fraction(sympy.cancel(b / a))[1] == 1


# the two orders of a dim of B*T tokens: batch-major ([B, T] flattened: row b*T + t) or
# sequence-first ([T, B] flattened, as nn.MultiheadAttention's [T, B, D] layout gives: row t*B + b);
# MIXED: tokens of both orders met in one op, whose B*T dim has no one order
BATCH_MAJOR, SEQ_FIRST, MIXED = "bt", "tb", "mixed"


def _token_stride(x: tuple, seq, batch, order) -> object | None:
    """S such that the element at flat (row-major) index f of a tensor of shape `x` belongs
    to token floor(f / S) mod T: the size of one token's block. None where `x` does not say:
    T in several dims or inside another expression, or a B*T dim of no known order."""
    along = [i for i, d in enumerate(x) if _mentions(d, seq)]
    if len(along) != 1:
        return None
    i = along[0]
    inner = _product(x[i + 1:])
    if dims_equal(x[i], seq):
        return inner
    if dims_equal(x[i], batch * seq) and order in (BATCH_MAJOR, SEQ_FIRST):
        return inner if order == BATCH_MAJOR else inner * batch
    return None


def _view_tokens(x: Value, out: Value, seq, batch, order) -> tuple[bool | None, str | None]:
    return _reshape_tokens(tuple(x.shape), tuple(out.shape), seq, batch, order)


@functools.lru_cache(maxsize=4096)  # a model repeats its layers' few reshapes
def _reshape_tokens(x: tuple, out: tuple, seq, batch, order) -> tuple[bool | None, str | None]:
    """Whether a reshape of `x` to `out` keeps each element with its token, in a dim that
    still names the tokens: (True, the order of out's B*T dim, if it has one), (False, None)
    when a dim of `out` without T runs across tokens (then an op over it, a linear say,
    would mix them), (None, None) when `x`'s tokens cannot be read (_token_stride).
    With token t at flat index f in floor(f / S) mod T, each dim of `out` must be T at
    stride S, B*T at stride S (batch-major) or S / B (sequence-first), k*B*T at stride S or
    S / k (k values per token, batch-major), or, without T, lie
    within one token's block (its size times its stride divides S) or step over whole
    sequences (its stride a multiple of S * T). Both [B, T, H, D] -> [B*T, H*D] and
    nn.MultiheadAttention's [T, B, H, D] -> [T*B, H*D] keep one token per row."""
    stride_t = _token_stride(x, seq, batch, order)
    if stride_t is None:
        return None, None
    out_order = None
    for k, d in enumerate(out):
        stride = _product(out[k + 1:])
        if not _mentions(d, seq):
            if _divides(d * stride, stride_t) or _divides(stride_t * seq, stride):
                continue
            return False, None
        if dims_equal(d, seq) and dims_equal(stride, stride_t):
            continue
        if dims_equal(d, batch * seq) and dims_equal(stride, stride_t):
            out_order = BATCH_MAJOR
        elif dims_equal(d, batch * seq) and dims_equal(stride * batch, stride_t):
            out_order = SEQ_FIRST
        elif _token_count(d, batch, seq) and (dims_equal(stride, stride_t)
                                              or dims_equal(stride * d / (batch * seq), stride_t)):
            # k*B*T (a mixture-of-experts' top-k weights flattened, [B*T, k] or [k, B*T]): the
            # tokens batch-major, k values each; left without an order, as B*T dims were before
            continue
        else:
            return False, None
    return True, out_order


def _view_problem(x: Value, out: Value, seq, batch, orders: dict | None) -> str | None:
    """Why a reshape of `x` to `out` may put different tokens in one row (None: it keeps
    each token's elements in rows of their own)."""
    order = (orders or {}).get(x)
    if order == MIXED:
        return ("reshapes a dim of B*T tokens that holds tokens flattened in both orders (batch-major [B, T] "
                "and sequence-first [T, B], met in one op), so which row is which token depends on the length. "
                "Keep one layout: flatten [B, T, ...] (batch_first=True) or [T, B, ...] throughout")
    keeps, _ = _view_tokens(x, out, seq, batch, order)
    if keeps is None:
        keeps = _view_keeps_tokens(x, out, seq, batch)
    return None if keeps else "reshapes across the sequence (the elements of different tokens end up in one row)"


def _is_view(node: Node) -> bool:
    return len(node.outputs) == 1 and node.inputs and isinstance(node.inputs[0].type, TensorType) and (
        node.op == "view" or node.op == "torch_call" and _aten_name(node.attrs["target"]) in _ATEN_VIEWS)


def _token_orders(graph: Graph, seq, batch) -> dict[Value, str]:
    """The order of each value's B*T dim where the graph says it: a reshape that merges
    [B, T] gives batch-major, one that merges [T, B] sequence-first (_view_tokens); other
    ops keep their inputs' order (a linear over [B*T, D] rows keeps the rows). Sequence-first
    tokens meeting tokens of another or unknown order in one op give MIXED. A B*T dim of no known order (from an op this
    does not follow) is left out, and its reshapes are judged as before
    (_view_keeps_tokens)."""
    orders: dict[Value, str] = {}

    def has_tokens(v) -> bool:
        return isinstance(v.type, TensorType) and any(dims_equal(d, batch * seq) for d in v.shape)

    for n in graph.nodes:
        if _is_view(n):
            keeps, order = _view_tokens(n.inputs[0], n.outputs[0], seq, batch, orders.get(n.inputs[0]))
            if keeps and order is not None:
                orders[n.outputs[0]] = order
            elif orders.get(n.inputs[0]) == MIXED and has_tokens(n.outputs[0]):
                orders[n.outputs[0]] = MIXED
            continue
        seen = {orders.get(v) for v in n.inputs if has_tokens(v)}
        if not seen or seen == {None}:
            continue
        # an unknown order was taken as batch-major before the orders were followed
        order = MIXED if MIXED in seen or SEQ_FIRST in seen and len(seen) > 1 else (seen - {None}).pop()
        for v in n.outputs:
            if has_tokens(v):
                orders[v] = order
    return orders


def _indexing_mixes(node: Node, x: Value, seq, batch) -> str | None:
    """x[indices] and x[indices] = values (integer indices along T are refused by
    _moves_along_the_sequence before this). A boolean mask over the tokens compacts them
    (x[mask]) or writes them in mask order, unless it writes one value (a masked fill); an
    integer-indexed write whose destination has no sequence dim gathers tokens into it."""
    from ..ir.ops import Arg

    args = node.attrs["args"]
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    index_values = [node.inputs[ix.index] for ix in indices if isinstance(ix, Arg)]
    masks = [v for v in index_values if v.dtype == torch.bool]
    writes = node.attrs["target"].startswith("aten.index_put")
    values = node.inputs[args[2].index] if writes and len(args) > 2 and isinstance(args[2], Arg) else None
    if any(_carries_length(m, seq, batch) for m in masks) and not (writes and values is not None and values.rank == 0):
        return "selects or writes the tokens by a boolean mask (the result depends on the whole sequence)"
    if writes and not _carries_length(x, seq, batch):
        return "writes the tokens into a tensor without a sequence dim (it gathers them from the whole sequence)"
    return None


def _mixes_tokens(node: Node, seq, batch, orders: dict | None = None) -> str | None:
    """Why `node` may combine values of different tokens (None: each token's result reads
    only that token's inputs). An allow-list: an op the pass does not know, with an input
    along the sequence, is taken to mix tokens. Reductions, scans, convolutions, matmuls and
    moves along T are checked before this, each with its own message. `orders`: the token
    order of B*T dims (_token_orders), which a reshape of them needs."""
    tensors = [v for v in node.inputs if isinstance(v.type, TensorType)]
    if _is_view(node) and (orders or {}).get(node.inputs[0]) is not None:
        # rows of B*T tokens in a known order: read back as [B, T] or [T, B] only in that order
        return _view_problem(node.inputs[0], node.outputs[0], seq, batch, orders)
    if not any(_carries_length(v, seq, batch) for v in tensors):
        return None
    spec = OPS[node.op]
    if spec.kind == "pointwise" or node.op in (
            "permute", "expand", "unsqueeze", "squeeze", "cast", "slice", "select", "cat", "repeat_interleave",
            "matmul", "attention", "paged_attention", "rope_attention", "kv_append", "paged_kv_write",
            "all_reduce"):
        return None  # token by token, or checked elsewhere (moves along T, matmuls, the attention itself)
    x = tensors[0] if tensors else None
    if node.op == "view":
        return _view_problem(x, node.outputs[0], seq, batch, orders)
    if node.op in ("linear", "quant_linear", "linear_fused"):
        return None if not _is_length(x.shape[-1], batch, seq) else "contracts over the sequence"
    if node.op == "embedding":
        return None if not _carries_length(node.inputs[0], seq, batch) else \
            "looks up rows of a table over the sequence (values of other tokens)"
    if node.op in ("tril", "triu"):
        return None if not any(_is_length(d, batch, seq) for d in x.shape[-2:]) else \
            "masks by position along the sequence (which value it keeps depends on the token's place)"
    if node.op == "all_gather":
        return None if not _is_length(x.shape[node.attrs["dim"] % x.rank], batch, seq) else \
            "gathers along the sequence"
    if node.op == "fused_pointwise":
        row = node.attrs.get("row") is not None
        return None if not (row and any(v.rank and _is_length(v.shape[-1], batch, seq) for v in tensors)) else \
            "reduces rows along the sequence"
    if node.op == "sdpa":
        return "attends over the sequence outside a fused attention op (fuse_attention did not take it)"
    if node.op != "torch_call":
        return ("is an op the kv_cache pass does not know to act on each token by itself (its result at one "
                "token may read other tokens)")
    target = node.attrs["target"]
    name = _aten_name(target)
    rank = x.rank if x is not None else 0
    if name in _ATEN_ELEMENTWISE or target.startswith(("aten.max.other", "aten.min.other")):
        return None  # (max.other: torch.max(x, y), elementwise)
    if target.startswith(("aten.index.Tensor", "aten.index_put")):
        return _indexing_mixes(node, x, seq, batch)
    if name in ("prelu", "_prelu_kernel"):
        # one slope: elementwise; one slope per channel, along dim 1: per position where
        # dim 1 is T (token t scaled by slope t), which a step of new tokens would not see
        slopes = node.inputs[1] if len(node.inputs) > 1 else None
        per_channel = slopes is None or not isinstance(slopes.type, TensorType) or \
            sympy.Mul(*[sympy.sympify(d) for d in slopes.shape]) != 1
        return None if not (per_channel and rank > 1 and _is_length(x.shape[1], batch, seq)) else \
            "scales each position along the sequence by its own slope (prelu's channels are dim 1)"
    if name == "repeat" and len(node.attrs["args"]) > 1 and isinstance(node.attrs["args"][1], (list, tuple)):
        repeats = node.attrs["args"][1]
        lead = len(repeats) - rank
        return None if lead >= 0 and all(repeats[lead + d] == 1 for d in range(rank)
                                         if _is_length(x.shape[d], batch, seq)) else \
            "tiles the sequence (repeats the tokens along it)"
    if name in _ATEN_VIEWS and len(node.outputs) == 1:
        return _view_problem(x, node.outputs[0], seq, batch, orders)
    over = None
    if name in _ATEN_OVER_DIMS:
        over = _aten_dims(node, *_ATEN_OVER_DIMS[name], rank)
        over = tuple(range(rank)) if over is None else over
    elif name in _ATEN_OVER_LAST_DIMS:
        args = node.attrs["args"]
        shape = args[1] if len(args) > 1 else dict(node.attrs["kwargs"]).get("normalized_shape")
        over = tuple(range(rank - len(shape), rank)) if isinstance(shape, (list, tuple)) else tuple(range(rank))
    elif name in _ATEN_ALONG_ONE_DIM:
        over = _aten_dims(node, *_ATEN_ALONG_ONE_DIM[name], rank)
        if over is None or len(over) != 1:
            over = tuple(range(rank))  # no dim: over the flattened tensor
    if over is not None:
        return None if not any(_is_length(x.shape[d], batch, seq) for d in over) else \
            "reduces, normalizes or runs over the sequence outside attention"
    return ("is an op the kv_cache pass does not know to act on each token by itself (its result at one token "
            "may read other tokens: a reduction, a normalization, an FFT, a pooling or an interpolation over the "
            "sequence)")


def _sizes_in(value):
    """(expr, inside a list) for each sympy expression in an attr value: a torch_call's
    size arguments (expand's or new_full's shape) are lists, its argument tuple is not."""
    for leaf, trail in attr_leaves(value):
        if isinstance(leaf, sympy.Basic):
            yield leaf, any(isinstance(container, list) for container, _ in trail)


def _length_in_a_value(node: Node, seq, batch, cache_len) -> object | None:
    """An expression in `node`'s attributes that uses the length T as a value (a constant,
    a fill, an index, a clamp bound, a scalar argument), not as the size of a dim along the
    sequence; None if there is none. Left to the other checks: creation ops' start, end and
    shape (_check_no_other_length_ops), slices and selects along T (_moves_along_the_sequence),
    normalized shapes (_check_nothing_runs_along_the_sequence); view and expand shapes are
    sizes; a table slice [L, L + T) is the positions the pass placed."""
    a = node.attrs
    for key, value in a.items():
        if key == "shape":
            continue  # sizes (a view's, a norm's, a full's: _check_no_other_length_ops checks full's)
        if OPS[node.op].kind == "creation" and key in ("start", "end", "step"):
            continue
        if node.op in ("slice", "select") and node.inputs and isinstance(node.inputs[0].type, TensorType):
            x = node.inputs[0]
            if _is_length(x.shape[a["dim"] % x.rank], batch, seq):
                continue  # along the sequence: _moves_along_the_sequence decides
            if node.op == "slice" and cache_len is not None and _mentions(a["start"], cache_len) \
                    and dims_equal(a["start"], cache_len) and isinstance(a["end"], sympy.Basic) \
                    and dims_equal(a["end"], cache_len + seq):
                continue  # a position table's rows [L, L + T): the positions the pass placed
        dims = []
        if node.op == "torch_call" and key in ("args", "kwargs"):
            dims = [d for v in node.inputs + node.outputs if isinstance(v.type, TensorType) for d in v.shape]
        for expr, in_list in _sizes_in(value):
            if not _is_length(expr, batch, seq):
                continue
            if in_list and any(dims_equal(expr, d) for d in dims):
                continue  # a size argument (a shape to expand or fill to) that is a dim of its tensors
            return expr
    return None
