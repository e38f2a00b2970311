"""Issue #29 item 4: activation checkpointing (full, selective), offload and the tiled MLP on the
generic wrap (model.impl: transformers): same loss and every gradient as the plain wrap, on one
process (Gemma 2: windows and soft-caps) and with the SP attention installed (ring, 2 gloo ranks)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")

from seqshard.models import VarlenContext  # noqa: E402
from tests.helpers.hf_models import LENGTHS, assert_rel_close, packed_batch, save_hf_model  # noqa: E402
from tests.helpers.ranks import run_ranks  # noqa: E402

OPTIONS = [dict(activation_checkpointing="full", mlp_tiles=1, offload_activations=False),
           dict(activation_checkpointing="selective", mlp_tiles=3, offload_activations=True),
           dict(activation_checkpointing="none", mlp_tiles=0, offload_activations=False)]


def loss_and_grads(model, ctx, tokens, positions, labels):
    loss = model(tokens, positions, ctx, labels=labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("options", OPTIONS, ids=["full", "selective+offload+tiles3", "tiles-auto"])
def test_memory_options_on_the_wrap(tmp_path, options):
    from seqshard.models.hf_wrap import wrap_hf
    from seqshard.train.memory import apply_memory_options

    save_hf_model("gemma2", tmp_path)
    tokens, positions, labels = packed_batch()
    ctx = VarlenContext.from_lengths(LENGTHS)
    ref_loss, ref_grads = loss_and_grads(wrap_hf(tmp_path), ctx, tokens, positions, labels)
    model = apply_memory_options(wrap_hf(tmp_path), SimpleNamespace(**options))
    loss, grads = loss_and_grads(model, ctx, tokens, positions, labels)
    assert_rel_close("loss", loss, ref_loss)
    for name, g in grads.items():
        assert_rel_close(f"grad {name}", g, ref_grads[name])


def check_wrap_ring_with_selective(rank, world, folder):
    import torch.distributed as dist

    from seqshard.dist.mesh import ParallelDims, build_mesh
    from seqshard.models.hf_wrap import wrap_hf
    from seqshard.parallel.parallelize import make_sharder, parallelize
    from seqshard.train.memory import apply_memory_options

    tokens, positions, labels = packed_batch()
    cfg = SimpleNamespace(sp=world, sp_method="ring", layout="auto", softmax_method="allgather", ulysses=1)
    mesh = build_mesh(ParallelDims(world, 1, world, 1), "cpu")
    results = []
    for options in (None, OPTIONS[1]):
        model = parallelize(wrap_hf(folder), mesh, cfg)
        if options:
            apply_memory_options(model, SimpleNamespace(**options))
        local = make_sharder(mesh, cfg, pad_id=0)(tokens, labels, positions, LENGTHS)
        loss, grads = loss_and_grads(model, local[3], local[0], local[2], local[1])
        for g in grads.values():
            dist.all_reduce(g)
        results.append((loss, grads))
    (ref_loss, ref_grads), (loss, grads) = results
    assert_rel_close("loss", loss, ref_loss)
    for name, g in grads.items():
        assert_rel_close(f"grad {name}", g, ref_grads[name])
    return True


def test_selective_checkpointing_on_the_wrap_under_ring(tmp_path):
    save_hf_model("gemma2", tmp_path)
    assert run_ranks(2, check_wrap_ring_with_selective, str(tmp_path)) == [True, True]
