"""fxforge: a graph compiler for PyTorch language models.

    fast = fxforge.optimize(model, example_inputs=(input_ids,))
    fast(input_ids); print(fast.report()); print(fast.ir); fast.dump("out/")
"""
from .api import load_ir, optimize, register_pass, unregister_pass
from .ir import CaptureError, Graph, IRCheckError, ParseError, capture, parse, typecheck
from .runtime.backends import register_backend, unregister_backend
from .runtime.module import OptimizedModel

__all__ = ["optimize", "load_ir", "capture", "register_pass", "unregister_pass", "register_backend", "unregister_backend",
           "OptimizedModel", "Graph", "parse",
           "typecheck", "CaptureError", "IRCheckError", "ParseError"]
__version__ = "0.1.0"
