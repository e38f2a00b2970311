"""Extended RoPE under sequence parallelism: for every RoPE type (Llama and Qwen2 checkpoints), the
logits gathered from Ulysses, Ring, all-gather and USP shards on gloo ranks equal transformers' at 4x
``original_max_position_embeddings`` (fp32, relative 1e-5). RoPE is applied to each shard with its
tokens' own positions, so a shard holding the far end of a document sees the extended frequencies."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from tests.helpers.hf_models import assert_rel_close, save_hf_model  # noqa: E402
from tests.helpers.ranks import run_ranks  # noqa: E402
from tests.helpers.rope_cases import CASES, LENGTHS, LONG, packed_tokens, padded_reference  # noqa: E402


def check_rope_cases_under_sp(rank, world, root, families=("llama", "qwen2"), cases=tuple(CASES)):
    import torch.distributed as dist
    from safetensors.torch import load_file
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoConfig, AutoModelForCausalLM

    from seqshard.models import from_hf
    from seqshard.parallel.parallelize import DEFAULT_LAYOUT, SOFTMAX_METHODS, SPContext
    from seqshard.parallel.plan import ShardPlan

    tokens, positions = packed_tokens()
    cu = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
    world_group = dist.new_group(list(range(world)))
    mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("ring", "ulysses"))
    errors = {}
    for family in families:
        for case in cases:
            folder = f"{root}/{family}_{case}"
            # from_config + load_state_dict: from_pretrained would take part in the process group
            hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), attn_implementation="eager")
            hf.load_state_dict(load_file(f"{folder}/model.safetensors"), strict=False)
            hf.tie_weights()
            ref = padded_reference(hf.eval(), tokens)
            model = from_hf(folder, seq_len=LONG)
            for method, fn in SOFTMAX_METHODS.items():
                for m in model.modules():
                    if hasattr(m, "attention_fn"):
                        m.attention_fn = fn
                plan = ShardPlan.build(cu, world, DEFAULT_LAYOUT[method])
                ctx = SPContext(plan, world_group)
                if method == "usp":
                    ctx = SPContext(plan, world_group, mesh["ulysses"].get_group(), mesh["ring"].get_group())
                local = [plan.shard(t, rank, pad_value=0) for t in (tokens, positions)]
                with torch.no_grad():
                    logits = plan.gather(model(local[0], local[1], ctx), world_group)
                assert_rel_close(f"{family}/{case}/{method}", logits, ref)
                errors[f"{family}/{case}/{method}"] = float((logits - ref).abs().max() / ref.abs().max())
    return errors


def test_rope_types_under_sp_match_transformers(tmp_path):
    for family in ("llama", "qwen2"):
        for case, overrides in CASES.items():
            save_hf_model(family, tmp_path / f"{family}_{case}", **overrides)
    results = run_ranks(2, check_rope_cases_under_sp, str(tmp_path))
    print({k: f"{v:.1e}" for k, v in results[0].items()})
    assert len(results[0]) == 2 * len(CASES) * 4


@pytest.mark.slow
def test_rope_types_under_sp_4_ranks(tmp_path):
    """4 ranks: USP is 2 (Ulysses) x 2 (Ring)."""
    cases = ("yarn", "dynamic", "longrope", "llama3")
    for case in cases:
        save_hf_model("llama", tmp_path / f"llama_{case}", **CASES[case])
    results = run_ranks(4, check_rope_cases_under_sp, str(tmp_path), ("llama",), cases)
    print({k: f"{v:.1e}" for k, v in results[0].items()})
    assert len(results[0]) == len(cases) * 4
