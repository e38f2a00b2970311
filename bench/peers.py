"""seqshard vs DeepSpeed's ALST on the same Hugging Face checkpoint and the same tokens (issue #32).

One tiny HF Llama (hidden 256, 4 layers, 8 heads / 4 kv heads, SwiGLU 688, vocab 259, fp32,
random weights made here with transformers' own class) and one document of ``L`` tokens per step.

- **seqshard**: ``seqshard launch`` of a spec with ``model: {hf: CKPT}``, Ulysses over ``P`` gloo
  ranks, ``train.activation_checkpointing`` as given by ``--ckpt-modes`` (``selective``: q/k/v,
  the attention output and lse kept, nothing re-exchanged; ``full``; ``lean``: see docs/memory.md),
  ``train.mlp_tiles: 0`` (auto) and seqshard's chunked fused loss. Step time and peak RSS come from
  its ``metrics.jsonl`` (``step_time_s``; ``peak_mem_mb`` = max RSS, max over ranks).
- **ALST**, built from deepspeed's own classes as its tutorial describes:
  ``UlyssesSPAttentionHF.register_with_transformers(core_attn_implementation="sdpa")``,
  ``TiledMLP`` patched into ``LlamaMLP.forward`` before the model is made, HF gradient
  checkpointing (non-reentrant), ``TiledFusedLogitsLoss`` on the last hidden state with
  ``shift_labels``, the tutorial's token-weighted loss over the SP group, and
  ``deepspeed.initialize(..., mpu=...)`` with ``sequence_parallel_size: P``, and ``engine.train()``
  (``from_pretrained`` returns the model in eval mode, where transformers skips gradient
  checkpointing: before that call was added, ALST ran without it). Changes needed on CPU
  (all in :func:`alst_worker`): the gloo backend (``deepspeed.init_distributed("gloo")``);
  ZeRO stage 0 (the tutorial uses ZeRO-3 to shard the weights of a large model over GPUs; this
  model is 13 MB and ZeRO-3's CPU path adds nothing being measured here); no activation-checkpoint
  offload (on CPU the activations already live in host memory); the batch is sharded by slicing
  as ``UlyssesSPDataLoaderAdapter`` does (the adapter itself round-robins P samples through each
  rank, which would need P documents per step).
- **sp 1** (``--sp 1``): seqshard with one process vs a plain transformers training loop
  (``model(input_ids, labels=...)``, sdpa, HF gradient checkpointing, torch AdamW).

Each (P, L) runs ``--repeats`` times, systems alternating order repeat by repeat (drift of the
shared machine hits both); s/step is the median of steps 2.. of each run, the table shows the median
over runs and the range; peak memory is the max RSS over ranks (process high-water mark, which
includes the Python/torch runtime: ``base_mb`` is each system's RSS before the model is built).
The first-step loss is computed before any update, so it must agree to 1e-5.
``--cap-mb`` adds the largest L (growing from the smallest of ``--seqlens``) whose peak stays under
the cap, per system (one step each, which includes the optimizer's first step; L grows by
``--cap-growth``).
Every process runs one torch thread (``OMP_NUM_THREADS=1``), as ``seqshard launch`` does.
``--malloc mmap1m`` gives every process ``MALLOC_MMAP_THRESHOLD_=1048576`` (freed tensors leave the
RSS, so the peak follows the live tensors instead of glibc's retained heap).
``--live-peak`` replaces the timing by one 2-step run per system with step 2 under the torch
profiler on rank 0: the peak of the tensors allocated inside that step (no runtime, no model
states; seqshard allocates its gradients inside every step, ALST's engine keeps them across steps,
about 14 MB here) and the largest allocation sites alive at it. It moves by about 25 MB between
runs (when the asynchronous exchanges free their buffers).

    python bench/peers.py --sp 2 --seqlens 16384 --steps 3 --repeats 2
    python bench/peers.py --sp 2 --seqlens 16384 --ckpt-modes lean selective --live-peak
    python bench/peers.py --sp 1 --seqlens 16384
    python bench/peers.py --sp 2 --cap-mb 1400 --seqlens 8192

On a CUDA machine (``--device cuda --dtype bf16``: NCCL, one GPU per rank; peak = max_memory_allocated)
the same runs apply; ``bench/gpu_check.sh`` runs ``--sp 1`` there. That path has never run (no GPU
was lent to this project's sessions).

Writes bench/results/peers.json (merged by (system, P, L, mode)) and prints a table.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shutil
import statistics
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/kernels.py would shadow the `kernels` package transformers imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

MODEL = dict(vocab_size=259, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, rope_theta=10000.0, bos_token_id=256, eos_token_id=257, pad_token_id=258,
             tie_word_embeddings=False, rms_norm_eps=1e-5)
RESULTS = ROOT / "bench/results/peers.json"
DEVICE = {"device": "cpu", "dtype": "fp32", "malloc": "default"}  # the driver's --device / --dtype / --malloc
# --malloc mmap1m: glibc serves every allocation of 1 MiB or more by mmap and returns it on free (by
# default the threshold floats up to 32 MiB and freed heap blocks stay in the RSS)
MALLOC_ENV = {"default": {}, "mmap1m": {"MALLOC_MMAP_THRESHOLD_": "1048576"}}
PY = sys.executable


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_mb(dev) -> float:
    """CPU: the process's max RSS (what seqshard logs there); CUDA: max_memory_allocated (likewise)."""
    import torch

    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    return _rss_mb()


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def make_checkpoint(path: Path, max_len: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(max_position_embeddings=max_len, **MODEL)
    LlamaForCausalLM(cfg).save_pretrained(path)


def make_document(path: Path, L: int) -> None:
    """One jsonl document whose byte tokenization (BOS + bytes + EOS) is exactly L tokens."""
    rng = random.Random(L)
    text = "".join(rng.choice(string.ascii_letters + string.digits + " .,\n") for _ in range(L - 2))
    path.write_text(json.dumps({"text": text}) + "\n")


def document_ids(path: Path):
    import torch

    from seqshard.data.tokenizer import encode

    return torch.tensor(encode(json.loads(path.read_text())["text"]))


# ---------------------------------------------------------------- ALST (deepspeed's classes)

def _tiled_mlp_forward(self, x):
    """The TiledMLP patch of DeepSpeed's docstring: shards = ceil(seqlen / hidden), agreed by max."""
    import math

    import torch
    import torch.distributed as dist
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    shards = torch.tensor(math.ceil(x.shape[1] / x.shape[2]))
    dist.all_reduce(shards, op=dist.ReduceOp.MAX)

    def mlp_forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    return TiledMLP.apply(mlp_forward, self, x, int(shards.item()),
                          [self.down_proj.weight, self.gate_proj.weight, self.up_proj.weight])


@contextlib.contextmanager
def _step_profile(out, rank: int, step: int):
    """``--live-peak``: the torch profiler around step 2 (index 1) of rank 0; writes the live-tensor
    peak of that step (allocations made inside it) and its largest allocation sites to ``out``."""
    if not out or rank != 0 or step != 1:
        yield
        return
    sys.path.insert(0, str(ROOT / "bench"))
    from memory_timeline import live_peak
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield
    peak, sites = live_peak(prof, top=8)
    Path(out).write_text(json.dumps({"live_peak_mb": peak / 2**20,
                                     "sites": [[c, b / 2**20, n] for c, b, n in sites]}))


def seqshard_worker(args) -> None:
    """``--live-peak``: ``seqshard train SPEC`` on this torchrun rank, step 2 profiled on rank 0."""
    import runpy

    import seqshard.train.trainer as trainer

    plain = trainer.train_step

    def profiled(run, step, *a, **k):
        with _step_profile(args.live_out, int(os.environ.get("RANK", 0)), step - 1):
            return plain(run, step, *a, **k)

    trainer.train_step = profiled
    sys.argv = ["seqshard", "train", args.spec]
    runpy.run_module("seqshard", run_name="__main__")


def alst_worker(args) -> None:
    import torch

    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist
    import torch.distributed.nn.functional as dnn
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss, UlyssesSPAttentionHF
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama

    cuda = args.device == "cuda"
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False, verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    base = _peak_mb(dev)
    modeling_llama.LlamaMLP.forward = _tiled_mlp_forward  # before the model is made, as the tutorial says
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=args.ckpt, core_attn_implementation="sdpa", sequence_parallel_size=world,
        micro_batch_size=1, seq_length=args.L, seq_length_is_variable=False)
    model = AutoModelForCausalLM.from_pretrained(args.ckpt, attn_implementation="sdpa", dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "sequence_parallel_size": world, "zero_optimization": {"stage": 0}, "steps_per_print": 10**9,
              "bf16": {"enabled": args.dtype == "bf16"}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optim, config=config, mpu=mpu)
    sp_group = mpu.get_sequence_parallel_group()
    # from_pretrained returns the model in eval mode, where transformers skips gradient
    # checkpointing (GradientCheckpointingLayer checks self.training): a training loop calls train()
    engine.train()

    ids = document_ids(Path(args.doc)).unsqueeze(0).to(dev)  # [1, L]
    labels = ids.clone()
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]  # the adapter's shift_labels
    n = args.L // world
    piece = slice(rank * n, (rank + 1) * n)
    local_ids, local_shift = ids[:, piece], shift[:, piece]
    local_pos = torch.arange(args.L, device=dev)[piece].unsqueeze(0)
    lm_head = engine.module.lm_head

    def loss_fn(self, x, y):
        return torch.nn.functional.cross_entropy(self(x).view(-1, self.out_features), y.view(-1), reduction="sum")

    times, losses = [], []
    for i in range(args.steps):
        dist.barrier()
        t0 = time.perf_counter()
        with _step_profile(args.live_out, rank, i):
            hidden = engine.module.model(input_ids=local_ids, position_ids=local_pos).last_hidden_state
            shards = max(1, -(-n // 4096))
            loss_sum = TiledFusedLogitsLoss.apply(loss_fn, lm_head, hidden, local_shift, None, shards,
                                                  [lm_head.weight], "sum")
            good = (local_shift != -100).sum()
            sums = dnn.all_gather(loss_sum, group=sp_group)  # the tutorial's weighted loss over the SP group
            goods = [torch.zeros_like(good) for _ in range(world)]
            dist.all_gather(goods, good, group=sp_group)
            loss = sum(sums) / max(int(sum(goods)), 1)
            engine.backward(loss)
            engine.step()
            _sync(dev)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    out = {"times": times, "losses": losses, "peak_mb": _peak_mb(dev), "base_mb": base}
    every = [None] * world
    dist.all_gather_object(every, out)
    if rank == 0:
        Path(args.out).write_text(json.dumps(every))
    dist.barrier()


def hf_worker(args) -> None:
    """sp 1: the plain transformers loop (sdpa, HF gradient checkpointing, AdamW, grad clip 1)."""
    import torch

    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    dev = torch.device(args.device)
    base = _peak_mb(dev)
    model = AutoModelForCausalLM.from_pretrained(args.ckpt, attn_implementation="sdpa", dtype=torch.float32).to(dev)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    ids = document_ids(Path(args.doc)).unsqueeze(0).to(dev)
    times, losses = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        _sync(dev)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    Path(args.out).write_text(json.dumps([{"times": times, "losses": losses, "peak_mb": _peak_mb(dev),
                                           "base_mb": base}]))


# ---------------------------------------------------------------- drivers

def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}",
                **MALLOC_ENV[DEVICE["malloc"]])  # the same allocator settings for every system


def _seqshard_spec(work: Path, ckpt: Path, doc: Path, P: int, L: int, steps: int, mode: str) -> tuple[Path, Path]:
    """(spec path, output folder) of one seqshard run."""
    out = work / f"seqshard_{P}_{L}_{mode}"
    spec = {
        "name": "peers", "seed": 0, "model": {"hf": str(ckpt)},
        "data": {"source": str(doc), "max_seq_len": L, "tokens_per_step": L, "tokenizer": "byte"},
        "parallel": {"sp": P, "sp_method": "ulysses" if P > 1 else "none"},
        "train": {"steps": steps, "lr": 1e-4, "warmup_steps": 0, "lr_schedule": "constant", "weight_decay": 0.0,
                  "grad_clip": 1.0, "dtype": "bfloat16" if DEVICE["dtype"] == "bf16" else "float32",
                  "output_dir": str(out), "log_every": 1,
                  "checkpoint_every": 0, "activation_checkpointing": mode, "mlp_tiles": 0},
        "launch": {"launcher": "torchrun", "nproc_per_node": P, "master_port": _port()},
    }
    path = work / f"spec_{P}_{L}_{mode}.yaml"
    import yaml

    path.write_text(yaml.safe_dump(spec))
    return path, out


def run_seqshard(work: Path, ckpt: Path, doc: Path, P: int, L: int, steps: int, mode: str, extra: list) -> dict:
    path, out = _seqshard_spec(work, ckpt, doc, P, L, steps, mode)
    cmd = [PY, "-m", "seqshard", "launch", str(path), "--overwrite", *extra]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    if proc.returncode:
        return _failed(proc)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "step_time_s" in r]
    return {"times": [r["step_time_s"] for r in rows], "losses": [r["loss"] for r in rows],
            "peak_mb": max(r["peak_mem_mb"] for r in rows)}


def live_peak_run(system: str, work: Path, ckpt: Path, doc: Path, P: int, L: int) -> dict:
    """``--live-peak``: one 2-step run of ``system`` (``seqshard:MODE`` or ``alst``) with step 2
    profiled on rank 0; returns the live-tensor peak and its largest allocation sites."""
    live = work / f"live_{system.replace(':', '_')}_{P}_{L}.json"
    live.unlink(missing_ok=True)
    if system.startswith("seqshard"):
        path, out = _seqshard_spec(work, ckpt, doc, P, L, 2, _mode(system))
        shutil.rmtree(out, ignore_errors=True)
        args = ["--worker", "seqshard", "--spec", str(path)]
    else:  # the CPU profiler: CPU tensors
        args = _peer_args("alst", ckpt, doc, L, 2, work / f"alst_live_{P}_{L}.json", "cpu", "fp32")
    proc = subprocess.run(_torchrun(P, *args, "--live-out", str(live)), env=_env(), capture_output=True, text=True)
    if proc.returncode or not live.exists():
        return _failed(proc)
    return json.loads(live.read_text())


def _peer_args(kind: str, ckpt: Path, doc: Path, L: int, steps: int, out: Path, device: str, dtype: str) -> list:
    return ["--worker", kind, "--ckpt", str(ckpt), "--doc", str(doc), "--L", str(L), "--steps", str(steps),
            "--out", str(out), "--device", device, "--dtype", dtype]


def _torchrun(P: int, *args) -> list:
    """This script under ``torch.distributed.run`` with ``P`` ranks."""
    return [PY, "-m", "torch.distributed.run", f"--nproc_per_node={P}", f"--master_port={_port()}", __file__, *args]


def _failed(proc) -> dict:
    return {"error": f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-600:]}"}


def run_peer(kind: str, work: Path, ckpt: Path, doc: Path, P: int, L: int, steps: int) -> dict:
    out = work / f"{kind}_{P}_{L}.json"
    out.unlink(missing_ok=True)
    args = _peer_args(kind, ckpt, doc, L, steps, out, DEVICE["device"], DEVICE["dtype"])
    cmd = _torchrun(P, *args) if kind == "alst" else [PY, __file__, *args]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    if proc.returncode or not out.exists():
        return _failed(proc)
    ranks = json.loads(out.read_text())
    steps_n = len(ranks[0]["times"])
    return {"times": [max(r["times"][i] for r in ranks) for i in range(steps_n)], "losses": ranks[0]["losses"],
            "peak_mb": max(r["peak_mb"] for r in ranks), "base_mb": max(r["base_mb"] for r in ranks)}


def _summary(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0]["error"]}
    per_run = [statistics.median(r["times"][1:] or r["times"]) for r in ok]
    return {"s_per_step": statistics.median(per_run), "range": [min(per_run), max(per_run)],
            "peak_mb": max(r["peak_mb"] for r in ok), "first_loss": ok[0]["losses"][0], "runs": len(ok),
            "base_mb": ok[0].get("base_mb")}


def _merge(rows: list[dict]) -> None:
    old = json.loads(RESULTS.read_text())["rows"] if RESULTS.exists() else []
    key = lambda r: (r["system"], r["P"], r["L"], r.get("mode", ""), r.get("kind", "time"),  # noqa: E731
                     r.get("device", "cpu"), r.get("dtype", "fp32"), r.get("malloc", "default"))
    new = {key(r): r for r in old}
    new.update({key(r): r for r in rows})
    RESULTS.write_text(json.dumps({"host": os.uname().nodename, "cpus": os.cpu_count(),
                                   "rows": sorted(new.values(), key=lambda r: (r.get("kind", "time"), r["P"], r["L"],
                                                                             r["system"]))}, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=["alst", "hf", "seqshard"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--live-out", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--doc", help=argparse.SUPPRESS)
    ap.add_argument("--L", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: NCCL, one GPU per rank (never run yet: no GPU was lent to this project's sessions)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: seqshard train.dtype bfloat16, "
                    "DeepSpeed bf16, autocast in the HF loop")
    ap.add_argument("--malloc", choices=sorted(MALLOC_ENV), default="default",
                    help="CPU allocator settings applied to every system alike (mmap1m: MALLOC_MMAP_THRESHOLD_=1 MiB, "
                    "so freed tensors leave the RSS; see docs/memory.md)")
    ap.add_argument("--sp", type=int, nargs="+", default=[2], help="SP degrees (ranks); 1 = vs the plain HF loop")
    ap.add_argument("--seqlens", type=int, nargs="+", default=[4096], help="tokens per step (one document)")
    ap.add_argument("--steps", type=int, default=3, help="steps per run (the first is not timed)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per system, interleaved")
    ap.add_argument("--ckpt-modes", nargs="+", default=["selective"], help="seqshard activation_checkpointing modes")
    ap.add_argument("--cap-mb", type=float, default=0.0, help="find the largest L each system finishes under this "
                    "peak RSS per rank (growing L from the smallest --seqlens)")
    ap.add_argument("--max-L", type=int, default=1 << 20, help="--cap-mb: stop growing L here")
    ap.add_argument("--cap-growth", type=float, default=2.0, help="--cap-mb: factor between tried lengths "
                    "(rounded to a multiple of 1024)")
    ap.add_argument("--seqshard-arg", action="append", default=[], help="extra `seqshard launch` argument "
                    "(e.g. --set=train.mlp_tiles=1)")
    ap.add_argument("--live-peak", action="store_true", help="instead of timing: one 2-step run per system with "
                    "step 2 under the torch profiler on rank 0 (CPU); prints the live-tensor peak of that step "
                    "(allocations made inside it: what a GPU's max_memory_allocated would count, less the model "
                    "states) and the largest allocation sites alive at it")
    args = ap.parse_args()
    if args.worker:
        return {"alst": alst_worker, "hf": hf_worker, "seqshard": seqshard_worker}[args.worker](args)
    DEVICE.update(device=args.device, dtype=args.dtype, malloc=args.malloc)

    work = Path(tempfile.mkdtemp(prefix="peers_"))
    ckpt = work / "ckpt"
    make_checkpoint(ckpt, max(max(args.seqlens), args.max_L if args.cap_mb else 0))
    rows = []
    for P in args.sp:
        peer = "alst" if P > 1 else "hf"
        systems = [f"seqshard:{m}" for m in args.ckpt_modes] + [peer]
        if args.live_peak:
            if P == 1:
                ap.error("--live-peak compares against ALST: --sp 2 or more")
            for L in args.seqlens:
                doc = work / f"doc_{L}.jsonl"
                make_document(doc, L)
                for system in systems:
                    r = live_peak_run(system, work, ckpt, doc, P, L)
                    if "error" in r:
                        print(f"  P={P} L={L} {system}: {r['error'][:400]}")
                        continue
                    print(f"  P={P} L={L} {system}: live-tensor peak of step 2 {r['live_peak_mb']:.1f} MB (rank 0)")
                    for chain, mb, count in r["sites"]:
                        print(f"      {mb:7.1f} MB {count:4d}  {chain[:110]}")
                    rows.append({"kind": "live", "system": system.split(":")[0], "mode": _mode(system), "P": P,
                                 "L": L, "live_peak_mb": r["live_peak_mb"], "sites": r["sites"]})
            continue
        if args.cap_mb:
            for system in systems:
                L, best = min(args.seqlens), 0
                while L <= args.max_L:
                    doc = work / f"doc_{L}.jsonl"
                    make_document(doc, L)
                    r = _one(system, work, ckpt, doc, P, L, 1, args.seqshard_arg)
                    peak = r.get("peak_mb", float("inf"))
                    print(f"  cap {args.cap_mb:.0f} MB  P={P} L={L} {system}: peak {peak:.0f} MB"
                          f"{'  ' + r['error'][:200] if 'error' in r else ''}", flush=True)
                    rows.append({"kind": "peak", "system": system.split(":")[0], "mode": _mode(system), "P": P,
                                 "L": L, "peak_mb": peak, "first_loss": (r.get("losses") or [None])[0]})
                    if peak > args.cap_mb:
                        break
                    best, L = L, max(L + 1024, round(L * args.cap_growth / 1024) * 1024)
                rows.append({"kind": "cap", "system": system.split(":")[0], "mode": _mode(system), "P": P,
                             "L": best, "cap_mb": args.cap_mb})
            continue
        for L in args.seqlens:
            doc = work / f"doc_{L}.jsonl"
            make_document(doc, L)
            runs = {s: [] for s in systems}
            for rep in range(args.repeats):
                for system in (systems if rep % 2 == 0 else systems[::-1]):
                    r = _one(system, work, ckpt, doc, P, L, args.steps, args.seqshard_arg)
                    runs[system].append(r)
                    print(f"  P={P} L={L} rep {rep} {system}: "
                          + (r["error"][:400] if "error" in r else
                             f"{statistics.median(r['times'][1:] or r['times']):.2f} s/step, "
                             f"peak {r['peak_mb']:.0f} MB, first loss {r['losses'][0]:.8f}"), flush=True)
            for system in systems:
                rows.append({"system": system.split(":")[0], "mode": _mode(system), "P": P, "L": L,
                             "steps": args.steps, **_summary(runs[system])})
    for r in rows:
        r.update(DEVICE)
    _merge(rows)
    _table(rows)


def _mode(system: str) -> str:
    return system.split(":")[1] if ":" in system else ""


def _one(system, work, ckpt, doc, P, L, steps, extra):
    if system.startswith("seqshard"):
        return run_seqshard(work, ckpt, doc, P, L, steps, _mode(system), extra)
    return run_peer(system, work, ckpt, doc, P, L, steps)


def _table(rows):
    timed = [r for r in rows if r.get("kind", "time") == "time"]
    if timed:
        print("\n| P | L | system | s/step (range) | tokens/s | peak MB/rank | first loss | vs peer: speed, memory |")
        print("|---|---|---|---|---|---|---|---|")
        for r in timed:
            peer = next((p for p in timed if p["P"] == r["P"] and p["L"] == r["L"] and p["system"] in ("alst", "hf")),
                        None)
            if "error" in r:
                print(f"| {r['P']} | {r['L']} | {r['system']} {r['mode']} | error: {r['error'][:80]} |")
                continue
            ratio = ""
            if peer and peer is not r and "error" not in peer:
                ratio = (f"{peer['s_per_step'] / r['s_per_step']:.2f}x tokens/s, "
                         f"{r['peak_mb'] / peer['peak_mb']:.2f}x peak, "
                         f"loss rel diff {abs(r['first_loss'] - peer['first_loss']) / abs(peer['first_loss']):.1e}")
            print(f"| {r['P']} | {r['L']} | {r['system']} {r['mode']} | {r['s_per_step']:.2f} "
                  f"({r['range'][0]:.2f}-{r['range'][1]:.2f}) | {r['L'] / r['s_per_step']:.0f} | {r['peak_mb']:.0f} | "
                  f"{r['first_loss']:.8f} | {ratio} |")
    for r in rows:
        if r.get("kind") == "peak":
            print(f"one step, P={r['P']} L={r['L']}: {r['system']} {r['mode']} peak {r['peak_mb']:.0f} MB/rank")
        if r.get("kind") == "cap":
            print(f"cap {r['cap_mb']:.0f} MB/rank, P={r['P']}: {r['system']} {r['mode']} largest L = {r['L']}")


if __name__ == "__main__":
    main()
