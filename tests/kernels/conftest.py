"""Kernel tests run where the suite's FXFORGE_TEST_DEVICE says (tests/conftest.py): in
Triton's interpreter on CPU tensors, or compiled on the GPU. On the GPU, tensors the tests
create land on CUDA through torch's default device, so one test body serves both; a
module that places its tensors itself (it defines DEVICE) or tests only plain-torch
references (it defines RUNS_NO_KERNEL) is left alone."""
import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _kernel_device(request):
    module = request.module
    if (os.environ.get("FXFORGE_TEST_DEVICE") != "cuda" or hasattr(module, "DEVICE")
            or getattr(module, "RUNS_NO_KERNEL", False)):
        yield
        return
    torch.set_default_device("cuda")
    try:
        yield
    finally:
        torch.set_default_device(None)
