"""An imported Hugging Face model under Ulysses, Ring, all-gather and USP on gloo ranks: the gathered
logits equal transformers' per-document forward, the summed loss and every gradient too."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from tests.helpers.hf_models import save_hf_model  # noqa: E402
from tests.helpers.ranks import run_ranks  # noqa: E402

RTOL = 1e-5
LENGTHS = [21, 6, 33]  # not multiples of the SP degree: the ShardPlan pads per document


def _close(name, got, ref, rtol=RTOL):
    err = (got - ref).abs().max() / ref.abs().max().clamp_min(1e-6)
    assert err <= rtol, f"{name}: max rel error {err:.2e} > {rtol:.0e}"


def _reference(hf, tokens):
    logits, loss, start = [], 0.0, 0
    for n in LENGTHS:
        out = hf(input_ids=tokens[None, start:start + n], labels=tokens[None, start:start + n])
        logits.append(out.logits[0])
        loss = loss + out.loss * (n - 1)
        start += n
    loss.backward()
    return torch.cat(logits).detach(), loss.detach()


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
    tokens = torch.randint(0, 300, (sum(LENGTHS),), generator=torch.Generator().manual_seed(5))
    positions = torch.cat([torch.arange(n) for n in LENGTHS])
    labels = torch.full_like(tokens, -100)
    cu = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
    for a, b in zip(cu[:-1], cu[1:]):
        labels[a:b - 1] = tokens[a + 1:b]
    ref_logits, ref_loss = _reference(hf, tokens)
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
        _close(f"{family}/{method} logits", logits.detach(), ref_logits)
        loss = model(local[0], local[1], ctx, labels=local[2])
        total = loss.detach().clone()
        dist.all_reduce(total)
        _close(f"{family}/{method} loss", total, ref_loss)
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        _close(f"{family}/{method} loss", total, ref_loss)
        for name, p in model.named_parameters():
            dist.all_reduce(p.grad)
            _close(f"{family}/{method} grad {name}", p.grad, hf_grads[hf_name(name)])
    return True


def test_sp_methods_match_transformers_2_ranks(tmp_path):
    save_hf_model("qwen3", tmp_path)  # q/k norm, explicit head_dim, GQA
    assert run_ranks(2, check_methods_match_transformers, str(tmp_path), "qwen3") == [True, True]


@pytest.mark.slow
def test_sp_methods_match_transformers_4_ranks(tmp_path):
    save_hf_model("llama3_scaled", tmp_path, num_attention_heads=4, num_key_value_heads=2)
    assert run_ranks(4, check_methods_match_transformers, str(tmp_path), "llama3") == [True] * 4
