"""The training loop: one spec in, ``metrics.jsonl`` and checkpoints out.

Every rank builds the same global batch from the seed (DESIGN.md invariant 3), takes the rows of
its data-parallel replica, packs them into micro-batches, shards each micro-batch over its SP
group through the method's ShardPlan, and scales each micro-batch's summed token loss by the
step's *global* loss-token count (with per-source ``loss_weight``: the weighted sum by the global
weight sum, source_loss.py). The gradient sum over all ranks is then the exact full-batch
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
from seqshard.dist.cause import heartbeat, start_heartbeat, stop_heartbeat
from seqshard.dist.comm_stats import COMM_LOG, record
from seqshard.dist.guard import named_barrier, shared_failure
from seqshard.dist.mesh import ParallelDims, build_mesh
from seqshard.dist.checkpoint import prune_checkpoints
from seqshard.dist.resume import resume_from_newest_loadable
from seqshard.models import VarlenContext, build_model

from .engines import build_engine
from .evaluate import eval_due, evaluate, load_data
from .guards import NonFiniteGuard, Preempted, Preemption
from .fsdp import equal_micro_batches
from .loggers import RunLoggers
from .long_eval import TrainingLongEval
from .logs import Progress, get_logger, peak_memory_mb
from .memory import apply_memory_options
from .moe_metrics import MoEMetrics
from .oom import exit_on_oom, is_oom
from .rundir import check_resume_spec, claim_output_dir, recorded_spec
from .runinfo import describe_engine, engine_settings, run_config
from .schedule import Schedule, lr_at as schedule_lr_at
from .source_loss import SourceLoss, loss_weights_of
from .stages import load_data_state, resume_reference, train_stages

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
    sources = torch.cat([r.sources for r in rows]) if all(r.sources is not None for r in rows) else None
    return tokens, labels, positions, doc_lens, sources


def build_batch_builder(spec: Spec, corpus):
    """The ``data.batching`` builder over ``corpus``, its steps carrying ``tokens_by_source``."""
    from seqshard.data.mixture import SourceMetrics

    return SourceMetrics(_builder(spec, corpus))


def _builder(spec: Spec, corpus):
    d, cont = spec.data, spec.data.continue_positions
    if d.batching == "window":
        from seqshard.data.window import WindowBuilder

        return WindowBuilder(corpus, d.max_seq_len, d.tokens_per_step, spec.seed, cont)
    from seqshard.data import builders

    if d.batching == "pack":
        return builders.PackBuilder(corpus, d.max_seq_len, d.tokens_per_step, d.pack_method, spec.seed,
                                    restart_positions=not cont)
    return builders.DecomposeBuilder(corpus.sampled_view(spec.seed), d.max_seq_len, d.min_seq_len, d.tokens_per_step,
                                     d.curriculum.schedule, d.curriculum.cycles, spec.train.steps, spec.seed, cont)


class StaticScatter:
    """A fixed dp x sp layout: replica ``dp_rank`` takes rows ``dp_rank::dp``, packs them into
    micro-batches of ``budget`` tokens, and ``sharder`` (if any) shards each over the SP group."""

    def __init__(self, mesh, budget: int, sharder=None, pad_id: int = 0):
        self.dp_rank, self.dp = mesh["dp"].get_local_rank(), mesh["dp"].size()
        self.budget, self.sharder, self.pad_id = budget, sharder, pad_id

    def __call__(self, batch):
        """This rank's micro-batches of a step: (tokens, labels, positions, attention ctx, sources):
        ``sources`` is each local token's source index (-1 on shard padding), or None when the
        rows carry none (rows not built through data/mixture.py's SourceMetrics)."""
        for rows in micro_batches(batch.rows[self.dp_rank::self.dp], self.budget):
            tokens, labels, positions, doc_lens, sources = _concat(rows)
            if self.sharder is None:
                yield tokens, labels, positions, VarlenContext.from_lengths(doc_lens), sources
            else:
                yield self.sharder(tokens, labels, positions, doc_lens, sources=sources)

    def padding(self):
        """A one-token micro-batch without loss tokens (fsdp2 runs it where a rank has none)."""
        tokens, labels, positions = torch.tensor([self.pad_id]), torch.tensor([-100]), torch.tensor([0])
        if self.sharder is None:
            return tokens, labels, positions, VarlenContext.from_lengths([1]), None
        return self.sharder(tokens, labels, positions, [1], sources=None)

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
    preemption: object = None  # guards.Preemption while train() runs
    source_loss: object = None  # source_loss.SourceLoss: loss weights, loss_by_source


def setup(spec: Spec) -> Run:
    denv, device = init_distributed(spec.train.collective_timeout_s)
    p = spec.parallel
    sp = 1 if p.sp_method == "adaptive" else p.sp
    dims = ParallelDims(denv.world_size, denv.world_size // sp, sp, p.ulysses if p.sp_method == "usp" else 1)
    mesh = build_mesh(dims, device.type)
    torch.manual_seed(spec.seed)  # identical initial weights on every rank, for every layout
    model = build_model(spec.model).to(device)
    scatter = build_scatter(spec, model, mesh, denv)
    if p.ep > 1:  # expert parallelism: keep this rank's experts, exchange tokens (parallel/ep.py)
        from seqshard.dist.mesh import build_expert_mesh
        from seqshard.parallel.ep import shard_experts

        shard_experts(model, build_expert_mesh(mesh, p.ep))
    apply_memory_options(model, spec.train)  # after the SP attention is installed
    corpus, held_out = load_data(spec, denv.rank)  # rank 0 builds the datasets cache first
    with shared_failure("loading data"):
        builder = build_batch_builder(spec, corpus)
    # fsdp2 casts floating forward inputs (the loss weights too) to its parameter dtype
    cast = torch.bfloat16 if spec.train.engine == "fsdp2" and spec.train.dtype == "bfloat16" else None
    return Run(spec, denv, device, mesh, build_engine(model, spec, denv.local_rank, mesh=mesh), builder, scatter,
               Schedule(spec.train), held_out, source_loss=SourceLoss(loss_weights_of(spec), builder.names, cast))


def train_step(run: Run, step: int) -> dict:
    spec, engine = run.spec, run.engine
    start = time.perf_counter()
    heartbeat(f"step {step}")
    COMM_LOG.reset()
    with shared_failure("step data"):
        batch = run.builder.next_batch()
    n_loss = batch.num_loss_tokens
    by_source = run.source_loss
    by_source.start()
    # the loss is sum_t w_t ce_t / sum_t w_t over the global step (source_loss.py); unweighted:
    # the global loss-token count, exactly as without loss weights
    denominator = by_source.denominator(batch)
    autocast = (torch.autocast(run.device.type, dtype=torch.bfloat16)
                if spec.train.dtype == "bfloat16" else nullcontext())
    lr = run.schedule.lr(step)
    engine.set_lr(lr)
    loss_sum = torch.zeros((), dtype=torch.float64)
    with shared_failure("step plan"):
        local = list(run.scatter(batch))
    real = equal_micro_batches(engine, local, run.scatter.padding)
    moe = MoEMetrics(engine.model)  # aux_loss, expert_load of MoE models (else nothing)
    loop_start = time.perf_counter()
    for i, (tokens, labels, positions, ctx, sources) in enumerate(local):
        weights = by_source.token_weights(labels, sources, run.device)
        args = (tokens.to(run.device), positions.to(run.device), ctx, labels.to(run.device))
        with autocast:
            loss = engine.forward(*args) if weights is None else engine.forward(*args, weights)
        moe.add(real[i])
        if real[i]:
            by_source.add(engine.model, labels, sources)
        engine.backward((loss if real[i] else loss * 0) / denominator, last=i == len(local) - 1)
        if real[i]:
            loss_sum += loss.detach().double().cpu()
    micro_batch_s = time.perf_counter() - loop_start
    grad_norm = engine.step()
    # one gather: the summed loss, the slowest rank's micro-batch loop (step predictions take the
    # slowest group), each rank's peak memory (the max is reported, with its rank), whether a
    # preemption signal reached any rank (every rank then checkpoints this step) and the
    # per-source loss sums
    mine = torch.cat([torch.tensor([loss_sum.item(), micro_batch_s, peak_memory_mb(run.device),
                                    float(run.preemption is not None and run.preemption.requested)],
                                   dtype=torch.float64), by_source.sums])
    every = mine.unsqueeze(0)
    if dist.get_world_size() > 1:  # one process sends nothing (its comm accounting stays 0)
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        with record("all_gather.step", 8 * mine.numel() * len(gathered)):
            dist.all_gather(gathered, mine)
        every = torch.stack(gathered)
    loss_sum, slowest_loop_s = every[:, 0].sum(), float(every[:, 1].max())
    peak_rank = int(every[:, 2].argmax())
    elapsed = time.perf_counter() - start
    comm = COMM_LOG.snapshot()
    source_sums = every[:, 4:].sum(0)
    return {"step": step, "loss": loss_sum.item() / denominator, "tokens": batch.num_tokens,
            "loss_tokens": n_loss, "lr": lr, "grad_norm": grad_norm, "step_time_s": elapsed,
            "tokens_per_s": batch.num_tokens / elapsed, "micro_batch_s": micro_batch_s,
            "slowest_micro_batch_s": slowest_loop_s,
            "peak_mem_mb": float(every[peak_rank, 2]), "peak_mem_rank": peak_rank,
            "preempt": bool(every[:, 3].max() > 0),
            "comm_bytes": comm["total"]["bytes"], "comm_time_s": comm["total"]["seconds"],
            "compute_time_s": elapsed - comm["total"]["seconds"],
            "comm": {op: {"bytes": v["bytes"], "seconds": v["seconds"], "calls": v["calls"]}
                     for op, v in comm.items() if op != "total"},
            **batch.stats, "loss_by_source": by_source.by_source(source_sums, batch.stats["loss_tokens_by_source"]),
            **run.scatter.step_metrics(), **moe.finish(denominator)}


def _trainer_state(run: Run, step: int) -> dict:
    return {"step": step, "data": run.builder.state_dict(), "spec_name": run.spec.name,
            "schedule": run.schedule.state_dict(), "spec": run.spec.to_dict()}


def write_run_info(run: Run):
    """``run.json`` (layout, versions) and the resolved ``spec.yaml`` beside ``metrics.jsonl``."""
    import json
    import platform
    from pathlib import Path

    import yaml

    out = Path(run.spec.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    from seqshard.parallel.ep import is_expert_param

    experts = is_expert_param(run.engine.model)  # parallel.ep: this rank holds 1/ep of each expert tensor
    info = {"name": run.spec.name, "world_size": run.denv.world_size, "dp": run.mesh["dp"].size(),
            "sp": run.spec.parallel.sp, "sp_method": run.spec.parallel.sp_method, "ep": run.spec.parallel.ep,
            "engine": run.spec.train.engine, "launcher": run.denv.launcher, "device": run.device.type,
            "torch": torch.__version__, "python": platform.python_version(),
            "n_params": sum(p.numel() * (experts[id(p)].ep if id(p) in experts else 1)
                            for p in run.engine.model.parameters()),
            **run_config(run.spec, run.engine, run.denv.launcher)}
    (out / "run.json").write_text(json.dumps(info, indent=1) + "\n")
    (out / "spec.yaml").write_text(yaml.safe_dump(run.spec.to_dict(), sort_keys=False))


def train(spec: Spec, resume: bool = False, stop_after: int | None = None, overwrite: bool = False) -> list[dict]:
    """Train per spec; returns the metrics of the steps run (every rank returns the same).

    Rank 0 holds the run folder's lock for the whole run (train/rundir.py); a folder that holds a
    run needs ``resume`` (continue) or ``overwrite`` (start over). A preemption signal checkpoints
    the current step and raises :class:`~seqshard.train.guards.Preempted`; a non-finite step
    raises :class:`~seqshard.train.guards.NonFiniteError` under ``train.on_nonfinite: stop``."""
    denv, _ = init_distributed(spec.train.collective_timeout_s)
    log = get_logger(denv.rank)
    lock = None
    start_heartbeat()
    try:
        with shared_failure("run folder"):
            if denv.rank == 0:
                lock = claim_output_dir(spec.train.output_dir, resume, overwrite, log)
        with Preemption() as preemption:
            if spec.train.stages:  # one stage after another, under this lock (stages.py)
                return train_stages(spec, resume, stop_after,
                                    lambda s, **kw: _train(s, log=log, preemption=preemption, **kw))
            return _train(spec, resume, stop_after, log, preemption)
    finally:
        stop_heartbeat()
        if lock is not None:
            lock.release()


def _resume(run: Run, log, stage=None) -> int:
    """Load the newest loadable checkpoint (if any) into ``run``; return its step (0: none).
    ``stage`` (stages.py): at its first step the checkpoint is the previous stage's."""
    spec = run.spec
    recorded = recorded_spec(spec.train.output_dir)  # compared before loading: the error names the key
    if recorded is not None:
        safe = check_resume_spec(recorded[1], resume_reference(spec, stage, recorded[0]), recorded[0],
                                 type(spec)().to_dict())  # keys newer than the checkpoint: their defaults
        if safe:
            log.warning("resume: changed since %s: %s", recorded[0].name, "; ".join(safe))
    ckpt, state = resume_from_newest_loadable(spec.train.output_dir, run.engine.load,
                                              log if run.denv.rank == 0 else None)
    if ckpt is None:
        return 0
    load_data_state(run.builder, state, stage)
    changed = run.schedule.load_state_dict(state.get("schedule", {}))
    log.info("resumed from %s (step %d)", ckpt, state["step"])
    if changed and (stage is None or state["step"] >= stage.first):  # a new stage may change the lr
        log.warning("resume: the lr schedule differs from the checkpoint's: %s", "; ".join(changed))
    return state["step"]


def _save(run: Run, step: int, log):
    spec = run.spec
    heartbeat(f"checkpoint step {step}")
    path = run.engine.save(spec.train.output_dir, step, _trainer_state(run, step))
    log.info("checkpoint %s", path)
    if spec.train.keep_checkpoints and run.denv.rank == 0:
        for old in prune_checkpoints(spec.train.output_dir, spec.train.keep_checkpoints):
            log.info("removed %s (train.keep_checkpoints %d)", old, spec.train.keep_checkpoints)
    return path


def _train(spec: Spec, resume: bool, stop_after: int | None, log, preemption, stage=None) -> list[dict]:
    run = setup(spec)
    run.preemption = preemption
    with shared_failure("resume"):
        start_step = _resume(run, log, stage) if resume else 0
    if run.denv.rank == 0:
        write_run_info(run)
    last = min(spec.train.steps, stop_after or spec.train.steps)
    long_eval = TrainingLongEval.for_run(run)  # train.eval_long: loss by position, passkey
    writer = RunLoggers(spec, run.denv.rank, run_config(spec, run.engine, run.denv.launcher), start_step)
    log.info("%s: world %d (dp %d x sp %d, %s%s), %d steps, launcher %s", spec.name, run.denv.world_size,
             run.mesh["dp"].size(), spec.parallel.sp, spec.parallel.sp_method,
             f", experts over ep {spec.parallel.ep}" if spec.parallel.ep > 1 else "", spec.train.steps, run.denv.launcher)
    log.info("%s, lr schedule %s", describe_engine(engine_settings(spec, run.engine)), spec.train.lr_schedule)
    if spec.model.hf and spec.data.tokenizer == spec.model.hf:
        log.info("data.tokenizer: the tokenizer of model.hf %s (set data.tokenizer: byte for bytes)", spec.model.hf)
    guard = NonFiniteGuard(spec.train.on_nonfinite, spec.train.max_nonfinite_in_row,
                           engine_skips=spec.train.engine != "deepspeed")
    history = []
    with Progress(start_step, last, run.denv.rank) as bar:
        for step in range(start_step + 1, last + 1):
            try:
                metrics = train_step(run, step)
            except (MemoryError, RuntimeError) as err:  # torch.OutOfMemoryError is a RuntimeError
                if not is_oom(err):
                    raise
                exit_on_oom(err, step, spec.data.max_seq_len, run.denv.rank)
            preempt = metrics.pop("preempt")
            metrics["stage"] = stage.index if stage else 0
            try:
                guard.check(metrics, norm_known=getattr(run.engine, "norm_known", True))
            finally:  # the non-finite step is logged before the run stops on it
                if eval_due(spec, step, last) and "nonfinite" not in metrics:
                    metrics.update(evaluate(run, run.held_out))
                if long_eval is not None and "nonfinite" not in metrics:
                    metrics.update(long_eval(step, last))
                history.append(metrics)
                writer.write(metrics)
                bar.update(metrics, log if step % spec.train.log_every == 0 else None)
            every = spec.train.checkpoint_every
            if (every and step % every == 0) or step == last or preempt:
                path = _save(run, step, log)
            if preempt:
                if hasattr(run.engine, "finish_checkpoint"):
                    run.engine.finish_checkpoint()
                writer.close()
                raise Preempted(f"preempted by {preemption.signal_name or 'a signal on another rank'} at step "
                                f"{step}: checkpoint {path} saved {preemption.seconds_since():.1f} s after the "
                                "signal; continue with --resume")
    if hasattr(run.engine, "finish_checkpoint"):
        run.engine.finish_checkpoint()  # an async save commits before the run ends
    writer.close()
    named_barrier("train.end")
    return history
