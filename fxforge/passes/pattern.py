"""The pattern DSL and the one generic rewrite driver.

A rule is data: a name, a pattern, and a replacement function::

    # mul(x, 1) -> x
    Rule("mul_one", op("mul", var("x"), const(value=1), commutative=True),
         lambda m, b: m["x"] if m.same_type("x") else None)

Patterns:
  var("x")                  any value, bound to "x" (a second use of "x" must be the same value)
  const("c", value=None)    a `const` node's value, bound to "c" (optionally equal to `value`)
  op("mul", p1, p2, name="n", commutative=False, **attrs)
                            a node of that op whose inputs match p1, p2; the node is bound to
                            "n"; each attr is matched by equality, by a predicate (a callable)
                            or bound with `attr("name")`.
  either(p1, p2, ...)       the first alternative that matches.

The replacement gets a `Match` and a `Builder` and returns the new value for the
matched root, or None to decline (a side condition that does not hold). The driver
applies a table of rules to a fixed point and counts what fired, by rule name. It tries
a rule only at nodes of its pattern's root op (`Rule.root_ops`), so a table's cost per
node does not grow with the rules written for other ops.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..ir.builder import Builder
from ..ir.edit import dead_code_elimination
from ..ir.graph import Graph, Node, Value


class Match:
    """What a pattern bound, plus read access to the graph around it: `producers` maps a
    value to the node that makes it (the graph as rewritten so far in this sweep) and
    `graph` gives the parameters."""

    def __init__(self, root: Node, uses: dict, producers: dict | None = None, graph: Graph | None = None):
        self.root = root
        self.producers = producers if producers is not None else {}
        self.graph = graph
        self.values: dict[str, Value] = {}
        self.nodes: dict[str, Node] = {}
        self.attrs: dict[str, Any] = {}
        self._uses = uses

    def __getitem__(self, name: str) -> Value:
        return self.values[name]

    def __contains__(self, name: str) -> bool:
        return name in self.values or name in self.attrs or name in self.nodes

    def attr(self, name: str):
        return self.attrs[name]

    def node(self, name: str) -> Node:
        return self.nodes[name]

    def uses(self, value: Value) -> int:
        """How many times `value` is read in the graph (graph outputs count)."""
        return self._uses.get(value, 0)

    def single_use(self, name: str) -> bool:
        node = self.nodes[name]
        return all(self.uses(v) <= 1 for v in node.outputs)

    def same_type(self, name: str) -> bool:
        """Would the bound value stand in for the root's result without changing its type?"""
        return self.values[name].type.same_as(self.root.outputs[0].type)

    def _copy(self) -> "Match":
        m = Match(self.root, self._uses, self.producers, self.graph)
        m.values, m.nodes, m.attrs = dict(self.values), dict(self.nodes), dict(self.attrs)
        return m


class Pattern:
    def match(self, value: Value, producers: dict, m: Match) -> Match | None:
        raise NotImplementedError

    def root_ops(self) -> frozenset | None:
        """The ops a node must have for this pattern to match at it, or None if it may
        match at any node (a variable, or a pattern class that does not say). The driver
        tries a rule only at nodes of its root ops."""
        return None


@dataclass(frozen=True)
class _Var(Pattern):
    name: str | None

    def match(self, value, producers, m):
        if self.name is None:
            return m
        bound = m.values.get(self.name)
        if bound is not None and bound is not value:
            return None
        m = m._copy()
        m.values[self.name] = value
        return m


@dataclass(frozen=True)
class _AttrVar:
    name: str


@dataclass(frozen=True)
class _Op(Pattern):
    op: str | tuple
    inputs: tuple | None
    attrs: tuple
    name: str | None
    commutative: bool

    def match(self, value, producers, m):
        node = producers.get(value)
        if node is None or len(node.outputs) != 1:
            return None
        if node.op != self.op if isinstance(self.op, str) else node.op not in self.op:
            return None
        m = self._match_attrs(node, m)
        if m is None:
            return None
        if self.name:
            m.nodes[self.name] = node
            m.values[self.name] = value
        if self.inputs is None:
            return m
        if len(node.inputs) != len(self.inputs):
            return None
        orders = [node.inputs]
        if self.commutative and len(node.inputs) == 2:
            orders.append(node.inputs[::-1])
        for inputs in orders:
            mm = m
            for pat, v in zip(self.inputs, inputs):
                mm = pat.match(v, producers, mm)
                if mm is None:
                    break
            if mm is not None:
                return mm
        return None

    def root_ops(self):
        return frozenset([self.op] if isinstance(self.op, str) else self.op)

    def _match_attrs(self, node, m):
        m = m._copy()
        for key, want in self.attrs:
            if key not in node.attrs:
                return None
            have = node.attrs[key]
            if isinstance(want, _AttrVar):
                if want.name in m.attrs and m.attrs[want.name] != have:
                    return None
                m.attrs[want.name] = have
            elif callable(want) and not isinstance(want, type):
                if not want(have):
                    return None
            elif have != want:
                return None
        return m


@dataclass(frozen=True)
class _Const(Pattern):
    name: str | None
    value: Any

    def match(self, value, producers, m):
        node = producers.get(value)
        if node is None or node.op != "const":
            return None
        v = node.attrs["value"]
        if self.value is not None and not (v == self.value):
            return None
        m = m._copy()
        if self.name:
            m.attrs[self.name] = v
            m.values[self.name] = value
        return m

    def root_ops(self):
        return frozenset(["const"])


@dataclass(frozen=True)
class _Either(Pattern):
    options: tuple

    def match(self, value, producers, m):
        for p in self.options:
            r = p.match(value, producers, m)
            if r is not None:
                return r
        return None

    def root_ops(self):
        roots = [p.root_ops() for p in self.options]
        return None if None in roots else frozenset().union(*roots)


def var(name: str | None = None) -> Pattern:
    return _Var(name)


def attr(name: str) -> _AttrVar:
    return _AttrVar(name)


def op(opname: str | Sequence[str], *inputs: Pattern, name: str | None = None, commutative: bool = False,
       any_inputs: bool = False, **attrs) -> Pattern:
    """A node of op `opname` (or any of several). `any_inputs=True` ignores the inputs."""
    ops = tuple(opname) if isinstance(opname, (list, tuple)) else opname
    return _Op(ops, None if any_inputs else tuple(inputs), tuple(attrs.items()), name, commutative)


def const(name: str | None = None, value=None) -> Pattern:
    return _Const(name, value)


def either(*options: Pattern) -> Pattern:
    return _Either(tuple(options))


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: Pattern
    replace: Callable[[Match, Builder], Value | None]
    doc: str = ""

    @property
    def root_ops(self) -> frozenset | None:
        """The ops this rule can fire at (None: any op); see `Pattern.root_ops`."""
        return self.pattern.root_ops()


class RulesByRootOp:
    """A rule table indexed by root op: `for_op(op)` gives, in table order, the rules whose
    pattern can match at a node of that op (wildcard rules included everywhere). Trying
    only these gives the same first match as trying the whole table, as a rule whose
    root op differs cannot match."""

    def __init__(self, rules: Sequence[Rule]):
        self.rules = tuple(rules)
        self._roots = [rule.root_ops for rule in self.rules]
        self._by_op: dict[str, tuple[Rule, ...]] = {}

    def for_op(self, op_name: str) -> tuple[Rule, ...]:
        found = self._by_op.get(op_name)
        if found is None:
            found = tuple(rule for rule, roots in zip(self.rules, self._roots) if roots is None or op_name in roots)
            self._by_op[op_name] = found
        return found


class RewriteError(RuntimeError):
    pass


def apply_rules(graph: Graph, rules: Sequence[Rule], stats: Counter | None = None, pass_name: str = "",
                max_sweeps: int = 50) -> Graph:
    """Apply `rules` everywhere until none fires. Each sweep walks the nodes in order and
    tries, at each single-result node, the rules whose root op is the node's (in table order); a replacement's new nodes go right after
    the matched root (they only read values defined before it), the root's result is
    renamed to the replacement's, and dead nodes are swept away at the end."""
    stats = Counter() if stats is None else stats
    table = RulesByRootOp(rules)
    for _ in range(max_sweeps):
        uses = graph.use_counts()
        producers: dict[Value, Node] = {}
        renamed: dict[Value, Value] = {}
        nodes: list[Node] = []
        fired = False
        for node in graph.nodes:
            node = node.with_renamed_inputs(renamed)
            nodes.append(node)
            for v in node.outputs:
                producers[v] = node
            if len(node.outputs) != 1:
                continue
            root = node.outputs[0]
            for rule in table.for_op(node.op):
                m = rule.pattern.match(root, producers, Match(node, uses, producers, graph))
                if m is None:
                    continue
                b = Builder(meta={**node.meta, "pass": pass_name, "rule": rule.name})
                new = rule.replace(m, b)
                if new is None or new is root:
                    continue
                if not new.type.same_as(root.type):
                    raise RewriteError(f"rule {rule.name} replaced a {root.type} with a {new.type}")
                for n in b.nodes:
                    nodes.append(n)
                    for v in n.outputs:
                        producers[v] = n
                renamed[root] = new
                stats[rule.name] += 1
                fired = True
                break
        outputs = [renamed.get(v, v) for v in graph.outputs]
        graph = dead_code_elimination(graph.with_nodes(nodes, outputs))
        if not fired:
            return graph
    raise RewriteError(f"rules {[r.name for r in rules]} did not reach a fixed point in {max_sweeps} sweeps")
