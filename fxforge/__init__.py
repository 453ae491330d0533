"""fxforge: a graph compiler for PyTorch language models.

    fast = fxforge.optimize(model, example_inputs=(input_ids,))
    fast(input_ids); print(fast.report()); print(fast.ir); fast.dump("out/")
    fast.save("smollm2.fxf"); again = fxforge.load("smollm2.fxf")   # no model class, no capture
"""
import importlib

from .api import load_ir, optimize, register_pass, unregister_pass
from .passes.gqa import GQAConfig
from .passes.kv_cache import KVCacheConfig
from .passes.quantize import QuantConfig
from .passes.shard import ShardConfig, ShardError
from .runtime.saving import IncompatibleSaveError, load_model as load
from .ir.capture_cache import CaptureCache
from .ir import CaptureError, Graph, IRCheckError, ParseError, capture, parse, typecheck
from .runtime.backends import register_backend, unregister_backend
from .runtime.engine import Engine
from .runtime.module import OptimizedModel

__all__ = ["optimize", "load", "load_ir", "capture", "CaptureCache", "register_pass", "unregister_pass", "register_backend",
           "unregister_backend", "OptimizedModel", "Engine", "QuantConfig", "GQAConfig", "KVCacheConfig",
           "ShardConfig", "ShardError", "Graph", "parse",
           "typecheck", "CaptureError", "IRCheckError", "ParseError", "IncompatibleSaveError"]
__version__ = "0.1.0"

# fxforge.runtime.speculative.self_draft / SpeculativeStats, as the README spells them, after
# a plain `import fxforge` (a submodule is an attribute of its package once imported)
importlib.import_module(".runtime.speculative", __name__)
