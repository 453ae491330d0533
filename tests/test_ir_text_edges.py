"""Edges of the IR's text form and of what is built from it: names the printer must not
reuse, truncated or hand-edited text, passes that break the graph's contract, dumps into a
used folder, the CLI's argument errors."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import fxforge
from fxforge.ir.parser import ParseError, parse, structurally_equal

import zoo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _ArgNamedP0(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.lin = nn.Linear(16, 50)

    def forward(self, p0):
        return self.lin(self.emb(p0))


def _ids(vocab=50, shape=(2, 6)):
    torch.manual_seed(0)
    return torch.randint(0, vocab, shape)


@pytest.fixture(scope="module")
def tiny_llama():
    model, vocab = zoo.llama("sdpa", n_layer=1)
    ids = _ids(vocab, (2, 7))
    return model, ids, fxforge.optimize(model, (ids,), passes=["cleanup", "fuse_attention"])


def test_an_input_named_like_a_parameter_keeps_names_unique(tmp_path):
    torch.manual_seed(0)
    model, ids = _ArgNamedP0().eval(), _ids()
    fast = fxforge.optimize(model, (ids,))
    head = fast.ir.splitlines()[0]
    assert head.count("%p0:") == 1
    assert structurally_equal(parse(fast.ir), fast.graph)
    fast.save(str(tmp_path / "m"))
    assert torch.equal(fxforge.load(str(tmp_path / "m"))(ids), fast(ids))
