"""Parse the IR's text form (see printer.py) back into a Graph.

Parameters parse as values with no tensor attached (`graph.params` stays empty) unless
a `params` dict is given, so a dumped graph can be re-read, checked and compared.
"""
from __future__ import annotations

import json
import re

import sympy
import torch

from .graph import Graph, Node, Value
from .guards import parse_guard
from . import roles
from .ops import Arg
from .types import DTYPES_BY_NAME, SymType, TensorType, parse_size_text

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ARITHMETIC = re.compile(r"[\w\s+\-*/%(),.]*")


class ParseError(ValueError):
    pass


def parse_dim(text: str, cache: dict | None = None) -> sympy.Expr:
    text = text.strip()
    if cache is not None and text in cache:
        return cache[text]
    if re.fullmatch(r"-?\d+", text):
        out = sympy.Integer(int(text))
    elif not _ARITHMETIC.fullmatch(text) or "__" in text or re.search(r"\.[A-Za-z_]", text):
        # parse_expr evaluates Python: let through only arithmetic on names and numbers
        raise ParseError(f"cannot read size expression {text!r}: only names, numbers and + - * / % ( ) are allowed")
    else:
        try:  # torch's float functions of sizes (ToFloat, FloatPow...) too, floats as the doubles written
            out = parse_size_text(text)
        except Exception as e:  # sympy raises many kinds
            raise ParseError(f"cannot read size expression {text!r}: {e}") from None
        if not isinstance(out, sympy.Expr):  # e.g. a tuple or a comparison
            raise ParseError(f"size expression {text!r} is a {type(out).__name__}, not a number")
    if cache is not None:
        cache[text] = out
    return out


def _unquoted(text: str):
    """(index, char) of each character outside double-quoted strings (the quotes excluded;
    inside a string a backslash escapes the next character)."""
    in_str, i = False, 0
    while i < len(text):
        c = text[i]
        if in_str:
            if c == "\\":
                i += 1
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        else:
            yield i, c
        i += 1


def _top_level(text: str):
    """(index, char) of each character outside strings and brackets (an opening bracket
    is itself at the level it opens from)."""
    depth = 0
    for i, c in _unquoted(text):
        if c in ")]}":
            depth -= 1
        else:
            if depth == 0:
                yield i, c
            if c in "([{":
                depth += 1


def split_top(text: str, sep: str = ",") -> list[str]:
    """Split at separators outside brackets and strings."""
    parts, start = [], 0
    for i, c in _top_level(text):
        if c == sep:
            parts.append(text[start:i])
            start = i + 1
    tail = text[start:]
    if tail.strip():
        parts.append(tail)
    return [p.strip() for p in parts]


def parse_type(text: str, cache=None):
    text = text.strip()
    if text == "int":
        return SymType()
    m = re.fullmatch(r"([a-z0-9]+)\[(.*)\]", text)
    if not m or m.group(1) not in DTYPES_BY_NAME:
        raise ParseError(f"not a type: {text!r} (want e.g. f32[B, T, 768])")
    dims = [parse_dim(d, cache) for d in split_top(m.group(2))] if m.group(2).strip() else []
    return TensorType(tuple(dims), DTYPES_BY_NAME[m.group(1)])


class _AttrReader:
    """Recursive descent over one `{k=v, ...}` attribute block."""

    def __init__(self, text: str, cache: dict):
        self.s, self.i, self.cache = text, 0, cache

    def ws(self):
        while self.i < len(self.s) and self.s[self.i] == " ":
            self.i += 1

    def peek(self) -> str:
        self.ws()
        return self.s[self.i] if self.i < len(self.s) else ""

    def expect(self, c: str):
        if self.peek() != c:
            raise ParseError(f"expected {c!r} at {self.s[self.i:self.i + 30]!r} in {self.s!r}")
        self.i += 1

    def attrs(self) -> dict:
        out = {}
        self.expect("{")
        while self.peek() != "}":
            m = _IDENT.match(self.s, self.i)
            if not m:
                raise ParseError(f"expected an attribute name at {self.s[self.i:self.i + 30]!r}")
            self.i = m.end()
            self.expect("=")
            if m.group(0) in out:  # last-one-wins would silently drop an edit
                raise ParseError(f"attribute {m.group(0)!r} is given twice in {self.s!r}")
            out[m.group(0)] = self.value()
            if self.peek() == ",":
                self.i += 1
        self.expect("}")
        return out

    def sequence(self, close: str) -> list:
        items = []
        while self.peek() != close:
            items.append(self.value())
            if self.peek() == ",":
                self.i += 1
        self.expect(close)
        return items

    def value(self):
        c = self.peek()
        if c == "(":
            start = self.i
            self.i += 1
            items = self.sequence(")")
            if self.peek() not in (",", ")", "]", "}", ""):
                self.i = start  # an expression such as (T + 1)**2, not a tuple
                return self.atom()
            return tuple(items)
        if c == "[":
            self.i += 1
            return self.sequence("]")
        if c == '"':
            val, self.i = read_quoted(self.s, self.i)
            return val
        if c == "$":
            m = re.compile(r"\$(\d+)").match(self.s, self.i)
            if not m:
                raise ParseError(f"expected $<input index> at {self.s[self.i:self.i + 30]!r}")
            self.i = m.end()
            return Arg(int(m.group(1)))
        return self.atom()

    def atom(self):
        self.ws()
        start, depth = self.i, 0
        while self.i < len(self.s):
            c = self.s[self.i]
            if c == '"':  # a string inside the atom (device("cuda:0")): its brackets and commas are text
                self.i = read_quoted(self.s, self.i)[1]
                continue
            if c in "([":
                depth += 1
            elif c in ")]}" and depth == 0:
                break
            elif c in ")]":
                depth -= 1
            elif c == "," and depth == 0:
                break
            self.i += 1
        text = self.s[start:self.i].strip()
        return interpret_atom(text, self.cache)


def interpret_atom(text: str, cache: dict):
    keywords = {"true": True, "false": False, "none": None, "inf": float("inf"), "-inf": float("-inf"),
                "nan": float("nan")}
    if text in keywords:
        return keywords[text]
    if text in DTYPES_BY_NAME:
        return DTYPES_BY_NAME[text]
    if text.startswith("torch."):
        # only the enum-like values format_attr writes this way, not any torch attribute
        value = getattr(torch, text[len("torch."):], None)
        if not isinstance(value, (torch.layout, torch.memory_format)):
            raise ParseError(f"{text!r} is not a torch layout or memory format")
        return value
    m = re.fullmatch(r'device\((".*")\)', text)
    if m:
        try:
            return torch.device(json.loads(m.group(1)))
        except (ValueError, RuntimeError) as e:
            raise ParseError(f"bad device {text!r}: {e}") from None
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    m = re.fullmatch(r"complex\(([^,()]+),([^,()]+)\)", text)
    if m:  # format_attr's complex(real, imag), each part a float's text form
        return complex(*(_float_part(part.strip(), text) for part in m.groups()))
    try:
        return float(text)
    except ValueError:
        pass
    condition = _size_condition(text)
    return condition if condition is not None else parse_dim(text, cache)


def _size_condition(text: str):
    """A condition on sizes as an attribute's value (a torch_call's argument `Ne(T, 7)` or
    `(T > 2) & (B < 5)`, a const's `T > 7`, sympy's own True / False where it decided one):
    sympy's boolean, or None when `text` is no condition."""
    if text in ("True", "False"):
        return sympy.true if text == "True" else sympy.false
    if not re.search(r"[<>&|~]|\b(Eq|Ne)\(", text):
        return None
    try:
        out = parse_size_text(text)
    except Exception as e:  # sympy raises many kinds
        raise ParseError(f"cannot read size condition {text!r}: {e}") from None
    if not isinstance(out, sympy.logic.boolalg.Boolean):
        raise ParseError(f"size condition {text!r} is a {type(out).__name__}, not a condition")
    return out


def _float_part(text: str, whole: str) -> float:
    keywords = {"inf": float("inf"), "-inf": float("-inf"), "nan": float("nan")}
    try:
        return keywords[text] if text in keywords else float(text)
    except ValueError:
        raise ParseError(f"bad complex constant {whole!r}: {text!r} is not a float") from None


_DECODER = json.JSONDecoder()


def read_quoted(text: str, start: int) -> tuple[str, int]:
    """The double-quoted string (JSON's syntax, as the printer writes it: `\\"`, `\\\\`,
    `\\n`, `\\u00e9`...) that starts at text[start], and the index just past it. A real
    string token: a regex cannot tell where `"a\\" b"` ends."""
    if not text.startswith('"', start):
        raise ParseError(f"expected a double-quoted string at {text[start:start + 30]!r}")
    try:
        value, end = _DECODER.raw_decode(text, start)
    except json.JSONDecodeError as e:
        raise ParseError(f"bad quoted string at {text[start:start + 40]!r}: {e.msg} (write it as JSON does: "
                         "\\\" for a quote, \\\\ for a backslash, \\n for a new line)") from None
    return value, end


def _named_entry(item: str, kind: str):
    """`%p0: param "name" f32[8]` (kind "param" or "state") -> ("p0", "name", "f32[8]"),
    or None when `item` is not such an entry."""
    m = re.match(r"%([\w.]+):\s*" + kind + r"\s+(?=\")", item)
    if not m:
        return None
    name, end = read_quoted(item, m.end())
    rest = item[end:]
    if not rest[:1].isspace():
        raise ParseError(f"expected a space and a type after the {kind}'s name {json.dumps(name)} in {item!r}")
    return m.group(1), name, rest.strip()


def _entry_attrs(item: str, cache: dict) -> tuple[str, dict | None]:
    """`%L: int {role="cache_len"}` -> ("%L: int", {"role": "cache_len"})."""
    for i, c in _top_level(item):
        if c == "{":
            return item[:i].rstrip(), _AttrReader(item[i:], cache).attrs()
    return item, None


def _split_lhs_rhs(line: str) -> tuple[str, str]:
    for i, c in _top_level(line):  # an `=` in a string attribute (name="a=b") is no separator
        if c == "=":
            return line[:i], line[i + 1:]
    raise ParseError(f"expected `%v: type = op(...)`, got {line!r}")


def strip_comment(line: str) -> str:
    """`line` without its comment: a line whose text starts with `#`, or what follows
    `  #` (two spaces, the printer's source comments) outside a quoted string: a
    parameter may be called `scale  #1`."""
    if line.lstrip().startswith("#"):
        return ""
    for i, c in _unquoted(line):
        if c == "#" and line[max(0, i - 2):i] == "  ":
            return line[:i - 2].rstrip()
    return line.rstrip()


def parse(text: str, params: dict[str, torch.Tensor] | None = None) -> Graph:
    cache: dict = {}
    # lines end at \n, \r\n or \r only: str.splitlines() also splits at \x0c, \x1c, \x85, \u2028..., which
    # a hand-written name or a source comment may hold
    numbered = [(i, strip_comment(ln)) for i, ln in enumerate(re.split(r"\r\n|\r|\n", text), 1)]
    numbered = [(i, ln) for i, ln in numbered if ln.strip()]
    lines = [ln for _, ln in numbered]
    head = lines[0].strip() if lines else ""
    m = re.fullmatch(r"graph\((.*)\)\s*\{", head)
    if not m:
        raise ParseError(f"a graph starts with `graph(...) {{`, got {head!r}")
    env: dict[str, Value] = {}
    g = Graph()

    def define(name: str, v: Value):
        if name in env:
            raise ParseError(f"%{name} is assigned twice")
        env[name] = v

    def use(name: str) -> Value:
        name = name.strip()
        if not name.startswith("%") or name[1:] not in env:
            raise ParseError(f"{name} is used before it is defined")
        return env[name[1:]]

    for item in split_top(m.group(1)):
        item, value_attrs = _entry_attrs(item, cache)
        entry = _named_entry(item, "param")
        if entry:
            hint, name, type_text = entry
            if value_attrs is not None and set(value_attrs) - {roles.BUFFER}:
                raise ParseError(f"a parameter takes no attributes but {roles.BUFFER}=true: {item!r}")
            v = Value(parse_type(type_text, cache), param=name, attrs=value_attrs)
            define(hint, v)
            g.param_values.append(v)
            if params is not None and name in params:
                g.params[name] = params[name]
            continue
        entry = _named_entry(item, "state")
        if entry:
            hint, name, type_text = entry
            v = Value(parse_type(type_text, cache), state=name, attrs=value_attrs)
            define(hint, v)
            g.state_values.append(v)
            continue
        im = re.fullmatch(r"%([\w.]+):\s*(.*)", item)
        if not im:
            raise ParseError(f"bad graph input {item!r}")
        v = Value(parse_type(im.group(2), cache), hint=im.group(1), attrs=value_attrs)
        define(im.group(1), v)
        g.inputs.append(v)
        g.input_names.append(im.group(1))
    if params is not None:
        missing = [v.param for v in g.param_values if v.param not in params]
        if missing:
            raise ParseError(f"params has no tensor for {len(missing)} parameter(s) the graph names, e.g. "
                             f"{missing[:3]}; pass a tensor for every `param \"name\"` of the signature (a dump "
                             "written before quantize or fuse_linear names weights that fast.graph.params no longer "
                             "holds: use the model's own state_dict there)")

    closed = returned = False
    for lineno, line in numbered[1:]:
        try:
            if closed:
                raise ParseError("text after the graph's closing `}`")
            if returned and line.strip() != "}":
                raise ParseError("only the closing `}` may follow the `return` line")
            if _read_line(g, line, define, use, cache):
                if not returned:
                    raise ParseError("the graph closes without a `return (...)` line")
                closed = True
            elif line.strip().startswith("return"):
                returned = True
        except ParseError as e:
            where = "" if line.strip() in str(e) else f" (in {line.strip()!r})"
            raise ParseError(f"line {lineno}: {e}{where}") from None
    if not closed:
        last = numbered[-1][0] if numbered else 0
        missing = "`}`" if returned else "`return (...)` line and `}`"
        raise ParseError(f"the text ends at line {last} without the graph's {missing}: it looks truncated "
                         "(a partial copy or an interrupted write)")
    return g


def _read_line(g: Graph, line: str, define, use, cache) -> bool:
    """Add one body line (signature, guard, node or return) to `g`; True at the closing `}`."""
    s = line.strip()
    if s == "}":
        return True
    if s.startswith("signature {"):
        if g.signature:
            raise ParseError("a graph has one signature line")
        g.signature = roles.with_fixed_dtype_kinds(_AttrReader(s[len("signature "):], cache).attrs())
        return False
    if s.startswith("guard "):
        if s[len("guard "):].strip() in ("True", "true"):  # holds for every size: nothing to check
            return False
        if s[len("guard "):].strip() in ("False", "false"):
            raise ParseError(f"{s!r} holds for no sizes: no call could run")
        try:
            rel = parse_guard(s[len("guard "):])
        except ValueError as e:
            raise ParseError(str(e)) from None
        if rel is not sympy.true:  # one that always holds (older fxforge wrote some): nothing to check
            g.guards.append(rel)
        return False
    if s.startswith("return"):
        rm = re.fullmatch(r"return\s*\((.*)\)", s)
        if not rm:
            raise ParseError(f"expected `return (%a, ...)`, got {line!r}")
        g.outputs = [use(x) for x in split_top(rm.group(1))] if rm.group(1).strip() else []
        return False
    lhs, rhs = _split_lhs_rhs(s)
    rhs = rhs.strip()
    om = re.match(r"([A-Za-z_][\w.]*)\(", rhs)
    if not om:
        raise ParseError(f"expected op(...) in {line!r}")
    depth, j = 0, om.end() - 1
    for j in range(om.end() - 1, len(rhs)):
        depth += {"(": 1, ")": -1}.get(rhs[j], 0)
        if depth == 0:
            break
    if depth != 0:
        raise ParseError(f"unbalanced parentheses: {om.group(1)}( is not closed in {line!r}")
    args_text, rest = rhs[om.end():j], rhs[j + 1:].strip()
    inputs = tuple(use(a) for a in split_top(args_text)) if args_text.strip() else ()
    attrs = _AttrReader(rest, cache).attrs() if rest else {}
    outputs = []
    for out in split_top(lhs):
        om2 = re.fullmatch(r"%([\w.]+):\s*(.*)", out)
        if not om2:
            raise ParseError(f"bad result {out!r} in {line!r}")
        v = Value(parse_type(om2.group(2), cache))
        define(om2.group(1), v)
        outputs.append(v)
    g.nodes.append(Node(om.group(1), inputs, attrs, tuple(outputs)))
    return False


def attrs_equal(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True  # nan
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(attrs_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, sympy.Basic)) and isinstance(b, (int, sympy.Basic)):
        return sympy.sympify(a) == sympy.sympify(b)
    return type(a) is type(b) and a == b


def _attr_dicts_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(attrs_equal(a[k], b[k]) for k in a)


def structurally_equal(a: Graph, b: Graph) -> bool:
    """Same ops, attrs, types and wiring (values matched by position, not identity)."""
    if len(a.inputs) != len(b.inputs) or len(a.nodes) != len(b.nodes) or len(a.outputs) != len(b.outputs):
        return False
    if [v.param for v in a.param_values] != [v.param for v in b.param_values]:
        return False
    if [v.state for v in a.state_values] != [v.state for v in b.state_values]:
        return False
    if len(a.guards) != len(b.guards) or any(x != y for x, y in zip(a.guards, b.guards)):
        return False
    if not _attr_dicts_equal(a.signature, b.signature):
        return False
    for x, y in zip(a.inputs + a.state_values, b.inputs + b.state_values):
        if not _attr_dicts_equal(x.attrs or {}, y.attrs or {}):
            return False
    index_a, index_b = {}, {}
    for i, (x, y) in enumerate(zip(a.inputs + a.param_values + a.state_values,
                                   b.inputs + b.param_values + b.state_values)):
        if not x.type.same_as(y.type):
            return False
        index_a[x], index_b[y] = ("in", i), ("in", i)
    for i, (n, m) in enumerate(zip(a.nodes, b.nodes)):
        if n.op != m.op or len(n.outputs) != len(m.outputs) or len(n.inputs) != len(m.inputs):
            return False
        if [index_a.get(v) for v in n.inputs] != [index_b.get(v) for v in m.inputs]:
            return False
        if n.attrs.keys() != m.attrs.keys() or not all(attrs_equal(n.attrs[k], m.attrs[k]) for k in n.attrs):
            return False
        for j, (x, y) in enumerate(zip(n.outputs, m.outputs)):
            if not x.type.same_as(y.type):
                return False
            index_a[x], index_b[y] = ("node", i, j), ("node", i, j)
    return [index_a.get(v) for v in a.outputs] == [index_b.get(v) for v in b.outputs]
