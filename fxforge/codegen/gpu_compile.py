"""Ahead-of-time compilation of fxforge's Triton kernels for NVIDIA targets, with no GPU.

Triton lowers a kernel to PTX and assembles it to a cubin with the ptxas shipped in its
wheel, so the resources a specialization needs (shared memory per block, registers and
spill bytes per thread) are known without a device. This module compiles a list of
`KernelSpec`s for a list of compute capabilities and reports one `CompileResult` each.

It must run with TRITON_INTERPRET unset: under the interpreter `@triton.jit` makes
interpreted functions that `triton.compile` cannot take. The tests set the variable for
their whole process, so they run this module as a subprocess (one for a whole batch, to
pay the imports once):

    python -m fxforge.codegen.gpu_compile specs.json results.json [--jobs N]

where specs.json is a list of spec dicts (`KernelSpec.to_json`). What fxforge launches is
enumerated in `gpu_specs`; the report and the table in docs/gpu-compile.md are written by
benchmarks/gpu_compile.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import io
import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed

# Shared memory a block may use (opt-in maximum): A100 (sm_80) 163 KB, H100 (sm_90) 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ARCHS = tuple(SHARED_LIMIT)


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One specialization fxforge can launch: which kernel, its argument types, its
    constexprs and launch options, and labels for the report. `tuned` is True when the
    autotuner picks among several configs (one that does not fit is skipped at run time,
    at a cost); False when the launch wrapper always uses this one.

    `aligned`: compile the specialization Triton makes when every pointer argument is
    16-byte aligned and every integer argument a multiple of 16 (`tt.divisibility` 16):
    the usual launch for LLM shapes (torch's allocations are aligned; hidden sizes, head
    dims and strides are multiples of 16). There Triton's pipeliner can stage loads in
    shared memory with 16-byte async copies, so a block may need up to twice the shared
    memory of the unaligned specialization (False: no argument known divisible, the most
    registers). A launch can get either, so the sweeps compile both (`compile_all`)."""
    kernel: str                 # a label: "attention", "decode_split", "row:softmax", ...
    fn: str                     # "package.module:attribute" or "file:/path/to/source.py:name"
    signature: dict             # argument name -> "*fp16", "i32", "fp32" ("constexpr" for constexprs)
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    tuned: bool = False
    labels: dict = dataclasses.field(default_factory=dict)  # dtype, head_dim, format, config ...
    aligned: bool = False

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "KernelSpec":
        return cls(**d)

    def config_text(self) -> str:
        blocks = " ".join(f"{k}={v}" for k, v in self.constexprs.items() if k.startswith("BLOCK"))
        return f"{blocks} w{self.num_warps} s{self.num_stages}".strip()


@dataclasses.dataclass
class CompileResult:
    spec: KernelSpec
    arch: int
    shared: int = 0             # bytes per block
    registers: int = 0          # per thread
    spill_stores: int = 0       # bytes per thread
    spill_loads: int = 0
    stack: int = 0              # stack frame bytes per thread
    error: str = ""

    @property
    def fits(self) -> bool:
        return not self.error and self.shared <= SHARED_LIMIT[self.arch]

    @property
    def spill_per_block(self) -> int:
        """Spill stores of the whole thread block (what the issue counts)."""
        return self.spill_stores * self.spec.num_warps * 32

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["spec"] = self.spec.to_json()
        return d

    @classmethod
    def from_json(cls, d: dict) -> "CompileResult":
        return cls(**{**d, "spec": KernelSpec.from_json(d["spec"])})


def resolve_kernel(ref: str):
    """The JITFunction behind "module:attr" (unwrapping an autotuner) or behind
    "file:path:name" (a generated kernel module, loaded from its file)."""
    if ref.startswith("file:"):
        path, name = ref[len("file:"):].rsplit(":", 1)
        spec = importlib.util.spec_from_file_location(f"fxforge_aot.{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        fn = getattr(module, name)
    else:
        module_name, attr = ref.split(":")
        fn = getattr(importlib.import_module(module_name), attr)
    from triton.runtime.jit import JITFunction

    while not isinstance(fn, JITFunction):  # Autotuner / Heuristics wrap the JITFunction
        fn = fn.fn
    return fn


_PTXAS_PATTERNS = {
    "registers": r"Used (\d+) registers",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
    "stack": r"(\d+) bytes stack frame",
}


def parse_ptxas_log(log: str) -> dict:
    """Registers and spill bytes from `ptxas -v` output (0 where a line is absent)."""
    out = {}
    for field, pattern in _PTXAS_PATTERNS.items():
        m = re.search(pattern, log)
        out[field] = int(m.group(1)) if m else 0
    return out


def compile_spec(spec: KernelSpec, arch: int) -> CompileResult:
    """Compile one spec for one compute capability down to a cubin. Triton already runs
    ptxas with -v; its log is printed (to Python's stdout) when dump_ptxas_log is on, and
    always_compile makes sure ptxas runs even when the kernel is in Triton's cache."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    result = CompileResult(spec, arch)
    try:
        fn = resolve_kernel(spec.fn)
        source = triton.compiler.ASTSource(fn=fn, signature=spec.signature, constexprs=spec.constexprs,
                                           attrs=_divisibility(fn, spec) if spec.aligned else None)
        log = io.StringIO()
        with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True
            knobs.compilation.always_compile = True
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        result.shared = int(compiled.metadata.shared)
        for field, value in parse_ptxas_log(log.getvalue()).items():
            setattr(result, field, value)
    except Exception as e:  # a compile error is a result to report, not a crash of the sweep
        result.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
    return result


def _divisibility(fn, spec: KernelSpec) -> dict:
    """Triton's attrs for an aligned launch: every pointer and integer argument 16-divisible."""
    return {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, kind in spec.signature.items()
            if name not in spec.constexprs and (kind.startswith("*") or kind in ("i32", "i64"))}


def _compile_json(args) -> dict:
    spec_json, arch = args
    return compile_spec(KernelSpec.from_json(spec_json), arch).to_json()


def _indexed_compile(args) -> tuple[int, dict]:
    index, work = args
    return index, _compile_json(work)


# kernels the CI subset also compiles unaligned for sm_80 (see main)
QUICK_UNALIGNED_BOTH = ("decode_split", "decode_combine")


def quick_unaligned(spec: KernelSpec, arch: int) -> bool:
    """Whether the CI subset compiles `spec` unaligned for `arch`: every spec for sm_90, and
    the QUICK_UNALIGNED_BOTH kernels for sm_80 too, but for the paged split kernel: the
    full sweep measured its sm_80 registers below sm_90's at every paged point (by 2-96)
    and the unaligned shared memory the same on both."""
    return arch == 90 or (spec.kernel in QUICK_UNALIGNED_BOTH and spec.labels.get("variant") != "paged")


def compile_all(specs: list[KernelSpec], archs=ARCHS, jobs: int = 1, progress: str | None = None,
                aligned_archs=None, unaligned=None) -> list[CompileResult]:
    """Every spec for every arch unaligned and for the `aligned_archs` (None: every arch)
    aligned (`KernelSpec.aligned`), `jobs` compiles at a time (ptxas is single-threaded), in
    spec order. `unaligned(spec, arch)`, where given, says which unaligned compiles to make.
    `progress`: a file each result is appended to (a JSON line) as it is done, so that a full
    sweep stopped early (it takes tens of minutes) leaves what it compiled."""
    aligned_archs = archs if aligned_archs is None else aligned_archs
    work = list(enumerate((dataclasses.replace(s, aligned=aligned).to_json(), a)
                          for s in specs for aligned in (False, True) for a in archs
                          if (a in aligned_archs if aligned else unaligned is None or unaligned(s, a))))
    done: list = [None] * len(work)
    log = open(progress, "a") if progress else None
    try:
        if jobs <= 1:
            finished = map(_indexed_compile, work)
        else:
            pool = ProcessPoolExecutor(jobs)
            finished = (f.result() for f in as_completed([pool.submit(_indexed_compile, w) for w in work]))
        for index, result in finished:
            done[index] = result
            if log:
                log.write(json.dumps(result) + "\n")
                log.flush()
    finally:
        if log:
            log.close()
        if jobs > 1:
            pool.shutdown()
    return [CompileResult.from_json(r) for r in done]


def clean_env() -> dict:
    """The environment of a compile subprocess: compiled (not interpreted) Triton."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default; set only to silence triton's warning
    return env


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", help="JSON list of KernelSpec dicts, or 'quick' / 'full' for gpu_specs' sets")
    parser.add_argument("results", help="where to write the JSON list of CompileResult dicts")
    parser.add_argument("--arch", type=int, action="append", help="compute capability (default: 80 and 90)")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--extra", help="JSON list of more specs (e.g. generated kernels of the zoo models)")
    parser.add_argument("--progress", help="append each result to this file as a JSON line when it is done")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("run with TRITON_INTERPRET unset: interpreted kernels cannot be compiled")
    if args.specs in ("quick", "full"):
        from . import gpu_specs

        specs = gpu_specs.launchable_specs(quick=args.specs == "quick")
    else:
        with open(args.specs) as f:
            specs = [KernelSpec.from_json(d) for d in json.load(f)]
    if args.extra:
        with open(args.extra) as f:
            specs += [KernelSpec.from_json(d) for d in json.load(f)]
    # the CI subset compiles the aligned specializations for sm_80 alone: its 163 KB is the
    # tighter limit (the largest aligned block of the subset: 144 KB there, 176 of 227 KB on
    # sm_90; an unaligned launch pipelines nothing through shared memory, so it needs less),
    # and the unaligned ones for sm_90, plus sm_80's for the split-K decode kernel (launched
    # without autotuning: its spills matter on each arch) where sm_90's do not bound them
    # (quick_unaligned); the full sweep compiles all three
    archs = tuple(args.arch or ARCHS)
    quick = args.specs == "quick" and set(archs) == {80, 90}
    results = compile_all(specs, archs, args.jobs, args.progress, aligned_archs=(80,) if quick else None,
                          unaligned=quick_unaligned if quick else None)
    with open(args.results, "w") as f:
        json.dump([r.to_json() for r in results], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
