"""Generic wrap (model.impl: transformers) under Ulysses, Ring, all-gather and USP on 2 gloo ranks,
installed by ``parallelize`` and sharded by the trainer's own sharder: the summed loss over the
shards and every gradient (summed over ranks, as the trainer's reduction does) equal transformers
alone on one process (eager attention, per document), fp32 1e-5."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("transformers")

from tests.helpers.hf_models import LENGTHS, assert_sharded_loss_and_grads, packed_batch, save_hf_model  # noqa: E402
from tests.helpers.ranks import run_ranks  # noqa: E402
from tests.models.test_hf_wrap import transformers_reference  # noqa: E402

METHODS = ("ulysses", "ring", "allgather", "usp")


def check_wrap_methods(rank, world, folder, family):
    from seqshard.dist.mesh import ParallelDims, build_mesh
    from seqshard.models.hf_wrap import wrap_hf
    from seqshard.parallel.parallelize import make_sharder, parallelize

    tokens, positions, labels = packed_batch()
    _, ref_loss, ref_grads = transformers_reference(folder, tokens)
    for method in METHODS:
        cfg = SimpleNamespace(sp=world, sp_method=method, layout="auto", softmax_method="allgather",
                              ulysses=2 if method == "usp" else 1)
        mesh = build_mesh(ParallelDims(world, 1, world, cfg.ulysses), "cpu")
        model = parallelize(wrap_hf(folder), mesh, cfg)
        local_tokens, local_labels, local_positions, ctx = make_sharder(mesh, cfg, pad_id=0)(
            tokens, labels, positions, LENGTHS)
        # every rank holds global positions: RoPE sees each token's place in its document
        assert set(local_positions[local_labels != -100].tolist()) <= set(positions.tolist())
        loss = model(local_tokens, local_positions, ctx, labels=local_labels)
        assert_sharded_loss_and_grads(f"{family}/{method}", loss, ref_loss, model, ref_grads.__getitem__)
    return True


@pytest.mark.parametrize("family", ["gemma", pytest.param("phi", marks=pytest.mark.slow),
                                    pytest.param("stablelm", marks=pytest.mark.slow)])
def test_wrap_sp_methods_match_transformers_2_ranks(tmp_path, family):
    save_hf_model(family, tmp_path)
    assert run_ranks(2, check_wrap_methods, str(tmp_path), family) == [True, True]
