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

report(): per layer, the relative error of the attention output (errors of earlier layers
included, as the model would see them), and the KV cache bytes per token before and after.
The error is measured on tokens nothing was fitted to, and report() says which:
  "mean"     fits nothing, so on all the calibration inputs;
  "aligned"  fits its groups and maps on part of the calibration inputs and measures on
             the rest, held out (a quarter of the rows, or of each row's tokens when there
             is one row): an error measured on the fitted tokens is far below the error on
             any other input (a rank-head_dim fit on few tokens matches them almost
             exactly). A calibration too small to keep head_dim tokens for the fit and hold
             some out is fitted on whole, and the error is reported as in-sample, saying so
             and how many tokens a held-out figure needs.
details["gqa"]["error_measured_on"] says the same in words, "error_tokens" gives the count.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..ir.builder import Builder
from ..ir.edit import dead_code_elimination, retyped
from ..ir.evaluate import evaluate, input_sizes
from ..ir.graph import Graph, Node, Value
from ..ir.guards import GuardChecker, GuardError
from .projections import (Layer, _chain_between, _per_head_operand, emit_projection, find_layers as _find_layers,
                          other_reader, shared_projection)

METHODS = ("mean", "aligned")
# The weights gqa writes are named after the model's: k_proj.weight -> k_proj.weight.gqa_k
# (and .gqa_k_bias), o_proj.weight -> o_proj.weight.gqa; Graph.add_param may add ".1"
_NEW_NAME = re.compile(r"\.gqa(_[qkv])?(_bias)?(\.\d+)?$")


def source_param_name(name: str) -> str:
    """The model's parameter a weight of gqa's came from (`name` itself for any other):
    quantize's include / exclude globs are written against the model's names."""
    return _NEW_NAME.sub("", name)


class GQAError(ValueError):
    """The gqa pass cannot convert this model as asked; the message says why and what to do."""


@dataclass(frozen=True)
class GQAConfig:
    num_kv_heads: int
    method: str = "mean"
    calibration: object = None  # token ids [B, T] (or a tuple of the model's inputs)

    def __post_init__(self):
        # a bool is an int to Python, but gqa=True names no head count
        if not isinstance(self.num_kv_heads, int) or isinstance(self.num_kv_heads, bool) or self.num_kv_heads < 1:
            raise GQAError(f"gqa: num_kv_heads must be a positive int (the number of key/value heads to keep, "
                           f"dividing the model's), got {self.num_kv_heads!r}")
        if self.method not in METHODS:
            raise GQAError(f"gqa: unknown method {self.method!r}; choose one of {', '.join(METHODS)}")


def as_config(option) -> GQAConfig:
    if isinstance(option, GQAConfig):
        return option
    if isinstance(option, int) and not isinstance(option, bool):
        return GQAConfig(option)  # 0 and negatives fail there, naming the value
    if isinstance(option, dict):
        try:
            return GQAConfig(**option)
        except TypeError as e:  # an unknown or missing field
            raise TypeError(f"gqa={option!r}: {e}; GQAConfig's fields are num_kv_heads, method, calibration") from None
    raise TypeError(f"gqa= takes the number of KV heads (a positive int), a GQAConfig or a dict of its fields, "
                    f"or None to leave attention as it is; got {option!r}")


def parse_option(option) -> GQAConfig | None:
    """optimize(gqa=...): None leaves the pass out; anything else must name a head count
    (gqa=0 or gqa=True is an error, not a quiet no-op). Like every option, checked before
    capture: method='aligned' without calibration inputs, or with calibration that is not
    tensors, fails here, not after a minute of tracing."""
    if option is None:
        return None
    config = as_config(option)
    if config.method == "aligned" and config.calibration is None:
        raise GQAError(_NEEDS_CALIBRATION)
    calib = config.calibration
    if calib is not None and not all(isinstance(x, torch.Tensor) for x in
                                     (calib if isinstance(calib, (tuple, list)) else (calib,))):
        raise GQAError(f"gqa: calibration must be token ids (a tensor) or a tuple of the model's input tensors, "
                       f"got {type(calib).__name__}")
    return config


_NEEDS_CALIBRATION = ("gqa: method='aligned' needs calibration inputs, e.g. GQAConfig(num_kv_heads=..., "
                      "method='aligned', calibration=tokenizer(text, return_tensors='pt').input_ids)")


def find_layers(graph: Graph, method: str = "mean") -> list[Layer]:
    """Each fused attention's Q/K/V projections and output projection (passes/projections.py),
    refusing a layer whose rewrite would reach beyond the attention (see _rewrite_problem)."""
    layers = _find_layers(graph, GQAError, "gqa", "so its heads cannot be merged")
    producers = graph.producers()
    for layer in layers:
        problem = _rewrite_problem(graph, layer, method, producers)
        if problem:
            raise GQAError(f"gqa: {problem}\n  at: attention{layer.attn.where()}")
    return layers


def _rewrite_problem(graph: Graph, layer: Layer, method: str, producers) -> str | None:
    """Why rewriting this layer's projections would change more than the attention, or
    could not be done for each separately (None: neither). K and V always shrink; Q
    changes only under 'aligned' (its heads are permuted and rotated), else it keeps its
    values."""
    shared = shared_projection(layer, producers)
    if shared:
        return (f"{shared}; gqa rewrites Q, K and V projections each on its own, so a shared one cannot be merged "
                "for one role and kept for the other: give each its own projection, or leave gqa off for this model")
    roles = [("K", layer.k), ("V", layer.v)] + ([("Q", layer.q)] if method == "aligned" else [])
    for which, proj in roles:
        reader = other_reader(graph, layer, proj, which)
        if reader:
            changed = "its heads permuted and rotated" if which == "Q" else "its heads merged"
            return (f"{reader}, not only the attention; gqa would hand that reader the rewritten {which} ({changed}) "
                    "instead of the model's, a different answer, so it refuses this layer")
    if method == "aligned":  # Q's heads move: a per-head scale on Q would stay behind
        q_chain = _chain_between(graph, layer.q.out, layer.attn.inputs[0])
        problem = _per_head_operand(layer.q, q_chain, "Q")
        if problem:
            return f"{problem}; 'aligned' permutes and rotates the query heads, which it does not follow: use 'mean'"
    return None


# -- calibration ---------------------------------------------------------------------------
def run_values(graph: Graph, values: list[Value], inputs: tuple) -> list[torch.Tensor]:
    """Evaluate `values` of `graph` on `inputs` (the IR's reference evaluator)."""
    return evaluate(graph, inputs, values)


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
        if x.numel() == 0:
            raise GQAError(f"gqa: calibration input of shape {tuple(x.shape)} is empty; give token ids of some text")
    _check_token_ids(graph, inputs)
    try:
        GuardChecker(graph.guards).check(input_sizes(graph, inputs), "gqa: the calibration inputs")
    except GuardError as e:
        raise GQAError(str(e)) from None
    return tuple(inputs)


def _check_token_ids(graph: Graph, inputs):
    """Calibration ids an embedding table of the model has no row for (the model would
    fail on them, deep inside the calibration run)."""
    for node in graph.nodes:
        if node.op != "embedding" or node.inputs[1] not in graph.inputs:
            continue
        x = inputs[graph.inputs.index(node.inputs[1])]
        rows = node.inputs[0].shape[0]
        if int(x.min()) < 0 or int(x.max()) >= rows:
            raise GQAError(f"gqa: calibration token ids must be in [0, {rows}) (the rows of "
                           f"{node.inputs[0].param or 'the embedding'}), got ids from {int(x.min())} to "
                           f"{int(x.max())}")


def _run_calibration(graph: Graph, values: list[Value], calib: tuple) -> list[torch.Tensor]:
    """run_values on the calibration inputs; a failure there is the calibration's (more
    positions than the model has, say), so the error names it."""
    try:
        return run_values(graph, values, calib)
    except (IndexError, RuntimeError) as e:
        shapes = ", ".join(str(tuple(x.shape)) for x in calib)
        raise GQAError(f"gqa: the model fails on the calibration inputs (shape {shapes}): {type(e).__name__}: {e}. "
                       "Give inputs the model accepts: token ids below its vocabulary size, and no more tokens "
                       "per row than its positions (n_positions / max_position_embeddings)") from None


def _check_enough_tokens(layers, k_outs):
    """'aligned' fits each merged head from the calibration tokens' activations (a rank
    head_dim PCA): fewer tokens than head_dim leave it underdetermined."""
    for layer, k in zip(layers, k_outs):
        tokens = k.numel() // (layer.kv_heads * layer.head_dim)
        if tokens < layer.head_dim:
            raise GQAError(f"gqa: method='aligned' fits each merged head (head_dim={layer.head_dim}) from the "
                           f"calibration's activations, but the calibration has {tokens} tokens (batch x length); "
                           f"give at least {layer.head_dim}, and many more for a good fit")


@dataclass(frozen=True)
class _Calibration:
    """The calibration inputs split for 'aligned': `fit` (what the groups and maps are
    fitted on) and `held` (what the reported error is measured on), and in words what
    the error was measured on, for report() and details."""
    fit: tuple
    held: tuple
    held_tokens: int
    measured_on: str
    held_out: bool


def _tokens(inputs: tuple) -> int:
    """Tokens in the calibration inputs: batch x length of the first (the token ids)."""
    x = inputs[0]
    return int(x.shape[0]) * (int(x.shape[1]) if x.dim() > 1 else 1)


def _held_out(n: int) -> int:
    """How many of n rows, or of a row's n tokens, are held out: a quarter, at least one."""
    return max(1, n // 4)


def _splits(inputs: tuple):
    """(fit, held, how) candidates: the last quarter of the rows (at least one) when
    there are several, else the last quarter of each row's tokens (at least one), run as
    sequences of their own; only where every input has the token ids' batch (and length)
    dimensions, so that a slice of each is a consistent set of inputs."""
    b = int(inputs[0].shape[0])
    if b >= 2 and all(x.dim() >= 1 and int(x.shape[0]) == b for x in inputs):
        h = _held_out(b)
        yield (tuple(x[:b - h] for x in inputs), tuple(x[b - h:] for x in inputs),
               f"{h} of {b} calibration rows")
    if inputs[0].dim() >= 2:
        t = int(inputs[0].shape[1])
        if t >= 2 and all(x.dim() >= 2 and tuple(x.shape[:2]) == (b, t) for x in inputs):
            h = _held_out(t)
            yield (tuple(x[:, :t - h] for x in inputs), tuple(x[:, t - h:] for x in inputs),
                   f"the last {h} of {t} tokens of each calibration row, run as sequences of their own")


def _min_tokens_for_held_out(head_dim: int) -> int:
    """The fewest tokens in one row that leave head_dim for the fit and hold some out."""
    t = head_dim + 1
    while t - _held_out(t) < head_dim:
        t += 1
    return t


def _split_calibration(graph: Graph, layers, calib: tuple) -> _Calibration:
    """Hold out part of the calibration for measuring 'aligned''s error (see the module
    docstring); fit on all of it, reporting the error as in-sample, when no split leaves
    head_dim tokens for the fit (or the model's guards refuse a part's sizes)."""
    head_dim = max(layer.head_dim for layer in layers)
    checker = GuardChecker(graph.guards)
    for fit, held, how in _splits(calib):
        if _tokens(fit) < head_dim or _tokens(held) < 1:
            continue
        try:
            for part in (fit, held):
                checker.check(input_sizes(graph, part), "gqa: a part of the calibration inputs")
        except GuardError:
            continue
        n = _tokens(held)
        return _Calibration(fit, held, n, f"held-out: {n} tokens ({how}; fitted on the other {_tokens(fit)})", True)
    n = _tokens(calib)
    return _Calibration(calib, calib, n,
                        f"in-sample: the {n} calibration tokens it was fitted on, too few to hold any out, so the "
                        f"error on other inputs is likely much larger; give at least "
                        f"{_min_tokens_for_held_out(head_dim)} tokens per row, or several rows of "
                        f"{head_dim} or more, for a held-out figure", False)


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


def _pair_block(c: torch.Tensor) -> torch.Tensor:
    """Complex scalars per rotary pair (i, i + D/2) as a real D x D matrix."""
    half = c.shape[0]
    m = torch.zeros(2 * half, 2 * half, dtype=c.real.dtype)
    idx = torch.arange(half)
    m[idx, idx], m[idx, idx + half] = c.real, -c.imag
    m[idx + half, idx], m[idx + half, idx + half] = c.imag, c.real
    return m


def _merge_linear(acts: torch.Tensor, members: list[int]):
    """Best rank-D linear merge of the members' activations [N, n, D] (PCA of the stacked
    heads): k_g = sum_j M_j k_j and k_j ~ A_j k_g. Exact when the heads span D dims."""
    d = acts.shape[2]
    stacked = torch.cat([acts[:, j] for j in members], dim=1)  # [N, n * D]
    _, _, vt = torch.linalg.svd(stacked, full_matrices=False)
    p = vt[:d].T  # [n * D, D]
    blocks = [p[i * d:(i + 1) * d] for i in range(len(members))]
    return {j: b.T for j, b in zip(members, blocks)}, {j: b for j, b in zip(members, blocks)}


def _merge_rotary(acts: torch.Tensor, members: list[int]):
    """The same with maps that commute with rotary embeddings: one complex scalar per
    frequency pair (rotate-half layout), fitted by a rank-1 complex SVD per pair."""
    half = acts.shape[2] // 2
    z = torch.complex(acts[..., :half], acts[..., half:])[:, members]  # [N, n, D/2]
    merge = {j: [] for j in members}
    for i in range(half):
        _, _, vh = torch.linalg.svd(z[:, :, i], full_matrices=False)
        v = vh[0].conj()  # z_g = sum_j z_j v_j, and z_j ~ z_g conj(v_j)
        for jj, j in enumerate(members):
            merge[j].append(v[jj])
    m = {j: _pair_block(torch.stack(c)) for j, c in merge.items()}
    a = {j: _pair_block(torch.stack(c).conj()) for j, c in merge.items()}
    return m, a


def plan_layer(layer: Layer, G: int, method: str, k_acts=None, v_acts=None, rotary_ok: bool = True):
    """Groups of KV heads, and per KV head the maps M (into the merged head) and A (back
    out of it, folded into Q for K and into the output projection for V)."""
    n, d = layer.kv_heads // G, layer.head_dim
    eye = torch.eye(d, dtype=torch.float64)
    plan = {"groups": [list(range(g * n, (g + 1) * n)) for g in range(G)],
            "mk": [eye / n] * layer.kv_heads, "ak": [eye] * layer.kv_heads,
            "mv": [eye / n] * layer.kv_heads, "av": [eye] * layer.kv_heads}
    if method == "aligned" and n > 1:
        rotary = not layer.k_plain
        if G > 1:
            fit_k = _pair_rotation if rotary else _procrustes
            dist = _distance(v_acts, _procrustes) + (_distance(k_acts, fit_k) if rotary_ok or not rotary else 0)
            plan["groups"] = _group(dist, n)
        for members in plan["groups"]:
            for key, acts, merge in (("v", v_acts, _merge_linear),
                                     ("k", k_acts, _merge_rotary if rotary else _merge_linear)):
                if key == "k" and rotary and not rotary_ok:
                    continue
                m, a = merge(acts, members)
                for j in members:
                    plan["m" + key][j], plan["a" + key][j] = m[j], a[j]
    layer.plan = plan
    return plan


# -- rewriting -------------------------------------------------------------------------------
def _blocks(w: torch.Tensor, d: int) -> list[torch.Tensor]:
    return list(w.reshape(-1, d, *w.shape[1:]).unbind(0))


def _new_weights(layer: Layer):
    """Q, K, V weights/biases and the output projection's weight for the plan."""
    p, d = layer.plan, layer.head_dim
    per_kv = layer.heads // layer.kv_heads
    kv_order = [j for g in p["groups"] for j in g]
    q_order = [j * per_kv + t for j in kv_order for t in range(per_kv)]  # new query head -> old
    q_kv = [j for j in kv_order for _ in range(per_kv)]  # new query head -> its old KV head
    f32 = {k: [m.float() for m in p[k]] for k in ("mk", "ak", "mv", "av")}

    # the maps are float32 (from float64 fits); so are the products, for a bfloat16 /
    # float16 model too, which gets its weights back in its own dtype (one rounding)
    def queries(t):  # q_h' = A_j^T q_h: scores q_h' . k_g ~ q_h . k_j
        if t is None:
            return None
        blocks = _blocks(t.float(), d)
        return torch.cat([f32["ak"][j].T @ blocks[h] for h, j in zip(q_order, q_kv)]).to(t.dtype)

    def merged(t, m):  # head g = sum_j M_j head_j
        if t is None:
            return None
        blocks = _blocks(t.float(), d)
        return torch.cat([sum(m[j] @ blocks[j] for j in g) for g in p["groups"]]).to(t.dtype)

    wq, bq = queries(layer.q.weight), queries(layer.q.bias)
    wk, bk = merged(layer.k.weight, f32["mk"]), merged(layer.k.bias, f32["mk"])
    wv, bv = merged(layer.v.weight, f32["mv"]), merged(layer.v.bias, f32["mv"])
    wo = None
    if layer.o is not None:
        # input rows of the output projection, per query head: o_h = A_j (attention over v_g)
        rows = layer.o.tensor if layer.o.rows_are_inputs else layer.o.tensor.t()
        blocks = _blocks(rows.float(), d)
        new = torch.cat([f32["av"][j].T @ blocks[h] for h, j in zip(q_order, q_kv)]).to(rows.dtype)
        wo = new if layer.o.rows_are_inputs else new.t().contiguous()
    return (wq, bq), (wk, bk), (wv, bv), wo, q_order


def _is_identity(maps, d) -> bool:
    return all(torch.equal(m, torch.eye(d, dtype=m.dtype)) for m in maps)


def _needs_q_rewrite(layer: Layer, q_order) -> bool:
    """Q changes when heads move or K is rotated; a slice of a fused projection is split
    out anyway, so that the fused matmul (with the old K/V columns) goes away."""
    return q_order != list(range(layer.heads)) or not _is_identity(layer.plan["ak"], layer.head_dim) or layer.q.fused


def rewrite(graph: Graph, layers: list[Layer], G: int) -> tuple[Graph, dict]:
    """A new graph with each layer's projections replaced; returns it and, per attention
    node, (new attention output value, query head order) for error measurement."""
    out = graph.with_nodes(graph.nodes)
    producers = graph.producers()
    replace_at: dict[int, list] = {}  # id(node producing a projection's output) -> [(proj, w, b)]
    weight_swap: dict[int, Value] = {}  # id(out-projection node) -> new weight value
    orders = {}
    for layer in layers:
        (wq, bq), (wk, bk), (wv, bv), wo, q_order = _new_weights(layer)
        orders[id(layer.attn)] = q_order
        for role, proj, w, b in (("q", layer.q, wq, bq), ("k", layer.k, wk, bk), ("v", layer.v, wv, bv)):
            if proj is layer.q and not _needs_q_rewrite(layer, q_order):
                continue
            replace_at.setdefault(id(producers[proj.out]), []).append((role, proj, w, b))
        if wo is not None:
            weight_swap[id(layer.o.node)] = out.add_param(layer.o.weight.param + ".gqa", wo)
        elif q_order != list(range(layer.heads)) or not _is_identity(layer.plan["av"], layer.head_dim):
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
            node = _retyped(node, inputs, renamed)
        if node.op == "attention" and orders.get(original, []) != list(range(len(orders.get(original, [])))):
            node, extra = _per_head_inputs_moved(node, orders[original])
            nodes.extend(extra)
        block_out[original] = node.outputs[0]
        nodes.append(node)
        if node.op == "attention":
            new_attn[original] = node.outputs[0]
        for role, proj, w, b in replace_at.get(original, []):
            bld = Builder(meta={**node.meta, "pass": "gqa"})
            weight = out.add_param(f"{proj.name}.gqa_{role}", w)  # weight, then bias: the IR's param order
            bias = out.add_param(f"{proj.name}.gqa_{role}_bias", b) if b is not None else None
            y = emit_projection(bld, proj, renamed.get(proj.x, proj.x), weight, bias)
            nodes.extend(bld.nodes)
            renamed[proj.out] = y
    g = out.with_nodes(nodes, [renamed.get(v, v) for v in graph.outputs])
    return dead_code_elimination(g), {"orders": orders, "attn": new_attn, "out": block_out}


def _per_head_inputs_moved(node: Node, order: list[int]) -> tuple[Node, list[Node]]:
    """The attention node with its inputs of one value per query head -- the ALiBi slopes
    (alibi=true) and the sinks (sinks=true), the last inputs -- in the new query head
    `order`, and the nodes that reorder them: the query heads moved, and slopes[h] or
    sinks[h] belong to the head, not to its position."""
    per_head = bool(node.attrs.get("alibi")) + bool(node.attrs.get("sinks"))
    if not per_head:
        return node, []
    bld = Builder(meta={**node.meta, "pass": "gqa"})
    first = len(node.inputs) - per_head
    moved = tuple(bld.emit("cat", *(bld.emit("slice", x, dim=0, start=j, end=j + 1, step=1) for j in order), dim=0)
                  for x in node.inputs[first:])
    return Node(node.op, node.inputs[:first] + moved, node.attrs, node.outputs, node.meta), bld.nodes


def _retyped(node: Node, inputs: tuple, renamed: dict) -> Node:
    """The node with new inputs; where an input lost heads, its type (and a head-splitting
    view's shape) follow."""
    attrs = node.attrs
    if node.op == "view" and not inputs[0].type.same_as(node.inputs[0].type):
        shape = list(attrs["shape"])
        old_width, new_width = node.inputs[0].shape[-1], inputs[0].shape[-1]
        if len(shape) >= 2 and shape[-1] * shape[-2] == old_width:
            shape[-2] = new_width // shape[-1]
        attrs = {**attrs, "shape": tuple(shape)}
    return retyped(node, inputs, renamed, attrs)[0]


# -- the pass --------------------------------------------------------------------------------
def gqa(graph: Graph, ctx=None) -> Graph:
    config = as_config(ctx.options["gqa"] if ctx is not None else None)
    G = config.num_kv_heads
    layers = find_layers(graph, config.method)
    if not layers:
        raise GQAError("gqa: the graph has no fused attention op. Run fuse_attention first (it is in the default "
                       "pipeline); if it ran, its notes (below) say why it declined this model's attention")
    for layer in layers:
        if layer.kv_heads % G:
            raise GQAError(f"gqa: {G} KV heads does not divide this model's {layer.kv_heads} KV heads; choose a "
                           f"divisor of {layer.kv_heads}\n  at: attention{layer.attn.where()}")
    calib = _calibration_inputs(graph, config.calibration)
    if calib is not None and ctx is not None:
        ctx.status(f"gqa: calibrating {len(layers)} attention layers on inputs of shape "
                   f"{tuple(calib[0].shape) if hasattr(calib[0], 'shape') else '?'}")
    if config.method == "aligned" and calib is None:
        raise GQAError(_NEEDS_CALIBRATION)

    acts = None
    split = None
    if calib is not None:
        # 'mean' fits nothing: its error is measured on all the calibration inputs
        n = _tokens(calib)
        split = _split_calibration(graph, layers, calib) if config.method == "aligned" else \
            _Calibration(calib, calib, n, f"all {n} calibration tokens ('mean' fits nothing to them)", True)
    if config.method == "aligned":
        values = [v for layer in layers for v in (layer.k.out, layer.v.out)]
        if split.held_out:
            # the model must run the calibration as given (130 tokens for 128 positions
            # fails, named as the calibration's), not only the shorter parts of it
            _run_calibration(graph, values, calib)
        flat = _run_calibration(graph, values, split.fit)
        _check_enough_tokens(layers, flat[0::2])
        acts = [(k.reshape(-1, layer.kv_heads, layer.head_dim).double(),
                 v.reshape(-1, layer.kv_heads, layer.head_dim).double())
                for layer, k, v in zip(layers, flat[0::2], flat[1::2])]
    rotary_ok, note = True, ""
    if config.method == "aligned" and not all(layer.k_plain for layer in layers):
        # rotary models: merging K with per-pair complex maps is exact only in the
        # rotate-half layout; check that layout on the calibration inputs first
        rotary_ok = _rotary_layout_ok(graph, layers, calib)
        if not rotary_ok:
            note = ("; rotary embeddings are not rotate-half over each whole head (partial rotary, as GPT-NeoX's "
                    "and Phi's, or another pairing), so K heads are only averaged")
    for i, layer in enumerate(layers):
        plan_layer(layer, G, config.method, *(acts[i] if acts else (None, None)), rotary_ok=rotary_ok)
    new, info = rewrite(graph, layers, G)

    details = {"method": config.method, "num_kv_heads": G, "layers": [],
               "error_measured_on": None if split is None else split.measured_on,
               "error_tokens": None if split is None else split.held_tokens,
               "error_held_out": None if split is None else split.held_out}
    errors = _attention_errors(graph, new, layers, info, split.held) if split is not None else None
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
        err = "no calibration inputs: pass GQAConfig(calibration=...) to measure each layer's error" if errors is None else \
            f"attention output relative error per layer ({split.measured_on}): " + \
            ", ".join(f"{e:.3g}" for e in errors)
        ctx.note(f"{len(layers)} attention layers -> {G} KV heads ({config.method}); KV cache bytes per token "
                 f"{before} -> {after}{note}; {err}")
    return new


def _unpermute(out: torch.Tensor, order: list[int]) -> torch.Tensor:
    """Attention output [B, H, T, D] with query heads in `order` back to the model's order."""
    inverse = [0] * len(order)
    for new, old in enumerate(order):
        inverse[old] = new
    return out[:, inverse]


def _block_output(layer: Layer, users: dict, info: dict | None = None) -> Value:
    """Where the attention block's output is measured: after the output projection, its
    bias included (V rotations and head permutations are exact only there), else the
    attention op's. `users`: the old graph's Graph.users()."""
    if layer.o is None:
        return layer.attn.outputs[0] if info is None else info["attn"][id(layer.attn)]
    node = _with_bias(layer.o.node, users)
    return node.outputs[0] if info is None else info["out"][id(node)]


def _with_bias(node: Node, users: dict) -> Node:
    """The node that ends an output projection: GPT-2's Conv1D is a matmul, then an add
    of its bias (a 1-D parameter), which the block's output includes."""
    readers = users.get(node.outputs[0], [])
    if len(readers) == 1 and readers[0].op == "add" and \
            any(v.param is not None and v.rank == 1 for v in readers[0].inputs):
        return readers[0]
    return node


def _attention_errors(old: Graph, new: Graph, layers, info, calib) -> list[float]:
    users = old.users()
    ref = _run_calibration(old, [_block_output(layer, users) for layer in layers], calib)
    got = run_values(new, [_block_output(layer, users, info) for layer in layers], calib)
    errs = []
    for layer, r, g in zip(layers, ref, got):
        if layer.o is None:
            g = _unpermute(g, info["orders"][id(layer.attn)])
        errs.append(float((g.float() - r.float()).norm() / r.float().norm().clamp_min(1e-30)))
    return errs


def _rotary_layout_ok(graph: Graph, layers, calib) -> bool:
    """Fold random per-pair rotations into Q and K of every head (no merging): if rotary
    embeddings use the rotate-half layout they commute and the model must not change,
    up to the rounding of the rotated weights. That rounding is measured with a control
    that commutes with any layout (K scaled by c, Q by 1 / c): in float32 it is ~1e-7,
    in bfloat16 ~1e-3, which a fixed tolerance would take for a wrong layout."""
    gen = torch.Generator().manual_seed(0)

    def rotations(layer):
        half = layer.head_dim // 2
        return [_pair_block(torch.polar(torch.ones(half, dtype=torch.float64),
                                        torch.rand(half, generator=gen, dtype=torch.float64) * 6.28))
                for _ in range(layer.kv_heads)]

    def scalings(layer):
        eye = torch.eye(layer.head_dim, dtype=torch.float64)
        return [eye * 1.37] * layer.kv_heads

    errs = _errors_with_k_maps(graph, layers, calib, rotations)
    control = _errors_with_k_maps(graph, layers, calib, scalings)
    return all(e < 1e-4 + 2 * c for e, c in zip(errs, control))


def _errors_with_k_maps(graph: Graph, layers, calib, maps) -> list[float]:
    """Each layer's attention output error with K's heads mapped by `maps(layer)` (M,
    invertible) and Q by A = M^-1 (q . k = (A^T q) . (M k)), which leaves the scores unchanged in exact arithmetic."""
    saved = [layer.plan for layer in layers]
    for layer in layers:
        eye = torch.eye(layer.head_dim, dtype=torch.float64)
        mk = maps(layer)
        layer.plan = {"groups": [[j] for j in range(layer.kv_heads)], "mk": mk,
                      "ak": [torch.linalg.inv(m) for m in mk],
                      "mv": [eye] * layer.kv_heads, "av": [eye] * layer.kv_heads}
    try:
        rotated, info = rewrite(graph, layers, max(layer.kv_heads for layer in layers))
        return _attention_errors(graph, rotated, layers, info, calib)
    finally:
        for layer, plan in zip(layers, saved):
            layer.plan = plan
