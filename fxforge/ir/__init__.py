"""fxforge's IR: typed SSA graphs with symbolic shapes, their text form, and capture."""
from .capture import CallSpec, CaptureError, capture
from .graph import Graph, Node, Value
from .ops import OPS, OpDef, get as get_op
from .parser import ParseError, parse, structurally_equal
from .printer import print_graph
from .typecheck import IRCheckError, typecheck
from .types import SymType, TensorType, symbol

__all__ = ["Graph", "Node", "Value", "TensorType", "SymType", "symbol", "OPS", "OpDef", "get_op",
           "parse", "print_graph", "structurally_equal", "ParseError", "typecheck", "IRCheckError", "capture",
           "CaptureError", "CallSpec"]
