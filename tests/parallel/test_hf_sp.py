"""An imported Hugging Face model under Ulysses, Ring, all-gather and USP on gloo ranks: the gathered
logits equal transformers' per-document forward, the summed loss and every gradient too."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from tests.helpers.hf_models import (LENGTHS, assert_rel_close, assert_sharded_loss_and_grads,  # noqa: E402
                                     packed_batch, per_document_reference, save_hf_model)
from tests.helpers.ranks import run_ranks  # noqa: E402

def check_methods_match_transformers(rank, world, folder, family):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from seqshard.models import from_hf
    from seqshard.models.hf import hf_name
    from seqshard.parallel.parallelize import DEFAULT_LAYOUT, SOFTMAX_METHODS, SPContext
    from seqshard.parallel.plan import ShardPlan

    # from_config + load_state_dict: from_pretrained takes part in the process group itself
    hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), attn_implementation="eager")
    hf.load_state_dict(load_file(f"{folder}/model.safetensors"), strict=False)
    hf.tie_weights()
    tokens, positions, labels = packed_batch()
    cu = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
    ref_logits, ref_loss = per_document_reference(hf, tokens)
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    for method, fn in SOFTMAX_METHODS.items():
        model = from_hf(folder)
        for m in model.modules():
            if hasattr(m, "attention_fn"):
                m.attention_fn = fn
        plan = ShardPlan.build(cu, world, DEFAULT_LAYOUT[method])
        world_group = dist.new_group(list(range(world)))
        ctx = SPContext(plan, world_group)
        if method == "usp":  # ulysses x ring = 2 x (world / 2)
            mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("ring", "ulysses"))
            ctx = SPContext(plan, world_group, mesh["ulysses"].get_group(), mesh["ring"].get_group())
        local = [plan.shard(t, rank, pad_value=pad) for t, pad in ((tokens, 0), (positions, 0), (labels, -100))]
        with torch.no_grad():
            logits = plan.gather(model(local[0], local[1], ctx), world_group)
        assert_rel_close(f"{family}/{method} logits", logits.detach(), ref_logits)
        loss = model(local[0], local[1], ctx, labels=local[2])
        assert_sharded_loss_and_grads(f"{family}/{method}", loss, ref_loss, model, lambda n: hf_grads[hf_name(n)])
    return True


def test_sp_methods_match_transformers_2_ranks(tmp_path):
    save_hf_model("qwen3", tmp_path)  # q/k norm, explicit head_dim, GQA
    assert run_ranks(2, check_methods_match_transformers, str(tmp_path), "qwen3") == [True, True]


@pytest.mark.slow
def test_sp_methods_match_transformers_4_ranks(tmp_path):
    save_hf_model("llama3_scaled", tmp_path, num_attention_heads=4, num_key_value_heads=2)
    assert run_ranks(4, check_methods_match_transformers, str(tmp_path), "llama3") == [True] * 4
