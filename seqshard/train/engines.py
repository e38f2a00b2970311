"""Optimizer engines: plain torch (AdamW + one gradient all-reduce) or DeepSpeed's engine.

Both see the same contract from the trainer: ``forward``, ``backward(loss, last)`` where
``loss`` is a micro-batch's summed token loss already divided by the step's global loss-token
count (or weight sum, train/source_loss.py), ``step() -> grad_norm``, ``save``/``load``. Either way the gradient applied is the sum over
all ranks, i.e. the exact full-batch gradient, so both reproduce the single-process losses.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re

import torch
import torch.distributed as dist

from seqshard.dist.checkpoint import (commit_checkpoint, load_checkpoint, read_trainer_state, save_checkpoint,
                                      save_checkpoint_async)
from seqshard.dist.comm_stats import record
from seqshard.dist.grad_sync import BucketedGradReducer


def build_optimizer(model, spec):
    t = spec.train
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8)


class TorchEngine:
    """AdamW; gradients summed over the ranks in buckets during the last backward. Under expert
    parallelism (``parallel.ep``, parallel/ep.py) a rank holds only its experts: their gradients
    (which already cover every token of the EP group routed to them) are summed over the ranks
    holding the same experts only, everything else over all ranks; the clipping norm adds the
    expert part over the EP group; every rank of an EP group runs the same micro-batch count
    (``equal_micro_batches``: each MoE forward is an exchange inside the group)."""

    def __init__(self, model, spec):
        from seqshard.parallel.ep import is_expert_param

        self.model, self.spec = model, spec
        self.optimizer = build_optimizer(model, spec)
        experts = is_expert_param(model)
        self.ep_shard = next(iter(experts.values())) if experts else None
        self.dense = [p for p in model.parameters() if id(p) not in experts]
        self.experts = [p for p in model.parameters() if id(p) in experts]
        self.equal_micro_batches = self.ep_shard is not None
        # gradients all-reduced in buckets launched during the last backward (dist/grad_sync.py)
        self.reducer = BucketedGradReducer(self.dense) if dist.get_world_size() > 1 else None
        self.expert_reducer = None
        if self.ep_shard is not None and dist.get_world_size(self.ep_shard.replicas) > 1:
            self.expert_reducer = BucketedGradReducer(self.experts, group=self.ep_shard.replicas)
        self.pending_checkpoint = None

    def set_lr(self, lr):
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def forward(self, *args):
        return self.model(*args)

    def backward(self, loss, last: bool):
        if last:
            for reducer in (self.reducer, self.expert_reducer):
                if reducer is not None:
                    reducer.arm()
        loss.backward()

    def step(self) -> float:
        for reducer in (self.reducer, self.expert_reducer):
            if reducer is not None:
                reducer.finish()
        clip = self.spec.train.grad_clip if self.spec.train.grad_clip > 0 else float("inf")
        if self.ep_shard is None:
            norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        else:
            norm = self.clip_expert_parallel(clip)
        if math.isfinite(norm):  # a non-finite gradient is never applied (train/guards.py)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def clip_expert_parallel(self, clip: float) -> float:
        """``clip_grad_norm_`` over the whole model when this rank holds only its experts: the
        squared norm of the (reduced, identical) dense gradients plus the expert gradients' summed
        over the EP group (each expert counted once); every rank gets the same norm."""
        def squares(params):
            norms = [torch.linalg.vector_norm(p.grad, 2.0, dtype=torch.float32) for p in params if p.grad is not None]
            return torch.stack(norms).square().sum() if norms else torch.zeros(())

        expert = squares(self.experts)
        with record("all_reduce.expert_grad_norm", 4):
            dist.all_reduce(expert, group=self.ep_shard.group)
        norm = float((squares(self.dense) + expert).sqrt())
        coef = min(1.0, clip / (norm + 1e-6))
        if math.isfinite(norm):
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
        return norm

    def save(self, output_dir, step, trainer_state):
        if not self.spec.train.async_checkpoint:
            return save_checkpoint(output_dir, step, self.model, self.optimizer, trainer_state)
        self.finish_checkpoint()  # the previous async save commits before the next one starts
        self.pending_checkpoint = save_checkpoint_async(output_dir, step, self.model, self.optimizer,
                                                        trainer_state)
        return f"step {step} (async, committed when written on every rank)"

    def finish_checkpoint(self):
        """Wait for a pending async save and commit it (collective; the trainer calls it last)."""
        if self.pending_checkpoint is not None:
            self.pending_checkpoint, finish = None, self.pending_checkpoint
            return finish()
        return None

    def load(self, path):
        return load_checkpoint(path, self.model, self.optimizer)


def deepspeed_config(spec, world_size: int) -> dict:
    """A ds_config consistent with the spec, merged over by the user's ``train.ds_config`` file."""
    t = spec.train
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,  # boundaries are set explicitly per step
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.dtype == "bfloat16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if t.ds_config:
        with open(t.ds_config) as f:
            user = json.load(f)
        for key, value in user.items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key] = {**config[key], **value}
            else:
                config[key] = value
    return config


class DeepSpeedEngine:
    """``deepspeed.initialize`` around the (already parallelized) model; ZeRO 0-3."""

    def __init__(self, model, spec, local_rank: int):
        os.environ.setdefault("LOCAL_RANK", str(local_rank))  # DeepSpeed reads it, whatever launched us
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.spec, self.world = spec, dist.get_world_size()
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=build_optimizer(model, spec),
            config=deepspeed_config(spec, self.world), dist_init_required=False)
        self.model = self.engine.module

    def set_lr(self, lr):
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def forward(self, *args):
        return self.engine(*args)

    def backward(self, loss, last: bool):
        # DeepSpeed averages gradients over its data-parallel world (all ranks here); the
        # trainer's losses are already global-token normalized, so undo the average to sum.
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss * self.world, scale_wrt_gas=False)

    def step(self) -> float:
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        self.norm_known = norm is not None  # DeepSpeed computes none without clipping / in some ZeRO paths
        return float(norm) if norm is not None else float("nan")

    def save(self, output_dir, step, trainer_state):
        def write(partial):
            self.engine.save_checkpoint(str(partial), tag="deepspeed", save_latest=False)

        return commit_checkpoint(output_dir, step, write, trainer_state)

    def load(self, path):
        check_zero_partitions(path / "deepspeed", self.world)
        self.engine.load_checkpoint(str(path), tag="deepspeed")
        return read_trainer_state(path)


def check_zero_partitions(folder, world: int) -> None:
    """DeepSpeed loads ZeRO (stage >= 1) optimizer partitions only into the world size that saved
    them; stage 0 keeps one full copy, which loads into any layout. Refuse a changed world size
    here, naming both sizes, instead of DeepSpeed's exception mid-load (the CLI exits 2)."""
    from seqshard.dist.checkpoint import CheckpointMismatch

    ranks = {int(m.group(1)) for f in folder.glob("*zero_pp_rank_*_optim_states.pt")
             if (m := re.search(r"zero_pp_rank_(\d+)_", f.name))}
    if ranks and len(ranks) != world:
        raise CheckpointMismatch(
            f"checkpoint {folder.parent} holds DeepSpeed ZeRO optimizer partitions of {len(ranks)} ranks, this run "
            f"has {world}: DeepSpeed cannot repartition them; resume on {len(ranks)} ranks (any dp x sp layout), "
            "or save with train.zero_stage: 0 or train.engine: torch / fsdp2, whose checkpoints reshard")


def build_engine(model, spec, local_rank: int = 0, mesh=None):
    from seqshard.parallel.ep import is_expert_param

    if spec.train.engine != "torch" and is_expert_param(model):  # launch/moe_checks.py refuses it first
        raise ValueError(f"parallel.ep > 1 runs on train.engine torch only, not {spec.train.engine}")
    if spec.train.engine == "fsdp2":
        from .fsdp import FSDP2Engine

        return FSDP2Engine(model, spec, mesh)
    if spec.train.engine == "deepspeed":
        return DeepSpeedEngine(model, spec, local_rank)
    return TorchEngine(model, spec)
