"""Memory of the default CPU attention: one long document, forward + backward, in a fresh process.
The dense reference would hold ``[H, L, L]`` fp32 scores (and their probabilities) for backward;
the flash path must stay far below one such matrix (Invariant 9: memory linear in tokens)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import json, resource, sys, torch
from seqshard.kernels.attention import attention
L, H, D = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
q, k, v, dout = (torch.randn(L, H, D) for _ in range(4))
q.requires_grad_(); k.requires_grad_(); v.requires_grad_()
cu = torch.tensor([0, L], dtype=torch.int32)
small = torch.tensor([0, 64], dtype=torch.int32)  # warm up the kernels on a small document
attention(q[:64], k[:64], v[:64], small, small, 64, 64, causal=True).backward(dout[:64])
q.grad = k.grad = v.grad = None
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
attention(q, k, v, cu, cu, L, L, causal=True).backward(dout)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_increase_bytes": (after - before) * 1024, "grad_finite": bool(q.grad.isfinite().all())}))
"""


def test_long_document_memory_stays_linear():
    length, heads, dim = 8192, 4, 32
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SEQSHARD_KERNELS": "auto"}
    run = subprocess.run([sys.executable, "-c", CHILD, str(length), str(heads), str(dim)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    scores = heads * length * length * 4  # one [H, L, L] fp32 matrix: 1 GiB here
    assert got["grad_finite"]
    assert got["peak_increase_bytes"] < scores / 8, \
        f"attention fwd+bwd at L={length} raised peak RSS by {got['peak_increase_bytes'] / 2**20:.0f} MiB; " \
        f"one [H, L, L] fp32 score matrix is {scores / 2**20:.0f} MiB"
