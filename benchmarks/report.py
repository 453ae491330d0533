"""What every benchmark prints and saves beside its figures: the machine and versions."""
import json
import os
import platform
import time


def run_metadata() -> dict:
    import torch

    meta = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        meta["device"] = torch.cuda.get_device_name()
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    return meta


def finish(rows: list, out_path: str | None) -> dict:
    """Print the run's metadata and, if asked, save rows + metadata as JSON."""
    meta = run_metadata()
    print(f"\n{meta}")
    if out_path:
        with open(out_path, "w") as f:
            json.dump({"rows": rows, "meta": meta}, f, indent=2)
    return meta
