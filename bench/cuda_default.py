"""pytest plugin for bench/gpu_check.sh: tensors the kernel tests create default to the GPU, so
the Triton kernels run compiled there (the tests build their inputs without a device argument)."""
import torch


def pytest_configure(config):
    torch.set_default_device("cuda")
