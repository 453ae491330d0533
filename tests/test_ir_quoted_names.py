"""Quoted names in the IR's text form: a weight, buffer or state may be called anything
(quotes, backslashes, spaces, `=`, braces, `#`, new lines, tabs, any unicode) and the text
still parses back to the same names, through parse(), load_ir and fxforge.load."""
import json
import random

import pytest
import torch
import torch.nn as nn

import fxforge
from fxforge.ir.graph import Value
from fxforge.ir.parser import ParseError, parse, structurally_equal
from fxforge.ir.printer import print_graph, quote
from fxforge.ir.types import TensorType

NASTY = ['a" b', '"', '" ', '\\', '\\"', 'a\\" b', '\\\\" x', 'x y', 'k=v', '{', '}', '{buffer=true}', '# c',
         'a  #1', 'a\nb', 'a\tb', 'a\rb', '\x0c\x1c\x85', '\u2028\u2029', 'é ü 模型', '\U0001f600', '', ' ',
         'p0', '%p0', 'f32[8]', 'param "x" f32[8]', '"a""b"', 'a,b', '(x)', '[y]', "'", '\x00', '\ud800']
ALPHABET = '"\\ =:{}[](),#%$\n\t\r\'aZ0.é\u2028\x7f\U0001f600'


def _fuzzed_names(n: int = 300) -> list[str]:
    rng = random.Random(0)
    return [''.join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 12))) for _ in range(n)]


class _Buffers(nn.Module):
    """Buffers whose names are what torch allows: anything but '.' and ''."""

    NAMES = ['a" b', 'q\\" r', 'x=y {z}', 'h # i', 'tab\tnl\nend', 'é\u2028模型']

    def __init__(self):
        super().__init__()
        for i, name in enumerate(self.NAMES):
            self.register_buffer(name, torch.full((8,), float(i + 1)))

    def forward(self, x):
        for name in self.NAMES:
            x = x * getattr(self, name)
        return x


@pytest.fixture(scope="module")
def fast_and_input():
    torch.manual_seed(0)
    model, x = _Buffers().eval(), torch.randn(2, 3, 8)
    return model, x, fxforge.optimize(model, (x,), verbose=False)


def test_buffer_names_with_quotes_and_spaces_parse_back(fast_and_input):
    _, _, fast = fast_and_input
    g = parse(fast.ir, params=fast.graph.params)
    assert structurally_equal(g, fast.graph)
    assert set(g.params) == set(fast.graph.params)


def test_buffer_names_with_quotes_and_spaces_save_and_load(fast_and_input, tmp_path):
    model, x, fast = fast_and_input
    fast.save(str(tmp_path / "m"))
    loaded = fxforge.load(str(tmp_path / "m"))
    assert torch.equal(loaded(x), model(x))


def _graph_with_names(base, names):
    """`base` (parsed afresh) with its params renamed and a state and a string attribute per name."""
    g = parse(print_graph(base))
    for v, name in zip(g.param_values, names):
        v.param = name
    for name in names:
        g.state_values.append(Value(TensorType((2, 3), torch.float32), state=name))
    g.nodes[0].attrs = {**g.nodes[0].attrs, **{f"s{i}": name for i, name in enumerate(names)}}
    return g


@pytest.mark.parametrize("names", [NASTY[i:i + 6] for i in range(0, len(NASTY), 6)] +
                         [_fuzzed_names()[i:i + 10] for i in range(0, 300, 10)])
def test_any_name_prints_and_parses_back(fast_and_input, names):
    _, _, fast = fast_and_input
    g = _graph_with_names(fast.graph, names)
    text = print_graph(g, show_source=True)
    assert len(text.split("\n")) == len(g.nodes) + 3  # header, nodes, return, }: each name stays on its line
    back = parse(text)
    assert [v.param for v in back.param_values][:len(names)] == names[:len(back.param_values)]
    assert [v.state for v in back.state_values] == names
    assert structurally_equal(back, g)
    assert print_graph(back) == print_graph(g)


def test_quote_is_json_and_ascii():
    for name in NASTY + _fuzzed_names(50):
        text = quote(name)
        assert text.isascii() and "\n" not in text and json.loads(text) == name


def test_hand_written_unicode_and_line_separators_inside_a_name_parse():
    # a hand-written file may hold é or U+2028 raw (not \u-escaped): a name, not a line break
    text = ('graph(%x: f32[4], %p0: param "é\u2028\x85 x" f32[4]) {\n'
            '  %1: f32[4] = mul(%x, %p0)\n  return (%1)\n}\n')
    g = parse(text)
    assert g.param_values[0].param == "é\u2028\x85 x"


@pytest.mark.parametrize("bad, why", [
    ('%p0: param "a\\" f32[4]', "bad quoted string"),       # the quote escaped: no end
    ('%p0: param "a"f32[4]', "a space and a type"),
    ('%p0: param "a\\q" f32[4]', "bad quoted string"),      # \q is no escape
])
def test_a_bad_quoted_name_is_a_clear_error(bad, why):
    with pytest.raises(ParseError, match=why):
        parse(f"graph(%x: f32[4], {bad}) {{\n  return (%x)\n}}\n")
