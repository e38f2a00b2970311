"""Kernel dispatch: Triton on CUDA tensors, the torch reference (or, for attention, the
memory-efficient torch path) elsewhere.

``SEQSHARD_KERNELS=triton`` forces the Triton kernels (on CPU tensors they need
``TRITON_INTERPRET=1``: that is how the tests run them here), ``reference`` forces the plain
torch references (attention's dense one included: a test oracle only).

Triton itself is imported only where a Triton kernel runs (the kernel modules import it on first
use): a CPU run never loads it, which keeps about 70 MB of RSS out of every process.
"""
from __future__ import annotations

import importlib.util
import os

HAS_TRITON = importlib.util.find_spec("triton") is not None  # installed; not imported here


def use_triton(tensor) -> bool:
    mode = os.environ.get("SEQSHARD_KERNELS", "auto")
    if mode == "reference" or not HAS_TRITON:
        return False
    return mode == "triton" or tensor.is_cuda


def use_reference() -> bool:
    """``SEQSHARD_KERNELS=reference``: the naive twins, even where a memory-efficient path exists."""
    return os.environ.get("SEQSHARD_KERNELS", "auto") == "reference"
