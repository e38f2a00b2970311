"""MoE imports vs transformers (issue #31): max relative errors ``max|got - ref| / max|ref|`` of the
logits, the loss (with the per-document load-balancing loss) and the worst parameter gradient, fp32
CPU, packed documents against transformers one document at a time: one process, Qwen3-MoE / Mixtral
under Ulysses and Ring (sp 2), MiniMax under LASP-2 / LASP-1 (sp 2, 4; ``[3, 2]``: rank 3 holds only
padding). Run from the repository root: ``PYTHONPATH=$PWD python bench/moe_parity.py``."""
import os
import sys
import tempfile

sys.path[:] = [os.getcwd()] + [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
from types import SimpleNamespace
import torch
from tests.helpers.hf_models import save_hf_model, make_hf_model, packed_batch, per_document_reference, LENGTHS
from tests.helpers.ranks import run_ranks
from tests.models.test_moe_import import hf_param
from seqshard.models import from_hf, VarlenContext

def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))

def single(fam, folder):
    hf = make_hf_model(fam)
    ours = from_hf(folder)
    tokens, positions, labels = packed_batch()
    ctx = VarlenContext.from_lengths(LENGTHS)
    with torch.no_grad():
        logits = ours(tokens, positions, ctx)
    loss = ours(tokens, positions, ctx, labels=labels); loss.backward()
    rl, rloss = per_document_reference(hf, tokens)
    hp = dict(hf.named_parameters())
    g = max(rel(p.grad, hp[hf_param(n)].grad) for n, p in ours.named_parameters())
    return rel(logits, rl), rel(loss.detach(), rloss), g

def sp(rank, world, folder, fam, methods, lengths):
    import torch.distributed as dist
    from seqshard.parallel.parallelize import SPContext, build_plan, parallelize
    hf = make_hf_model(fam)
    tokens, positions, labels = packed_batch(lengths=lengths)
    cu = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    rl, rloss = per_document_reference(hf, tokens, lengths)
    hg = {n: p.grad for n, p in hf.named_parameters()}
    group = dist.new_group(list(range(world)))
    out = []
    for m, s in methods:
        cfg = SimpleNamespace(sp_method=m, softmax_method=s, sp=world, layout="auto")
        model = parallelize(from_hf(folder), None, cfg)
        plan = build_plan(cu, cfg); ctx = SPContext(plan, group)
        loc = [plan.shard(t, rank, pad_value=p) for t, p in ((tokens, 0), (positions, 0), (labels, -100))]
        with torch.no_grad():
            lg = plan.gather(model(loc[0], loc[1], ctx), group)
        loss = model(loc[0], loc[1], ctx, labels=loc[2]); loss.backward()
        tot = loss.detach().clone(); dist.all_reduce(tot)
        g = 0.0
        for n, p in model.named_parameters():
            dist.all_reduce(p.grad); g = max(g, rel(p.grad, hg[hf_param(n)]))
        out.append((m, s, rel(lg, rl), rel(tot, rloss), g))
    return out

if __name__ == "__main__":
    for fam in ["qwen3_moe", "qwen3_moe_norm", "mixtral", "minimax"]:
        d = tempfile.mkdtemp(); save_hf_model(fam, d)
        print(f"{fam:15} single          logits {single(fam, d)[0]:.1e} loss {single(fam, d)[1]:.1e} grads {single(fam, d)[2]:.1e}", flush=True)
        if fam in ("qwen3_moe", "mixtral"):
            for r in run_ranks(2, sp, d, fam, [("ulysses", None), ("ring", None)], LENGTHS)[0]:
                print(f"{fam:15} {r[0]}/{r[1]} sp2 logits {r[2]:.1e} loss {r[3]:.1e} grads {r[4]:.1e}", flush=True)
        if fam == "minimax":
            for w, L in ((2, LENGTHS), (4, LENGTHS), (4, [3, 2])):
                for r in run_ranks(w, sp, d, fam, [("lasp2", "allgather"), ("lasp1", "allgather")], L)[0]:
                    print(f"{fam:15} {r[0]}/{r[1]} sp{w} {L} logits {r[2]:.1e} loss {r[3]:.1e} grads {r[4]:.1e}", flush=True)
