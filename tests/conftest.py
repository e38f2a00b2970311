"""Session-wide test settings, applied before any test module imports seqshard."""
import os

# Triton chooses interpreter vs compiled kernels when a kernel is decorated (at import), and
# these machines have no GPU: run every Triton kernel under the interpreter on CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")
