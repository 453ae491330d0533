"""fuse_elementwise: connected pointwise ops become one `fused_pointwise` node, which the
Triton backends run as one generated kernel (codegen/pointwise.py).

A group is a connected set of pointwise nodes that all produce the same shape (their
inputs may broadcast into it) and float or bool values. Groups are the connected parts
of the fusible dataflow edges; contracting every group must leave the graph a DAG, which
`find_cycle` (networkx's search, on plain dicts) checks on the quotient graph: a group
on a cycle through an unfused node is split (most such cycles, a residual add's two
operands, are ruled out before grouping, in one pass over the graph). A member used
outside its group becomes an extra output of the fused node (no recomputation: every
member is computed once, in one pass over memory).

The fused node's `body` lists the steps, each `(op, operands, attrs)`, where an operand
is "inK" (the K-th input of the fused node) or "tK" (the result of step K); `outputs`
names the steps that leave the kernel.
"""
from __future__ import annotations

import networkx as nx
import torch

from ..ir.edit import dead_code_elimination
from ..ir.graph import Graph, Node, Value
from ..codegen.pointwise import POW_EXPONENTS
from ..ir.ops import OPS

# Only ops whose Triton template the codegen knows are fused.
MIN_GROUP = 2  # a lone op gains nothing from a kernel of its own


def gathers_last_dim(node: Node) -> bool:
    """A cat along the last dim of same-dtype float operands of static widths. It moves no
    arithmetic, only indices: in a fused kernel each output element is its operand's value
    at a shifted last index (codegen/pointwise.py), computed there, so rotary's
    rotate-half (neg of a half, cat, mul, add) is one kernel with the rest of its group."""
    if node.op != "cat" or len(node.outputs) != 1:
        return False
    out = node.outputs[0]
    if not out.dtype.is_floating_point or out.rank == 0 or node.attrs["dim"] % out.rank != out.rank - 1:
        return False
    return all(v.dtype == out.dtype and v.rank == out.rank and v.shape[:-1] == out.shape[:-1]
               and v.shape[-1].is_number for v in node.inputs)


def _fusible(node: Node, producers: dict | None = None, nodes=None) -> bool:
    if gathers_last_dim(node):
        return True
    if OPS[node.op].kind != "pointwise" or len(node.outputs) != 1:
        return False
    if node.op == "pow":  # the codegen needs a small constant exponent
        j = producers.get(node.inputs[1]) if producers is not None else None
        c = nodes[j].attrs.get("value") if j is not None and nodes[j].op == "const" else None
        if not isinstance(c, (int, float)) or float(c) not in POW_EXPONENTS:
            return False
    out = node.outputs[0]
    return out.dtype.is_floating_point or out.dtype == torch.bool


MAX_ROW = 16384  # longest row one program holds (the codegen's BLOCK_N)


def row_length(node: Node):
    """N if `node` reduces (or normalises) over the last dim of an [..., N] float input,
    in a form the row kernel handles; else None."""
    if len(node.outputs) != 1 or not node.inputs:
        return None
    x = node.inputs[0]
    if not x.dtype.is_floating_point or node.outputs[0].dtype != x.dtype or x.rank == 0:
        return None
    last = x.rank - 1
    if OPS[node.op].has("row_reduction"):
        ok = tuple(node.attrs["dims"]) == (last,) and node.attrs["keepdim"] and not node.attrs.get("dtype")
    elif node.op == "softmax":
        ok = node.attrs["dim"] == last and not node.attrs.get("dtype")
    elif node.op in ("layer_norm", "rms_norm"):
        ok = len(node.attrs["shape"]) == 1 and all(v.rank == 1 for v in node.inputs[1:])
    else:
        ok = False
    n = x.shape[-1]
    return n if ok and n.is_number and 1 < int(n) <= MAX_ROW else None


def _edge_ok(j: Node, i: Node, rows: dict) -> bool:
    """May producer j and consumer i share a kernel?"""
    sj, si = j.outputs[0].type.shape, i.outputs[0].type.shape
    if "cat" in (i.op, j.op):  # a fusible cat: never in a row kernel; its operands are narrower
        if rows.get(id(i)) is not None or rows.get(id(j)) is not None:
            return False
        return sj[:-1] == si[:-1] if i.op == "cat" else sj == si
    if sj == si:
        return True
    if sj and si and si[:-1] == sj[:-1] and sj[-1] == 1 and si[-1] != 1:
        return True  # a per-row value (e.g. rsqrt of a mean) broadcast back over the row
    if rows.get(id(i)) is not None and i.inputs[0].type.shape == sj:
        return True  # a row computed by the prologue, then reduced
    return False


def _one_kernel(group: list[int], nodes, rows: dict, escapes=None) -> bool:
    """A group is one kernel if all its results share a shape (the flat kernel), or it
    reduces rows of one length N and every result is [..., N] or [..., 1] (the row kernel).
    With a cat, the flat kernel's shape is that of its last member (a sink, so an output);
    narrower members are computed only under a cat, at shifted indices, so none may be
    used outside the group (`escapes(i, group)`), nor may the group reduce rows."""
    if any(nodes[i].op == "cat" for i in group):
        if any(rows[id(nodes[i])] is not None for i in group):
            return False
        shape = nodes[group[-1]].outputs[0].type.shape
        return all(nodes[i].outputs[0].type.shape == shape or not escapes(i, group) for i in group)
    shapes = {nodes[i].outputs[0].type.shape for i in group}
    if len(shapes) == 1:
        return True
    lengths = {rows[id(nodes[i])] for i in group} - {None}
    if len(lengths) != 1:
        return False
    n = lengths.pop()
    return len({s[:-1] for s in shapes}) == 1 and all(s[-1] in (n, 1) for s in shapes)


def find_groups(graph: Graph) -> list[list[int]]:
    """Index lists of the nodes to fuse, each list in graph order.

    Fusible edges whose ends also meet through an unfused node are dropped first
    (`_without_certain_cycles`); connected parts over the rest give the first groups; a
    group that is not one kernel is cut where shapes change; then, while contracting the
    groups leaves a cycle (the first one `find_cycle` meets), the group on it is split.
    Each split changes only the group it cuts, so only that group's pieces are recomputed."""
    nodes = graph.nodes
    producers = {v: i for i, n in enumerate(nodes) for v in n.outputs}
    rows = {id(n): row_length(n) for n in nodes}
    fusible = [_fusible(n, producers, nodes) or rows[id(n)] is not None for n in nodes]
    edges = [(j, i) for i, n in enumerate(nodes) if fusible[i] for v in n.inputs
             if (j := producers.get(v)) is not None and fusible[j] and nodes[j].op != "const"
             and _edge_ok(nodes[j], n, rows)]
    edges = _without_certain_cycles(nodes, producers, fusible, edges)
    dag = _DataflowDag(nodes, producers)
    parts = _Partition(nodes, fusible, edges, dag.rank, _Escapes(graph, producers))
    for group in parts.groups():
        parts.cut_if_not_one_kernel(group, rows)
    while True:
        cycle = find_cycle(_Quotient(parts, dag))
        if not cycle:
            return parts.sorted_groups()
        # A group G reaches an outside node x that reaches G again (e.g. x = mean of an
        # RMSNorm between two pointwise chains). Split G: the members downstream of x
        # go apart from the rest.
        k = next(n for n, (u, _) in enumerate(cycle) if isinstance(u, tuple))
        group = set(parts.members[cycle[k][0][1]])
        x = cycle[k][1]
        x_idx = parts.first[x[1]] if isinstance(x, tuple) else x
        downstream = _reachable(dag.succ, x_idx, max(group)) & group
        inside = parts.edges_within(group)
        new_cuts = [e for e in inside if (edges[e][0] in downstream) != (edges[e][1] in downstream)]
        if not new_cuts:  # cannot happen for a real cycle; guard against looping forever
            new_cuts = parts.edges_touching(group)
        for piece in parts.cut(cycle[k][0][1], new_cuts):
            parts.cut_if_not_one_kernel(piece, rows)


def _without_certain_cycles(nodes, producers, fusible, edges) -> list[tuple[int, int]]:
    """Drop the fusible edges j -> i whose ends can never share a group: j also reaches i
    through a node that is never fused (a residual add's two operands: the stream, and
    the stream after a matmul), so one kernel holding both would need its own output.

    The loop in find_groups would split such a group anyway, one cycle at a time; on a
    deep model the residual stream is one group across all layers, split about twice per
    layer, and each split cost time in proportion to what was left of it (quadratic in
    depth). Deciding these edges up front leaves the loop the rare cycles through fusible
    nodes. Reachability is a bitmask per node of the unfusible nodes above it (and below
    it), each built in one pass over the graph in order."""
    unfused_bit = {}
    for i, fuses in enumerate(fusible):
        if not fuses:
            unfused_bit[i] = 1 << len(unfused_bit)
    above = [0] * len(nodes)  # unfusible nodes with a path to node i (i itself excluded)
    for i, n in enumerate(nodes):
        mask = 0
        for v in n.inputs:
            j = producers.get(v)
            if j is not None:
                mask |= above[j] | unfused_bit.get(j, 0)
        above[i] = mask
    below = [0] * len(nodes)  # unfusible nodes node j has a path to (j itself excluded)
    for j in range(len(nodes) - 1, -1, -1):
        mask = below[j]
        for v in nodes[j].inputs:
            k = producers.get(v)
            if k is not None:
                below[k] |= mask | unfused_bit.get(j, 0)
    return [(j, i) for j, i in edges if not below[j] & above[i]]


class _Escapes:
    """escapes(i, group): is node i's result used outside `group` (or returned)?"""

    def __init__(self, graph: Graph, producers: dict):
        self.users: dict[int, set] = {}
        for k, n in enumerate(graph.nodes):
            for v in n.inputs:
                j = producers.get(v)
                if j is not None:
                    self.users.setdefault(j, set()).add(k)
        self.returned = {producers[v] for v in graph.outputs if v in producers}

    def __call__(self, i: int, group) -> bool:
        return i in self.returned or not self.users.get(i, set()) <= set(group)


class _DataflowDag:
    """The node-level dataflow DAG as networkx would hold it: nodes ranked in the order
    an edge first names them, successors in insertion order. (The quotient's successor
    order, and so the cycle found, follows this order.)"""

    def __init__(self, nodes, producers):
        succ: dict[int, dict[int, None]] = {}
        for i, n in enumerate(nodes):
            for v in n.inputs:
                j = producers.get(v)
                if j is None:
                    continue
                succ.setdefault(j, {})
                succ.setdefault(i, {})
                succ[j][i] = None  # a repeated edge keeps its first place, as in networkx
        self.succ = {u: list(s) for u, s in succ.items()}
        self.rank = {u: r for r, u in enumerate(succ)}


class _Partition:
    """The fusible nodes split into connected parts by the uncut fusible edges. A part of
    MIN_GROUP nodes or more is a group (labelled ("g", part id) in the quotient)."""

    def __init__(self, nodes, fusible, edges, rank, escapes=None):
        self.nodes, self.edges, self.rank, self.escapes = nodes, edges, rank, escapes
        self.cut_edges: set[int] = set()
        self.incident: dict[int, list[int]] = {}
        for e, (j, i) in enumerate(edges):
            self.incident.setdefault(j, []).append(e)
            if i != j:
                self.incident.setdefault(i, []).append(e)
        self.part_of: dict[int, int] = {}
        self.members: dict[int, list[int]] = {}  # part id -> members, in graph order
        self.first: dict[int, int] = {}  # part id -> its first member
        self._in_dag_order: dict[int, list[int]] = {}
        candidates = [i for i in range(len(nodes)) if fusible[i] and nodes[i].op != "const"]
        self._split_into_parts(candidates)

    def groups(self) -> list[int]:
        return [p for p, m in self.members.items() if len(m) >= MIN_GROUP]

    def sorted_groups(self) -> list[list[int]]:
        return sorted((m for m in self.members.values() if len(m) >= MIN_GROUP), key=lambda m: m[0])

    def label(self, i: int):
        p = self.part_of.get(i)
        return ("g", p) if p is not None and len(self.members[p]) >= MIN_GROUP else i

    def in_dag_order(self, part: int, rank: dict) -> list[int]:
        """The part's members that have edges, in the DAG's node order (kept: a part never
        changes; a split makes new ones)."""
        found = self._in_dag_order.get(part)
        if found is None:
            found = sorted((i for i in self.members[part] if i in rank), key=rank.__getitem__)
            self._in_dag_order[part] = found
        return found

    def edges_within(self, group: set) -> list[int]:
        return sorted({e for i in group for e in self.incident.get(i, ()) if
                       self.edges[e][0] in group and self.edges[e][1] in group})

    def edges_touching(self, group: set) -> list[int]:
        return sorted({e for i in group for e in self.incident.get(i, ())})

    def cut(self, part: int, edge_ids) -> list[int]:
        """Cut `edge_ids` and split `part` into what stays connected: the new part ids."""
        self.cut_edges.update(edge_ids)
        old = self.members.pop(part)
        del self.first[part]
        return self._split_into_parts(old)

    def cut_if_not_one_kernel(self, part: int, rows: dict):
        """A group whose members cannot share one kernel is cut where shapes change; its
        pieces each have one shape, so they are one kernel each."""
        m = self.members.get(part)
        if m is None or len(m) < MIN_GROUP or _one_kernel(m, self.nodes, rows, self.escapes):
            return
        shape = {i: self.nodes[i].outputs[0].type.shape for i in m}
        if any(self.nodes[i].op == "cat" for i in m):
            # the cats go apart (each piece is then an ordinary group, or a lone cat)
            cats = {i for i in m if self.nodes[i].op == "cat"}
            cuts = [e for e in self.edges_within(set(m)) if cats & set(self.edges[e])]
            for piece in self.cut(part, cuts):
                self.cut_if_not_one_kernel(piece, rows)
            return
        self.cut(part, [e for e in self.edges_within(set(m)) if shape[self.edges[e][0]] != shape[self.edges[e][1]]])

    def _split_into_parts(self, candidates: list[int]) -> list[int]:
        """Connected parts of `candidates` (in graph order) over uncut edges; new ids."""
        new_ids = []
        for start in candidates:
            if self.part_of.get(start, -1) in new_ids:
                continue
            pid = self._fresh_id()
            self.part_of[start] = pid
            found, todo = [start], [start]
            while todo:
                i = todo.pop()
                for e in self.incident.get(i, ()):
                    if e in self.cut_edges:
                        continue
                    j, k = self.edges[e]
                    other = k if j == i else j
                    if self.part_of.get(other) != pid:
                        self.part_of[other] = pid
                        found.append(other)
                        todo.append(other)
            found.sort()
            self.members[pid] = found
            self.first[pid] = found[0]
            new_ids.append(pid)
        return new_ids

    def _fresh_id(self) -> int:
        self._next_id = getattr(self, "_next_id", -1) + 1
        return self._next_id


class _Quotient:
    """The graph with every group contracted to one node, read lazily by find_cycle:
    keys in graph order of each label's first node, successors in the order the
    node-level edges (in networkx's order) first reach them. Built on demand because the
    cycle search usually returns after a short walk, while building it whole cost a pass
    over every edge per split."""

    def __init__(self, parts: _Partition, dag: _DataflowDag):
        self.parts, self.dag = parts, dag

    def __iter__(self):
        seen = set()
        for i in range(len(self.parts.nodes)):
            label = self.parts.label(i)
            if label not in seen:
                seen.add(label)
                yield label

    def __getitem__(self, label):
        sources = self.parts.in_dag_order(label[1], self.dag.rank) if isinstance(label, tuple) else [label]
        return self._successors(label, sources)

    def _successors(self, label, sources):
        seen = set()
        for j in sources:
            for i in self.dag.succ.get(j, ()):  # a node without edges is not in the DAG
                target = self.parts.label(i)
                if target != label and target not in seen:
                    seen.add(target)
                    yield target


def find_cycle(succ: dict) -> list[tuple]:
    """The cycle `networkx.find_cycle` finds in the digraph whose successors are `succ`
    ({node: {successor: None}}, nodes and edges in insertion order), or [] if it is acyclic.
    find_groups asks once per split; building an nx.DiGraph each time was most of its
    time. The walk is networkx's, step for step (a depth-first search over edges from each
    unexplored node in order, keeping the active path), so the same cycle comes out."""
    explored: set = set()
    for start in succ:
        if start in explored:
            continue
        path: list[tuple] = []
        seen, active = {start}, {start}
        previous = None
        for tail, head in _edge_dfs(succ, start):
            if head in explored:
                continue
            if previous is not None and tail != previous:  # backtracked: pop back to `tail`
                while True:
                    if not path:
                        active = {tail}
                        break
                    active.remove(path.pop()[1])
                    if path and path[-1][1] == tail:
                        break
            path.append((tail, head))
            if head in active:
                for k, (t, _) in enumerate(path):
                    if t == head:
                        break
                return path[k:]
            seen.add(head)
            active.add(head)
            previous = head
        explored |= seen
    return []


def _edge_dfs(succ: dict, start):
    """networkx.edge_dfs(G, start): every edge reachable from `start`, depth first."""
    stack, pending = [start], {}
    while stack:
        node = stack[-1]
        if node not in pending:
            pending[node] = iter(succ[node])
        head = next(pending[node], _DONE)
        if head is _DONE:
            stack.pop()
        else:
            stack.append(head)
            yield node, head


_DONE = object()


def _reachable(succ: dict, start: int, last: int) -> set:
    """`start` and what it reaches among nodes up to index `last`: nodes are in
    topological order, so a path to such a node never leaves that range."""
    seen, todo = {start}, [start]
    while todo:
        for j in succ.get(todo.pop(), ()):
            if j <= last and j not in seen:
                seen.add(j)
                todo.append(j)
    return seen


def _build_fused(graph: Graph, group: list[int], uses: dict, outputs_set: set,
                 producers: dict) -> tuple[Node, list[Value]]:
    nodes = graph.nodes
    member = set(group)
    inputs: list[Value] = []
    ref: dict[Value, str] = {}
    body = []
    inlined_consts: dict[Value, str] = {}

    def operand(v: Value) -> str:
        if v in ref:
            return ref[v]
        j = producers.get(v)
        if j is not None and nodes[j].op == "const" and v not in inlined_consts:
            body.append(("const", (), tuple(nodes[j].attrs.items())))
            inlined_consts[v] = f"t{len(body) - 1}"
        if v in inlined_consts:
            return inlined_consts[v]
        if v not in inputs:
            inputs.append(v)
        return f"in{inputs.index(v)}"

    out_steps, out_values = [], []
    for i in group:
        n = nodes[i]
        args = tuple(operand(v) for v in n.inputs)
        body.append((n.op, args, tuple(n.attrs.items())))
        ref[n.outputs[0]] = f"t{len(body) - 1}"
        external = sum(1 for u in uses.get(n.outputs[0], ()) if u not in member) or n.outputs[0] in outputs_set
        if external:
            out_steps.append(ref[n.outputs[0]])
            out_values.append(n.outputs[0])
    attrs = {"body": tuple(body), "outputs": tuple(out_steps)}
    row_n = {row_length(nodes[i]) for i in group} - {None}
    if row_n:
        attrs["row"] = int(row_n.pop())  # the kernel works a row of this length at a time
    fused = Node("fused_pointwise", tuple(inputs), attrs,
                 tuple(out_values), {"pass": "fuse_elementwise", "fused": [nodes[i].op for i in group]})
    return fused, out_values


def fuse_elementwise(graph: Graph, ctx=None) -> Graph:
    return store_appends(_fuse_groups(graph, ctx), ctx)


def _reads_a_tensor(graph: Graph, group: list[int], producers: dict) -> bool:
    """Whether a group reads a tensor from outside (not only constants, which it inlines).
    A group of constants alone (`zeros(()).add(T).sigmoid()`: a value of the sizes) has no
    input to take its device and launch grid from, so it stays as the ops it is."""
    member = set(group)
    for i in group:
        for v in graph.nodes[i].inputs:
            j = producers.get(v)
            if j not in member and (j is None or graph.nodes[j].op != "const"):
                return True
    return False


def _fuse_groups(graph: Graph, ctx=None) -> Graph:
    node_index = {v: i for i, n in enumerate(graph.nodes) for v in n.outputs}
    groups = [g for g in find_groups(graph) if _reads_a_tensor(graph, g, node_index)]
    if not groups:
        return graph
    uses: dict = {}
    for i, n in enumerate(graph.nodes):
        for v in n.inputs:
            uses.setdefault(v, []).append(i)
    outputs_set = set(graph.outputs)
    group_of = {i: k for k, g in enumerate(groups) for i in g}
    fused_nodes = [_build_fused(graph, g, uses, outputs_set, node_index)[0] for g in groups]

    # Emit in a topological order of the contracted graph, keeping the original order
    # where it is free: a fused node goes where all its inputs exist.
    items = {}
    for i, n in enumerate(graph.nodes):
        items.setdefault(("g", group_of[i]) if i in group_of else ("n", i), i)
    dag = nx.DiGraph()
    producers = {}
    for key in items:
        dag.add_node(key)
    for key in items:
        node = fused_nodes[key[1]] if key[0] == "g" else graph.nodes[key[1]]
        for v in node.outputs:
            producers[v] = key
    for key in items:
        node = fused_nodes[key[1]] if key[0] == "g" else graph.nodes[key[1]]
        for v in node.inputs:
            if v in producers and producers[v] != key:
                dag.add_edge(producers[v], key)
    order = nx.lexicographical_topological_sort(dag, key=lambda k: items[k])
    new_nodes = [fused_nodes[k[1]] if k[0] == "g" else graph.nodes[k[1]] for k in order]
    if ctx is not None:
        ctx.rules["fused_group"] += len(groups)
        ctx.rules["ops_fused"] += sum(len(g) for g in groups)
        ctx.note(f"{len(groups)} fused kernels replace {sum(len(g) for g in groups)} pointwise ops")
    return dead_code_elimination(graph.with_nodes(new_nodes))



# --------------------------------------------------------------------------------------
# KV cache appends written by the kernels that compute K and V
#
# kv_append(cache, x) {start} copies x into the cache: one launch of its own per K and V
# per layer. After grouping, two rules move the copy into a generated kernel:
#
#   kv_append(c, fused_pointwise(..) -> x) {start}
#       -> fused_pointwise(.., c) {into=((k, i),), start}     x's only reader was the append
#   two nodes that store into caches at the same start over the same index space
#   (a fused node with `into`, or a kv_append: a copy, whose body is one identity cast)
#       -> one fused_pointwise storing both                  (horizontal: K and V of a layer)
#   a flat fused node read only by readers of a store node's results
#       -> joins it, even over another index space           (rotary q, read by attention)
#
# A fused output named in `into` is stored by the kernel straight into the cache at
# `start` (codegen/pointwise.py `Stores`) and the node's result is what kv_append returns.
# Exact: the values computed are the same and the same bytes land in the cache. The rules
# fire only when it is provable that moving the write changes nothing: the cache buffer is
# read by that one append alone (so no kernel reads the buffer it writes, no input of the
# merged kernel is a view of it, and no other node sees the write move), and a node that
# moves to merge reads nothing the other produces, its results used only after both.


def _store_node(node: Node) -> bool:
    return node.op == "fused_pointwise" and bool(node.attrs.get("into")) and node.attrs.get("row") is None


def _value_shape(node: Node):
    """The index space of a store node's kernel: the shape of the values it computes."""
    if node.op == "kv_append":
        return node.inputs[1].shape
    n_compute = len(node.inputs) - len(node.attrs["into"])
    types = OPS["fused_pointwise"].infer([v.type for v in node.inputs[:n_compute]],
                                         {"body": node.attrs["body"], "outputs": node.attrs["outputs"]})
    return types[0].shape


def _as_fused_copy(node: Node) -> Node:
    """kv_append(c, x) {start} as a fused node: an identity cast of x, stored into c."""
    cache, x = node.inputs
    return Node("fused_pointwise", (x, cache),
                {"body": (("cast", ("in0",), (("dtype", x.dtype),)),), "outputs": ("t0",), "into": ((0, 1),),
                 "start": node.attrs["start"]}, node.outputs, {**node.meta, "pass": "fuse_elementwise"})


def _merge_stores(f: Node, g: Node) -> Node:
    """One fused node computing and storing what f and g do (f's results first; g stores)."""
    f_into = f.attrs.get("into") or ()
    nf, ng = len(f.inputs) - len(f_into), len(g.inputs) - len(g.attrs["into"])
    compute = list(f.inputs[:nf]) + [v for v in dict.fromkeys(g.inputs[:ng]) if v not in f.inputs[:nf]]
    shift = len(f.attrs["body"])

    def ref(a: str) -> str:
        return f"in{compute.index(g.inputs[int(a[2:])])}" if a.startswith("in") else f"t{int(a[1:]) + shift}"

    body = f.attrs["body"] + tuple((op, tuple(ref(a) for a in args), attrs) for op, args, attrs in g.attrs["body"])
    dests = list(f.inputs[nf:]) + list(g.inputs[ng:])
    into = tuple((k, len(compute) + i - nf) for k, i in f_into)
    into += tuple((len(f.outputs) + k, len(compute) + len(f.inputs) - nf + i - ng) for k, i in g.attrs["into"])
    attrs = {"body": body, "outputs": f.attrs["outputs"] + tuple(ref(o) for o in g.attrs["outputs"]),
             "into": into, "start": g.attrs["start"]}
    fused = f.meta.get("fused", []) + g.meta.get("fused", [g.op])
    return Node("fused_pointwise", tuple(compute + dests), attrs, f.outputs + g.outputs,
                {**f.meta, "pass": "fuse_elementwise", "fused": fused})


def _uses(nodes: list[Node], outputs) -> dict:
    """value -> indices of the nodes reading it (len(nodes) for the graph's return)."""
    uses: dict = {}
    for i, n in enumerate(nodes):
        for v in n.inputs:
            uses.setdefault(v, []).append(i)
    for v in outputs:
        uses.setdefault(v, []).append(len(nodes))
    return uses


def _sole_append(nodes, p: int, uses) -> bool:
    """nodes[p] is a kv_append into a cache buffer that nothing else reads."""
    n = nodes[p]
    return n.op == "kv_append" and n.inputs[0].state is not None and uses.get(n.inputs[0]) == [p]


def _absorb_append(nodes, uses) -> bool:
    """Rule 1, once: kv_append(c, x) with x a flat fused output read by the append alone."""
    producer = {v: j for j, n in enumerate(nodes) for v in n.outputs}
    for p, a in enumerate(nodes):
        if not _sole_append(nodes, p, uses):
            continue
        x = a.inputs[1]
        j = producer.get(x)
        f = nodes[j] if j is not None else None
        if (f is None or f.op != "fused_pointwise" or f.attrs.get("row") is not None or uses.get(x) != [p]
                or (f.attrs.get("into") and f.attrs["start"] != a.attrs["start"])):
            continue
        k = f.outputs.index(x)
        attrs = {**f.attrs, "into": tuple(f.attrs.get("into", ())) + ((k, len(f.inputs)),),
                 "start": a.attrs["start"]}
        outputs = f.outputs[:k] + a.outputs + f.outputs[k + 1:]
        nodes[j] = Node("fused_pointwise", f.inputs + (a.inputs[0],), attrs, outputs, f.meta)
        del nodes[p]
        return True
    return False


def _merge_two_stores(nodes, uses) -> bool:
    """Rule 2, once: the nearest two store nodes (a fused node with `into`, or a sole kv_append
    of a float value) with the same start and index space, neither reading the other's
    results, the earlier one's results read only after the later one: one node, where the
    later one was."""
    stores = [p for p, n in enumerate(nodes) if _store_node(n)
              or (_sole_append(nodes, p, uses) and n.inputs[1].dtype.is_floating_point)]
    shapes = {p: _value_shape(nodes[p]) for p in stores}
    pairs = sorted(((q - p, p, q) for p in stores for q in stores if p < q
                    and nodes[p].attrs["start"] == nodes[q].attrs["start"] and shapes[p] == shapes[q]
                    and all(u > q for v in nodes[p].outputs for u in uses.get(v, ()))))
    if not pairs:
        return False
    _, p, q = pairs[0]
    f, g = (_as_fused_copy(n) if n.op == "kv_append" else n for n in (nodes[p], nodes[q]))
    nodes[q] = _merge_stores(f, g)
    del nodes[p]
    return True


def _join_sibling(nodes, uses) -> bool:
    """Rule 3, once: a flat fused node F without stores whose results are read only by nodes
    that also read a store node S's (rotary q, read by attention with the K/V S stores)
    joins S, whatever its shape: one launch whose programs are dealt out over the two index
    spaces (codegen/pointwise.py generate_parts_source). The same movability condition as
    rule 2; the sibling only moves to a place before its readers."""
    producer = {v: j for j, n in enumerate(nodes) for v in n.outputs}
    for q, s in enumerate(nodes):
        if not _store_node(s):
            continue
        readers = {u for v in s.outputs for u in uses.get(v, ())}
        siblings = {producer[v] for r in readers if r < len(nodes) for v in nodes[r].inputs if v in producer}
        for p in sorted(siblings, key=lambda p: abs(p - q)):
            f = nodes[p]
            if p == q or f.op != "fused_pointwise" or f.attrs.get("into") or f.attrs.get("row") is not None:
                continue
            f_readers = {u for v in f.outputs for u in uses.get(v, ())}
            lo, hi = sorted((p, q))
            if not f_readers <= readers or not all(u > hi for v in nodes[lo].outputs for u in uses.get(v, ())):
                continue
            nodes[hi] = _merge_stores(f, s)
            del nodes[lo]
            return True
    return False


def store_appends(graph: Graph, ctx=None) -> Graph:
    """The KV cache appends of `graph` stored by the fused kernels (the rules above)."""
    nodes = list(graph.nodes)
    if not any(n.op == "kv_append" for n in nodes):
        return graph
    absorbed = merged = 0
    while _absorb_append(nodes, _uses(nodes, graph.outputs)):
        absorbed += 1
    while _merge_two_stores(nodes, _uses(nodes, graph.outputs)):
        merged += 1
    joined = 0
    while _join_sibling(nodes, _uses(nodes, graph.outputs)):
        joined += 1
    if not absorbed and not merged and not joined:
        return graph
    if ctx is not None:
        ctx.rules["append_stored_by_kernel"] += absorbed
        ctx.rules["stores_merged"] += merged
        ctx.rules["siblings_joined"] += joined
        ctx.note(f"{absorbed} KV appends stored by the kernel computing them, {merged} merges of stores, "
                 f"{joined} sibling groups joined to them")
    return graph.with_nodes(nodes)
