"""shard: Megatron-LM tensor parallelism as a graph pass (`optimize(model, tensor_parallel=N)`
or `ShardConfig(world_size, rank, process_group=, vocab=)`).

Every rank optimizes the same model and keeps its own slice of the weights:
  - attention, by heads: the Q/K/V projections are column-parallel (rank r keeps the rows
    of its H/N query heads and of their Hkv/N key/value heads), the output projection is
    row-parallel (the matching input columns), followed by one `all_reduce`. With fewer KV
    heads than ranks, a rank keeps the one KV head its query heads read (replicated);
  - each MLP, by columns of its intermediate width I: the up (and gate) projections are
    column-parallel, the down projection row-parallel, followed by one `all_reduce`;
  - optionally (vocab=True) the lm_head by vocabulary rows, followed by an `all_gather`
    of the logits, and the token embedding by vocabulary rows (a masked lookup, then an
    `all_reduce`).
Biases of row-parallel projections are added once, after the all_reduce. Everything else
(norms, embeddings unless vocab=True, rotary tables) is replicated.

Projections are found from the graph, not from names: the attention's as gqa finds them
(passes/projections.py), an MLP as a down projection whose input is an elementwise
function (views, pointwise ops, biases) of one or more linear projections of width I, used
nowhere else. The head counts in the graph then follow from the sliced weights (views that
split or merge heads are retyped), so the kv_cache pass that runs after this one sizes
each rank's cache for its own heads only.

The pass runs after fuse_attention (it needs the fused attention op) and gqa, and before
kv_cache, quantize (which packs the sliced weights) and fuse_linear (which concatenates
the sliced q/k/v and gate/up weights).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import reduce
from operator import mul

import sympy
import torch

from ..ir.builder import Builder
from ..ir.edit import dead_code_elimination, retyped
from ..ir.graph import Graph, Node, Value
from ..ir.ops import OPS, IRTypeError, attention_has_bias
from ..ir.roles import LOGITS, OUTPUT, output_roles
from ..ir.types import as_dim, dims_equal
from .projections import Layer, _chain_nodes, emit_projection, find_layers, other_reader


class ShardError(ValueError):
    """The shard pass cannot split this model as asked; the message says why and what to do."""


@dataclass(frozen=True)
class ShardConfig:
    """world_size: the number of ranks (tensor_parallel=N). rank: this process's rank (None:
    torch.distributed's rank in `process_group`, e.g. set by torchrun). process_group: the
    torch.distributed group the collectives run on (None: the default group); the backend
    holds it. vocab: also split the lm_head (and a token embedding) by vocabulary rows."""

    world_size: int
    rank: int | None = None
    process_group: object = field(default=None, compare=False)
    vocab: bool = False

    def __post_init__(self):
        if not _positive_int(self.world_size):
            raise ShardError(f"tensor_parallel: world_size must be a positive int (the number of ranks), "
                             f"got {self.world_size!r}")
        if self.rank is not None and (not _int(self.rank) or not 0 <= self.rank < self.world_size):
            raise ShardError(f"tensor_parallel: rank must be an int in 0..{self.world_size - 1} for world_size="
                             f"{self.world_size}, got {self.rank!r}")
        if not isinstance(self.vocab, bool):
            raise ShardError(f"tensor_parallel: vocab must be True or False, got {self.vocab!r}")

    def resolved_rank(self) -> int:
        """The rank: as given, else torch.distributed's (0 for a world of one)."""
        if self.rank is not None:
            return self.rank
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            size = dist.get_world_size(self.process_group)
            if size != self.world_size:
                raise ShardError(f"tensor_parallel={self.world_size}, but the torch.distributed process group has "
                                 f"{size} ranks; launch with `torchrun --nproc-per-node {self.world_size}` or give "
                                 f"tensor_parallel={size}")
            return dist.get_rank(self.process_group)
        if self.world_size == 1:
            return 0
        raise ShardError(f"tensor_parallel={self.world_size} needs this process's rank: launch it with "
                         f"`torchrun --nproc-per-node {self.world_size} script.py` and call "
                         "torch.distributed.init_process_group() before optimize(), or give "
                         f"ShardConfig(world_size={self.world_size}, rank=r) (the rank's graph, e.g. to inspect it)")


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive_int(v) -> bool:
    return _int(v) and v >= 1


def as_config(option) -> ShardConfig:
    if isinstance(option, ShardConfig):
        return option
    if _int(option):
        return ShardConfig(option)  # 0 and negatives fail there
    if isinstance(option, dict):
        try:
            return ShardConfig(**option)
        except TypeError as e:
            raise TypeError(f"tensor_parallel={option!r}: {e}; ShardConfig's fields are world_size, rank, "
                            "process_group, vocab") from None
    raise TypeError(f"tensor_parallel= takes the number of ranks (a positive int), a ShardConfig or a dict of its "
                    f"fields, or None to run on one device; got {option!r}")


def parse_option(option) -> ShardConfig | None:
    """optimize(tensor_parallel=...): None leaves the pass out."""
    return None if option is None else as_config(option)


# -- finding what to split ----------------------------------------------------------------------
@dataclass
class HeadPlan:
    layer: Layer
    q_lo: int  # this rank's first query head
    q_n: int
    kv_lo: int
    kv_n: int
    kv_replicated: bool


@dataclass
class MLP:
    down: Node
    width: int  # I, the intermediate width
    ups: list[Node]  # linear(x, W[I, in], [b[I]]) or matmul(x, W[in, I])
    biases: list[tuple[Node, int]]  # (node, input index) of params [.., I] read in the chain


def _head_plan(layer: Layer, n: int, rank: int) -> HeadPlan:
    h, hkv = layer.heads, layer.kv_heads
    where = f"\n  at: attention{layer.attn.where()}"
    if h % n:
        divisors = [d for d in range(1, h + 1) if h % d == 0]
        raise ShardError(f"shard: tensor_parallel={n} does not divide this attention's {h} query heads; "
                         f"tensor_parallel must divide the number of heads: choose one of {divisors}" + where)
    q_n = h // n
    group = h // hkv  # query heads per KV head
    if hkv % n == 0:
        return HeadPlan(layer, rank * q_n, q_n, rank * (hkv // n), hkv // n, False)
    if group % q_n == 0:  # each rank's query heads read one KV head: keep that one (replicated)
        return HeadPlan(layer, rank * q_n, q_n, rank * q_n // group, 1, True)
    raise ShardError(f"shard: tensor_parallel={n} does not divide this attention's {hkv} KV heads, and a rank's "
                     f"{q_n} query heads would read parts of several KV groups of {group}; choose a tensor_parallel "
                     f"that divides {hkv}, or a multiple of {hkv} that divides {h}" + where)


def _weight_in_dim(graph: Graph, node: Node) -> tuple[int, bool] | None:
    """(input width, rows_are_inputs) of a linear/matmul on a 2-D weight parameter."""
    if len(node.inputs) < 2 or not node.inputs[1].param or node.inputs[1].param not in graph.params:
        return None
    w = graph.params[node.inputs[1].param]
    if w.dim() != 2:
        return None
    if node.op == "linear" and (len(node.inputs) < 3 or node.inputs[2].param):
        return int(w.shape[1]), False
    if node.op == "matmul":
        return int(w.shape[0]), True
    return None


def _up_projection(graph: Graph, node: Node, width: int) -> bool:
    if node.op not in ("linear", "matmul"):
        return False
    found = _weight_in_dim(graph, node)
    if found is None:
        return False
    w = graph.params[node.inputs[1].param]
    return int(w.shape[1] if found[1] else w.shape[0]) == width


def _last(v: Value):
    return v.shape[-1] if v.rank else None


def _mlp(graph: Graph, producers, users, down: Node, width: int) -> MLP | None:
    """The MLP feeding `down`, or None when its input is not an elementwise function of
    projections of width `width` used only here."""
    ups, biases, chain = [], [], []
    seen, stack = set(), [down.inputs[0]]
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        node = producers.get(v)
        if node is None or not dims_equal(_last(v), width):
            return None
        if _up_projection(graph, node, width):
            ups.append(node)
            continue
        if not (OPS[node.op].kind == "pointwise" or (node.op == "view" and dims_equal(_last(node.inputs[0]), width))):
            return None
        chain.append(node)
        for i, u in enumerate(node.inputs):
            if u.param and u.rank and dims_equal(_last(u), width):
                biases.append((node, i))
            elif u.rank == 0 or dims_equal(_last(u), 1):
                src = producers.get(u)
                if not (u.param or (src is not None and src.op == "const")):
                    return None  # a broadcast value computed elsewhere (maybe from the chain): leave it
            else:
                stack.append(u)
    if not ups:
        return None
    inside = {id(n) for n in chain} | {id(down)}
    for n in chain + ups:
        if any(id(u) not in inside for u in users.get(n.outputs[0], [])) or n.outputs[0] in graph.outputs:
            return None
    return MLP(down, width, ups, biases)


def find_mlps(graph: Graph, skip: set[int]) -> list[MLP]:
    producers, users = graph.producers(), graph.users()
    mlps = []
    for node in graph.nodes:
        if id(node) in skip or node.op not in ("linear", "matmul"):
            continue
        found = _weight_in_dim(graph, node)
        if found is None:
            continue
        mlp = _mlp(graph, producers, users, node, found[0])
        if mlp is not None:
            mlps.append(mlp)
    # a projection is split one way only: an "up" that is also a row-parallel projection
    # (two MLPs in a row with nothing between) leaves the second MLP replicated
    row_parallel = skip | {id(m.down) for m in mlps}
    return [m for m in mlps if not any(id(u) in row_parallel for u in m.ups)]


# -- rewriting -------------------------------------------------------------------------------
def _prod(dims):
    return reduce(mul, [as_dim(d) for d in dims], sympy.Integer(1))


def _plain(d):
    d = as_dim(d)
    return int(d) if d.is_number else d


def _view_shape(old_in, new_in, out) -> tuple | None:
    """A view's target shape when one dim of its input shrank by a factor (heads or
    columns split across ranks): the output dim that starts at the same element offset
    shrinks by it ([B, T, H*D] -> [B, T, H, D] and back)."""
    changed = [i for i, (a, b) in enumerate(zip(old_in, new_in)) if not dims_equal(a, b)]
    if len(changed) != 1 or len(old_in) != len(new_in):
        return None
    i = changed[0]
    factor = as_dim(old_in[i]) / as_dim(new_in[i])
    prefix = _prod(old_in[:i])
    for j in range(len(out)):
        if dims_equal(_prod(out[:j]), prefix):
            d = as_dim(out[j]) / factor
            if d.is_integer or (d.is_number and float(d).is_integer()):
                return tuple(_plain(x) for x in out[:j]) + (_plain(d),) + tuple(_plain(x) for x in out[j + 1:])
    return None


def _retype(node: Node, inputs: tuple, renamed: dict, graph: Graph) -> Node:
    attrs = node.attrs
    if node.op == "view" and not inputs[0].type.same_as(node.inputs[0].type):
        shape = _view_shape(node.inputs[0].shape, inputs[0].shape, attrs["shape"])
        if shape is None:
            raise ShardError(f"shard: cannot reshape this view for a rank's slice ({node.inputs[0].type} became "
                             f"{inputs[0].type}){_describe(graph, node)}")
        attrs = {**attrs, "shape": shape}
    try:
        return retyped(node, inputs, renamed, attrs)[0]
    except (IRTypeError, TypeError) as e:
        raise ShardError(f"shard: after slicing this rank's heads/columns, an op no longer fits ({e}); the model "
                         f"mixes sharded values with others here{_describe(graph, node)}") from None


def _describe(graph: Graph, node: Node) -> str:
    from ..ir.printer import Namer, format_node

    return f"\n  at: {format_node(node, Namer(graph))}{node.where()}"


class _Plan:
    """What the rewrite does at each node of the old graph (keyed by id(node))."""

    def __init__(self, out: Graph, n: int, rank: int):
        self.out, self.n, self.rank = out, n, rank
        self.sub: dict[int, dict[int, Value]] = {}  # input index -> sliced parameter
        self.emit_after: dict[int, list] = {}  # projections replaced by sliced ones
        self.reduce_after: dict[int, bool] = {}  # row-parallel: all_reduce (and the bias after it)
        self.gather_after: set[int] = set()  # vocabulary-parallel logits: all_gather
        self.replace: dict[int, object] = {}  # fn(builder, inputs) -> the value replacing the node's output
        self.sharded: set[str] = set()  # names of the new, sliced parameters

    def param(self, name: str, tensor: torch.Tensor) -> Value:
        v = self.out.add_param(f"{name}.tp{self.rank}of{self.n}", tensor.contiguous().clone())
        self.sharded.add(v.param)
        return v

    def substitute(self, node: Node, index: int, tensor: torch.Tensor):
        self.sub.setdefault(id(node), {})[index] = self.param(node.inputs[index].param, tensor)


def _rows(t: torch.Tensor, lo: int, n: int) -> torch.Tensor:
    return t[lo:lo + n]


def _plan_attention(plan: _Plan, graph: Graph, hp: HeadPlan, producers):
    layer, d = hp.layer, hp.layer.head_dim
    for role, proj, lo, count in (("q", layer.q, hp.q_lo, hp.q_n), ("k", layer.k, hp.kv_lo, hp.kv_n),
                                  ("v", layer.v, hp.kv_lo, hp.kv_n)):
        base = f"{proj.name}.{role}" if proj.fused else proj.name
        w = plan.param(base, _rows(proj.weight, lo * d, count * d))
        b = None if proj.bias is None else plan.param(base + "_bias", _rows(proj.bias, lo * d, count * d))
        plan.emit_after.setdefault(id(producers[proj.out]), []).append((proj, w, b))
    o = layer.o
    width = o.tensor.shape[0] if o.rows_are_inputs else o.tensor.shape[1]
    if width != layer.heads * d:
        raise ShardError(f"shard: the output projection {o.weight.param} reads {width} features, not {layer.heads} "
                         f"heads x {d}{_describe(graph, o.node)}")
    cols = slice(hp.q_lo * d, (hp.q_lo + hp.q_n) * d)
    plan.substitute(o.node, 1, o.tensor[cols] if o.rows_are_inputs else o.tensor[:, cols])
    plan.reduce_after[id(o.node)] = True
    attn = layer.attn
    per_head = _per_head_inputs(attn)
    if per_head:
        plan.replace[id(attn)] = lambda bld, inputs: _sliced_attention(bld, attn, inputs, per_head, hp.q_lo, hp.q_n)


def _per_head_inputs(attn: Node) -> list[int]:
    """The indices of an attention's inputs that hold one value per query head: ALiBi's
    slopes and the sinks (the last inputs, in that order)."""
    last = len(attn.inputs)
    out = []
    if attn.attrs.get("sinks"):
        last -= 1
        out.append(last)
    if attn.attrs.get("alibi"):
        out.append(last - 1)
    return out


def _sliced_attention(bld: Builder, attn: Node, inputs: list, per_head: list[int], lo: int, count: int) -> Value:
    """The attention over this rank's query heads lo..lo+count: its per-head inputs
    (slopes, sinks) sliced with them."""
    inputs = list(inputs)
    for i in per_head:
        inputs[i] = bld.emit("slice", inputs[i], dim=0, start=lo, end=lo + count, step=1)
    return bld.emit("attention", *inputs, **attn.attrs)


def _plan_mlp(plan: _Plan, graph: Graph, mlp: MLP):
    n, r = plan.n, plan.rank
    if mlp.width % n:
        raise ShardError(f"shard: tensor_parallel={n} does not divide this MLP's intermediate width {mlp.width}"
                         f"{_describe(graph, mlp.down)}")
    k = mlp.width // n
    cols = slice(r * k, (r + 1) * k)
    for up in mlp.ups:
        w = graph.params[up.inputs[1].param]
        plan.substitute(up, 1, w[:, cols] if up.op == "matmul" else w[cols])
        if up.op == "linear" and len(up.inputs) > 2:
            plan.substitute(up, 2, graph.params[up.inputs[2].param][cols])
    for node, i in mlp.biases:
        plan.substitute(node, i, graph.params[node.inputs[i].param][..., cols])
    w = graph.params[mlp.down.inputs[1].param]
    plan.substitute(mlp.down, 1, w[cols] if mlp.down.op == "matmul" else w[:, cols])
    plan.reduce_after[id(mlp.down)] = True


def rewrite(graph: Graph, plan: _Plan) -> Graph:
    renamed: dict[Value, Value] = {}
    nodes: list[Node] = []
    for node in graph.nodes:
        key = id(node)
        inputs = [renamed.get(v, v) for v in node.inputs]
        if key in plan.replace:
            bld = Builder(meta={**node.meta, "pass": "shard"})
            renamed[node.outputs[0]] = plan.replace[key](bld, inputs)
            nodes.extend(bld.nodes)
            continue
        for i, v in plan.sub.get(key, {}).items():
            inputs[i] = v
        bias = None
        if plan.reduce_after.get(key) and node.op == "linear" and len(inputs) > 2:
            bias = inputs.pop()  # added once, after the sum over ranks
        old_out = node.outputs[0]
        if tuple(inputs) != node.inputs:
            node = _retype(node, tuple(inputs), renamed, graph) if bias is None else \
                Node(node.op, tuple(inputs), node.attrs, node.outputs, node.meta)
        nodes.append(node)
        bld = Builder(meta={**node.meta, "pass": "shard"})
        if plan.reduce_after.get(key):
            y = bld.emit("all_reduce", node.outputs[0], world_size=plan.n)
            if bias is not None:
                y = bld.emit("add", y, bias)
            renamed[old_out] = y
        if key in plan.gather_after:
            renamed[old_out] = bld.emit("all_gather", node.outputs[0], dim=-1, world_size=plan.n)
        for proj, w, b in plan.emit_after.get(key, []):
            renamed[proj.out] = emit_projection(bld, proj, renamed.get(proj.x, proj.x), w, b)
        nodes.extend(bld.nodes)
    out = plan.out.with_nodes(nodes, [renamed.get(v, v) for v in graph.outputs])
    for old, new in zip(graph.outputs, out.outputs):
        if not new.type.same_as(old.type):
            raise ShardError(f"shard: the graph's output changed type ({old.type} -> {new.type}); a sharded value "
                             "reaches the output without a collective")
    return dead_code_elimination(out)


# -- vocabulary parallelism ------------------------------------------------------------------------
def _plan_vocab(plan: _Plan, graph: Graph, nodes_skip: set[int]) -> list[str]:
    """lm_head rows (-> all_gather of the logits) and the token embedding rows (a masked
    lookup -> all_reduce) for this rank. Returns notes."""
    notes = []
    roles = output_roles(graph)
    producers = graph.producers()
    heads = []
    for v, role in zip(graph.outputs, roles):
        node = producers.get(v)
        while node is not None and node.op == "view":
            node = producers.get(node.inputs[0])
        # before kv_cache names the logits, every output has the plain role
        if role in (LOGITS, OUTPUT) and node is not None and node.op == "linear" and len(node.inputs) == 2 \
                and node.inputs[1].param and id(node) not in nodes_skip:
            heads.append(node)
    n, r = plan.n, plan.rank
    for head in heads:
        w = graph.params[head.inputs[1].param]
        vocab = int(w.shape[0])
        if vocab % n:
            raise ShardError(f"shard: tensor_parallel={n} does not divide the vocabulary ({vocab}) of the lm_head; "
                             f"use vocab=False (the lm_head replicated){_describe(graph, head)}")
        k = vocab // n
        plan.substitute(head, 1, w[r * k:(r + 1) * k])
        plan.gather_after.add(id(head))
        notes.append(f"lm_head {head.inputs[1].param}: {k} of {vocab} vocabulary rows, logits all-gathered")
    # the token embedding (looked up by the graph's input ids; tied to the lm_head or not)
    inputs = set(graph.inputs)
    sliced_heads = {head.inputs[1].param: plan.sub[id(head)][1] for head in heads}
    for node in graph.nodes:
        if node.op != "embedding" or node.inputs[1] not in inputs or not node.inputs[0].param:
            continue
        name = node.inputs[0].param
        w = graph.params[name]
        if w.shape[0] % n:
            raise ShardError(f"shard: tensor_parallel={n} does not divide the embedding's {w.shape[0]} rows; use "
                             f"vocab=False (the embedding replicated){_describe(graph, node)}")
        k = w.shape[0] // n
        sliced = sliced_heads.get(name) or plan.param(name, w[r * k:(r + 1) * k])  # tied: one slice for both
        plan.replace[id(node)] = lambda bld, inputs, sliced=sliced, k=k: \
            _emit_vocab_embedding(bld, sliced, inputs[1], r * k, k, n)
        notes.append(f"embedding {name}: {k} of {w.shape[0]} rows{' (tied to the lm_head)' if name in sliced_heads else ''}"
                     ", masked lookup all-reduced")
    return notes


def _emit_vocab_embedding(bld: Builder, weight: Value, ids: Value, lo: int, k: int, n: int) -> Value:
    """embedding over rows lo..lo+k of the vocabulary: ids outside give zeros, and the sum
    over ranks is the full lookup."""
    inside = bld.emit("logical_and", bld.emit("ge", ids, bld.const(lo, ids.dtype)),
                      bld.emit("lt", ids, bld.const(lo + k, ids.dtype)))
    local = bld.emit("where", inside, bld.emit("sub", ids, bld.const(lo, ids.dtype)), bld.const(0, ids.dtype))
    rows = bld.emit("embedding", weight, local)
    mask = bld.emit("unsqueeze", inside, dim=-1)
    rows = bld.emit("where", mask, rows, bld.const(0.0, rows.dtype))
    return bld.emit("all_reduce", rows, world_size=n)


# -- the pass --------------------------------------------------------------------------------
def shard(graph: Graph, ctx=None) -> Graph:
    config = as_config(ctx.options["tensor_parallel"] if ctx is not None else None)
    n, rank = config.world_size, config.resolved_rank()
    layers = find_layers(graph, ShardError, "shard", "so its heads cannot be split across ranks", masks=True)
    producers = graph.producers()
    head_plans = []
    for layer in layers:
        where = f"\n  at: attention{layer.attn.where()}"
        if attention_has_bias(layer.attn) and not dims_equal(layer.attn.inputs[3].shape[1], 1):
            raise ShardError("shard: this attention's mask differs per head; only masks shared by all heads can be "
                             "split across ranks" + where)
        if layer.o is None:
            raise ShardError("shard: cannot find this attention's output projection (the row-parallel linear "
                             "after the heads are merged)" + where)
        if _chain_nodes(graph, layer.q.out, layer.attn.inputs[0]) is None:
            raise ShardError("shard: an op between the Q projection and the attention is not a head reshape or a "
                             "rotary embedding" + where)
        for which, proj in (("Q", layer.q), ("K", layer.k), ("V", layer.v)):
            reader = other_reader(graph, layer, proj, which)
            if reader:  # a rank holds only its heads' columns of it
                raise ShardError(f"shard: {reader}, not only the attention; a rank holds only its own heads' "
                                 f"slice of {which}, so that reader would see a slice, not the model's value" + where)
        head_plans.append(_head_plan(layer, n, rank))
    skip = {id(layer.o.node) for layer in layers}
    mlps = find_mlps(graph, skip)

    out = graph.with_nodes(graph.nodes)
    plan = _Plan(out, n, rank)
    for hp in head_plans:
        _plan_attention(plan, graph, hp, producers)
    for mlp in mlps:
        _plan_mlp(plan, graph, mlp)
    vocab_notes = _plan_vocab(plan, graph, skip | {id(m.down) for m in mlps}) if config.vocab else []
    new = rewrite(graph, plan)

    full = sum(t.numel() * t.element_size() for t in graph.params.values())
    sharded = sum(t.numel() * t.element_size() for name, t in new.params.items() if name in plan.sharded)
    replicated = sum(t.numel() * t.element_size() for name, t in new.params.items() if name not in plan.sharded)
    details = {"world_size": n, "rank": rank, "weight_bytes_full": full, "weight_bytes_sharded": sharded,
               "weight_bytes_replicated": replicated,
               "replicated": sorted(name for name in new.params if name not in plan.sharded),
               "layers": [{"heads": (hp.layer.heads, hp.q_n), "kv_heads": (hp.layer.kv_heads, hp.kv_n),
                           "kv_replicated": hp.kv_replicated} for hp in head_plans],
               "mlps": [(m.width, m.width // n) for m in mlps], "vocab": vocab_notes}
    if ctx is not None:
        ctx.details["shard"] = details
        ctx.rules["shard_attention"] += len(head_plans)
        ctx.rules["shard_mlp"] += len(mlps)
        ctx.rules["all_reduce"] += new.count("all_reduce")
        heads = ", ".join(sorted({f"{hp.layer.heads}->{hp.q_n} heads, KV {hp.layer.kv_heads}->{hp.kv_n}"
                                  + (" (replicated)" if hp.kv_replicated else "") for hp in head_plans})) or "none"
        ctx.note(f"rank {rank} of {n}: {len(head_plans)} attention layers ({heads}), {len(mlps)} MLPs; weights "
                 f"{_mb(sharded)} sharded + {_mb(replicated)} replicated = {_mb(sharded + replicated)} of "
                 f"{_mb(full)}" + "".join(f"; {s}" for s in vocab_notes))
        if not layers:
            ctx.note("no fused attention: attention is replicated (fuse_attention's note says why it declined)")
    return new


def _mb(b: int) -> str:
    return f"{b / 2**20:.2f} MiB"
