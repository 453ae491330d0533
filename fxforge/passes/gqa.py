"""gqa: multi-head attention -> grouped-query attention with G key/value heads (an
approximation, run only when asked: `optimize(model, gqa=G | GQAConfig(...))`).

For every fused `attention(q, k, v)` whose K and V are linear projections of the hidden
state (separate k_proj / v_proj, or slices of a fused qkv projection such as GPT-2's
c_attn, which are split first), the K and V projections shrink from Hkv to G heads:

  "mean"     the GQA paper's conversion (Ainslie et al., 2023): the projection weights
             (and biases) of the heads in a group are averaged. Groups are consecutive
             heads, as GQA checkpoints lay them out.
  "aligned"  uses calibration activations (GQAConfig(calibration=token ids)):
             - each V head is rotated onto its group (orthogonal Procrustes, iterated to a
               common reference) before averaging; the rotation is folded into the output
               projection, which makes it exact;
             - each K head is rotated the same way, folded into the query projection. With
               rotary embeddings the rotation must commute with them: one 2-D rotation per
               frequency pair (closed form). It is kept only if the rotated model equals
               the original on the calibration inputs (checked), else K is only averaged;
             - heads are grouped by similarity after alignment (not just neighbours); the
               query heads are permuted to match, which is exact.
The attention op's K/V inputs get G heads (it maps query head h to KV head h // (H / G)),
so a KV cache inserted afterwards is Hkv / G times smaller.

report(): per layer, the relative error of the attention output on the calibration
inputs (errors of earlier layers included, as the model would see them), and the KV
cache bytes per token before and after.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..ir.builder import Builder
from ..ir.graph import Graph, Node, Value
from ..ir.ops import OPS
from ..ir.types import TensorType

METHODS = ("mean", "aligned")
# Ops allowed between a K/V projection and the attention: head split/merge and rotary.
_CHAIN_OPS = ("view", "permute", "cast", "mul", "add", "sub", "neg", "slice", "cat", "unsqueeze", "fused_pointwise")
_PLAIN_CHAIN = ("view", "permute", "cast")  # no position-dependent op: any rotation commutes


class GQAError(ValueError):
    """The gqa pass cannot convert this model as asked; the message says why and what to do."""


@dataclass(frozen=True)
class GQAConfig:
    num_kv_heads: int
    method: str = "mean"
    calibration: object = None  # token ids [B, T] (or a tuple of the model's inputs)

    def __post_init__(self):
        if not isinstance(self.num_kv_heads, int) or self.num_kv_heads < 1:
            raise GQAError(f"gqa: num_kv_heads must be a positive int, got {self.num_kv_heads!r}")
        if self.method not in METHODS:
            raise GQAError(f"gqa: unknown method {self.method!r}; choose one of {', '.join(METHODS)}")


def as_config(option) -> GQAConfig:
    if isinstance(option, GQAConfig):
        return option
    if isinstance(option, int) and not isinstance(option, bool):
        return GQAConfig(option)
    if isinstance(option, dict):
        return GQAConfig(**option)
    raise TypeError(f"gqa= takes the number of KV heads, a GQAConfig or a dict of its fields, got {option!r}")


# -- finding each layer's projections ----------------------------------------------------------
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


def _projection(graph: Graph, producers, start: Value) -> Projection | None:
    """Walk back from an attention input through head reshapes and rotary ops to the one
    linear projection that feeds it."""
    found, seen, stack = [], set(), [start]
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        node = producers.get(v)
        if node is None:
            continue
        proj = _as_projection(graph, producers, node, v)
        if proj is not None:
            found.append(proj)
            continue
        if node.op in _CHAIN_OPS:
            stack.extend(node.inputs)
    return found[0] if len(found) == 1 else None


def _as_projection(graph: Graph, producers, node: Node, v: Value) -> Projection | None:
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
    """Nodes on paths from the projection output to the attention input, in order."""
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
    chain = [n for n in graph.nodes if id(n) in down and id(n) in up]
    if any(n.op not in _CHAIN_OPS for n in chain):
        return None
    return chain


def find_layers(graph: Graph) -> list[Layer]:
    producers, users = graph.producers(), graph.users()
    layers = []
    for n in graph.nodes:
        if n.op != "attention":
            continue
        q, k, v = n.inputs[:3]
        where = f"\n  at: attention{n.where()}"
        if len(n.inputs) > 3:
            raise GQAError("gqa: this attention has a mask input; gqa handles masks built from shapes only "
                           "(causal), so capture without attention_mask" + where)
        projs = [_projection(graph, producers, x) for x in (q, k, v)]
        if any(p is None for p in projs):
            which = ["Q", "K", "V"][[p is None for p in projs].index(True)]
            raise GQAError(f"gqa: the {which} input of this attention is not one linear projection of the hidden "
                           "state (through head reshapes and rotary embeddings), so its heads cannot be merged" + where)
        heads, kv_heads, head_dim = int(q.shape[1]), int(k.shape[1]), int(k.shape[3])
        k_chain = _chain_nodes(graph, projs[1].out, k)
        v_chain = _chain_nodes(graph, projs[2].out, v)
        if k_chain is None or v_chain is None or any(c.op not in _PLAIN_CHAIN for c in v_chain):
            raise GQAError("gqa: an op between the K/V projection and the attention is not a head reshape or a "
                           "rotary embedding" + where)
        for p in projs[1:]:
            if p.weight.shape[0] != kv_heads * head_dim:
                raise GQAError(f"gqa: projection {p.name} has {p.weight.shape[0]} outputs, not {kv_heads} heads x "
                               f"{head_dim}" + where)
        layers.append(Layer(n, *projs, _out_projection(graph, users, n.outputs[0]),
                            all(c.op in _PLAIN_CHAIN for c in k_chain), heads, kv_heads, head_dim))
    return layers


# -- calibration ---------------------------------------------------------------------------
def run_values(graph: Graph, values: list[Value], inputs: tuple) -> list[torch.Tensor]:
    """Evaluate `values` of `graph` on `inputs` with the torch reference backend."""
    from ..runtime.backends import op_table
    from ..runtime.program import build_program

    probe = graph.with_nodes(graph.nodes, outputs=values)
    device = next(iter(graph.params.values())).device if graph.params else "cpu"
    program = build_program(probe, op_table("torch"), device=device, filename="<fxforge gqa calibration>")
    with torch.no_grad():
        return list(program(*inputs))


def _calibration_inputs(graph: Graph, calibration) -> tuple | None:
    if calibration is None:
        return None
    inputs = calibration if isinstance(calibration, (tuple, list)) else (calibration,)
    if len(inputs) != len(graph.inputs):
        raise GQAError(f"gqa: calibration gives {len(inputs)} inputs but the model takes {len(graph.inputs)} "
                       f"({', '.join(map(str, (v.type for v in graph.inputs)))})")
    for x, v in zip(inputs, graph.inputs):
        if not isinstance(x, torch.Tensor) or x.dim() != v.rank or x.dtype != v.dtype:
            raise GQAError(f"gqa: calibration input must be a {v.type} tensor (e.g. token ids of some text), got "
                           f"{type(x).__name__ if not isinstance(x, torch.Tensor) else (x.dtype, tuple(x.shape))}")
    return tuple(inputs)


# -- planning: groups and rotations ----------------------------------------------------------
def _procrustes(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The orthogonal R minimising ||x R^T - ref|| (x, ref: [N, D])."""
    u, _, vt = torch.linalg.svd(x.T @ ref)
    return (u @ vt).T


def _pair_rotation(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The best R made of one 2-D rotation per rotary frequency pair (i, i + D/2): it
    commutes with rotary embeddings, so folding it into Q and K is exact."""
    half = x.shape[1] // 2
    z = torch.complex(x[:, :half], x[:, half:])
    r = torch.complex(ref[:, :half], ref[:, half:])
    phi = -torch.angle((z * r.conj()).sum(0))
    c, s = torch.cos(phi), torch.sin(phi)
    rot = torch.zeros(x.shape[1], x.shape[1], dtype=x.dtype)
    idx = torch.arange(half)
    rot[idx, idx], rot[idx, idx + half] = c, -s
    rot[idx + half, idx], rot[idx + half, idx + half] = s, c
    return rot


def _align(acts: torch.Tensor, members: list[int], fit, iters: int = 4) -> dict[int, torch.Tensor]:
    """Generalised Procrustes: rotate each member's activations [N, D] onto their mean."""
    ref = acts[:, members[0]]
    rots = {}
    for _ in range(iters):
        rots = {j: fit(acts[:, j], ref) for j in members}
        ref = torch.stack([acts[:, j] @ rots[j].T for j in members]).mean(0)
    return rots


def _distance(acts: torch.Tensor, fit) -> torch.Tensor:
    """Residual after aligning head i onto head j, normalised by the mean energy."""
    h = acts.shape[1]
    d = torch.zeros(h, h)
    for i in range(h):
        for j in range(h):
            if i != j:
                d[i, j] = (acts[:, i] @ fit(acts[:, i], acts[:, j]).T - acts[:, j]).pow(2).sum()
    return d / acts.pow(2).sum(dim=(0, 2)).mean()


def _group(dist: torch.Tensor, size: int) -> list[list[int]]:
    """Greedy: the head whose `size - 1` nearest free heads are closest starts a group."""
    free = list(range(dist.shape[0]))
    groups = []
    while free:
        best = None
        for i in free:
            near = sorted((j for j in free if j != i), key=lambda j: float(dist[i, j] + dist[j, i]))[:size - 1]
            cost = sum(float(dist[i, j] + dist[j, i]) for j in near)
            if best is None or cost < best[0]:
                best = (cost, [i] + near)
        groups.append(sorted(best[1]))
        free = [j for j in free if j not in best[1]]
    return sorted(groups)


def plan_layer(layer: Layer, G: int, method: str, k_acts=None, v_acts=None, rotate_k: bool = True):
    n = layer.kv_heads // G
    eye = torch.eye(layer.head_dim)
    plan = {"groups": [list(range(g * n, (g + 1) * n)) for g in range(G)],
            "rk": [eye] * layer.kv_heads, "rv": [eye] * layer.kv_heads}
    if method == "aligned":
        fit_k = _procrustes if layer.k_plain else _pair_rotation
        if n > 1 and G > 1:
            dist = _distance(v_acts, _procrustes) + (_distance(k_acts, fit_k) if rotate_k else 0)
            plan["groups"] = _group(dist, n)
        for members in plan["groups"]:
            for j, r in _align(v_acts, members, _procrustes).items():
                plan["rv"][j] = r
            if rotate_k:
                for j, r in _align(k_acts, members, fit_k).items():
                    plan["rk"][j] = r
    layer.plan = plan
    return plan


# -- rewriting -------------------------------------------------------------------------------
def _blocks(w: torch.Tensor, d: int) -> list[torch.Tensor]:
    return list(w.reshape(-1, d, *w.shape[1:]).unbind(0))


def _new_weights(layer: Layer, G: int):
    """Q, K, V weights/biases and the output projection's weight for the plan."""
    p, d = layer.plan, layer.head_dim
    per_kv = layer.heads // layer.kv_heads
    kv_order = [j for g in p["groups"] for j in g]
    q_order = [j * per_kv + t for j in kv_order for t in range(per_kv)]  # new query head -> old
    q_kv = [j for j in kv_order for _ in range(per_kv)]  # new query head -> its old KV head

    rk = p["rk"]
    wq = torch.cat([rk[j] @ b for b, j in zip([_blocks(layer.q.weight, d)[h] for h in q_order], q_kv)])
    bq = None if layer.q.bias is None else torch.cat(
        [rk[j] @ b for b, j in zip([_blocks(layer.q.bias, d)[h] for h in q_order], q_kv)])

    def pooled(proj: Projection, rot):
        wb, bb = _blocks(proj.weight, d), _blocks(proj.bias, d) if proj.bias is not None else None
        w = torch.cat([torch.stack([rot[j] @ wb[j] for j in g]).mean(0) for g in p["groups"]])
        b = None if bb is None else torch.cat([torch.stack([rot[j] @ bb[j] for j in g]).mean(0) for g in p["groups"]])
        return w, b

    wk, bk = pooled(layer.k, rk)
    wv, bv = pooled(layer.v, p["rv"])
    wo = None
    if layer.o is not None:
        w = layer.o.tensor
        rv = p["rv"]
        if layer.o.rows_are_inputs:  # [in, out]: row block h
            blocks = _blocks(w, d)
            wo = torch.cat([rv[j] @ blocks[h] for h, j in zip(q_order, q_kv)])
        else:  # [out, in]: column block h
            blocks = _blocks(w.t(), d)
            wo = torch.cat([rv[j] @ blocks[h] for h, j in zip(q_order, q_kv)]).t().contiguous()
    return (wq, bq), (wk, bk), (wv, bv), wo, q_order


def _needs_q_rewrite(layer: Layer, q_order) -> bool:
    """Q changes when heads move or K is rotated; a slice of a fused projection is split
    out anyway, so that the fused matmul (with the old K/V columns) goes away."""
    rotated = any(not torch.equal(r, torch.eye(layer.head_dim)) for r in layer.plan["rk"])
    return q_order != list(range(layer.heads)) or rotated or layer.q.fused


def rewrite(graph: Graph, layers: list[Layer], G: int) -> tuple[Graph, dict]:
    """A new graph with each layer's projections replaced; returns it and, per attention
    node, (new attention output value, query head order) for error measurement."""
    out = graph.with_nodes(graph.nodes)
    producers = graph.producers()
    replace_at: dict[int, list] = {}  # id(node producing a projection's output) -> [(proj, w, b)]
    weight_swap: dict[int, Value] = {}  # id(out-projection node) -> new weight value
    orders = {}
    for layer in layers:
        (wq, bq), (wk, bk), (wv, bv), wo, q_order = _new_weights(layer, G)
        orders[id(layer.attn)] = q_order
        for role, proj, w, b in (("q", layer.q, wq, bq), ("k", layer.k, wk, bk), ("v", layer.v, wv, bv)):
            if proj is layer.q and not _needs_q_rewrite(layer, q_order):
                continue
            replace_at.setdefault(id(producers[proj.out]), []).append((role, proj, w, b))
        if wo is not None:
            weight_swap[id(layer.o.node)] = out.add_param(layer.o.weight.param + ".gqa", wo)
        elif q_order != list(range(layer.heads)) or any(
                not torch.equal(r, torch.eye(layer.head_dim)) for r in layer.plan["rv"]):
            raise GQAError("gqa: cannot find this attention's output projection to fold the head permutation or "
                           f"V rotation into; use method='mean'\n  at: attention{layer.attn.where()}")

    renamed: dict[Value, Value] = {}
    nodes: list[Node] = []
    new_attn: dict[int, Value] = {}
    block_out: dict[int, Value] = {}  # id(old node) -> its output in the new graph
    for node in graph.nodes:
        original = id(node)
        inputs = tuple(renamed.get(v, v) for v in node.inputs)
        if original in weight_swap:
            inputs = (inputs[0], weight_swap[original]) + inputs[2:]
        if inputs != node.inputs:
            node = _retyped(node, inputs, renamed, G)
        block_out[original] = node.outputs[0]
        nodes.append(node)
        if node.op == "attention":
            new_attn[original] = node.outputs[0]
        for role, proj, w, b in replace_at.get(original, []):
            bld = Builder(meta={**node.meta, "pass": "gqa"})
            x = renamed.get(proj.x, proj.x)
            args = [x, out.add_param(f"{proj.name}.gqa_{role}", w)]
            if b is not None:
                args.append(out.add_param(f"{proj.name}.gqa_{role}_bias", b))
            y = bld.emit("linear", *args)
            shape = proj.out.shape[:-1] + (w.shape[0],)
            if y.shape != shape:
                y = bld.emit("view", y, shape=shape)
            nodes.extend(bld.nodes)
            renamed[proj.out] = y
    g = out.with_nodes(nodes, [renamed.get(v, v) for v in graph.outputs])
    from .cleanup import dead_code_elimination

    return dead_code_elimination(g), {"orders": orders, "attn": new_attn, "out": block_out}


def _retyped(node: Node, inputs: tuple, renamed: dict, G: int) -> Node:
    """The node with new inputs; where an input lost heads, its type (and a head-splitting
    view's shape) follow."""
    attrs = node.attrs
    if node.op == "view" and not inputs[0].type.same_as(node.inputs[0].type):
        shape = list(attrs["shape"])
        old_width, new_width = node.inputs[0].shape[-1], inputs[0].shape[-1]
        if len(shape) >= 2 and shape[-1] * shape[-2] == old_width:
            shape[-2] = new_width // shape[-1]
        attrs = {**attrs, "shape": tuple(shape)}
    types = OPS[node.op].infer([v.type for v in inputs], attrs)
    outputs = []
    for t, old in zip(types, node.outputs):
        if t.same_as(old.type):
            outputs.append(old)
        else:
            new = Value(t, old.hint)
            renamed[old] = new
            outputs.append(new)
    return Node(node.op, inputs, attrs, tuple(outputs), node.meta)


# -- the pass --------------------------------------------------------------------------------
def gqa(graph: Graph, ctx=None) -> Graph:
    config = as_config(ctx.options["gqa"] if ctx is not None else None)
    G = config.num_kv_heads
    layers = find_layers(graph)
    if not layers:
        raise GQAError("gqa: the graph has no fused attention op. Run fuse_attention first (it is in the default "
                       "pipeline); if it ran, see its report note for why it declined this model's attention")
    for layer in layers:
        if layer.kv_heads % G:
            raise GQAError(f"gqa: {G} KV heads does not divide this model's {layer.kv_heads} KV heads; choose a "
                           f"divisor of {layer.kv_heads}\n  at: attention{layer.attn.where()}")
    calib = _calibration_inputs(graph, config.calibration)
    if config.method == "aligned" and calib is None:
        raise GQAError("gqa: method='aligned' needs calibration inputs, e.g. GQAConfig(num_kv_heads=..., "
                       "method='aligned', calibration=tokenizer(text, return_tensors='pt').input_ids)")

    acts = None
    if config.method == "aligned":
        values = [v for layer in layers for v in (layer.k.out, layer.v.out)]
        flat = run_values(graph, values, calib)
        acts = [(k.reshape(-1, layer.kv_heads, layer.head_dim).double(),
                 v.reshape(-1, layer.kv_heads, layer.head_dim).double())
                for layer, k, v in zip(layers, flat[0::2], flat[1::2])]
    rotate_k = config.method == "aligned"
    for i, layer in enumerate(layers):
        plan_layer(layer, G, config.method, *(acts[i] if acts else (None, None)), rotate_k=rotate_k)
    k_rotation_note = ""
    if rotate_k and not all(layer.k_plain for layer in layers):
        # rotary models: K rotations are exact only if they commute with the embedding as
        # assumed (rotate-half pairs); check on the calibration inputs before using them
        if not _rotations_are_exact(graph, layers, calib):
            k_rotation_note = "; K rotations did not preserve the model exactly (rotary layout?), K only averaged"
            for i, layer in enumerate(layers):
                plan_layer(layer, G, config.method, *acts[i], rotate_k=False)
    for layer in layers:
        layer.plan = {**layer.plan, "rk": [r.float() for r in layer.plan["rk"]],
                      "rv": [r.float() for r in layer.plan["rv"]]}
    new, info = rewrite(graph, layers, G)

    details = {"method": config.method, "num_kv_heads": G, "layers": []}
    errors = _attention_errors(graph, new, layers, info, calib) if calib is not None else None
    for i, layer in enumerate(layers):
        itemsize = layer.attn.inputs[1].dtype.itemsize
        details["layers"].append({
            "layer": i, "kv_heads": (layer.kv_heads, G), "groups": layer.plan["groups"],
            "kv_bytes_per_token": (2 * layer.kv_heads * layer.head_dim * itemsize, 2 * G * layer.head_dim * itemsize),
            "rel_error": None if errors is None else errors[i]})
    if ctx is not None:
        ctx.details["gqa"] = details
        ctx.rules[f"gqa_{config.method}"] += len(layers)
        before = sum(r["kv_bytes_per_token"][0] for r in details["layers"])
        after = sum(r["kv_bytes_per_token"][1] for r in details["layers"])
        err = "no calibration inputs: pass GQAConfig(calibration=...) to measure the error" if errors is None else \
            "attention output relative error per layer: " + ", ".join(f"{e:.3g}" for e in errors)
        ctx.note(f"{len(layers)} attention layers -> {G} KV heads ({config.method}); KV cache bytes per token "
                 f"{before} -> {after}{k_rotation_note}; {err}")
    return new


def _unpermute(out: torch.Tensor, order: list[int]) -> torch.Tensor:
    """Attention output [B, H, T, D] with query heads in `order` back to the model's order."""
    inverse = [0] * len(order)
    for new, old in enumerate(order):
        inverse[old] = new
    return out[:, inverse]


def _block_output(layer: Layer, info: dict | None = None) -> Value:
    """Where the attention block's output is measured: after the output projection (V
    rotations and head permutations are exact only there), else the attention op's."""
    if info is None:
        return layer.o.node.outputs[0] if layer.o is not None else layer.attn.outputs[0]
    return info["out"][id(layer.o.node)] if layer.o is not None else info["attn"][id(layer.attn)]


def _attention_errors(old: Graph, new: Graph, layers, info, calib) -> list[float]:
    ref = run_values(old, [_block_output(layer) for layer in layers], calib)
    got = run_values(new, [_block_output(layer, info) for layer in layers], calib)
    errs = []
    for layer, r, g in zip(layers, ref, got):
        if layer.o is None:
            g = _unpermute(g, info["orders"][id(layer.attn)])
        errs.append(float((g.float() - r.float()).norm() / r.float().norm().clamp_min(1e-30)))
    return errs


def _rotations_are_exact(graph: Graph, layers, calib) -> bool:
    """Apply only the K (and V) rotations, keeping every head: the model must not change."""
    saved = [layer.plan for layer in layers]
    for layer in layers:
        layer.plan = {"groups": [[j] for j in range(layer.kv_heads)],
                      "rk": [r.float() for r in layer.plan["rk"]], "rv": [r.float() for r in layer.plan["rv"]]}
    try:
        rotated, info = rewrite(graph, layers, max(layer.kv_heads for layer in layers))
        errs = _attention_errors(graph, rotated, layers, info, calib)
    finally:
        for layer, plan in zip(layers, saved):
            layer.plan = plan
    return max(errs) < 1e-4
