"""Rank functions for the copy-free / pipelined Ulysses layer (issue #32): a native model under
``parallelize`` on gloo ranks against the same model on one device, loss and every gradient."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from tests.helpers.hf_models import assert_sharded_loss_and_grads


def native_model(seed=0, **overrides):
    from seqshard.models.config import ModelConfig
    from seqshard.models.llama import build_llama

    torch.manual_seed(seed)
    cfg = ModelConfig(**{"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 96, **overrides})
    return build_llama(cfg)


def batch(lengths, vocab=259, seed=1):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    tokens = torch.randint(0, vocab, (total,), generator=gen)
    positions = torch.cat([torch.arange(n) for n in lengths])
    labels = torch.full((total,), -100)
    start = 0
    for n in lengths:
        labels[start:start + n - 1] = tokens[start + 1:start + n]
        start += n
    return tokens, positions, labels


def reference(model_kw, lengths):
    from seqshard.models.context import VarlenContext

    model = native_model(**model_kw)
    tokens, positions, labels = batch(lengths)
    loss = model(tokens, positions, VarlenContext.from_lengths(lengths), labels=labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def check_layer(rank, world, cases):
    """Each case ``(tag, model_kw, lengths, cfg_kw, expect_fast)``: ``parallelize`` with ``cfg_kw``
    (sp_method, layout, ulysses_chunks, comm_dtype, ulysses); the loss summed over ranks and every
    gradient equal the single-device model's; ``expect_fast``: whether the copy-free path ran
    (the ``ulysses.qkv`` / ``usp.ulysses.qkv`` exchange of the fused layer is logged)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from seqshard.dist.comm_stats import COMM_LOG
    from seqshard.parallel.parallelize import SPContext, build_plan, parallelize

    group = dist.new_group(list(range(world)))
    meshes = {}
    for tag, model_kw, lengths, cfg_kw, expect_fast in cases:
        cfg = SimpleNamespace(**{"sp": world, "layout": "auto", "softmax_method": "allgather", **cfg_kw})
        ref_loss, ref_grads = reference(model_kw, lengths)
        model = parallelize(native_model(**model_kw), None, cfg)
        plan = build_plan([0, *torch.tensor(lengths).cumsum(0).tolist()], cfg)
        if cfg.sp_method == "usp":
            u = cfg.ulysses
            if u not in meshes:
                meshes[u] = init_device_mesh("cpu", (world // u, u), mesh_dim_names=("ring", "ulysses"))
            mesh = meshes[u]
            ctx = SPContext(plan, group, mesh["ulysses"].get_group(), mesh["ring"].get_group())
        else:
            ctx = SPContext(plan, group)
        tokens, positions, labels = batch(lengths)
        local = [plan.shard(t, rank, pad_value=pad) for t, pad in ((tokens, 0), (positions, 0), (labels, -100))]
        COMM_LOG.reset()
        loss = model(local[0], local[1], ctx, labels=local[2])
        bf16 = cfg_kw.get("comm_dtype") == "bf16"
        if bf16:  # the wire's rounding: the loss within 2e-3, gradients within 2e-2 (relative)
            total = loss.detach().clone()
            dist.all_reduce(total)
            err = float((total - ref_loss).abs() / ref_loss.abs())
            assert err <= 2e-3, f"{tag}: bf16 wire loss rel error {err:.1e}"
        assert_sharded_loss_and_grads(f"{tag} rank {rank}", loss, ref_loss, model, lambda n: ref_grads[n],
                                      lambda n: 2e-2 if bf16 else 1e-5)
        calls = dict(COMM_LOG.calls)
        op = "usp.ulysses.qkv" if cfg.sp_method == "usp" else "ulysses.qkv"
        fast = calls.get(f"{op}.bwd", 0) > 0 and "ulysses.positions" in calls
        assert fast == expect_fast, f"{tag}: copy-free path ran: {fast}, expected {expect_fast} ({calls})"
        if fast:  # one q/k/v exchange per chunk per layer, each way
            chunks = cfg_kw.get("ulysses_chunks", 1)
            layers = model_kw.get("n_layers", 2)
            if isinstance(chunks, int):
                assert calls[op] == calls[f"{op}.bwd"] == chunks * layers, (tag, calls)
            assert calls["ulysses.positions"] == 1, (tag, calls)  # once per step, not per layer
    return True
