"""Issue #29, generic wrap (model.impl: transformers): GPT-OSS (learned sinks, alternating sliding
windows, MoE), Gemma 2 (soft-caps, windows) and Mistral (window) run transformers' own layers with
seqshard attention and give transformers' eager logits, loss and every gradient (fp32, 1e-5)."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from seqshard.models import VarlenContext  # noqa: E402
from tests.helpers.hf_models import LENGTHS, packed_batch, save_hf_model  # noqa: E402
from tests.models.test_hf_wrap import check_wrap_matches_transformers, transformers_reference  # noqa: E402


@pytest.mark.parametrize("family", ["gpt_oss", "gemma2", "mistral_window"])
def test_wrap_patterns_match_transformers(tmp_path, family):
    check_wrap_matches_transformers(family, tmp_path)


def test_wrap_refuses_a_window_the_layer_does_not_pass(tmp_path):
    """A model whose config has a window its attention call does not carry is refused, not run full."""
    from seqshard.models.hf_wrap import wrap_hf

    save_hf_model("mistral_window", tmp_path)
    model = wrap_hf(tmp_path)
    for m in model._attention:
        m.seqshard_window = 16  # what config.json would say if the layer dropped its window
    tokens, positions, _ = packed_batch()
    with pytest.raises(ValueError, match="config.json gives a sliding window of 16, the layer passed 8"):
        model(tokens, positions, VarlenContext.from_lengths(LENGTHS))


WRAP_PAIRS = [("ulysses", "stream"), ("allgather", "zigzag"), ("ring", "zigzag"), ("ring", "contiguous")]


def check_wrap_patterns(rank, world, folder, family, pairs):
    from types import SimpleNamespace

    from seqshard.dist.mesh import ParallelDims, build_mesh
    from seqshard.models.hf_wrap import wrap_hf
    from seqshard.parallel.parallelize import make_sharder, parallelize
    from tests.helpers.hf_models import assert_sharded_loss_and_grads

    tokens, positions, labels = packed_batch()
    _, ref_loss, ref_grads = transformers_reference(folder, tokens)
    for method, layout in pairs:
        cfg = SimpleNamespace(sp=world, sp_method=method, layout=layout, softmax_method="allgather",
                              ulysses=2 if method == "usp" else 1)
        mesh = build_mesh(ParallelDims(world, 1, world, cfg.ulysses), "cpu")
        model = parallelize(wrap_hf(folder), mesh, cfg)
        local_tokens, local_labels, local_positions, ctx = make_sharder(mesh, cfg, pad_id=0)(
            tokens, labels, positions, LENGTHS)
        loss = model(local_tokens, local_positions, ctx, labels=local_labels)
        assert_sharded_loss_and_grads(f"{family}/{method}/{layout}", loss, ref_loss, model, ref_grads.__getitem__)
    return True


def test_gpt_oss_sinks_under_sp_2_ranks(tmp_path):
    """GPT-OSS (sinks + alternating windows) through the wrap under every SP method: summed loss and
    every gradient equal transformers eager alone."""
    from tests.helpers.ranks import run_ranks

    save_hf_model("gpt_oss", tmp_path)
    assert run_ranks(2, check_wrap_patterns, str(tmp_path), "gpt_oss", WRAP_PAIRS) == [True, True]


@pytest.mark.slow
def test_gpt_oss_sinks_under_usp_4_ranks(tmp_path):
    from tests.helpers.ranks import run_ranks

    save_hf_model("gpt_oss", tmp_path)
    assert run_ranks(4, check_wrap_patterns, str(tmp_path), "gpt_oss", [("usp", "zigzag")]) == [True] * 4
