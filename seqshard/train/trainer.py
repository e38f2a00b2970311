"""The training loop: one spec in, ``metrics.jsonl`` and checkpoints out.

Every rank builds the same global batch from the seed (DESIGN.md invariant 3), takes the rows of
its data-parallel replica, packs them into micro-batches, shards each micro-batch over its SP
group through the method's ShardPlan, and scales each micro-batch's summed token loss by the
step's *global* loss-token count. The gradient sum over all ranks is then the exact full-batch
gradient, whatever the layout, so every layout reproduces the single-process loss trajectory.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from seqshard.data.batches import Row
from seqshard.data.tokenizer import PAD_ID
from seqshard.dist.bootstrap import DistEnv, init_distributed
from seqshard.dist.checkpoint import latest_checkpoint
from seqshard.dist.comm_stats import COMM_LOG
from seqshard.dist.mesh import ParallelDims, build_mesh
from seqshard.models import VarlenContext, build_model

from .engines import build_engine
from .logs import MetricsWriter, Progress, get_logger, peak_memory_mb

if TYPE_CHECKING:  # the typed spec lives in launch/, a room above this one
    from seqshard.launch.spec import Spec


def lr_at(step: int, spec: Spec) -> float:
    """Linear warmup to ``train.lr``, then cosine decay to ``lr * min_lr_ratio`` (step is 1-based)."""
    t = spec.train
    if step <= t.warmup_steps:
        return t.lr * step / max(1, t.warmup_steps)
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * cosine)


def micro_batches(rows: list[Row], budget: int) -> list[list[Row]]:
    """Group a replica's rows, in order, into micro-batches of at most ``budget`` tokens."""
    groups, current, used = [], [], 0
    for row in rows:
        if current and used + len(row) > budget:
            groups.append(current)
            current, used = [], 0
        current.append(row)
        used += len(row)
    return groups + ([current] if current else [])


def _concat(rows: list[Row]):
    tokens = torch.cat([r.tokens for r in rows])
    labels = torch.cat([r.labels for r in rows])
    positions = torch.cat([r.positions for r in rows])
    doc_lens = [n for r in rows for n in r.doc_lens]
    return tokens, labels, positions, doc_lens


def build_batch_builder(spec: Spec, corpus):
    d = spec.data
    if d.batching == "window":
        from seqshard.data.window import WindowBuilder

        return WindowBuilder(corpus, d.max_seq_len, d.tokens_per_step, spec.seed)
    from seqshard.data import builders

    if d.batching == "pack":
        return builders.PackBuilder(corpus, d.max_seq_len, d.tokens_per_step, d.pack_method, spec.seed)
    return builders.DecomposeBuilder(corpus, d.max_seq_len, d.min_seq_len, d.tokens_per_step,
                                     d.curriculum.schedule, d.curriculum.cycles, spec.train.steps, spec.seed)


class StaticScatter:
    """A fixed dp x sp layout: replica ``dp_rank`` takes rows ``dp_rank::dp``, packs them into
    micro-batches of ``budget`` tokens, and ``sharder`` (if any) shards each over the SP group."""

    def __init__(self, mesh, budget: int, sharder=None):
        self.dp_rank, self.dp = mesh["dp"].get_local_rank(), mesh["dp"].size()
        self.budget, self.sharder = budget, sharder

    def __call__(self, batch):
        """This rank's micro-batches of a step: (tokens, labels, positions, attention ctx)."""
        for rows in micro_batches(batch.rows[self.dp_rank::self.dp], self.budget):
            tokens, labels, positions, doc_lens = _concat(rows)
            if self.sharder is None:
                yield tokens, labels, positions, VarlenContext.from_lengths(doc_lens)
            else:
                yield self.sharder(tokens, labels, positions, doc_lens)

    def step_metrics(self) -> dict:
        return {}


def build_scatter(spec: Spec, model, mesh, denv: DistEnv):
    """Install the spec's SP attention into ``model`` and return how each step is scattered."""
    p = spec.parallel
    budget = spec.data.micro_batch_tokens or spec.data.max_seq_len
    if p.sp_method == "none":
        return StaticScatter(mesh, budget)
    if p.sp_method == "adaptive":
        from seqshard.parallel.adaptive import AdaptiveScatter

        return AdaptiveScatter(model, spec, denv.world_size, denv.rank, pad_id=PAD_ID)
    from seqshard.parallel.parallelize import make_sharder, parallelize

    parallelize(model, mesh, p)
    return StaticScatter(mesh, budget, make_sharder(mesh, p, pad_id=PAD_ID))


@dataclass
class Run:
    spec: Spec
    denv: DistEnv
    device: torch.device
    mesh: object
    engine: object  # TorchEngine | DeepSpeedEngine (engines.py)
    builder: object
    scatter: object  # StaticScatter | AdaptiveScatter


def setup(spec: Spec) -> Run:
    denv, device = init_distributed(spec.train.collective_timeout_s)
    p = spec.parallel
    sp = 1 if p.sp_method == "adaptive" else p.sp
    dims = ParallelDims(denv.world_size, denv.world_size // sp, sp, p.ulysses if p.sp_method == "usp" else 1)
    mesh = build_mesh(dims, device.type)
    torch.manual_seed(spec.seed)  # identical initial weights on every rank, for every layout
    model = build_model(spec.model).to(device)
    scatter = build_scatter(spec, model, mesh, denv)
    from .memory import apply_memory_options

    apply_memory_options(model, spec.train)  # after the SP attention is installed
    from seqshard.data.corpus import load_corpus

    d = spec.data
    if denv.rank == 0:  # build the datasets cache once, then everyone reads it
        corpus = load_corpus(d.source, d.text_field, d.cache_dir or None, d.max_documents or None)
    dist.barrier()
    if denv.rank != 0:
        corpus = load_corpus(d.source, d.text_field, d.cache_dir or None, d.max_documents or None)
    return Run(spec, denv, device, mesh, build_engine(model, spec, denv.local_rank),
               build_batch_builder(spec, corpus), scatter)


def train_step(run: Run, step: int) -> dict:
    spec, engine = run.spec, run.engine
    start = time.perf_counter()
    COMM_LOG.reset()
    batch = run.builder.next_batch()
    n_loss = batch.num_loss_tokens
    autocast = (torch.autocast(run.device.type, dtype=torch.bfloat16)
                if spec.train.dtype == "bfloat16" else nullcontext())
    lr = lr_at(step, spec)
    engine.set_lr(lr)
    loss_sum = torch.zeros((), dtype=torch.float64)
    local = list(run.scatter(batch))
    for i, (tokens, labels, positions, ctx) in enumerate(local):
        with autocast:
            loss = engine.forward(tokens.to(run.device), positions.to(run.device), ctx, labels.to(run.device))
        engine.backward(loss / n_loss, last=i == len(local) - 1)
        loss_sum += loss.detach().double().cpu()
    grad_norm = engine.step()
    dist.all_reduce(loss_sum)
    elapsed = time.perf_counter() - start
    comm = COMM_LOG.snapshot()
    return {"step": step, "loss": loss_sum.item() / n_loss, "tokens": batch.num_tokens,
            "loss_tokens": n_loss, "lr": lr, "grad_norm": grad_norm, "step_time_s": elapsed,
            "tokens_per_s": batch.num_tokens / elapsed, "peak_mem_mb": peak_memory_mb(run.device),
            "comm_bytes": comm["total"]["bytes"], "comm_time_s": comm["total"]["seconds"],
            "compute_time_s": elapsed - comm["total"]["seconds"],
            "comm": {op: {"bytes": v["bytes"], "seconds": v["seconds"], "calls": v["calls"]}
                     for op, v in comm.items() if op != "total"},
            **batch.stats, **run.scatter.step_metrics()}


def _trainer_state(run: Run, step: int) -> dict:
    return {"step": step, "data": run.builder.state_dict(), "spec_name": run.spec.name}


def write_run_info(run: Run):
    """``run.json`` (layout, versions) and the resolved ``spec.yaml`` beside ``metrics.jsonl``."""
    import json
    import platform
    from pathlib import Path

    import yaml

    out = Path(run.spec.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = {"name": run.spec.name, "world_size": run.denv.world_size, "dp": run.mesh["dp"].size(),
            "sp": run.spec.parallel.sp, "sp_method": run.spec.parallel.sp_method,
            "engine": run.spec.train.engine, "launcher": run.denv.launcher, "device": run.device.type,
            "torch": torch.__version__, "python": platform.python_version(),
            "n_params": sum(p.numel() for p in run.engine.model.parameters())}
    (out / "run.json").write_text(json.dumps(info, indent=1) + "\n")
    (out / "spec.yaml").write_text(yaml.safe_dump(run.spec.to_dict(), sort_keys=False))


def train(spec: Spec, resume: bool = False, stop_after: int | None = None) -> list[dict]:
    """Train per spec; returns the metrics of the steps run (every rank returns the same)."""
    run = setup(spec)
    log = get_logger(run.denv.rank)
    if run.denv.rank == 0:
        write_run_info(run)
    start_step = 0
    if resume and (ckpt := latest_checkpoint(spec.train.output_dir)) is not None:
        state = run.engine.load(ckpt)
        run.builder.load_state_dict(state["data"])
        start_step = state["step"]
        log.info("resumed from %s (step %d)", ckpt, start_step)
    last = min(spec.train.steps, stop_after or spec.train.steps)
    writer = MetricsWriter(spec.train.output_dir, run.denv.rank, keep_through=start_step)
    log.info("%s: world %d (dp %d x sp %d, %s), %d steps, launcher %s", spec.name, run.denv.world_size,
             run.mesh["dp"].size(), spec.parallel.sp, spec.parallel.sp_method, spec.train.steps, run.denv.launcher)
    history = []
    with Progress(start_step, last, run.denv.rank) as bar:
        for step in range(start_step + 1, last + 1):
            try:
                metrics = train_step(run, step)
            except (MemoryError, RuntimeError) as err:  # torch.OutOfMemoryError is a RuntimeError
                from .oom import exit_on_oom, is_oom

                if not is_oom(err):
                    raise
                exit_on_oom(err, step, spec.data.max_seq_len, run.denv.rank)
            history.append(metrics)
            writer.write(metrics)
            bar.update(metrics, log if step % spec.train.log_every == 0 else None)
            every = spec.train.checkpoint_every
            if (every and step % every == 0) or step == last:
                path = run.engine.save(spec.train.output_dir, step, _trainer_state(run, step))
                log.info("checkpoint %s", path)
    writer.close()
    dist.barrier()
    return history
