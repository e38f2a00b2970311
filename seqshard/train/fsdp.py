"""``train.engine: fsdp2``: torch's ``fully_shard`` per transformer block and on the root.

Parameters, gradients and AdamW states are sharded over the flattened dp x sp mesh (SP ranks
hold identical parameters, so they shard them too: torchtitan's dp_shard x cp pattern).
The trainer scales each micro-batch loss by the step's *global* loss-token count, so the
gradient must be the SUM over ranks: the default FSDP average is switched off with
``set_gradient_divide_factor(1.0)``. During accumulation only the last micro-batch's backward
reduce-scatters (``set_requires_gradient_sync``).

FSDP all-gathers parameters in every forward and backward, so every rank must run the same
number of micro-batches: ``equal_micro_batches`` says so to the trainer, which pads the short
replicas with zero-weight repeats of their last micro-batch (gradient unchanged), and a rank
with no micro-batch at all with a one-token padding micro-batch. Under adaptive scattering each
rank stays in one group for the whole step and every member of a group runs the same
micro-batches, so the repeats keep the group's SP collectives matched too.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from .engines import TorchEngine, build_optimizer


def shard_mesh(mesh):
    """The 1-D mesh FSDP shards over: all of the mesh's dims flattened (dp x sp = the world)."""
    names = mesh.mesh_dim_names
    return mesh[names]._flatten("fsdp") if len(names) > 1 else mesh


def apply_fsdp(model, mesh, spec):
    t = spec.train
    dtype = torch.bfloat16 if t.dtype == "bfloat16" else torch.float32
    kwargs = {"mesh": shard_mesh(mesh),
              "mp_policy": MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32),
              "reshard_after_forward": t.reshard_after_forward}
    if t.offload_params:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for block in model.layers:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    for module in model.modules():  # sum, not average: losses are globally normalized
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM / AVG
    return model


class FSDP2Engine(TorchEngine):
    """TorchEngine's optimizer and (async) DCP checkpoints; FSDP2 does the reduction."""
    equal_micro_batches = True

    def __init__(self, model, spec, mesh):
        self.spec, self.reducer, self.pending_checkpoint = spec, None, None
        self.model = apply_fsdp(model, mesh, spec)
        self.optimizer = build_optimizer(self.model, spec)

    def backward(self, loss, last: bool):
        self.model.set_requires_gradient_sync(last)
        loss.backward()

    def step(self) -> float:
        clip = self.spec.train.grad_clip if self.spec.train.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        norm = float(norm)
        if math.isfinite(norm):  # a non-finite gradient is never applied (train/guards.py)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm


def equalize_micro_batches(local: list, padding=None) -> list[bool]:
    """Pad ``local`` in place to the largest micro-batch count of any rank with repeats of its
    last micro-batch; a rank with none this step (an adaptive group given no document) repeats
    ``padding()``, a one-token micro-batch without loss tokens. Returns per entry whether it
    counts (False: a zero-weight repeat: it runs forward and backward, adds nothing)."""
    count = torch.tensor([len(local)])
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    real = [True] * len(local)
    if not local and int(count):
        if padding is None:
            raise RuntimeError("this rank has no micro-batch this step and no padding micro-batch to repeat")
        local.append(padding())
        real.append(False)
    while len(local) < int(count):
        local.append(local[-1])
        real.append(False)
    return real


def equal_micro_batches(engine, local: list, padding=None) -> list[bool]:
    """For an engine that needs every rank in every all-gather (fsdp2), pad ``local`` as
    :func:`equalize_micro_batches` does; otherwise leave it. Returns which entries are real."""
    if not getattr(engine, "equal_micro_batches", False):
        return [True] * len(local)
    return equalize_micro_batches(local, padding)
