"""Issue #29 under SP: imported models with windows, soft-caps, chunks and sinks under Ulysses,
all-gather, Ring (zigzag and contiguous) and USP on gloo ranks equal transformers' eager attention
alone, per document, on the same weights and tokens: gathered logits, summed loss and every
gradient (fp32, 1e-5).

Chunked attention has no dense transformers model to import, so its reference is transformers'
Llama run with the chunked mask given explicitly (a 4-D additive mask, eager attention).
The reference runs transformers in float64 (same weights): two fp32 runs of Gemma 3 differ by
about 1.1e-5 in the q/k-norm weight gradients (each is about 6e-6 from the float64 result, measured),
so fp32 against fp32 would sit on the tolerance; seqshard stays fp32. Against float64, seqshard's
Gemma 3 q/k-norm weight gradients (sums over every token and head) measured 0.8e-5 to 1.2e-5 in
one process (transformers fp32: about 0.5e-5): they alone get ``NORM_RTOL``; every other tensor
is held to 1e-5."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from tests.helpers.hf_models import (  # noqa: E402
    LENGTHS, assert_rel_close, assert_sharded_loss_and_grads, packed_batch, per_document_reference, save_hf_model)
from tests.helpers.ranks import run_ranks  # noqa: E402

NORM_RTOL = 2e-5  # Gemma 3's q/k-norm weight gradients only (see above)
PAIRS_2 = [("ulysses", "stream"), ("allgather", "zigzag"), ("ring", "zigzag"), ("ring", "contiguous")]


def chunk_mask(n, chunk, dtype=torch.float32):
    """``[1, 1, n, n]`` additive mask: causal and inside the query's chunk."""
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    ok = (j <= i) & (i // chunk == j // chunk)
    return torch.zeros(n, n, dtype=dtype).masked_fill(~ok, torch.finfo(dtype).min)[None, None]


def reference(hf, tokens, chunk=0):
    """transformers per document (eager; with ``chunk`` the explicit chunked mask): logits, loss."""
    mask = (lambda n: chunk_mask(n, chunk, hf.dtype)) if chunk else None
    return per_document_reference(hf, tokens, LENGTHS, mask)


def _assert_loss_and_grads(tag, loss, ref_loss, model, hf_grads):
    from seqshard.models.hf import hf_name

    def rtol_of(name):
        return NORM_RTOL if name.endswith(("q_norm.weight", "k_norm.weight")) else 1e-5

    assert_sharded_loss_and_grads(tag, loss, ref_loss, model, lambda name: hf_grads[hf_name(name, model.cfg.block)],
                                  rtol_of)


def check_native(rank, world, folder, family, pairs, chunk=0):
    import torch.distributed as dist
    from safetensors.torch import load_file
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoConfig, AutoModelForCausalLM

    from seqshard.models import from_hf
    from seqshard.parallel.parallelize import SOFTMAX_METHODS, SPContext
    from seqshard.parallel.plan import ShardPlan

    hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), attn_implementation="eager")
    hf.load_state_dict(load_file(f"{folder}/model.safetensors"), strict=False)
    hf.tie_weights()
    hf = hf.double()
    tokens, positions, labels = packed_batch()
    cu = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
    ref_logits, ref_loss = (t.float() for t in reference(hf, tokens, chunk))
    hf_grads = {n: p.grad.float() for n, p in hf.named_parameters()}
    world_group = dist.new_group(list(range(world)))
    for method, layout in pairs:
        model = from_hf(folder)
        for m in model.modules():
            if hasattr(m, "attention_fn"):
                m.attention_fn = SOFTMAX_METHODS[method]
        plan = ShardPlan.build(cu, world, layout)
        ctx = SPContext(plan, world_group)
        if method == "usp":  # ring x ulysses = (world / 2) x 2
            mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("ring", "ulysses"))
            ctx = SPContext(plan, world_group, mesh["ulysses"].get_group(), mesh["ring"].get_group())
        local = [plan.shard(t, rank, pad_value=pad) for t, pad in ((tokens, 0), (positions, 0), (labels, -100))]
        tag = f"{family}/{method}/{layout}"
        with torch.no_grad():
            assert_rel_close(f"{tag} logits", plan.gather(model(local[0], local[1], ctx), world_group), ref_logits)
        loss = model(local[0], local[1], ctx, labels=local[2])
        _assert_loss_and_grads(tag, loss, ref_loss, model, hf_grads)
    return True


@pytest.mark.parametrize("family", ["mistral_window", "gemma2", "gemma3"])
def test_native_patterns_under_sp_2_ranks(tmp_path, family):
    save_hf_model(family, tmp_path)
    assert run_ranks(2, check_native, str(tmp_path), family, PAIRS_2) == [True, True]


def test_chunked_attention_under_sp_2_ranks(tmp_path):
    """Llama 4 style chunks (8 tokens, documents of 21, 6 and 33) under every method."""
    save_hf_model("llama", tmp_path, attention_chunk_size=8, layer_types=["chunked_attention"] * 2)
    assert run_ranks(2, check_native, str(tmp_path), "llama_chunked", PAIRS_2, 8) == [True, True]


@pytest.mark.slow
def test_usp_patterns_4_ranks(tmp_path):
    """USP 2 x 2 (Ulysses inside, the window-aware ring across) on Gemma 3's local/global layers."""
    save_hf_model("gemma3", tmp_path)
    assert run_ranks(4, check_native, str(tmp_path), "gemma3", [("usp", "zigzag"), ("ring", "zigzag")]) == [True] * 4
