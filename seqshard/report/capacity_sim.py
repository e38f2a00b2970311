"""``seqshard simulate SPEC --memory``: the longest sequence that fits per device count, by the
memory model (seqshard/parallel/memory_model.py), beside published figures. PREDICTED, no run.

One sequence is spread over all ``P`` devices (``sp = P``: Ulysses while ``P`` divides the heads,
USP past that; both hold the same per-rank buffers in the model); model states are sharded over
all ``P`` devices by the spec's ZeRO stage (DeepSpeed and fsdp2 shard over the SP ranks too);
activations in the spec's dtype, checkpointing, offload and MLP tiling; on ``cuda`` offloaded
block inputs leave device memory (host memory is assumed large enough and is printed). Each
device count gets two figures: model states on the device, and model states on the host
(fsdp2 ``train.offload_params``: parameters, gradients and AdamW states in host memory, the
device keeping two gathered blocks and the embedding), as ALST does on one GPU.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from seqshard.parallel import memory_model as mm

# Arctic Long Sequence Training (Bekman et al. 2025, arXiv 2506.13996): Llama-3.1-8B, H100 80GB,
# Ulysses + tiled MLP + tiled loss + activation checkpoint offload to CPU, ZeRO-3.
PUBLISHED = {1: ("ALST", 500_000), 8: ("ALST", 3_700_000), 32: ("ALST", 15_000_000)}


def capacity_rows(spec, devices: list[int], memory_bytes: float) -> list[dict]:
    rows = []
    for p in devices:
        method = "ulysses" if spec.model.n_heads % p == 0 else "usp"
        c = dataclasses.replace(mm.config_from_spec(spec, p, "cuda"), sp=p, sp_method=method, dp=p,
                                param_bytes=2 if spec.train.dtype == "bfloat16" else 4)
        off = dataclasses.replace(c, offload_states=True)
        longest = mm.longest_fitting(spec.model, c, memory_bytes)
        longest_off = mm.longest_fitting(spec.model, off, memory_bytes)
        best = max(longest, longest_off)
        terms = mm.predict_peak(spec.model, longest_off, off) if longest_off else {}
        host = spec.model.n_layers * spec.model.dim * c.act_bytes * longest_off / p if c.offload else 0
        host += mm.n_params(spec.model) * 16 / p  # bf16 weights + grads, fp32 master + 2 moments
        name, figure = PUBLISHED.get(p, ("", 0))
        rows.append({"devices": p, "method": method, "longest_tokens_states_on_device": longest,
                     "longest_tokens": longest_off, "published": f"{name} {figure:,}" if figure else "",
                     "ratio_to_published": best / figure if figure else None,
                     "host_bytes_per_rank": host,
                     "terms_gib": {k: v / 2**30 for k, v in terms.items()}})
    return rows


def assumptions(spec, memory_bytes: float) -> list[str]:
    t, m = spec.train, spec.model
    return [f"model {spec.name}: {m.arch} dim {m.dim}, {m.n_layers} layers, {m.n_heads} heads / {m.n_kv_heads} kv, "
            f"ffn {m.ffn_dim}, vocab {m.vocab_size}: {mm.n_params(m) / 1e9:.2f}B parameters",
            f"device memory {memory_bytes / 2**30:g} GiB; weights/grads {t.dtype}, AdamW fp32 master + moments, "
            f"ZeRO {t.zero_stage} over all devices; checkpointing {t.activation_checkpointing}, "
            f"offload {t.offload_activations}, mlp_tiles {t.mlp_tiles} (0 = auto)",
            f"per token: backward working set {mm.WORK_FACTOR:g} x one block's activations (measured on CPU with "
            f"the torch profiler), attention workspace {mm.ATTN_WORKSPACE:g} x (d + 2 d_kv), Ulysses send + receive "
            f"buffers of q/k/v/o; the loss phase (fp32 hidden gradient, fp32 weight gradient and copy, one "
            f"{mm.LOSS_CHUNK_BYTES // 2**20} MiB logits block) does not overlap a block's backward; no fragmentation, "
            "no CUDA context (max_memory_allocated); host memory assumed large enough (printed per rank)"]


def memory_cli(args, spec, memory_bytes: float, devices: list[int]) -> int:
    rows = capacity_rows(spec, devices, memory_bytes)
    lines = ["PREDICTED by seqshard/parallel/memory_model.py: no run behind these numbers",
             *assumptions(spec, memory_bytes), "",
             "| devices | SP | longest, states on device | longest, states on host | published | ratio | "
             "host GiB/rank |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ratio_to_published']:.2f}" if r["ratio_to_published"] else ""
        lines.append(f"| {r['devices']} | {r['method']} | {r['longest_tokens_states_on_device']:,} | "
                     f"{r['longest_tokens']:,} | {r['published']} | {ratio} | {r['host_bytes_per_rank'] / 2**30:.0f} |")
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "capacity.md").write_text("\n".join(lines) + "\n")
    (out / "capacity.json").write_text(json.dumps({"assumptions": assumptions(spec, memory_bytes), "rows": rows},
                                                  indent=1) + "\n")
    return 0
