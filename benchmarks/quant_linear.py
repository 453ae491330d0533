"""Benchmark quantized linear layers on a CUDA GPU (shapes of a ~1B Llama).

For each weight shape (K in-features -> N out-features) and batch size (tokens M), times
fp16 ``torch.nn.functional.linear`` against fxforge's Triton int8 / int4 / nf4 / w8a8 kernels
and, when ``import torchao`` works, torchao's ``quantize_`` int8/int4 weight-only layers,
with ``triton.testing.do_bench`` (median).  Prints a Markdown table (ms and speedup vs fp16)
and writes JSON to ``--out``.

    python benchmarks/quant_linear.py --out quant_linear.json [--gemm]

At M <= 16 the kernels run the split-K decode GEMV (quant_gemv); ``--gemm`` also times the
tiled GEMM there (columns ``<scheme>_gemm``). Each row records the error of a CUDA-graph
replay with new inputs (``graph_replay_rel_err``).

Without a CUDA GPU it prints a message and exits 0.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (K in_features, N out_features): q/o proj, gate/up proj, down proj, lm_head of a ~1B Llama
DEFAULT_SHAPES = [(2048, 2048), (2048, 5632), (5632, 2048), (2048, 32000)]
DEFAULT_BATCHES = [1, 16]
OURS = [("int8", {}), ("int4", {"group_size": 128}), ("nf4", {"group_size": 64}), ("w8a8", {})]


def _parse_shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        k, n = item.lower().split("x")
        out.append((int(k), int(n)))
    return out


def _torchao_variants():
    """[(name, make_config_or_fn, dtype)] for torchao's weight-only quantization, or a reason string."""
    try:
        import torchao  # noqa: F401
        from torchao.quantization import quantize_
    except Exception as e:  # noqa: BLE001 - any import failure means "skip torchao"
        return f"torchao not importable ({type(e).__name__}: {e})"
    import torch
    variants = []
    try:
        from torchao.quantization import Int8WeightOnlyConfig
        variants.append(("torchao_int8wo", lambda: Int8WeightOnlyConfig(), torch.float16))
    except ImportError:
        try:
            from torchao.quantization import int8_weight_only
            variants.append(("torchao_int8wo", lambda: int8_weight_only(), torch.float16))
        except ImportError:
            pass
    try:
        from torchao.quantization import Int4WeightOnlyConfig
        variants.append(("torchao_int4wo", lambda: Int4WeightOnlyConfig(group_size=128), torch.bfloat16))
    except ImportError:
        try:
            from torchao.quantization import int4_weight_only
            variants.append(("torchao_int4wo", lambda: int4_weight_only(group_size=128), torch.bfloat16))
        except ImportError:
            pass
    return quantize_, variants


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="quant_linear_bench.json", help="JSON results file")
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in DEFAULT_SHAPES),
                    help="comma-separated KxN (in_features x out_features)")
    ap.add_argument("--batches", default=",".join(map(str, DEFAULT_BATCHES)), help="comma-separated M values")
    ap.add_argument("--rep", type=int, default=100, help="do_bench rep (ms)")
    ap.add_argument("--no-torchao", action="store_true")
    ap.add_argument("--gemm", action="store_true",
                    help="also time the tiled GEMM at M <= 16 (where the split-K GEMV runs), as <scheme>_gemm")
    args = ap.parse_args(argv)

    import torch
    if not torch.cuda.is_available():
        print("benchmarks/quant_linear.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing to do.")
        return 0

    import triton
    from triton.testing import do_bench, do_bench_cudagraph

    from fxforge.codegen.kernels import quant_gemv
    from fxforge.codegen.kernels.quant_matmul import quant_linear_triton
    from fxforge.ir.quant_formats import packed_nbytes, quant_linear_reference, quantize_weight

    shapes = _parse_shapes(args.shapes)
    batches = [int(b) for b in args.batches.split(",")]
    dev = "cuda"
    torch.manual_seed(0)

    ao = None if args.no_torchao else _torchao_variants()
    if isinstance(ao, str):
        print(f"skipping torchao: {ao}")
        ao = None
    elif ao is None:
        print("skipping torchao (--no-torchao)")

    def bench(fn):
        return do_bench(fn, warmup=25, rep=args.rep, return_mode="median")

    def device_time(fn):
        """The kernels' own time: replays of a CUDA graph of the call, so that the host's
        launch work (which do_bench includes when it exceeds the kernel) drops out."""
        try:
            return do_bench_cudagraph(fn, rep=args.rep, return_mode="median")
        except Exception as e:  # noqa: BLE001 - a call that cannot be captured: say so, keep going
            print(f"cannot time in a CUDA graph: {type(e).__name__}: {str(e)[:200]}")
            return float("nan")

    def graph_error(fn, x, ref):
        """max |y - ref| / max |ref| of a CUDA-graph replay with new contents in x: the
        split-K GEMV keeps state on the device (arrival counters) that a replay must find
        reset."""
        try:
            fn()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y = fn()
            x.copy_(torch.randn_like(x))
            graph.replay()
            graph.replay()
            torch.cuda.synchronize()
            want = ref()
            return float((y.float() - want.float()).abs().max() / want.float().abs().max())
        except Exception as e:  # noqa: BLE001
            print(f"cannot replay in a CUDA graph: {type(e).__name__}: {str(e)[:200]}")
            return float("nan")

    def gemm_only(fn):
        """fn with the decode GEMV turned off (the tiled GEMM at every M)."""
        def run():
            rows, quant_gemv.MAX_ROWS = quant_gemv.MAX_ROWS, 0
            try:
                return fn()
            finally:
                quant_gemv.MAX_ROWS = rows
        return run

    results = []
    for k, n in shapes:
        w = torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02
        packs = {}
        for scheme, opts in OURS:
            try:
                packs[scheme] = quantize_weight(w, scheme, **opts)
            except ValueError as e:
                print(f"skip {scheme} for {k}x{n}: {e}")
        ao_layers = {}
        if ao is not None:
            quantize_, variants = ao
            for name, make, dt in variants:
                try:
                    lin = torch.nn.Linear(k, n, bias=False, device=dev, dtype=dt)
                    with torch.no_grad():
                        lin.weight.copy_(w.to(dt))
                    quantize_(lin, make())
                    ao_layers[name] = (lin, dt)
                except Exception as e:  # noqa: BLE001
                    print(f"torchao {name} failed for {k}x{n}: {type(e).__name__}: {e}")
        for m in batches:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            row = {"K": k, "N": n, "M": m, "ms": {}, "max_rel_err": {}, "nbytes": {"fp16": w.numel() * 2}}
            row["ms"]["fp16"] = bench(lambda: torch.nn.functional.linear(x, w))
            row["graph_ms"] = {"fp16": device_time(lambda: torch.nn.functional.linear(x, w))}
            for scheme, p in packs.items():
                y = quant_linear_triton(x, p)
                ref = quant_linear_reference(x, p)
                row["max_rel_err"][scheme] = float((y.float() - ref.float()).abs().max() / ref.float().abs().max())
                row["ms"][scheme] = bench(lambda p=p: quant_linear_triton(x, p))
                row["graph_ms"][scheme] = device_time(lambda p=p: quant_linear_triton(x, p))
                row["nbytes"][scheme] = packed_nbytes(p)
                row.setdefault("graph_replay_rel_err", {})[scheme] = graph_error(
                    lambda p=p: quant_linear_triton(x, p), x, lambda p=p: quant_linear_reference(x, p))
                if args.gemm and m <= quant_gemv.MAX_ROWS:
                    gemm = gemm_only(lambda p=p: quant_linear_triton(x, p))
                    row["ms"][f"{scheme}_gemm"] = bench(gemm)
                    row["graph_ms"][f"{scheme}_gemm"] = device_time(gemm)
            for name, (lin, dt) in ao_layers.items():
                xa = x.to(dt)
                try:
                    with torch.no_grad():
                        row["ms"][name] = bench(lambda lin=lin, xa=xa: lin(xa))
                except Exception as e:  # noqa: BLE001
                    print(f"torchao {name} failed at M={m}: {type(e).__name__}: {e}")
            results.append(row)
            print(f"K={k} N={n} M={m}: " + ", ".join(f"{kk}={v:.4f}ms" for kk, v in row["ms"].items())
                  + " | in a CUDA graph: " + ", ".join(f"{kk}={v:.4f}ms" for kk, v in row["graph_ms"].items()),
                  flush=True)

    cols = ["fp16"] + [c for s, _ in OURS for c in (s, f"{s}_gemm")] + ["torchao_int8wo", "torchao_int4wo"]
    cols = [c for c in cols if any(c in r["ms"] for r in results)]
    print()
    print("| K x N | M | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for r in results:
        cells = []
        for c in cols:
            if c not in r["ms"]:
                cells.append("-")
            elif c == "fp16":
                cells.append(f"{r['ms'][c] * 1e3:.1f} us")
            else:
                cells.append(f"{r['ms'][c] * 1e3:.1f} us ({r['ms']['fp16'] / r['ms'][c]:.2f}x)")
        print(f"| {r['K']}x{r['N']} | {r['M']} | " + " | ".join(cells) + " |")
    print("\n(speedup vs fp16 F.linear in parentheses; w8a8 includes per-token activation quantization "
          "and outlier detection in torch)")
    graph_cols = [c for c in cols if any(c in r.get("graph_ms", {}) for r in results)]
    print("\nIn a CUDA graph (the kernels' own time, no host launch work):\n")
    print("| K x N | M | " + " | ".join(graph_cols) + " |")
    print("|---|---|" + "---|" * len(graph_cols))
    for r in results:
        g = r["graph_ms"]
        cells = [f"{g[c] * 1e3:.1f} us" + ("" if c == "fp16" else f" ({g['fp16'] / g[c]:.2f}x)") for c in graph_cols]
        print(f"| {r['K']}x{r['N']} | {r['M']} | " + " | ".join(cells) + " |")

    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version()}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
