"""The markdown summary of one benchmarks/gpu_suite.sh run: the device and versions, a
table of the steps (passed, failed or timed out, seconds), and each step's printed
figures (the last lines of its log, where every benchmark prints its table).

    python benchmarks/gpu_suite_report.py OUT_DIR > OUT_DIR/summary.md
"""
import os
import sys
import time

TIMEOUT_CODES = {124: "timed out", 137: "killed (time limit)"}


def status(rc: int) -> str:
    return "passed" if rc == 0 else TIMEOUT_CODES.get(rc, f"failed (exit {rc})")


def main(out_dir: str) -> None:
    device = open(os.path.join(out_dir, "device.txt")).read().strip() if os.path.exists(
        os.path.join(out_dir, "device.txt")) else "device unknown"
    print(f"# fxforge GPU suite, {time.strftime('%Y-%m-%d')}\n")
    print("\n".join(f"- {line}" for line in device.splitlines()) + "\n")
    print("| step | result | seconds | command |\n|---|---|---|---|")
    steps = []
    with open(os.path.join(out_dir, "steps.tsv")) as f:
        for line in f:
            name, rc, seconds, command = line.rstrip("\n").split("\t", 3)
            steps.append(name)
            print(f"| {name} | {status(int(rc))} | {seconds} | `{command}` |")
    for name in steps:
        with open(os.path.join(out_dir, f"{name}.log"), errors="replace") as f:
            lines = [ln.rstrip() for ln in f if ln.strip()]
        print(f"\n## {name}\n\n```\n" + "\n".join(lines[-40:]) + "\n```")


if __name__ == "__main__":
    main(sys.argv[1])
