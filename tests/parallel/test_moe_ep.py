"""Expert parallelism (parallel/ep.py) at the layer level on real gloo ranks: the EP MoE layer's
output, input gradient, router gradient and every expert's gradient (gathered over the EP group,
summed over replicas) equal the single-process layer's to 1e-5, at ep 2 (two EP groups of a
4-rank world) and ep 4, with uneven routing: an expert no token picks, an EP rank that receives
no row, a rank that owns no token. The same spawn checks one TorchEngine step at ep 2 against ep 1
when EP peers run different micro-batch counts, then trains a small native MoE model for 3 steps
at dp 4 without EP and at ep 2 (two EP groups: expert gradients summed over replicas): the same
losses, aux losses, gradient norms and held-out loss (one spawn for the default suite's time budget; the imported-checkpoint, ep x sp,
resume and export runs are the slow tests of tests/train/test_moe_ep_train.py)."""
from __future__ import annotations

import torch

from tests.helpers.ranks import run_ranks

DIM, FFN = 16, 24


def make_layer(num_experts, top_k, dead, seed=0):
    """A MoE layer whose experts in ``dead`` are never picked (inputs are positive, their router
    rows strongly negative)."""
    from seqshard.models.config import ModelConfig, MoEConfig
    from seqshard.models.moe import MoE

    cfg = ModelConfig(dim=DIM, ffn_dim=FFN, moe=MoEConfig(num_experts=num_experts, top_k=top_k, expert_ffn_dim=FFN,
                                                        shared_expert_ffn_dim=8))
    torch.manual_seed(seed)
    layer = MoE(cfg)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.2)
        layer.router.weight.abs_()
        for e in dead:
            layer.router.weight[e] = -5.0
    return layer


def tokens_of(world, lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, DIM, generator=g) + 0.05 for n in lengths[:world]], \
        [torch.randn(n, DIM, generator=g) for n in lengths[:world]]


CASES = [  # (ep, experts, top_k, dead experts, tokens per rank)
    (4, 4, 2, [3], [5, 0, 9, 3]),  # EP rank 3 receives nothing, rank 1 owns nothing
    (2, 4, 2, [2, 3], [6, 4, 0, 7]),  # EP rank 1 of both groups receives nothing
    (2, 4, 1, [1], [11, 2, 5, 0]),
    (4, 8, 3, [], [7, 1, 4, 6]),  # two experts per rank, ordinary routing
]


def ep_layer_rank(rank, world):
    from torch import distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from seqshard.dist.comm_stats import COMM_LOG
    from seqshard.dist.mesh import ParallelDims, build_expert_mesh, build_mesh
    from seqshard.parallel.ep import shard_experts

    usp = build_expert_mesh(build_mesh(ParallelDims(4, 1, 4, 2)), 2)  # USP's 3-D mesh: consecutive ranks too
    assert dist.get_process_group_ranks(usp["ep"].get_group()) == [rank - rank % 2, rank - rank % 2 + 1]
    assert dist.get_process_group_ranks(usp["ep_replica"].get_group()) == [rank % 2, rank % 2 + 2]
    mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "sp"))
    for ep, num_experts, top_k, dead, lengths in CASES:
        xs, rs = tokens_of(world, lengths)
        ref = make_layer(num_experts, top_k, dead)
        x_all = torch.cat(xs).requires_grad_(True)
        y_ref = ref(x_all)
        (y_ref * torch.cat(rs)).sum().backward()
        with torch.no_grad():
            assert (ref.router(x_all)[2] == dead[0]).sum() == 0 if dead else True
        layer = make_layer(num_experts, top_k, dead)
        shard = shard_experts(layer, build_expert_mesh(mesh, ep))
        x = xs[rank].clone().requires_grad_(True)
        COMM_LOG.reset()
        y = layer(x)
        (y * rs[rank]).sum().backward()
        start = sum(lengths[:rank])
        torch.testing.assert_close(y, y_ref[start:start + lengths[rank]], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad, x_all.grad[start:start + lengths[rank]], rtol=1e-5, atol=1e-5)
        for name, p in layer.named_parameters():  # dense: summed over the world; experts: over replicas
            grad = p.grad.clone()
            if name.startswith("experts."):
                dist.all_reduce(grad, group=shard.replicas)
                parts = [torch.empty_like(grad) for _ in range(ep)]
                dist.all_gather(parts, grad, group=shard.group)
                grad = torch.cat(parts)
            else:
                dist.all_reduce(grad)
            torch.testing.assert_close(grad, dict(ref.named_parameters())[name].grad, rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"ep {ep} {name}: {m}")
        log = COMM_LOG.snapshot()
        assert {"moe.counts", "moe.dispatch", "moe.combine", "moe.dispatch.bwd", "moe.combine.bwd"} <= set(log)
    return True


MOE = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_ffn_dim=64", "model.moe.aux_loss_coef=0.01",
       "model.moe.shared_expert_ffn_dim=16", "model.dim=32", "model.ffn_dim=64", "data.max_seq_len=128",
       "data.tokens_per_step=1024", "train.lr=1e-2", "train.steps=3", "data.eval.fraction=0.05"]


def engine_step_rank(rank, world, out):
    """One optimizer step of TorchEngine where EP peers run different micro-batch counts (ranks 1, 3:
    two; 0, 2: one): padded with a zero-weight repeat at ep 2, the reduced and clipped gradients the
    optimizer receives (experts gathered) and the gradient norm equal ep 1's."""
    from torch import distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from seqshard.dist.mesh import build_expert_mesh
    from seqshard.models import VarlenContext, build_model
    from seqshard.parallel.ep import is_expert_param, shard_experts
    from seqshard.train.engines import TorchEngine
    from seqshard.train.fsdp import equal_micro_batches
    from tests.helpers.training import small_spec

    spec = small_spec(f"{out}/engine", world, MOE)
    g = torch.Generator().manual_seed(3)
    docs = [[torch.randint(0, 259, (n,), generator=g) for n in sizes][:1 + r % 2]
            for r, sizes in enumerate(([9], [11, 6], [5], [16, 4]))]
    n_loss = sum(len(d) - 1 for rank_docs in docs for d in rank_docs)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    results = {}
    for ep in (1, 2):
        torch.manual_seed(0)
        model = build_model(spec.model)
        if ep > 1:
            shard_experts(model, build_expert_mesh(mesh, ep))
        engine = TorchEngine(model, spec)
        engine.set_lr(1e-2)
        local = [(d, torch.cat([d[1:], torch.tensor([-100])]), torch.arange(len(d)), VarlenContext.from_lengths([len(d)]))
                 for d in docs[rank]]
        real = equal_micro_batches(engine, local)
        assert len(local) == (2 if ep > 1 else 1 + rank % 2)
        for i, (tokens, labels, positions, ctx) in enumerate(local):
            loss = engine.forward(tokens, positions, ctx, labels)
            engine.backward((loss if real[i] else loss * 0) / n_loss, last=i == len(local) - 1)
        grads = {}
        engine.optimizer.step = lambda: grads.update({n: p.grad.clone() for n, p in model.named_parameters()})
        norm = engine.step()  # reduced and clipped gradients, as the optimizer would see them
        experts = is_expert_param(model)
        for name, p in model.named_parameters():
            if id(p) in experts:
                parts = [torch.empty_like(grads[name]) for _ in range(ep)]
                dist.all_gather(parts, grads[name], group=experts[id(p)].group)
                grads[name] = torch.cat(parts)
        results[ep] = norm, grads
    assert abs(results[1][0] - results[2][0]) <= 1e-5 * results[1][0], (results[1][0], results[2][0])
    for name, grad in results[1][1].items():
        torch.testing.assert_close(results[2][1][name], grad, rtol=1e-5, atol=1e-5 * float(grad.abs().max()),
                                   msg=lambda m: f"{name}: {m}")


def ep_layer_and_training_rank(rank, world, out):
    from seqshard.train.trainer import train
    from tests.helpers.training import small_spec

    ep_layer_rank(rank, world)
    engine_step_rank(rank, world, out)
    runs = {}
    for ep in (1, 2):
        history = train(small_spec(f"{out}/ep{ep}", world, MOE + [f"parallel.ep={ep}"]))
        runs[ep] = [(m["loss"], m["aux_loss"], m["grad_norm"], m["comm"].get("moe.dispatch", {}).get("bytes", 0))
                    for m in history] + [history[-1]["eval_loss"]]
    return runs


def test_ep_layer_and_training_match_without_ep(tmp_path):
    from tests.helpers.training import assert_losses_close

    runs = run_ranks(4, ep_layer_and_training_rank, str(tmp_path))[0]
    (*ep2, eval2), (*ep1, eval1) = runs[2], runs[1]
    for i in range(3):  # loss, aux loss, gradient norm
        assert_losses_close([m[i] for m in ep2], [m[i] for m in ep1])
    assert_losses_close([eval2], [eval1])  # held-out evaluation (EP peers run matched forwards)
    assert all(m[3] > 0 for m in ep2) and all(m[3] == 0 for m in ep1), (ep2, ep1)
