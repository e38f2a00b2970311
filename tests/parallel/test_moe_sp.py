"""Imported MoE checkpoints under sequence parallelism on gloo ranks: Qwen3-MoE / Mixtral under
Ulysses and Ring, MiniMax under LASP-2 and LASP-1 (its softmax layer under all-gather / Ulysses).
The gathered logits equal transformers' per-document forward; the loss summed over ranks (with the
per-document load-balancing loss, whose counts span the ranks a document spans) and every gradient
summed over ranks equal transformers', relative 1e-5, fp32. A rank holding only padding takes part."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")

from tests.helpers.hf_models import (LENGTHS, assert_rel_close, assert_sharded_loss_and_grads,  # noqa: E402
                                     packed_batch, per_document_reference, save_hf_model)
from tests.helpers.ranks import run_ranks  # noqa: E402
from tests.models.test_moe_import import hf_param  # noqa: E402


def check_moe_sp(rank, world, folder, family, methods, lengths):
    import torch.distributed as dist
    from seqshard.models import from_hf
    from seqshard.parallel.parallelize import SPContext, build_plan, parallelize
    from tests.helpers.hf_models import make_hf_model

    hf = make_hf_model(family)  # the saved model again (same seed; from_pretrained joins the process group)
    tokens, positions, labels = packed_batch(lengths=lengths)
    cu = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    ref_logits, ref_loss = per_document_reference(hf, tokens, lengths)
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    group = dist.new_group(list(range(world)))
    for sp_method, softmax_method in methods:
        cfg = SimpleNamespace(sp_method=sp_method, softmax_method=softmax_method, sp=world, layout="auto")
        model = parallelize(from_hf(folder), None, cfg)
        plan = build_plan(cu, cfg)
        ctx = SPContext(plan, group)
        local = [plan.shard(t, rank, pad_value=pad) for t, pad in ((tokens, 0), (positions, 0), (labels, -100))]
        with torch.no_grad():
            logits = plan.gather(model(local[0], local[1], ctx), group)
        tag = f"{family}/{sp_method}/{softmax_method}/sp{world}"
        assert_rel_close(f"{tag} logits", logits, ref_logits)
        loss = model(local[0], local[1], ctx, labels=local[2])
        assert_sharded_loss_and_grads(tag, loss, ref_loss, model, lambda n: hf_grads[hf_param(n)])
    return True


SOFTMAX = [("ulysses", None), ("ring", None)]


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_moe_under_ulysses_and_ring_2_ranks(family, tmp_path):
    save_hf_model(family, tmp_path)
    assert run_ranks(2, check_moe_sp, str(tmp_path), family, SOFTMAX, LENGTHS) == [True] * 2


def test_minimax_under_lasp2_2_ranks(tmp_path):
    save_hf_model("minimax", tmp_path)
    methods = [("lasp2", "allgather"), ("lasp2", "ulysses"), ("lasp1", "allgather")]
    assert run_ranks(2, check_moe_sp, str(tmp_path), "minimax", methods, LENGTHS) == [True] * 2


@pytest.mark.slow
def test_minimax_under_lasp2_4_ranks_with_a_padding_only_rank(tmp_path):
    save_hf_model("minimax", tmp_path)
    methods = [("lasp2", "allgather")]
    assert run_ranks(4, check_moe_sp, str(tmp_path), "minimax", methods, LENGTHS) == [True] * 4
    assert run_ranks(4, check_moe_sp, str(tmp_path), "minimax", methods, [3, 2]) == [True] * 4  # rank 3: padding
