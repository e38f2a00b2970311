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


def saved_mib(fn):
    """MiB of distinct storages autograd saves while ``fn()`` runs (the layer's nested graphs too)."""
    from torch.autograd.graph import saved_tensors_hooks

    seen = {}

    def pack(t):
        if t.numel():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()) / 2**20, out


def check_saved_bytes(rank, world, tokens=2048):
    """The tensors autograd saves for the copy-free layer's backward (its nested per-chunk graphs
    included) total no more than the unchanged path's plus the RoPE tables of the head split,
    chunked or not. (Counts saved storages only: a buffer kept alive otherwise, e.g. by a graph
    leaf, is not seen here.)"""
    import torch.distributed as dist

    from seqshard.models.config import ModelConfig
    from seqshard.models.llama import Attention
    from seqshard.parallel.parallelize import SPContext
    from seqshard.parallel.plan import ShardPlan
    from seqshard.parallel.ulysses import ulysses_attention
    from seqshard.parallel.ulysses_layer import FusedUlysses

    torch.manual_seed(0)
    attn = Attention(ModelConfig(dim=256, n_heads=8, n_kv_heads=2, ffn_dim=64))
    plan = ShardPlan.build([0, tokens], world, "stream")
    x = torch.randn(tokens // world, 256, requires_grad=True)
    pos = plan.shard(torch.arange(tokens), rank)
    group = dist.group.WORLD
    attn.attention_fn = lambda q, k, v, ctx, **kw: ulysses_attention(q, k, v, plan, group, **kw)
    old, _ = saved_mib(lambda: attn.standard_forward(x, pos, SPContext(plan, group)))
    out = {"old": old}
    for chunks in (1, 2):
        out[chunks], _ = saved_mib(lambda: FusedUlysses(chunks)(attn, x, pos, SPContext(plan, group)))
        # RoPE runs on the head split: each chunk's q and k save cos and sin [T, D/2] of all T tokens
        rope = chunks * 2 * 2 * tokens * (attn.head_dim // 2) * 4 / 2**20
        assert out[chunks] <= old + rope + 1e-6, (out, rope)
    return out


def check_layer_and_saved_bytes(rank, world, cases):
    return check_layer(rank, world, cases) and bool(check_saved_bytes(rank, world))
