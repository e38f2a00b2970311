"""The training loop: one spec in, ``metrics.jsonl`` and checkpoints out.

Every rank builds the same global batch from the seed (DESIGN.md invariant 3), takes the rows of
its data-parallel replica, packs them into micro-batches, shards each micro-batch over its SP
group through the method's ShardPlan, and scales each micro-batch's summed token loss by the
step's *global* loss-token count. The gradient sum over all ranks is then the exact full-batch
gradient, whatever the layout, so every layout reproduces the single-process loss trajectory.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from seqshard.data.batches import Row
from seqshard.data.hf_tokenizer import load_tokenizer
from seqshard.dist.bootstrap import DistEnv, init_distributed
from seqshard.dist.comm_stats import COMM_LOG, record
from seqshard.dist.guard import named_barrier, shared_failure
from seqshard.dist.mesh import ParallelDims, build_mesh
from seqshard.dist.resume import resume_from_newest_loadable
from seqshard.models import VarlenContext, build_model

from .engines import build_engine
from .evaluate import eval_due, evaluate, load_data
from .fsdp import equal_micro_batches
from .loggers import RunLoggers
from .long_eval import TrainingLongEval
from .logs import Progress, get_logger, peak_memory_mb
from .memory import apply_memory_options
from .oom import exit_on_oom, is_oom
from .runinfo import describe_engine, engine_settings, run_config
from .schedule import Schedule, lr_at as schedule_lr_at
from .stages import load_data_state, rope_record, train_stages

if TYPE_CHECKING:  # the typed spec lives in launch/, a room above this one
    from seqshard.launch.spec import Spec


def lr_at(step: int, spec: Spec) -> float:
    """Linear warmup to ``train.lr``, then ``train.lr_schedule`` (step is 1-based; train/schedule.py)."""
    return schedule_lr_at(step, spec.train)


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

    def __init__(self, mesh, budget: int, sharder=None, pad_id: int = 0):
        self.dp_rank, self.dp = mesh["dp"].get_local_rank(), mesh["dp"].size()
        self.budget, self.sharder, self.pad_id = budget, sharder, pad_id

    def __call__(self, batch):
        """This rank's micro-batches of a step: (tokens, labels, positions, attention ctx)."""
        for rows in micro_batches(batch.rows[self.dp_rank::self.dp], self.budget):
            tokens, labels, positions, doc_lens = _concat(rows)
            if self.sharder is None:
                yield tokens, labels, positions, VarlenContext.from_lengths(doc_lens)
            else:
                yield self.sharder(tokens, labels, positions, doc_lens)

    def padding(self):
        """A one-token micro-batch without loss tokens (fsdp2 runs it where a rank has none)."""
        tokens, labels, positions = torch.tensor([self.pad_id]), torch.tensor([-100]), torch.tensor([0])
        if self.sharder is None:
            return tokens, labels, positions, VarlenContext.from_lengths([1])
        return self.sharder(tokens, labels, positions, [1])

    def step_metrics(self) -> dict:
        return {}


def build_scatter(spec: Spec, model, mesh, denv: DistEnv):
    """Install the spec's SP attention into ``model`` and return how each step is scattered."""
    p = spec.parallel
    PAD_ID = load_tokenizer(spec.data.tokenizer).pad_id  # noqa: N806 - padding of SP shards
    budget = spec.data.micro_batch_tokens or spec.data.max_seq_len
    if p.sp_method == "none":
        return StaticScatter(mesh, budget, pad_id=PAD_ID)
    if p.sp_method == "adaptive":
        from seqshard.parallel.adaptive import AdaptiveScatter

        return AdaptiveScatter(model, spec, denv.world_size, denv.rank, pad_id=PAD_ID)
    from seqshard.parallel.parallelize import make_sharder, parallelize

    parallelize(model, mesh, p)
    return StaticScatter(mesh, budget, make_sharder(mesh, p, pad_id=PAD_ID), pad_id=PAD_ID)


@dataclass
class Run:
    spec: Spec
    denv: DistEnv
    device: torch.device
    mesh: object
    engine: object  # TorchEngine | DeepSpeedEngine (engines.py)
    builder: object
    scatter: object  # StaticScatter | AdaptiveScatter
    schedule: Schedule = None
    held_out: object = None  # data.eval documents (evaluate.py), or None


def setup(spec: Spec) -> Run:
    denv, device = init_distributed(spec.train.collective_timeout_s)
    p = spec.parallel
    sp = 1 if p.sp_method == "adaptive" else p.sp
    dims = ParallelDims(denv.world_size, denv.world_size // sp, sp, p.ulysses if p.sp_method == "usp" else 1)
    mesh = build_mesh(dims, device.type)
    torch.manual_seed(spec.seed)  # identical initial weights on every rank, for every layout
    model = build_model(spec.model).to(device)
    scatter = build_scatter(spec, model, mesh, denv)
    apply_memory_options(model, spec.train)  # after the SP attention is installed
    corpus, held_out = load_data(spec, denv.rank)  # rank 0 builds the datasets cache first
    with shared_failure("loading data"):
        builder = build_batch_builder(spec, corpus)
    return Run(spec, denv, device, mesh, build_engine(model, spec, denv.local_rank, mesh=mesh), builder, scatter,
               Schedule(spec.train), held_out)


def train_step(run: Run, step: int) -> dict:
    spec, engine = run.spec, run.engine
    start = time.perf_counter()
    COMM_LOG.reset()
    with shared_failure("step data"):
        batch = run.builder.next_batch()
    n_loss = batch.num_loss_tokens
    autocast = (torch.autocast(run.device.type, dtype=torch.bfloat16)
                if spec.train.dtype == "bfloat16" else nullcontext())
    lr = run.schedule.lr(step)
    engine.set_lr(lr)
    loss_sum = torch.zeros((), dtype=torch.float64)
    with shared_failure("step plan"):
        local = list(run.scatter(batch))
    real = equal_micro_batches(engine, local, run.scatter.padding)
    loop_start = time.perf_counter()
    for i, (tokens, labels, positions, ctx) in enumerate(local):
        with autocast:
            loss = engine.forward(tokens.to(run.device), positions.to(run.device), ctx, labels.to(run.device))
        engine.backward((loss if real[i] else loss * 0) / n_loss, last=i == len(local) - 1)
        if real[i]:
            loss_sum += loss.detach().double().cpu()
    micro_batch_s = time.perf_counter() - loop_start
    grad_norm = engine.step()
    slowest_loop_s = micro_batch_s
    if dist.get_world_size() > 1:  # one process sends nothing (its comm accounting stays 0)
        # one gather: the summed loss, and the slowest rank's micro-batch loop (step predictions
        # take the slowest group, metrics are rank 0's)
        mine = torch.stack([loss_sum, torch.tensor(micro_batch_s, dtype=torch.float64)])
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        with record("all_gather.loss", 16 * len(every)):
            dist.all_gather(every, mine)
        every = torch.stack(every)
        loss_sum, slowest_loop_s = every[:, 0].sum(), float(every[:, 1].max())
    elapsed = time.perf_counter() - start
    comm = COMM_LOG.snapshot()
    return {"step": step, "loss": loss_sum.item() / n_loss, "tokens": batch.num_tokens,
            "loss_tokens": n_loss, "lr": lr, "grad_norm": grad_norm, "step_time_s": elapsed,
            "tokens_per_s": batch.num_tokens / elapsed, "micro_batch_s": micro_batch_s,
            "slowest_micro_batch_s": slowest_loop_s,
            "peak_mem_mb": peak_memory_mb(run.device),
            "comm_bytes": comm["total"]["bytes"], "comm_time_s": comm["total"]["seconds"],
            "compute_time_s": elapsed - comm["total"]["seconds"],
            "comm": {op: {"bytes": v["bytes"], "seconds": v["seconds"], "calls": v["calls"]}
                     for op, v in comm.items() if op != "total"},
            **batch.stats, **run.scatter.step_metrics()}


def _trainer_state(run: Run, step: int) -> dict:
    return {"step": step, "data": run.builder.state_dict(), "spec_name": run.spec.name,
            "schedule": run.schedule.state_dict(), "rope": rope_record(run.spec)}


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
            "n_params": sum(p.numel() for p in run.engine.model.parameters()),
            **run_config(run.spec, run.engine, run.denv.launcher)}
    (out / "run.json").write_text(json.dumps(info, indent=1) + "\n")
    (out / "spec.yaml").write_text(yaml.safe_dump(run.spec.to_dict(), sort_keys=False))


def train(spec: Spec, resume: bool = False, stop_after: int | None = None, stage=None) -> list[dict]:
    """Train per spec; returns the metrics of the steps run (every rank returns the same).
    With ``train.stages``, runs them one by one; ``stage`` is the one this call runs (stages.py)."""
    if spec.train.stages and stage is None:
        return train_stages(spec, resume, stop_after, train)
    run = setup(spec)
    log = get_logger(run.denv.rank)
    if run.denv.rank == 0:
        write_run_info(run)
    start_step = 0
    ckpt, state = (resume_from_newest_loadable(spec.train.output_dir, run.engine.load,
                                               log if run.denv.rank == 0 else None) if resume else (None, None))
    if ckpt is not None:
        load_data_state(run.builder, state, stage)
        start_step = state["step"]
        changed = run.schedule.load_state_dict(state.get("schedule", {}))
        log.info("resumed from %s (step %d)", ckpt, start_step)
        if changed:
            log.warning("resume: the lr schedule differs from the checkpoint's: %s", "; ".join(changed))
    last = min(spec.train.steps, stop_after or spec.train.steps)
    long_eval = TrainingLongEval.for_run(run)  # train.eval_long: loss by position, passkey
    writer = RunLoggers(spec, run.denv.rank, run_config(spec, run.engine, run.denv.launcher), start_step)
    log.info("%s: world %d (dp %d x sp %d, %s), %d steps, launcher %s", spec.name, run.denv.world_size,
             run.mesh["dp"].size(), spec.parallel.sp, spec.parallel.sp_method, spec.train.steps, run.denv.launcher)
    log.info("%s, lr schedule %s", describe_engine(engine_settings(spec, run.engine)), spec.train.lr_schedule)
    history = []
    with Progress(start_step, last, run.denv.rank) as bar:
        for step in range(start_step + 1, last + 1):
            try:
                metrics = train_step(run, step)
            except (MemoryError, RuntimeError) as err:  # torch.OutOfMemoryError is a RuntimeError
                if not is_oom(err):
                    raise
                exit_on_oom(err, step, spec.data.max_seq_len, run.denv.rank)
            metrics["stage"] = stage.index if stage else 0
            if eval_due(spec, step, last):
                metrics.update(evaluate(run, run.held_out))
            if long_eval is not None:
                metrics.update(long_eval(step, last))
            history.append(metrics)
            writer.write(metrics)
            bar.update(metrics, log if step % spec.train.log_every == 0 else None)
            every = spec.train.checkpoint_every
            if (every and step % every == 0) or step == last:
                path = run.engine.save(spec.train.output_dir, step, _trainer_state(run, step))
                log.info("checkpoint %s", path)
    if hasattr(run.engine, "finish_checkpoint"):
        run.engine.finish_checkpoint()  # an async save commits before the run ends
    writer.close()
    named_barrier("train.end")
    return history
