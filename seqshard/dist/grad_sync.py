"""Gradient reduction over replicas: one coalesced all-reduce (sum) of every gradient.

With sequence parallelism each rank's parameter gradients cover only its own tokens; with data
parallelism only its own rows. The trainer scales each micro-batch loss by the step's global
token count, so the *sum* over all ranks of the dp x sp mesh is the exact full-batch gradient.
(DDP's hooks assume the same number of backward passes on every rank; packed steps give
replicas different micro-batch counts, so the reduction runs once, after accumulation.)
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .comm_stats import record


def all_reduce_gradients(params, group=None) -> None:
    params = [p for p in params if p.requires_grad]
    if dist.get_world_size(group) == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    with record("all_reduce.grads", flat.numel() * flat.element_size()):
        dist.all_reduce(flat, group=group)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n
