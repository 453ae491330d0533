"""Compile every kernel specialization fxforge can launch for sm_80 and sm_90, with no GPU,
and write the table (shared memory, registers, spills per kernel/config/arch) to
docs/gpu-compile.md.

    python benchmarks/gpu_compile.py                  # the full sweep (~10-20 min on 2 cores)
    python benchmarks/gpu_compile.py --quick          # the CI subset
    python benchmarks/gpu_compile.py --before old.json  # add a before/after table

This process runs the zoo models under Triton's interpreter to collect the generated
kernels they launch; the compiles run in a subprocess without TRITON_INTERPRET
(fxforge/codegen/gpu_compile.py).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")  # for the zoo models; the compile subprocess unsets it
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import torch  # noqa: E402

from fxforge.codegen.gpu_compile import ARCHS, SHARED_LIMIT, CompileResult, clean_env  # noqa: E402

ZOO = ("nanogpt", "gpt2", "llama", "mistral")


def zoo_launches(names=ZOO) -> list[dict]:
    """The generated kernels each zoo model launches (prefill and a decode step), as
    `gpu_specs.generated_specs` dicts."""
    import fxforge
    import zoo
    from fxforge.codegen.gpu_specs import generated_specs

    makers = {"nanogpt": lambda: (zoo.NanoGPT().eval(), 96), "gpt2": zoo.gpt2, "llama": lambda: zoo.llama("sdpa"),
              "mistral": zoo.mistral}
    specs = []
    for name in names:
        torch.manual_seed(0)
        model, vocab = makers[name]()
        ids = torch.randint(0, vocab, (2, 7))
        optimized = fxforge.optimize(model, (ids,), backend="interpret")
        with torch.no_grad():
            optimized(ids)
        specs += [s.to_json() for s in generated_specs(list(optimized.backend.pointwise.launches.values()), name)]
    return specs


def run_compiles(which: str, extra: list[dict], jobs: int, archs=ARCHS, progress: str | None = None) \
        -> list[CompileResult]:
    """One subprocess, compiled-mode Triton, for the whole batch (`progress`: gpu_compile's)."""
    with tempfile.TemporaryDirectory() as tmp:
        extra_path, out_path = os.path.join(tmp, "extra.json"), os.path.join(tmp, "results.json")
        with open(extra_path, "w") as f:
            json.dump(extra, f)
        cmd = [sys.executable, "-m", "fxforge.codegen.gpu_compile", which, out_path, "--extra", extra_path,
               "--jobs", str(jobs)] + [a for arch in archs for a in ("--arch", str(arch))] \
            + (["--progress", progress] if progress else [])
        env = {**clean_env(), "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
        with open(out_path) as f:
            return [CompileResult.from_json(d) for d in json.load(f)]


# --------------------------------------------------------------------------- the report
_BASE_LABELS = ("dtype", "head_dim", "format", "row", "kernel", "launched")


def _where(spec, variants: bool = True) -> str:
    """The specialization's text: dtype, head dim, format, row length, generated kernel, and
    (`variants`) the other labels (variant, one_split, wide, rows ...: True flags by name,
    False ones left out) and "aligned" (KernelSpec.aligned), which tell apart rows of one
    kernel and config. The before/after
    table compares without them: the earlier run had no such labels."""
    lab = spec.labels
    parts = [lab.get("dtype", ""), f"d={lab['head_dim']}" if "head_dim" in lab else "",
             lab.get("format", "") if lab.get("format") not in (None, "w8a8") else "",
             f"N={lab['row']}" if "row" in lab else "", lab.get("kernel", "")]
    if variants:
        parts += [k if v is True else f"{k}={v}" for k, v in lab.items() if k not in _BASE_LABELS and v is not False]
        parts += ["aligned"] if spec.aligned else []
    return " ".join(str(p) for p in parts if p)


def row_key(spec) -> tuple:
    return (spec.kernel, _where(spec), spec.config_text())


def _kb(n: int) -> str:
    return f"{n / 1024:.1f}"


def _cell(r: CompileResult | None) -> str:
    if r is None:
        return "-"
    if r.error:
        return f"ERROR {r.error[:60]}"
    over = " **over**" if not r.fits else ""
    return f"{_kb(r.shared)}{over} / {r.registers} / {r.spill_stores}"


def by_row(results: list[CompileResult]) -> dict:
    rows: dict[tuple, dict] = {}
    for r in results:
        rows.setdefault(row_key(r.spec), {})[r.arch] = r
    return rows


def summary(results: list[CompileResult]) -> list[str]:
    lines = ["| arch | shared limit | specializations | compile errors | over shared limit (untuned) | "
             "over (autotuned) | spilling | worst spill B/thread |", "|---|---|---|---|---|---|---|---|"]
    for arch in sorted({r.arch for r in results}):
        rs = [r for r in results if r.arch == arch]
        over = [r for r in rs if not r.error and not r.fits]
        lines.append(f"| sm_{arch} | {_kb(SHARED_LIMIT[arch])} KB | {len(rs)} | {sum(bool(r.error) for r in rs)} | "
                     f"{sum(not r.spec.tuned for r in over)} | {sum(r.spec.tuned for r in over)} | "
                     f"{sum(r.spill_stores > 0 for r in rs)} | {max((r.spill_stores for r in rs), default=0)} |")
    return lines


def full_table(results: list[CompileResult]) -> list[str]:
    archs = sorted({r.arch for r in results})
    head = "| kernel | specialization | config | tuned | " + " | ".join(f"sm_{a} KB / regs / spill B" for a in archs)
    lines = [head + " |", "|" + "---|" * (4 + len(archs))]
    for (kernel, where, config), per_arch in by_row(results).items():
        tuned = "yes" if next(iter(per_arch.values())).spec.tuned else "no"
        lines.append(f"| {kernel} | {where} | {config} | {tuned} | "
                     + " | ".join(_cell(per_arch.get(a)) for a in archs) + " |")
    return lines


def before_after(before: list[CompileResult], after: list[CompileResult]) -> list[str]:
    """Per kernel and specialization (over all its launchable configs and both archs): the
    most shared memory and the most spill bytes, before and after."""
    def worst(results):
        out: dict[tuple, tuple] = {}
        for r in results:
            if r.error or r.spec.labels.get("launched") is False:
                continue
            key = (r.spec.kernel, _where(r.spec, variants=False))
            shared, spill, n = out.get(key, (0, 0, set()))
            out[key] = (max(shared, r.shared), max(spill, r.spill_stores), n | {r.spec.config_text()})
        return out

    b, a = worst(before), worst(after)
    lines = ["| kernel | specialization | configs before -> after | max shared KB before -> after | "
             "max spill B/thread before -> after |", "|---|---|---|---|---|"]
    for key in sorted(set(b) & set(a)):  # a quick run measures a subset: compare what both measured
        (sb, pb, nb), (sa, pa, na) = b.get(key, (0, 0, set())), a.get(key, (0, 0, set()))
        if (sb, pb) == (sa, pa) and nb == na:
            continue
        lines.append(f"| {key[0]} | {key[1]} | {len(nb)} -> {len(na)} | {_kb(sb)} -> {_kb(sa)} | {pb} -> {pa} |")
    return lines


def write_report(path: str, results, before=None, command="python benchmarks/gpu_compile.py", note="") -> None:
    text = ["# Ahead-of-time GPU compile report", "",
            f"Generated by `{command}` (fxforge/codegen/gpu_compile.py, gpu_specs.py): every kernel",
            "specialization fxforge can launch, compiled with no GPU by the triton wheel's compiler and ptxas",
            "for sm_80 (A100) and sm_90 (H100). Shared memory is per block (`compiled.metadata.shared`);",
            "registers and spill stores are per thread, from `ptxas -v`. **over** marks shared memory above",
            "the arch's limit. Autotuned kernels list each config the autotuner tries for that dtype and",
            "head dim (after the kernel module's pruning)."] + ([note] if note else []) + ["", "## Summary", ""] \
        + summary(results)
    if before:
        text += ["", "## Before and after (issue 17)", "",
                 "Worst case over the configs and variants launched for each specialization, both archs; only "
                 "rows that",
                 "changed. Before: the configs as they were (every attention and GEMM config for every dtype",
                 "and head dim, decode split with 64 keys, one-block rows of up to 64k elements).", ""]
        text += before_after(before, results)
    text += ["", "## Every specialization", "", "Cells: shared KB / registers / spill store bytes per thread.", ""]
    text += full_table(results)
    with open(path, "w") as f:
        f.write("\n".join(text) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the CI subset (worst cases, one zoo model)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "gpu-compile.md"))
    parser.add_argument("--json", help="also save the raw results here")
    parser.add_argument("--before", help="raw results of an earlier run, for the before/after table")
    parser.add_argument("--progress", help="append each result here as it is done (a JSON line): what a "
                        "sweep stopped early compiled, for --results")
    parser.add_argument("--results", nargs="+",
                        help="render these raw results (from --json; several: one sweep run in parts, merged) "
                             "instead of compiling")
    args = parser.parse_args()
    if args.results:
        results = []
        for path in args.results:
            with open(path) as f:
                raw = [json.loads(line) for line in f] if path.endswith(".jsonl") else json.load(f)
            results += [CompileResult.from_json(d) for d in raw]
    else:
        extra = zoo_launches(("llama",) if args.quick else ZOO)
        results = run_compiles("quick" if args.quick else "full", extra, args.jobs, progress=args.progress)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_json() for r in results], f, indent=1)
    before = None
    if args.before:
        with open(args.before) as f:
            before = [CompileResult.from_json(d) for d in json.load(f)]
    # rendered from raw results: say so (compiled earlier, or in parts and merged)
    note = "Rendered with `--results` from the raw results of that sweep." if args.results else ""
    write_report(args.out, results, before, "python benchmarks/gpu_compile.py" + (" --quick" if args.quick else ""),
                 note)
    for line in summary(results):
        print(line)
    bad = [r for r in results if r.error or not r.fits]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
