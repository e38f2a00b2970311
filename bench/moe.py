"""seqshard's MoE layer vs transformers' own sparse-MoE block, forward + backward (issue #31).

Per config (Mixtral-shaped: 8 experts, top-2, renormalised; Qwen3-MoE-shaped: 16 experts, top-4,
not renormalised) the two blocks hold the same weights (router, ``gate_up`` ``[E, 2F, D]``,
``down`` ``[E, D, F]``) and see the same ``[T, D]`` input and output gradient. seqshard's
:class:`~seqshard.models.moe.MoE` groups the token-expert assignments by expert and runs two batched
matmuls; transformers runs its experts as ``config._experts_implementation`` says: ``eager`` (its
default: a Python loop over the experts hit) and ``batched_mm`` (per-assignment weight gather).
Time: median over ``--reps`` timed reps after ``--warmup``; ratio = transformers / seqshard (>1:
seqshard faster). Memory: on CUDA the peak allocated bytes of one fwd+bwd above the start; on CPU
the bytes of the tensors autograd saves for backward (activation memory; torch reports no CPU
peak), both in MiB. Output: a table on stdout and ``bench/results/moe.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# bench/kernels.py would shadow the `kernels` package transformers imports
sys.path[:] = [os.path.dirname(HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != HERE]

from seqshard.models.config import ModelConfig, MoEConfig  # noqa: E402
from seqshard.models.moe import MoE  # noqa: E402

CONFIGS = {
    "mixtral-like": dict(family="mixtral", dim=512, ffn=1024, experts=8, top_k=2, norm=True),
    "qwen3moe-like": dict(family="qwen3_moe", dim=512, ffn=256, experts=16, top_k=4, norm=False),
}


def hf_block(c, impl):
    import transformers

    if c["family"] == "mixtral":
        cfg = transformers.MixtralConfig(hidden_size=c["dim"], intermediate_size=c["ffn"], num_local_experts=c["experts"],
                                         num_experts_per_tok=c["top_k"])
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block
    else:
        cfg = transformers.Qwen3MoeConfig(hidden_size=c["dim"], moe_intermediate_size=c["ffn"], num_experts=c["experts"],
                                          num_experts_per_tok=c["top_k"], norm_topk_prob=c["norm"])
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block
    cfg._experts_implementation = None if impl == "eager" else impl
    return Block(cfg).float()


def ours_block(c):
    cfg = ModelConfig(dim=c["dim"], ffn_dim=c["ffn"], moe=MoEConfig(num_experts=c["experts"], top_k=c["top_k"],
                                                                    norm_topk=c["norm"]))
    return MoE(cfg)


def copy_weights(ours, hf):
    torch.manual_seed(0)
    with torch.no_grad():
        ours.router.weight.normal_(0, 0.1)
        ours.experts.gate_up.normal_(0, 0.02)
        ours.experts.down.normal_(0, 0.02)
        hf.gate.weight.copy_(ours.router.weight)
        hf.experts.gate_up_proj.copy_(ours.experts.gate_up)
        hf.experts.down_proj.copy_(ours.experts.down)


def saved_mib(fn):
    """MiB of distinct tensors autograd saves during ``fn()`` (CPU activation memory)."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values()) / 2**20


def measure(block, x, grad, reps, warmup, call):
    def step():
        xi = x.detach().requires_grad_()
        out = call(block, xi)
        out.backward(grad)
        return out

    for _ in range(warmup):
        step()
    if x.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        mem = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        _, mem = saved_mib(lambda: call(block, x.detach().requires_grad_()))
    secs = []
    for _ in range(reps):
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if x.is_cuda:
            torch.cuda.synchronize()
        secs.append(time.perf_counter() - start)
    return statistics.median(secs), mem


def ours_call(block, x):
    return block(x)


def hf_call(block, x):
    return block(x[None])[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--batched-max-tokens", type=int, default=512,
                    help="hf-batched_mm gathers a weight copy per assignment: skip it above this many tokens")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe.json"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    print(f"{'config':14} {'tokens':>6} {'impl':>16} {'fwd+bwd ms':>11} {'mem MiB':>8} {'hf/ours':>8} {'max|dy|':>9}")
    for name in args.configs:
        c = CONFIGS[name]
        for t in args.tokens:
            gen = torch.Generator().manual_seed(t)
            x = torch.randn(t, c["dim"], generator=gen).to(device)
            grad = torch.randn(t, c["dim"], generator=gen).to(device)
            ours = ours_block(c).to(device)
            base_s, base_mem = None, None
            for impl in ("seqshard", "hf-eager", "hf-batched_mm")[:3 if t <= args.batched_max_tokens else 2]:
                block = ours if impl == "seqshard" else hf_block(c, impl[3:]).to(device)
                copy_weights(ours, hf_block(c, "eager") if impl == "seqshard" else block)
                call = ours_call if impl == "seqshard" else hf_call
                try:
                    with torch.no_grad():
                        diff = float((call(block, x) - ours_call(ours, x)).abs().max())
                    secs, mem = measure(block, x, grad, args.reps, args.warmup, call)
                except Exception as err:  # noqa: BLE001 - an implementation this device lacks is a row, not a crash
                    print(f"{name:14} {t:6d} {impl:>16} unavailable: {type(err).__name__}: {str(err)[:60]}")
                    rows.append({"config": name, "tokens": t, "impl": impl, "error": f"{type(err).__name__}: {err}"})
                    continue
                if impl == "seqshard":
                    base_s, base_mem = secs, mem
                ratio = secs / base_s
                print(f"{name:14} {t:6d} {impl:>16} {secs * 1e3:11.2f} {mem:8.1f} {ratio:8.2f} {diff:9.1e}")
                rows.append({"config": name, "tokens": t, "impl": impl, "fwd_bwd_s": secs, "mem_mib": mem,
                             "time_vs_seqshard": ratio, "mem_vs_seqshard": mem / base_mem if base_mem else None,
                             "max_abs_diff_vs_seqshard": diff, **c})
    meta = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "reps": args.reps, "warmup": args.warmup,
            "memory": "cuda peak allocated above start" if device.type == "cuda" else "autograd-saved tensors"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
