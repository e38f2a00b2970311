"""Kernel benchmarks: what this CPU machine can measure, and the GPU part when one is present.

CPU: peak memory and time of ``linear_cross_entropy`` (chunked, gradients in the forward pass)
vs the unfused ``F.cross_entropy(hidden @ weight.T, labels)``, forward + backward, at vocab 32K
and 8K tokens. Each variant runs in a fresh process; peak memory is the process's peak RSS
(``ru_maxrss``) above what it held once the inputs existed, so it counts every byte the
computation allocated (tracemalloc does not see torch's allocator).
GPU: attention fwd+bwd TFLOP/s of the Triton kernel vs ``scaled_dot_product_attention`` on
varlen batches; recorded as not measured when no CUDA device is present.

    python bench/kernels.py
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENS, DIM, VOCAB = 8192, 512, 32768

CHILD = r"""
import resource, sys, time, torch
import torch.nn.functional as F
sys.path.insert(0, {root!r})
from seqshard.kernels import linear_cross_entropy
torch.manual_seed(0)
torch.set_num_threads(1)
h = torch.randn({tokens}, {dim}, requires_grad=True)
w = (torch.randn({vocab}, {dim}) * 0.02).requires_grad_()
y = torch.randint(0, {vocab}, ({tokens},))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
if {fused}:
    loss = linear_cross_entropy(h, w, y, reduction="mean")
else:
    loss = F.cross_entropy(h @ w.t(), y)
loss.backward()
elapsed = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
print(loss.item(), elapsed, peak / 1024, float(h.grad.abs().sum()))
"""


def run(fused: bool):
    code = CHILD.format(root=str(ROOT), tokens=TOKENS, dim=DIM, vocab=VOCAB, fused=fused)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    loss, seconds, peak_mb, grad_sum = map(float, out)
    return {"loss": loss, "seconds": seconds, "peak_mb": peak_mb, "grad_abs_sum": grad_sum}


def gpu_part():
    import torch

    if not torch.cuda.is_available():
        print("GPU: no CUDA device here; attention / RMSNorm / RoPE GPU figures NOT measured")
        return {"measured": False, "reason": "no CUDA device on this machine"}
    return {"measured": False, "reason": "GPU timing not implemented in this version"}


def main():
    unfused, fused = run(False), run(True)
    ratio = fused["peak_mb"] / unfused["peak_mb"]
    print(f"linear cross-entropy, {TOKENS} tokens x vocab {VOCAB} (dim {DIM}), fwd+bwd, fp32, 1 thread")
    print(f"{'variant':<10}{'peak MB':>10}{'time s':>10}{'loss':>10}")
    for name, r in (("unfused", unfused), ("fused", fused)):
        print(f"{name:<10}{r['peak_mb']:>10.0f}{r['seconds']:>10.2f}{r['loss']:>10.4f}")
    print(f"peak memory fused / unfused = {ratio:.3f} (goal <= 0.25: {'met' if ratio <= 0.25 else 'not met'})")
    assert abs(fused["loss"] - unfused["loss"]) < 1e-4 * abs(unfused["loss"]), (fused, unfused)
    out = {"machine": "2 CPU cores, no GPU", "tokens": TOKENS, "dim": DIM, "vocab": VOCAB,
           "peak_measure": "ru_maxrss above the inputs, fresh process per variant",
           "unfused": unfused, "fused": fused, "peak_ratio": ratio, "gpu": gpu_part()}
    (ROOT / "bench/results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench/results/kernels.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
