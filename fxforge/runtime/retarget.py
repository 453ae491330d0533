"""OptimizedModel.to(device / dtype): the optimized graph on another device or in another
float dtype. The backend's planning and the program are then rebuilt from it (build.py).

A device move copies the weights. A dtype change casts every floating weight, state
buffer and float input, then re-derives every node's type from the op registry's type
rules. That is only the model's computation in the new dtype when no node fixes a float
dtype of its own: a cast written in the model (`x.float()`, Llama's RMSNorm and rotary
embeddings), a float constant tensor, an op whose type is stored rather than derived.
Such a node pins the dtype, and `to()` refuses with the IR line that pins it, rather than
running something the model would not compute; optimize the model again after
`model.to(dtype)` then. A cast the model asks for that was a no-op at capture (`x.float()`
on a float32 x) leaves no node, but capture records it in the graph's signature
(`fixed_dtypes`, ir/roles.py): it pins the same way. So does a float constant tensor that
is not a parameter or buffer (a plain tensor attribute, a `torch.tensor([...])` made in
forward), which model.to() leaves in its dtype: capture records it there too, and so does
quantize a compute dtype the user asked for (QuantConfig(compute_dtype=...)). Each entry
has its kind, and the refusal words each kind as what it is.

A float the model computed from its dtype at capture (`torch.finfo(x.dtype).eps` in a
hand-written RMSNorm, T5's clamp to `finfo.max - 1000`, a `finfo.min` mask fill) is baked
into the graph as a number, and in another dtype the model would compute another. A scalar
of the graph (any op's attribute, a fused body's constant) equal to a torch.finfo value of
the dtype the graph is leaving pins too, as does a clamp bound the new dtype cannot hold
(torch.clamp raises on it at every call), or a masked_fill value (-1e9 in float16: torch's
masked_fill raises on it), the one in a const {fill=true} or one fuse_attention folded into
the fused op, which the signature records as a `fill` entry of fixed_dtypes for each dtype
that cannot hold it. The float32 bias fuse_attention builds from such a fill (a where of two
constants read only as an attention's bias, or a fused_pointwise that only chooses among
constants by a mask: an int padding mask's `~keep.bool()` fused with it) is the op's own
accumulation dtype, not one the model fixed: it does not pin. A torch.finfo(d).min in such
a bias (`masked_fill(pad, torch.finfo(s.dtype).min)`) is retyped to the new dtype's min, as
fuse_attention builds it from the converted model, rather than pinning.

Fused bodies hold dtypes too. A cast in one that copies (to its operand's own dtype) is
a pass's: the K/V store into a dense cache (kv_append written as a fused body) casts to
the cache dtype, the keys' own; it is retyped to copy in the new dtype, with the cache.
Any other float cast in a body pins like a cast node, even where the node's outputs do
not show it (a value rounded inside the kernel that only feeds a comparison). A cache
dtype set at optimize (KVCacheConfig(dtype=...), in fixed_dtypes) refuses.
"""
from __future__ import annotations

import torch

from ..ir import roles
from ..ir.attr_walk import attr_leaves
from ..ir.dtypes import finfo_name, finfo_named_value
from ..ir.graph import Graph, Node, Value
from ..ir.ops import OPS, _run_body
from ..ir.printer import Namer, format_node
from ..ir.types import TensorType


# the activation dtypes the quantized linear kernels take (runtime/torch_kernels.py, codegen)
QUANT_COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class DtypePinnedError(TypeError):
    """The graph's own types fix a float dtype, so it cannot be retyped exactly."""


def graph_on(graph: Graph, device: torch.device | None = None, dtype: torch.dtype | None = None) -> Graph:
    """A new graph like `graph` with its weights on `device` and its floats in `dtype`
    (None: unchanged)."""
    if dtype is not None:
        graph = retyped(graph, dtype)
    if device is not None:
        moved = graph.with_nodes(graph.nodes)
        moved.params = _mapped(graph.params, lambda t: t.to(device))
        graph = moved
    return graph


def retyped(graph: Graph, dtype: torch.dtype) -> Graph:
    if not dtype.is_floating_point:
        raise TypeError(f"to({dtype}): an optimized model changes only to a floating dtype (its integer inputs "
                        "and quantized weights keep theirs)")
    quantized = [n for n in graph.nodes if n.op == "quant_linear" or n.attrs.get("qattrs")]
    if quantized and dtype not in QUANT_COMPUTE_DTYPES:
        names = Namer(graph)
        raise TypeError(
            f"to({dtype}): the model is quantized, and its quantized linears compute in "
            f"{', '.join(map(str, QUANT_COMPUTE_DTYPES))} only, e.g.\n  {format_node(quantized[0], names)}"
            f"{quantized[0].where()}\nUse one of those dtypes, or optimize the model without quantize= for {dtype}")
    new: dict[Value, Value] = {}
    for v in graph.inputs + graph.param_values + graph.state_values:
        new[v] = _as_dtype(v, dtype)
    fixed = [entry for entry in graph.signature.get("fixed_dtypes", ()) if _fixed_refuses(entry, dtype)]
    nodes, pinned = [], []
    own_bias = _attention_biases_of_consts(graph)
    finfo_fills = _bias_finfo_fills(graph, own_bias, dtype)
    retyped_attrs = {}
    for node in graph.nodes:
        inputs = tuple(new.get(v, v) for v in node.inputs)
        attrs = _consts_retyped(_copies_retyped(node, inputs), node.op, dtype)
        if id(node) in finfo_fills:
            attrs = retyped_attrs[id(node)] = finfo_fills[id(node)](attrs)
        inferred = OPS[node.op].infer([v.type for v in inputs], attrs) if node.op in OPS else None
        types = inferred if inferred is not None else [v.type for v in node.outputs]
        outputs = tuple(Value(t, v.hint, v.param, v.state, v.attrs) for t, v in zip(types, node.outputs))
        new.update(zip(node.outputs, outputs))
        # where a pinned dtype starts (what follows from it is not the node to blame)
        pins = any(_pins(v, dtype) for v in outputs) or _body_pins(attrs, dtype)
        if pins and not any(_pins(v, dtype) for v in inputs) and id(node) not in own_bias:
            pinned.append(node)
        nodes.append(Node(node.op, inputs, attrs, outputs, node.meta))
    scalars = _dtype_scalars(graph, dtype, retyped_attrs)
    if pinned or fixed or scalars:
        raise _pinned_error(graph, pinned, dtype, fixed, scalars)
    out = graph.with_nodes(nodes, [new.get(v, v) for v in graph.outputs])
    out.inputs = [new[v] for v in graph.inputs]
    out.param_values = [new[v] for v in graph.param_values]
    out.state_values = [new[v] for v in graph.state_values]
    out.params = _mapped(graph.params, lambda t: t.to(dtype) if t.is_floating_point() else t)
    return out


def _fixed_refuses(entry: tuple, dtype: torch.dtype) -> bool:
    """Whether a fixed_dtypes entry (dtype, kind, why) refuses `dtype`: another dtype than
    the one it keeps, except a `fill` entry, which names the one dtype it refuses (one that
    cannot hold a masked_fill value fuse_attention folded away). A cache dtype set at
    optimize refuses even its own dtype: the graph casts K/V to it and back to the model's
    dtype, and those casts back are the model's old dtype then."""
    kept, kind = entry[0], entry[1]
    if kind == roles.FIXED_FILL:
        return kept == dtype
    return kept != dtype or kind == roles.FIXED_CACHE_DTYPE


# what may lie between a bias and the attention that reads it: fuse_attention's terms.build
# (folded heads unsqueezed or viewed, terms summed, a scale, a floor)
_BIAS_STEPS = ("unsqueeze", "view", "expand", "add", "mul", "where", "lt")


def _attention_biases_of_consts(graph: Graph) -> set[int]:
    """The ids of the `where(mask, c1, c2)` nodes, c1 and c2 constants, read only (through
    _BIAS_STEPS) as an attention's bias: fuse_attention's bias for a mask the model filled
    with a number (terms.build). Its float32 comes from its constants, which keep their
    dtype (_const_float_dtype: float32, float64 in a float64 model) as fuse_attention gives
    them in any model dtype, the accumulation dtype the op reads its bias in: no dtype the
    model fixed. The same where fused with the mask's own ops into a fused_pointwise
    (`~keep.bool()` of an int 0/1 padding mask, HF's attention_mask) counts too, when its
    one output is such a selection of constants (_selects_consts_only)."""
    producers, users = graph.producers(), graph.users()
    outputs = set(graph.outputs)

    def only_bias(v: Value, depth: int = 0) -> bool:
        if v in outputs or depth > 8 or not users.get(v):
            return False
        for u in users[v]:
            if u.op == "attention":
                if [i for i, x in enumerate(u.inputs) if x is v] != [3]:
                    return False
            elif u.op not in _BIAS_STEPS or not only_bias(u.outputs[0], depth + 1):
                return False
        return True

    def const(v: Value) -> bool:
        return v.rank == 0 and (p := producers.get(v)) is not None and p.op == "const"

    def selects_consts(n: Node) -> bool:
        if n.op == "where":
            return len(n.inputs) == 3 and const(n.inputs[1]) and const(n.inputs[2])
        return n.op == "fused_pointwise" and len(n.outputs) == 1 and not n.attrs.get("into") \
            and _chosen_consts(n.attrs["body"], n.attrs["outputs"]) is not None

    return {id(n) for n in graph.nodes if selects_consts(n) and only_bias(n.outputs[0])}


def _chosen_consts(body: tuple, outputs: tuple) -> set[int] | None:
    """The indices of the const steps a fused body's one output is chosen from by masks
    (where steps whose two values are const steps or such where steps, whatever computes
    the mask), or None when the output is not such a choice or a step of the body casts to
    a float dtype (the mask's own ops cast to bool: `keep.bool()`): its float dtype is
    then the constants' alone."""
    if len(outputs) != 1 or any(op == "cast" and isinstance(dt := dict(attrs).get("dtype"), torch.dtype)
                                and dt.is_floating_point for op, _, attrs in body):
        return None
    found: set[int] = set()

    def chosen(ref: str, depth: int = 0) -> bool:
        if not ref.startswith("t") or depth > 8:
            return False
        op, args, _ = body[int(ref[1:])]
        if op == "const":
            found.add(int(ref[1:]))
            return True
        return op == "where" and len(args) == 3 and chosen(args[1], depth + 1) and chosen(args[2], depth + 1)
    return found if body[int(outputs[0][1:])][0] == "where" and chosen(outputs[0]) else None


def _bias_finfo_fills(graph: Graph, own_bias: set[int], dtype: torch.dtype) -> dict[int, object]:
    """For each node holding a constant of an attention's own bias (_attention_biases_of_consts)
    that equals torch.finfo(d).min of a float dtype d the graph leaves, a function that
    retypes its attrs to hold torch.finfo(dtype).min instead: fuse_attention's bias for
    `masked_fill(mask, torch.finfo(s.dtype).min)` (HF's padding mask), as it builds it
    from a model in `dtype` (the const's own dtype follows _const_float_dtype). Elsewhere a
    finfo value pins (_dtype_scalars); in such a bias it is the model's fill, which in
    another dtype is that dtype's own min, a key dropped all the same (as the causal form,
    folded whole, converts). A scaled one (a scale after the fill) stays, as it is."""
    leaving = _leaving(graph, dtype)

    def retyped_value(value):
        for d in sorted(leaving, key=str):
            if (named := finfo_name(value, d)) and named.endswith(".min"):
                return finfo_named_value(named, dtype)
        return value

    def const_attrs(attrs: dict) -> dict:
        return {**attrs, "value": retyped_value(attrs["value"])}

    def body_attrs(steps: set[int]):
        def retype(attrs: dict) -> dict:
            body = tuple((op, args, tuple((k, retyped_value(v) if k == "value" else v) for k, v in step_attrs))
                         if i in steps else (op, args, step_attrs)
                         for i, (op, args, step_attrs) in enumerate(attrs["body"]))
            return {**attrs, "body": body}
        return retype

    users, found = graph.users(), {}
    for node in graph.nodes:
        if node.op == "const" and users.get(node.outputs[0]) \
                and all(id(u) in own_bias and u.inputs[0] is not node.outputs[0] for u in users[node.outputs[0]]):
            if retyped_value(node.attrs.get("value")) != node.attrs.get("value"):
                found[id(node)] = const_attrs
        elif id(node) in own_bias and node.op == "fused_pointwise":
            values = {i: dict(node.attrs["body"][i][2]).get("value")
                      for i in _chosen_consts(node.attrs["body"], node.attrs["outputs"])}
            steps = {i for i, value in values.items() if retyped_value(value) != value}
            if steps:
                found[id(node)] = body_attrs(steps)
    return found


def _leaving(graph: Graph, dtype: torch.dtype) -> set[torch.dtype]:
    """The float dtypes of the graph's inputs, weights and state other than `dtype`: those
    retyping leaves."""
    return {v.type.dtype for v in graph.inputs + graph.param_values + graph.state_values
            if isinstance(v.type, TensorType) and v.type.dtype.is_floating_point} - {dtype}


def _as_dtype(v: Value, dtype: torch.dtype) -> Value:
    if isinstance(v.type, TensorType) and v.type.dtype.is_floating_point:
        return Value(TensorType(v.type.shape, dtype), v.hint, v.param, v.state, v.attrs)
    return v


def _pins(v: Value, dtype: torch.dtype) -> bool:
    """A float tensor (not a 0-dim constant, which torch's promotion lets the other
    operand's dtype win over) left in another dtype."""
    t = v.type
    return isinstance(t, TensorType) and t.dtype.is_floating_point and t.dtype != dtype and t.rank > 0


def _copies_retyped(node: Node, inputs: tuple[Value, ...]) -> dict:
    """`node`'s attrs with each cast that copies, to its operand's own float dtype, made to
    copy in the operand's new dtype. Capture drops the model's no-op casts (and records them
    in fixed_dtypes, which refuses), so such a cast is one a pass made to copy: a K/V store
    into the cache in a fused body (fuse_elementwise writes a kv_append so), which would
    otherwise keep rounding to the dtype the model was optimized in."""
    if node.op == "cast" and _copies(node.inputs[0], node.attrs["dtype"]):
        return {**node.attrs, "dtype": inputs[0].type.dtype}
    if node.op != "fused_pointwise":
        return node.attrs
    computed = len(node.inputs) - len(node.attrs.get("into") or ())  # (the stores' destinations come last)
    body = _body_copies_retyped(node.attrs["body"], [v.type for v in node.inputs[:computed]],
                                [v.type for v in inputs[:computed]])
    return node.attrs if body == node.attrs["body"] else {**node.attrs, "body": body}


def _const_float_dtype(old: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    """The dtype of a float constant (a Python float of the model: `x * 0.1`, an eps) once
    the model computes in `dtype`: what optimize() gives such a model afresh (lowering's
    _const_dtype), float64 in a float64 model (the model's exact value, not one rounded to
    float32 first), float32 otherwise. Only its rounding changes: a 0-dim constant never
    decides an op's dtype against a tensor operand."""
    return torch.float64 if dtype == torch.float64 else torch.float32 if old == torch.float64 else old


def _consts_retyped(attrs: dict, op: str, dtype: torch.dtype) -> dict:
    """`attrs` with each float constant retyped (_const_float_dtype): a const node's own, and
    the const steps of the fused bodies it holds (fused_pointwise's body, linear_fused's
    prologue and epilogue)."""
    def step(entry):
        if _is_body_entry(entry) and entry[0] == "const":
            items = tuple((k, _const_float_dtype(v, dtype) if k == "dtype" and isinstance(v, torch.dtype)
                           and v.is_floating_point else v) for k, v in entry[2])
            return (entry[0], entry[1], items) if items != entry[2] else entry
        if isinstance(entry, tuple):
            out = tuple(step(e) for e in entry)
            return entry if all(a is b for a, b in zip(out, entry)) else out
        return entry

    if op == "const":
        old = attrs.get("dtype")
        if isinstance(old, torch.dtype) and old.is_floating_point and _const_float_dtype(old, dtype) != old:
            return {**attrs, "dtype": _const_float_dtype(old, dtype)}
        return attrs
    changed = {k: step(v) for k, v in attrs.items() if isinstance(v, tuple)}
    changed = {k: v for k, v in changed.items() if v is not attrs[k]}
    return {**attrs, **changed} if changed else attrs


def _copies(operand, dtype) -> bool:
    """Whether a cast of `operand` (a Value or a TensorType) to `dtype` copies a float."""
    t = getattr(operand, "type", operand)
    return isinstance(t, TensorType) and t.dtype.is_floating_point and t.dtype == dtype


def _body_copies_retyped(body: tuple, old_types: list, new_types: list) -> tuple:
    """A fused body's copying casts (typed over `old_types`) made to copy over `new_types`.
    The body itself where none changes (a kernel's launch plan is keyed by its identity)."""
    before = _body_steps(body, old_types, lambda i, ts, attrs: attrs)

    def retarget(i, ts, attrs):
        if body[i][0] == "cast" and _copies(before[i][0][0], attrs["dtype"]):
            return {**attrs, "dtype": ts[0].dtype}
        return attrs
    after = _body_steps(body, new_types, retarget)
    if all(a == b for (_, a), (_, b) in zip(before, after)):
        return body
    return tuple((op, args, tuple(attrs.items())) for (op, args, _), (_, attrs) in zip(body, after))


def _body_steps(body: tuple, types: list, choose) -> list[tuple[list, dict]]:
    """(operand types, attrs) of each step of a fused body typed over `types`, where
    `choose(i, operand types, attrs)` gives the attrs step i is typed (and kept) with."""
    steps = []

    def step(op, ts, attrs):
        attrs = choose(len(steps), ts, attrs)
        steps.append((ts, attrs))
        return OPS[op].infer(ts, attrs)[0]
    _run_body(list(types), body, (), step)
    return steps


def _body_pins(attrs: dict, dtype: torch.dtype) -> bool:
    """Whether a fused body in `attrs` (a fused_pointwise's, a linear_fused's prologue or
    epilogue) casts to a float dtype other than `dtype` (once its copies are retyped): a
    cast the model makes, which no output of the node may show (a value rounded to bfloat16
    inside the kernel, then promoted back). A const step's dtype is 0-dim, which torch's
    promotion lets the tensor operand's dtype win over."""
    return any(isinstance(value, torch.dtype) and value.is_floating_point and value != dtype
               and _body_step_op(trail) not in (None, "const") for value, trail in attr_leaves(attrs))


def _body_step_op(trail: tuple) -> str | None:
    """The op of the innermost fused body entry an attr_leaves leaf sits in, or None."""
    ops = [container[0] for container, _ in trail if _is_body_entry(container)]
    return ops[-1] if ops else None


def _dtype_scalars(graph: Graph, dtype: torch.dtype, retyped_attrs: dict | None = None) -> list[tuple[Node, str]]:
    """The nodes holding a float scalar that is not the model's value in `dtype`, each with
    why: one equal to a torch.finfo value of a float dtype the graph leaves (the model
    computed it from that dtype), or a clamp bound `dtype` cannot hold. `retyped_attrs`:
    the attrs a node has once retyped where they hold other numbers (_bias_finfo_fills)."""
    leaving = _leaving(graph, dtype)
    if not leaving:  # (nothing changes dtype, so nothing computed from one changes)
        return []
    most = float(torch.finfo(dtype).max)
    found = []
    for node in graph.nodes:
        for op, key, value, owner in _floats((retyped_attrs or {}).get(id(node), node.attrs), node.op):
            named = next((n for n in map(lambda d: finfo_name(value, d), sorted(leaving, key=str)) if n), None)
            if named:
                # (a literal that happens to equal it, 1/128 in a bfloat16 model, is refused
                # too: the graph holds the number, not how it was made)
                why = (f"{value!r} equals {named}, which in {dtype} is {finfo_named_value(named, dtype):g}; if the "
                       "model computed it from its dtype, eager in the new dtype uses the latter (a literal that "
                       "happens to equal it cannot be told apart here)")
            elif op == "clamp" and key in ("min", "max") and abs(value) > most and abs(value) != float("inf"):
                why = f"clamp's {key}={value!r} does not fit in {dtype} (max {most:g}): torch.clamp raises on it"
            elif op == "const" and owner.get("fill") and abs(value) > most and abs(value) != float("inf"):
                why = (f"masked_fill's value {value!r} does not fit in {dtype} (max {most:g}): torch's masked_fill "
                       f"raises on it; a model that fills with torch.finfo(x.dtype).min works in every dtype")
            else:
                continue
            found.append((node, why))
            break
    return found


def _floats(attrs: dict, op: str):
    """(op, attribute name, value, that op's attrs) for each Python float in a node's
    attributes, a fused body's entries (`(op, inputs, ((name, value), ...))`) included: a
    float there is its entry's op's attribute (a clamp's bound inside a fused_pointwise),
    not the node's."""
    for value, trail in attr_leaves(attrs):
        if isinstance(value, float) and (owner := _owner(trail, op, attrs)) is not None:
            owner_op, key, owner_attrs = owner
            yield owner_op, key, value, owner_attrs


def _owner(trail: tuple, op: str, attrs: dict) -> tuple[str, object, dict] | None:
    """(op, attribute name, that op's attrs) that the leaf at the end of `trail`
    (attr_leaves of `attrs`) belongs to: the innermost body entry's, else `op`'s with the
    innermost dict key. None for a leaf among a body entry's op name and inputs, which are
    no attribute."""
    key = None
    for i, (container, k) in enumerate(trail):
        if isinstance(container, dict):
            key = k
        elif _is_body_entry(container):
            if k != 2:
                return None
            op, key = container[0], container[2][trail[i + 1][1]][0]  # the (name, value) pair the leaf is in
            attrs = dict(container[2])
    return op, key, attrs


def _is_body_entry(obj) -> bool:
    return isinstance(obj, (tuple, list)) and len(obj) == 3 and isinstance(obj[0], str) \
        and isinstance(obj[1], tuple) and isinstance(obj[2], tuple) \
        and all(isinstance(a, tuple) and len(a) == 2 and isinstance(a[0], str) for a in obj[2])


# what each kind of fixed_dtypes entry says in to()'s refusal, given its dtypes
_FIXED_WHAT = {
    roles.FIXED_CAST: "the model's code casts to {} (a no-op at capture, so no IR line shows it)",
    roles.FIXED_CONSTANT: "the model reads {} constant tensor(s) that are not parameters or buffers (model.to() "
                          "does not convert them, and one made in forward may have followed the input's dtype: the "
                          "graph cannot tell which)",
    roles.FIXED_COMPUTE_DTYPE: "the optimization pins its compute dtype to {} (asked for at optimize; where the "
                               "model computes in it already, no IR line casts to it)",
    roles.FIXED_CACHE_DTYPE: "the KV cache's dtype was set to {} at optimize (KVCacheConfig(dtype=...)), which "
                             "a retyped graph would not keep: where it differs from the model's, K/V are cast to "
                             "it and back, casts that retyping cannot redo",
    roles.FIXED_FILL: "the model's masked_fill writes a number {} cannot hold into attention scores (eager raises "
                      "there; the fill was folded into fused attention, so no IR line shows it)",
}


def _pinned_error(graph: Graph, pinned: list[Node], dtype: torch.dtype, fixed: list = (),
                  scalars: list = ()) -> DtypePinnedError:
    """`fixed`: the signature's (dtype, kind, why) entries for a dtype other than `dtype`
    (ir/roles.py): no-op casts and constant tensors (capture), a compute dtype asked for
    (quantize). `scalars`: (node, why) from _dtype_scalars."""
    names = Namer(graph)
    sections, whats = [], []
    why = {id(n): w for n, w in scalars}  # a node both pinned and holding such a number: listed once, with why

    def node_lines(nodes):
        lines = "\n".join(f"  {format_node(n, names)}{n.where()}" + (f"\n    ({why[id(n)]})" if id(n) in why else "")
                          for n in nodes[:3])
        return lines + (f"\n  ... and {len(nodes) - 3} more" if len(nodes) > 3 else "")

    if pinned:
        sections.append(node_lines(pinned))
        whats.append(f"{len(pinned)} node(s) of the optimized IR fix their float dtype")
    for kind, what in _FIXED_WHAT.items():
        entries = [(dt, text) for dt, k, text in fixed if k == kind]
        if entries:
            lines = "\n".join(f"  {text}" for _, text in entries[:3])
            sections.append(lines + (f"\n  ... and {len(entries) - 3} more" if len(entries) > 3 else ""))
            whats.append(what.format(", ".join(sorted({str(dt) for dt, _ in entries}))))
    if scalars:
        shown = {id(n) for n in pinned[:3]}  # (those shown above have their why)
        rest = [n for n, _ in scalars if id(n) not in shown]
        if rest:
            sections.append(node_lines(rest))
        whats.append(f"{len(scalars)} node(s) hold a number that is not the model's in {dtype} (one it computed "
                     "from its dtype at capture, torch.finfo, or one the new dtype cannot hold)")
    what = ", ".join(whats[:-1]) + (" and " if len(whats) > 1 else "") + whats[-1]
    body = "\n".join(sections)
    return DtypePinnedError(
        f"to({dtype}): {what}, so retyping the graph "
        f"would not be the model's computation in {dtype}:\n{body}\n"
        f"Convert the model instead and optimize it again: fxforge.optimize(model.to({dtype}), example_inputs)")


def _mapped(params: dict, convert) -> dict:
    """`convert` applied to each tensor once, so that tied weights stay one tensor."""
    done: dict[int, torch.Tensor] = {}
    out = {}
    for name, t in params.items():
        if id(t) not in done:
            done[id(t)] = convert(t)
        out[name] = done[id(t)]
    return out
