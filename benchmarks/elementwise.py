"""Generated pointwise kernels on a CUDA GPU: achieved GB/s of fxforge's fused kernels vs
eager torch vs torch.compile, in the same run, beside the device-to-device copy bandwidth.

Workloads: a GELU(x + bias) chain, residual add + RMSNorm, and softmax, on [tokens, hidden]
activations. (fxforge fuses the pointwise parts today; row reductions are not fused yet,
so the RMSNorm and softmax rows show the partial fusion honestly.)

    python benchmarks/elementwise.py [--quick] [--out results.json]
"""
import argparse
import os
import sys


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import finish  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("benchmarks/elementwise.py needs a CUDA GPU; none is available here. Nothing measured.")
        return 0
    import triton

    import fxforge

    class GeluBias(torch.nn.Module):
        def __init__(self, h):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.randn(h))

        def forward(self, x):
            return torch.nn.functional.gelu(x + self.bias, approximate="tanh")

    class ResidualRMSNorm(torch.nn.Module):
        def __init__(self, h):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(h))

        def forward(self, x, r):
            h = x + r
            return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight

    class Softmax(torch.nn.Module):
        def forward(self, x):
            return torch.softmax(x, dim=-1)

    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (16384, 4096), (8192, 8192)]
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        for tokens, hidden in shapes:
            x = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
            r = torch.randn_like(x)
            nbytes = x.numel() * x.element_size()
            copy_ms = triton.testing.do_bench(lambda: x.clone())
            copy_gbs = 2 * nbytes / copy_ms / 1e6
            for name, model, inputs, traffic in [
                ("gelu_bias", GeluBias(hidden), (x,), 2 * nbytes),
                ("residual_rmsnorm", ResidualRMSNorm(hidden), (x, r), 3 * nbytes),
                ("softmax", Softmax(), (x,), 2 * nbytes),
            ]:
                model = model.to("cuda", dtype)
                fast = fxforge.optimize(model, inputs, dynamic=False)
                compiled = torch.compile(model)
                row = {"workload": name, "dtype": str(dtype).split(".")[-1], "shape": [tokens, hidden],
                       "copy_GBps": copy_gbs}
                for label, fn in (("eager", model), ("torch.compile", compiled), ("fxforge", fast)):
                    with torch.no_grad():
                        fn(*inputs)
                        ms = triton.testing.do_bench(lambda: fn(*inputs))
                    row[label] = traffic / ms / 1e6
                rows.append(row)
                print(f"{name:<17} {row['dtype']} {tokens}x{hidden}: copy {copy_gbs:.0f} GB/s | eager "
                      f"{row['eager']:.0f} | torch.compile {row['torch.compile']:.0f} | fxforge {row['fxforge']:.0f}",
                      flush=True)
    print("\n| workload | dtype | shape | fxforge GB/s | % of copy | vs eager | vs torch.compile |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workload']} | {r['dtype']} | {r['shape'][0]}x{r['shape'][1]} | {r['fxforge']:.0f} | "
              f"{100 * r['fxforge'] / r['copy_GBps']:.0f}% | {r['fxforge'] / r['eager']:.2f}x | "
              f"{r['fxforge'] / r['torch.compile']:.2f}x |")
    finish(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
