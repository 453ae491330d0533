"""Finding an attention layer's projections in the graph: the linear projections that feed
a fused attention's Q, K and V (through head reshapes and rotary embeddings), and the
output projection it feeds. gqa merges K/V heads with them; shard slices them by heads.

Separate q/k/v_proj linears qualify, and so do slices of a fused qkv projection: GPT-2's
c_attn (a matmul on W[in, out] plus a bias, sliced), Phi-3's qkv_proj (a linear, sliced)
and GPT-NeoX's per-head interleaved layout. A Projection always gives its weight as
[out, in] (the rows of its heads, in head order).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..ir.builder import Builder
from ..ir.graph import Graph, Node, Value
from ..ir.ops import attention_has_bias
from ..ir.types import dims_equal

# Ops allowed between a K/V projection and the attention: head split/merge and rotary.
_CHAIN_OPS = ("view", "permute", "cast", "mul", "add", "sub", "neg", "slice", "cat", "unsqueeze", "fused_pointwise")
_PLAIN_CHAIN = ("view", "permute", "cast")  # no position-dependent op: any rotation commutes


@dataclass
class Projection:
    """y = x @ weight.T + bias as the model computes it, where `out` is the value holding
    y (possibly a slice of a fused projection, reshaped)."""

    x: Value
    weight: torch.Tensor  # [out, in]
    bias: torch.Tensor | None
    out: Value
    name: str
    fused: bool = False  # a slice of a wider projection (GPT-2's c_attn)
    head_dim: int | None = None  # set when `out` already has heads split, [..., heads, D] (GPT-NeoX)
    head_permute: tuple | None = None  # and then permuted (heads before T)


@dataclass
class OutProjection:
    node: Node
    weight: Value  # the param input of the node
    tensor: torch.Tensor
    rows_are_inputs: bool  # matmul(x, W[in, out]) (True) or linear(x, W[out, in]) (False)


@dataclass
class Layer:
    attn: Node
    q: Projection
    k: Projection
    v: Projection
    o: OutProjection | None
    k_plain: bool  # no position-dependent op between k_proj and the attention
    heads: int
    kv_heads: int
    head_dim: int
    plan: dict = field(default_factory=dict)


def _param(graph: Graph, v: Value) -> torch.Tensor | None:
    return graph.params.get(v.param) if v.param else None


def _projection(graph: Graph, producers, start: Value, head_dim: int) -> Projection | None:
    """Walk back from an attention input through head reshapes and rotary ops to the one
    linear projection that feeds it."""
    found = _projections_behind(graph, producers, start, head_dim, lambda node: node.op in _CHAIN_OPS)
    return found[0] if len(found) == 1 else None


def _projections_behind(graph: Graph, producers, start: Value, head_dim: int, follow) -> list[Projection]:
    """The linear projections found walking back from `start` through the nodes `follow`
    lets the walk pass (a projection ends a path)."""
    found, seen, stack = [], set(), [start]
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        node = producers.get(v)
        if node is None:
            continue
        proj = _as_projection(graph, producers, node, v, head_dim)
        if proj is not None:
            found.append(proj)
        elif follow(node):
            stack.extend(node.inputs)
    return found


def _as_projection(graph: Graph, producers, node: Node, v: Value, head_dim: int) -> Projection | None:
    if node.op == "linear":
        w = _param(graph, node.inputs[1])
        b = _param(graph, node.inputs[2]) if len(node.inputs) > 2 else None
        if w is not None and (len(node.inputs) < 3 or b is not None):
            return Projection(node.inputs[0], w, b, v, node.inputs[1].param)
        return None
    # slice(view(add(matmul(x, W[in, out]), b)), last dim) -- a fused qkv projection (GPT-2)
    if node.op == "slice" and node.attrs["step"] == 1 and node.attrs["dim"] % v.rank == v.rank - 1:
        src = producers.get(node.inputs[0])
        start, end = int(node.attrs["start"]), int(node.attrs["end"])
        if src is not None and src.op == "view" and src.inputs[0].shape[-1] == src.outputs[0].shape[-1]:
            src = producers.get(src.inputs[0])
        elif src is not None and src.op in ("view", "permute"):
            # q, k, v interleaved per head (GPT-NeoX): a head-dim-wide slice of the split
            # heads; a narrower one is a slice within heads (rotary's halves): walk on
            dims = tuple(src.attrs["dims"]) if src.op == "permute" else None
            view = producers.get(src.inputs[0]) if src.op == "permute" else src
            if end - start == head_dim and view is not None and view.op == "view" and _splits_last_dim(view) \
                    and (dims is None or dims[-1] == v.rank - 1):
                return _interleaved_projection(graph, producers, view, start, end, v, dims)
            return None
        if src is not None and src.op == "linear":  # linear(x, W[out, in], [b]) sliced (Phi-3's qkv_proj)
            w = _param(graph, src.inputs[1])
            b = _param(graph, src.inputs[2]) if len(src.inputs) > 2 else None
            if w is None or (len(src.inputs) > 2 and b is None):
                return None
            return Projection(src.inputs[0], w[start:end].clone(), None if b is None else b[start:end].clone(), v,
                              src.inputs[1].param, fused=True)
        bias = None
        if src is not None and src.op == "add":
            bias = _param(graph, src.inputs[1])
            src = producers.get(src.inputs[0]) if bias is not None else None
        if src is not None and src.op == "matmul":
            w = _param(graph, src.inputs[1])
            if w is not None and w.dim() == 2:
                return Projection(src.inputs[0], w[:, start:end].t().contiguous(),
                                  None if bias is None else bias[start:end].clone(), v, src.inputs[1].param,
                                  fused=True)
    return None


def _splits_last_dim(view: Node) -> bool:
    """view [..., H * X] -> [..., H, X] (the leading dims unchanged)."""
    a, b = view.inputs[0].shape, view.outputs[0].shape
    return len(b) == len(a) + 1 and a[:-1] == b[:-2] and b[-1].is_number and b[-2].is_number \
        and int(b[-1]) * int(b[-2]) == a[-1]


def _interleaved_projection(graph: Graph, producers, view: Node, start: int, end: int, v: Value, dims):
    """slice([permute(]view(linear(x, W), [..., H, X])[)], last dim, s, e): per head h the
    rows h * X + s .. h * X + e of W (GPT-NeoX lays q, k, v out per head)."""
    src = producers.get(view.inputs[0])
    if src is None or src.op != "linear":
        return None
    w = _param(graph, src.inputs[1])
    b = _param(graph, src.inputs[2]) if len(src.inputs) > 2 else None
    if w is None or (len(src.inputs) > 2 and b is None):
        return None
    heads, width = int(view.outputs[0].shape[-2]), int(view.outputs[0].shape[-1])
    rows = torch.cat([torch.arange(h * width + start, h * width + end) for h in range(heads)])
    return Projection(src.inputs[0], w[rows].clone(), None if b is None else b[rows].clone(), v,
                      src.inputs[1].param, fused=True, head_dim=end - start, head_permute=dims)


def _out_projection(graph: Graph, users, attn_out: Value) -> OutProjection | None:
    v = attn_out
    for _ in range(4):
        nxt = users.get(v, [])
        if len(nxt) != 1:
            return None
        node = nxt[0]
        if node.op in ("permute", "view"):
            v = node.outputs[0]
            continue
        if node.op == "linear" and node.inputs[0] is v and _param(graph, node.inputs[1]) is not None:
            return OutProjection(node, node.inputs[1], _param(graph, node.inputs[1]), rows_are_inputs=False)
        if node.op == "matmul" and node.inputs[0] is v and _param(graph, node.inputs[1]) is not None:
            return OutProjection(node, node.inputs[1], _param(graph, node.inputs[1]), rows_are_inputs=True)
        return None
    return None


def _chain_nodes(graph: Graph, proj_out: Value, target: Value) -> list[Node] | None:
    """Nodes on paths from the projection output to the attention input, in order (None
    when one is not a reshape, cast or rotary op: `_chain_between` says which)."""
    chain = _chain_between(graph, proj_out, target)
    return None if any(n.op not in _CHAIN_OPS for n in chain) else chain


def _chain_between(graph: Graph, proj_out: Value, target: Value) -> list[Node]:
    """Every node on a path from the projection output to the attention input, in order."""
    users = graph.users()
    down, stack = set(), [proj_out]
    while stack:
        for n in users.get(stack.pop(), []):
            if id(n) not in down:
                down.add(id(n))
                stack.extend(n.outputs)
    producers = graph.producers()
    up, stack = set(), [target]
    while stack:
        n = producers.get(stack.pop())
        if n is not None and id(n) not in up:
            up.add(id(n))
            stack.extend(n.inputs)
    return [n for n in graph.nodes if id(n) in down and id(n) in up]


_NORM_OPS = ("mean", "sum", "pow", "rsqrt", "sqrt", "div", "rms_norm", "layer_norm", "amax")


def _chain_problem(k_chain: list[Node], v_chain: list[Node], k_proj: Projection | None = None) -> str | None:
    """Why the ops between the K/V projections and the attention are not only head
    reshapes and a rotate-half rotary (None: they are), naming the op."""
    bad = [n for n in k_chain if n.op not in _CHAIN_OPS] + [n for n in v_chain if n.op not in _PLAIN_CHAIN]
    return _ops_in_the_way(bad, "K/V") or (_per_head_operand(k_proj, k_chain, "K") if k_proj else None)


# rotary's ops: a table operand (cos, sin) must be the same for every head; neg and the
# rotate-half slices and cat take none
_OPERAND_OPS = ("mul", "add", "sub", "fused_pointwise")


def _per_head_operand(proj: Projection, chain: list[Node], which: str) -> str | None:
    """The first op on the chain from `proj` to the attention that is not the same map on
    every head (None: there is none), said in words: an operand that differs along the
    heads axis (a learned per-channel scale or bias k * p[H * D], a per-head scale
    k * s[H, 1, 1]), a product of K with itself, or an op that moves values across
    heads. Rotary's cos/sin tables broadcast over the heads axis and pass: merging or
    splitting heads commutes with a map applied alike to each head, not with one that
    differs per head."""
    axes = _head_axes(proj, chain)
    for node in chain:
        axis = axes.get(node.outputs[0])
        if node.op not in _OPERAND_OPS and axis is not None:
            continue
        if axis is None:
            kind = "an op that moves values across its heads (or one whose heads axis cannot be followed)"
        else:
            on_chain = [v for v in node.inputs if v in axes]
            other = [v for v in node.inputs if v not in axes and _varies_along(v, node.outputs[0].rank, axis)]
            if node.op == "mul" and len(on_chain) > 1:
                kind = f"a product of {which} with itself (not linear)"
            elif other:
                v = other[0]
                what = f"parameter {v.param!r} {v.type}" if v.param else f"a {v.type} tensor"
                kind = (f"a learned scale or bias that differs per {which} head or channel ({what}), not a head "
                        "reshape or a rotary embedding (whose cos/sin tables are the same for every head)")
            else:
                continue
        name = node.attrs.get("target", "") if node.op == "torch_call" else node.op
        return f"the op {name}{node.where()} between the {which} projection and the attention is {kind}"
    return None


def _varies_along(v: Value, rank: int, axis: int) -> bool:
    """Whether `v`, broadcast against a rank-`rank` value, has more than one entry along `axis`."""
    i = axis - (rank - v.rank)
    return 0 <= i < v.rank and not dims_equal(v.shape[i], 1)


def _head_axes(proj: Projection, chain: list[Node]) -> dict[Value, int | None]:
    """For the projection's output and each value on the chain, the axis that holds its
    heads (the H * D features before the head split, H after): None where an op mixes
    them or the walk cannot follow (an op that slices or concatenates along it)."""
    out = proj.out
    if proj.head_dim is None:
        axes: dict[Value, int | None] = {out: out.rank - 1}
    else:  # GPT-NeoX: heads split at -2, then maybe permuted
        axis = out.rank - 2
        axes = {out: proj.head_permute.index(axis) if proj.head_permute is not None else axis}
    for node in chain:
        ins = [axes[v] for v in node.inputs if v in axes]
        y = node.outputs[0]
        if not ins or any(a is None or a != ins[0] for a in ins):
            axes[y] = None
            continue
        a, src = ins[0], next(v for v in node.inputs if v in axes)
        if node.op in ("cast", "neg") or node.op in _OPERAND_OPS:
            axes[y] = a + (y.rank - src.rank)
        elif node.op == "view":
            axes[y] = (y.rank - 2 if a == src.rank - 1 and _splits_last_dim(node) else
                       a if y.shape == src.shape else None)
        elif node.op == "permute":
            dims = [d % y.rank for d in node.attrs["dims"]]
            axes[y] = dims.index(a)
        elif node.op == "unsqueeze":
            d = node.attrs["dim"] % y.rank
            axes[y] = a + (d <= a)
        elif node.op in ("slice", "cat"):
            axes[y] = None if node.attrs["dim"] % y.rank == a else a
        else:
            axes[y] = None
    return axes


_COMPLEX_ROTARY = ("aten.view_as_complex", "aten.view_as_real", "aten.complex", "aten.polar")


def _ops_in_the_way(bad: list[Node], which: str) -> str | None:
    """`bad`: the ops on the path from a projection to the attention's `which` input that
    are not head reshapes or a rotate-half rotary; what they are, naming the op that says
    so (else the first)."""
    if not bad:
        return None

    def target(n):
        return n.attrs.get("target", "") if n.op == "torch_call" else ""

    complex_ops = [n for n in bad if target(n).startswith(_COMPLEX_ROTARY)]
    stacks = [n for n in bad if target(n).startswith("aten.stack")]
    # K/V of one head given a head axis by unsqueeze: multi-query attention (GPTBigCode)
    one_head = [n for n in bad if n.op == "unsqueeze" and which == "K/V" and n.inputs[0].rank == 3
                and n.outputs[0].rank == 4 and n.outputs[0].shape[1] == 1]
    # one head broadcast to every head: DeepSeek's multi-latent attention shares its rotary key part
    shared_head = [n for n in bad if n.op == "expand" and which != "Q" and n.inputs[0].rank == 4
                   and n.inputs[0].shape[1] == 1 and n.outputs[0].shape[1] != 1]
    node = (complex_ops or stacks or one_head or shared_head or bad)[0]
    if complex_ops:
        kind = ("an interleaved rotary embedding (rotating adjacent pairs of dims as complex numbers, "
                "view_as_complex: Meta's llama); only the rotate-half layout (transformers' rotate_half) is handled")
    elif stacks:
        kind = ("an interleaved rotary embedding (rotating adjacent pairs of dims, split with reshape(..., -1, 2) "
                "or x[..., ::2] and put back with stack: GPT-J, CodeGen, Cohere, llama2.c, gpt-fast); only the "
                "rotate-half layout (transformers' rotate_half) is handled")
    elif one_head:
        kind = ("a new head axis for a single K/V head: multi-query attention (GPTBigCode's multi_query=True), "
                "where every query head already shares one K/V head, so there are no K/V heads to merge or split")
    elif shared_head:
        kind = ("one head's keys broadcast to every head (multi-latent attention: DeepSeek-V2/V3 decompress K/V "
                "from one shared latent and give every head the same rotary key part), so the heads are not "
                "separate projections that could be merged or split")
    elif any(n.op in _NORM_OPS for n in bad):
        node = next(n for n in bad if n.op in _NORM_OPS)
        kind = (f"a norm of the {'queries' if which == 'Q' else 'keys'} (q/k-norm: Qwen3, OLMo2, Gemma3): it is "
                "not linear, so merging heads before it is not merging what the attention reads")
    else:
        kind = "not a head reshape or a rotary embedding"
    name = target(node) or node.op
    return f"the op {name}{node.where()} between the {which} projection and the attention is {kind}"


def _missing_projection_problem(graph: Graph, producers, start: Value, head_dim: int, which: str) -> str | None:
    """Why no single projection was found for an attention input: the op in the way between
    the nearest linear projection(s) and the attention (None when there is none to name)."""
    # any op but another layer's work (a product, an attention) may be on the way
    found = _projections_behind(graph, producers, start, head_dim,
                                lambda node: node.op not in ("linear", "matmul", "attention"))
    bad: list[Node] = []
    for proj in found:
        bad += [n for n in _chain_between(graph, proj.out, start) if n.op not in _CHAIN_OPS and n not in bad]
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    bad.sort(key=lambda n: order[id(n)])
    return _ops_in_the_way(bad, which)


def find_layers(graph: Graph, error=ValueError, who: str = "", why: str = "", masks: bool = False) -> list[Layer]:
    """Every fused attention's projections, in graph order. A layer that does not fit raises
    `error` with a message starting `who: ` and saying `why` the pass needs them.
    masks=False refuses an attention with a mask (bias) input."""
    producers, users = graph.producers(), graph.users()
    layers = []
    for n in graph.nodes:
        if n.op != "attention":
            continue
        q, k, v = n.inputs[:3]
        where = f"\n  at: attention{n.where()}"
        if attention_has_bias(n) and not masks:
            raise error(f"{who}: this attention has a mask input; {who} handles masks built from shapes only "
                        "(causal), so capture without attention_mask" + where)
        projs = [_projection(graph, producers, x, int(k.shape[3])) for x in (q, k, v)]
        if any(p is None for p in projs):
            i = [p is None for p in projs].index(True)
            which = ["Q", "K", "V"][i]
            problem = _missing_projection_problem(graph, producers, (q, k, v)[i], int(k.shape[3]), which)
            if problem:
                raise error(f"{who}: {problem}, {why}" + where)
            raise error(f"{who}: the {which} input of this attention is not one linear projection of the hidden "
                        f"state (through head reshapes and rotary embeddings), {why}" + where)
        heads, kv_heads, head_dim = int(q.shape[1]), int(k.shape[1]), int(k.shape[3])
        k_chain = _chain_between(graph, projs[1].out, k)
        v_chain = _chain_between(graph, projs[2].out, v)
        problem = _chain_problem(k_chain, v_chain, projs[1])
        if problem:
            raise error(f"{who}: {problem}" + where)
        for p in projs[1:]:
            if p.weight.shape[0] != kv_heads * head_dim:
                raise error(f"{who}: projection {p.name} has {p.weight.shape[0]} outputs, not {kv_heads} heads x "
                            f"{head_dim}" + where)
        layers.append(Layer(n, *projs, _out_projection(graph, users, n.outputs[0]),
                            all(c.op in _PLAIN_CHAIN for c in k_chain), heads, kv_heads, head_dim))
    return layers


def shared_projection(layer: Layer, producers) -> str | None:
    """Which two of the layer's Q, K and V read one projection (None: each has its own),
    in words: attention(q, q, v) gives K the queries; a tied k_proj / v_proj gives K and
    V one weight. Merging K and V heads rewrites each separately, so a shared one cannot
    be rewritten for both."""
    roles = (("Q", layer.q), ("K", layer.k), ("V", layer.v))
    for i, (a, pa) in enumerate(roles):
        for b, pb in roles[i + 1:]:
            same = pa.out is pb.out or producers.get(pa.out) is producers.get(pb.out) or \
                (pa.name == pb.name and not pa.fused and not pb.fused)
            if same:
                what = "the keys are the queries" if (a, b) == ("Q", "K") else f"{a} and {b} are one projection"
                return f"{b} reads the same projection as {a} ({pa.name}: {what})"
    return None


def other_reader(graph: Graph, layer: Layer, proj: Projection, which: str) -> str | None:
    """An op other than the attention that reads the projection's output or a value on
    its way to the attention (a value residual h + v_proj(x), a feature computed from
    k_proj(x)), in words (None: there is none). Rewriting the projection would hand
    that reader the rewritten (merged, sliced) values instead of the model's."""
    target = layer.attn.inputs[("Q", "K", "V").index(which)]
    chain = _chain_between(graph, proj.out, target)
    on_path = {id(n) for n in chain} | {id(layer.attn)}
    values = [proj.out] + [v for n in chain for v in n.outputs]
    users = graph.users()
    outputs = set(graph.outputs)
    for v in values:
        for n in users.get(v, []):
            if id(n) not in on_path:
                name = n.attrs.get("target", "") if n.op == "torch_call" else n.op
                return (f"the op {name}{n.where()} also reads {which} (the output of {proj.name}, or a value "
                        "between it and the attention)")
        if v in outputs:
            return f"the model also returns {which} (the output of {proj.name}, or a value between it and the attention)"
    return None


def emit_projection(bld: Builder, proj: Projection, x: Value, weight: Value, bias: Value | None) -> Value:
    """linear(x, weight, [bias]) shaped as the model shaped `proj.out` (its heads split and
    permuted where the model split them before slicing), with as many heads as `weight`
    has rows."""
    args = [x, weight] + ([bias] if bias is not None else [])
    y = bld.emit("linear", *args)
    rows = weight.shape[0]
    if proj.head_dim is None:
        shape = proj.out.shape[:-1] + (rows,)
    else:  # the model split heads (and permuted them) before slicing: so do we
        shape = y.shape[:-1] + (rows // proj.head_dim, proj.head_dim)
    if y.shape != shape:
        y = bld.emit("view", y, shape=shape)
    if proj.head_permute is not None:
        y = bld.emit("permute", y, dims=proj.head_permute)
    return y
