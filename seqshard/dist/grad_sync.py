"""Gradient reduction over replicas: one coalesced all-reduce (sum) of every gradient.

With sequence parallelism each rank's parameter gradients cover only its own tokens; with data
parallelism only its own rows. The trainer scales each micro-batch loss by the step's global
token count, so the *sum* over all ranks of the dp x sp mesh is the exact full-batch gradient.
(DDP's hooks assume the same number of backward passes on every rank; packed steps give
replicas different micro-batch counts, so the reduction runs once, after accumulation.)
"""
from __future__ import annotations

import time

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


MAX_BUCKET_MB = 25.0  # DDP's default cap: big enough that per-collective latency does not dominate
MIN_BUCKETS = 8  # below the cap, at least this many buckets, so a small model overlaps too
MIN_BUCKET_MB = 1.0  # DDP's first bucket: smaller ones cost more in launches than they hide


def default_bucket_mb(params) -> float:
    """``min(25 MB, max(1 MB, gradient bytes / 8))``: large models get DDP's 25 MB buckets, a
    model under 200 MB still gets about 8 buckets (a fixed 25 MB would leave one bucket, hence no
    overlap, for every model under 25 MB), but none under 1 MB: a bucket is one collective and its
    hooks, about 1 ms each on gloo, so a model under 8 MB gets fewer (one under 1 MB). Measured on
    the 0.56 MB bench model of ``bench/planner_measured.py``: 10 buckets of 56 KB took 8-14% more
    step time than one."""
    total = sum(p.numel() * p.element_size() for p in params if p.requires_grad) / 2**20
    return min(MAX_BUCKET_MB, max(MIN_BUCKET_MB, total / MIN_BUCKETS))


class BucketedGradReducer:
    """All-reduce (sum) gradients in buckets of about ``bucket_mb``, overlapped with backward.

    ``bucket_mb`` None means :func:`default_bucket_mb`. Buckets hold parameters in reverse
    registration order (roughly the order backward produces their gradients). During the last
    micro-batch's backward (``arm()`` before it), each parameter's post-accumulate-grad hook
    marks it ready; a full bucket is flattened and its async all-reduce launched while backward
    goes on. Buckets launch strictly in index order on every rank, whatever order hooks fire in,
    because gloo matches collectives by order. ``finish()`` launches what is left (a parameter
    without gradient counts as zeros), waits, and copies the sums back: the same exact
    full-batch gradient as ``all_reduce_gradients``. Earlier micro-batches only accumulate
    locally, so replicas may run different micro-batch counts: each runs at most one armed
    backward per step (none: ``finish`` reduces zeros).
    """

    def __init__(self, params, group=None, bucket_mb: float | None = None):
        self.group = group
        self.params = [p for p in params if p.requires_grad]
        bucket_mb = default_bucket_mb(self.params) if bucket_mb is None else bucket_mb
        self.buckets, size = [[]], 0
        for p in reversed(self.params):
            if self.buckets[-1] and size + p.numel() * p.element_size() > bucket_mb * 2**20:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel() * p.element_size()
        self.bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self.armed = False
        self.exposed_s = 0.0  # time finish() waited on reductions: the part not hidden by backward
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._on_grad)

    def arm(self):
        self.armed, self.next, self.works = True, 0, []
        self.ready = [0] * len(self.buckets)

    def _on_grad(self, p):
        if not self.armed:
            return
        self.ready[self.bucket_of[id(p)]] += 1
        while self.next < len(self.buckets) and self.ready[self.next] == len(self.buckets[self.next]):
            self._launch(self.next)

    def _launch(self, b):
        for p in self.buckets[b]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in self.buckets[b]])  # [bucket numel]
        self.works.append((b, flat, dist.all_reduce(flat, group=self.group, async_op=True)))
        self.next = b + 1

    def finish(self) -> None:
        if not self.armed:  # a rank with no micro-batch this step still joins every reduction
            self.arm()
        start = time.perf_counter()
        while self.next < len(self.buckets):
            self._launch(self.next)
        for b, flat, work in self.works:
            with record("all_reduce.grads", flat.numel() * flat.element_size()):
                work.wait()
            offset = 0
            for p in self.buckets[b]:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
                offset += p.numel()
        self.exposed_s = time.perf_counter() - start
        self.armed = False
