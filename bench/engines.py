"""Engines side by side at world 4: per-rank model-state memory and tokens/s.

For ``torch`` (replicated AdamW + bucketed all-reduce), ``fsdp2`` (fully_shard over all 4 ranks)
and ``deepspeed`` ZeRO-3, on 4 gloo CPU ranks with the same model, data and steps:
- per-rank bytes of parameters, gradients (measured just before the optimizer step) and AdamW
  states, read from the tensors each rank actually holds (local shards under fsdp2 / ZeRO-3);
- ``peak_mem_mb`` (the process's max RSS on CPU, as in metrics.jsonl) and tokens/s over the
  steps after the first (warm-up).
Goal (issue #18): fsdp2 params + grads + optimizer states <= 0.3x the torch engine's.

    python bench/engines.py          # ~3 minutes on 2 cores
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers.ranks import run_ranks  # noqa: E402
from tests.helpers.training import small_spec  # noqa: E402

WORLD, STEPS = 4, 4
MODEL = ["model.dim=256", "model.n_layers=4", "model.n_heads=8", "model.n_kv_heads=4", "model.ffn_dim=768",
         "data.max_seq_len=256", "data.tokens_per_step=2048", "data.batching=window",
         f"train.steps={STEPS}", "train.checkpoint_every=0", "train.warmup_steps=1"]
ENGINES = {"torch": ["train.engine=torch"], "fsdp2": ["train.engine=fsdp2"],
           "deepspeed_zero3": ["train.engine=deepspeed", "train.zero_stage=3"]}


def _local(t):
    from torch.distributed.tensor import DTensor

    t = t.to_local() if isinstance(t, DTensor) else t
    return t.numel() * t.element_size()


def _state_bytes(engine) -> dict:
    """Bytes this rank holds now: parameters, gradients, optimizer states."""
    model, opt = engine.model, engine.optimizer
    if hasattr(engine, "engine"):  # DeepSpeed ZeRO-3: the flat fp32 partitions live in its optimizer
        opt = engine.engine.optimizer
        params = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters())
        # ZeRO-3 keeps one fp32 gradient partition as large as the fp32 master partition (estimated,
        # not read: its gradient buffers are internal)
        grads = sum(_local(g) for g in opt.fp32_partitioned_groups_flat)
        states = sum(_local(v) for s in opt.optimizer.state.values() for v in s.values()
                     if hasattr(v, "numel") and v.dim() > 0)
        master = sum(_local(g) for g in opt.fp32_partitioned_groups_flat)
        return {"params": params + master, "grads": grads, "optim": states}
    return {"params": sum(_local(p) for p in model.parameters()),
            "grads": sum(_local(p.grad) for p in model.parameters() if p.grad is not None),
            "optim": sum(_local(v) for s in opt.state.values() for v in s.values()
                         if hasattr(v, "numel") and v.dim() > 0)}


def bench_rank(rank, world, out, overrides):
    import torch.distributed as dist

    from seqshard.train import trainer

    spec = small_spec(out, world, MODEL + overrides)
    run = trainer.setup(spec)
    engine, grads_seen = run.engine, {}
    step_fn = engine.step

    def step_and_measure():  # measure right before the optimizer step: grads and states both live
        grads_seen.update(_state_bytes(engine))
        return step_fn()

    engine.step = step_and_measure
    times, tokens = [], 0
    for step in range(1, STEPS + 1):
        m = trainer.train_step(run, step)
        if step > 1:
            times.append(m["step_time_s"])
            tokens += m["tokens"]
    after = _state_bytes(engine)  # optimizer states exist after the first step
    dist.barrier()
    mb = 2**20
    return {"params_mb": after["params"] / mb, "grads_mb": grads_seen["grads"] / mb,
            "optim_mb": after["optim"] / mb,
            "model_state_mb": (after["params"] + grads_seen["grads"] + after["optim"]) / mb,
            "tokens_per_s": tokens / sum(times), "peak_mem_mb": m["peak_mem_mb"], "loss": m["loss"]}


def main():
    import tempfile

    results = {}
    for name, overrides in ENGINES.items():
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            per_rank = run_ranks(WORLD, bench_rank, out, overrides, timeout=600)
        r0 = per_rank[0]
        results[name] = {**r0, "max_model_state_mb": max(r["model_state_mb"] for r in per_rank),
                         "max_peak_mem_mb": max(r["peak_mem_mb"] for r in per_rank),
                         "wall_s": time.perf_counter() - start}
        print(f"{name}: done in {results[name]['wall_s']:.0f}s", flush=True)
    base = results["torch"]["max_model_state_mb"]
    print(f"\nworld {WORLD}, {MODEL}")
    print(f"{'engine':<16}{'params MB':>10}{'grads MB':>10}{'optim MB':>10}{'state MB':>10}{'x torch':>9}"
          f"{'peak RSS MB':>13}{'tokens/s':>10}{'loss':>8}")
    for name, r in results.items():
        r["state_vs_torch"] = r["max_model_state_mb"] / base
        print(f"{name:<16}{r['params_mb']:>10.2f}{r['grads_mb']:>10.2f}{r['optim_mb']:>10.2f}"
              f"{r['max_model_state_mb']:>10.2f}{r['state_vs_torch']:>9.2f}{r['max_peak_mem_mb']:>13.0f}"
              f"{r['tokens_per_s']:>10.0f}{r['loss']:>8.4f}")
    out = ROOT / "bench" / "results" / "engines.json"
    out.write_text(json.dumps({"world": WORLD, "steps": STEPS, "overrides": MODEL, "engines": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
