"""Where a kernel test module that places its own tensors (it defines DEVICE) runs: on the
CPU under Triton's interpreter, on CUDA when the kernels were compiled, else skipped."""
import pytest
import torch


def kernel_device(interpret: bool, what: str) -> str:
    if interpret:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip(f"{what} was imported without TRITON_INTERPRET=1 and there is no GPU", allow_module_level=True)
