"""``seqshard export RUN_DIR [--step N] --format hf|torch --out DIR``: a DCP checkpoint -> files others load.

``hf``: ``config.json`` + ``model.safetensors`` (shards and ``model.safetensors.index.json`` above
``--max-shard-mb``) + the tokenizer files of ``data.tokenizer``, loadable by
``transformers.AutoModelForCausalLM.from_pretrained(DIR)``. A run started from ``model: {hf: PATH}``
keeps its family (its config.json is the template); seqshard's own llama becomes
LlamaForCausalLM; a generic-wrap run (``impl: transformers``) is written by transformers itself.
``torch``: one consolidated ``model.pt`` state dict (seqshard names). Every engine: DCP checkpoints
(torch, fsdp2) through ``dcp_to_torch_save``, DeepSpeed's through its ``zero_to_fp32``.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
import yaml

from .spec import ModelConfig, SpecError, _build

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json")


def _checkpoint(run_dir: Path, step):
    from seqshard.dist.checkpoint import checkpoint_root, latest_checkpoint

    if step is None:
        path = latest_checkpoint(run_dir)
        if path is None:
            raise SpecError("RUN_DIR", f"{run_dir}: no complete checkpoint under {checkpoint_root(run_dir)}")
        return path
    path = checkpoint_root(run_dir) / f"step_{step}"
    if not path.is_dir():
        raise SpecError("--step", f"{path} does not exist")
    return path


def deepspeed_model_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a DeepSpeed checkpoint (``train.engine: deepspeed``, tag
    ``deepspeed``): ZeRO 1-3 through DeepSpeed's own ``zero_to_fp32`` (the fp32 master weights,
    gathered from the partitions); ZeRO 0 from the one ``mp_rank_00_model_states.pt``."""
    tag = ckpt / "deepspeed"
    if list(tag.glob("*optim_states.pt")) and not list(tag.glob("mp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="deepspeed"))
    files = sorted(tag.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise SpecError("RUN_DIR", f"{tag}: no mp_rank_*_model_states.pt (not a DeepSpeed checkpoint)")
    return {k: v.float() if v.is_floating_point() else v
            for k, v in torch.load(files[0], map_location="cpu", weights_only=False)["module"].items()}


def model_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) state dict, seqshard names, from a checkpoint folder: DCP
    (engines torch and fsdp2: FSDP2's shards are reassembled) or DeepSpeed's."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    if (ckpt / "deepspeed").is_dir():
        return deepspeed_model_state(ckpt)
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(ckpt), f"{tmp}/full.pt")
        state = torch.load(f"{tmp}/full.pt", weights_only=False)
    return state["model"]


PATTERN_KEYS = ("layer_types", "sliding_window", "sliding_window_pattern", "attn_chunk_size", "attn_softcap",
                "final_softcap", "attn_scale", "local_rope_theta", "attn_sinks", "block")


def hf_config(cfg: ModelConfig, max_seq_len: int = 0) -> dict:
    """config.json: the source checkpoint's when the run came from one, else a LlamaConfig's; either
    way with the run's RoPE (``rope_parameters``, overrides included) and a
    ``max_position_embeddings`` covering the trained length ``max_seq_len``
    (models/rope_params.py: hf_max_positions)."""
    from seqshard.models.rope_params import hf_max_positions, to_hf_params

    if cfg.hf:
        out = json.loads((Path(cfg.hf) / "config.json").read_text())
        for key in ("rope_scaling", "rope_theta"):  # transformers 5 prefers rope_scaling over rope_parameters
            out.pop(key, None)
    else:
        patterned = [k for k in PATTERN_KEYS if getattr(cfg, k) != getattr(ModelConfig(), k)]
        if patterned:  # a LlamaConfig would drop them (DESIGN.md invariant 10)
            raise SpecError(f"model.{patterned[0]}", "a LlamaConfig cannot carry this attention pattern; "
                            "export with --format torch")
        out = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.dim,
               "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
               "num_key_value_heads": cfg.n_kv_heads, "intermediate_size": cfg.ffn_dim,
               "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
               "head_dim": cfg.head_dim, "tie_word_embeddings": cfg.tie_embeddings,
               "max_position_embeddings": 4096, "attention_bias": False, "mlp_bias": False}
    rs = cfg.rope_scaling
    params = out.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        # per layer type (Gemma 3: full and sliding layers with their own theta): the run's RoPE is
        # the full-attention layers'; the local layers keep theirs (model.local_rope_theta)
        params["full_attention"] = to_hf_params(cfg.rope_theta, rs)
    else:
        out["rope_parameters"] = to_hf_params(cfg.rope_theta, rs)
    if "original_max_position_embeddings" in out:  # a top-level one wins in transformers (Phi-3 style)
        out["original_max_position_embeddings"] = rs.original_max_position_embeddings
    out["max_position_embeddings"] = hf_max_positions(rs, max_seq_len, int(out.get("max_position_embeddings") or 0))
    return out


def write_safetensors(tensors: dict, out: Path, max_shard_bytes: int):
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = t.contiguous(), size + nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def export_wrapped(state: dict, cfg: ModelConfig, out: Path, max_shard_bytes: int):
    """A generic-wrap run (``impl: transformers``): its state dict is transformers' own (under
    ``hf.``); transformers writes the folder (tied weights, its own names and config)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.hf), dtype=torch.float32)
    model.load_state_dict({k[len("hf."):]: v for k, v in state.items() if k.startswith("hf.")}, strict=True)
    model.save_pretrained(out, max_shard_size=max(1, max_shard_bytes))  # an int: bytes


def export_hf(state: dict, cfg: ModelConfig, tokenizer: str, out: Path, max_shard_bytes: int,
              max_seq_len: int = 0):
    from seqshard.models.hf import hf_name

    if cfg.impl == "transformers":
        out.mkdir(parents=True, exist_ok=True)
        export_wrapped(state, cfg, out, max_shard_bytes)
        _copy_tokenizer(tokenizer, out)
        return
    if cfg.moe.num_experts:  # Qwen3-MoE, Mixtral, MiniMax: per-expert tensors, the source's config.json
        from seqshard.models.hf_moe import MOE_FAMILIES, seqshard_to_hf

        if cfg.hf_arch not in MOE_FAMILIES:
            raise SpecError("model.moe", "a mixture-of-experts model exports to Hugging Face only when it was "
                            f"imported from one ({', '.join(MOE_FAMILIES)}); use --format torch")
        tensors = seqshard_to_hf(state, cfg)
    elif cfg.arch != "llama":
        raise SpecError("model.arch", f"{cfg.arch} has no Hugging Face counterpart; use --format torch")
    else:
        tensors = {hf_name(k, cfg.block): v for k, v in state.items()
                   if not (cfg.tie_embeddings and k == "lm_head.weight")}
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, out, max_shard_bytes)
    (out / "config.json").write_text(json.dumps(hf_config(cfg, max_seq_len), indent=1))
    _copy_tokenizer(tokenizer, out)


def _copy_tokenizer(tokenizer: str, out: Path):
    """The tokenizer the run used: its folder's files, or the byte tokenizer written as files."""
    if tokenizer == "byte":
        from seqshard.data.byte_export import write_byte_tokenizer

        write_byte_tokenizer(out)
    else:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer) / name).is_file():
                shutil.copy(Path(tokenizer) / name, out / name)


def checkpoint_model(ckpt: Path, cfg: ModelConfig, max_seq_len: int) -> tuple[ModelConfig, int]:
    """The model config and length the checkpoint was trained with, from the spec its
    ``trainer.json`` records (with ``train.stages``: its stage's RoPE, which spec.yaml, the last
    stage's, may not have); spec.yaml's for checkpoints that record none."""
    meta = ckpt / "trainer.json"
    spec = json.loads(meta.read_text()).get("spec") if meta.is_file() else None
    if not isinstance(spec, dict) or "model" not in spec:
        return cfg, max_seq_len
    return _build(ModelConfig, spec["model"], "model"), int(spec.get("data", {}).get("max_seq_len", max_seq_len))


def export(run_dir, out, fmt="hf", step=None, max_shard_mb=2048.0) -> Path:
    run_dir, out = Path(run_dir), Path(out)
    spec_file = run_dir / "spec.yaml"
    if not spec_file.is_file():
        raise SpecError("RUN_DIR", f"{run_dir}: no spec.yaml (not a seqshard train.output_dir)")
    raw = yaml.safe_load(spec_file.read_text())
    cfg = _build(ModelConfig, raw["model"], "model")
    ckpt = _checkpoint(run_dir, step)
    cfg, max_seq_len = checkpoint_model(ckpt, cfg, int(raw.get("data", {}).get("max_seq_len", 0)))
    state = model_state(ckpt)
    if fmt == "torch":
        out.mkdir(parents=True, exist_ok=True)
        torch.save(state, out / "model.pt")
    else:
        export_hf(state, cfg, raw.get("data", {}).get("tokenizer", "byte"), out, int(max_shard_mb * 2**20),
                  max_seq_len)
    return out


def cmd_export(args) -> int:
    path = export(args.run_dir, args.out, args.format, args.step, args.max_shard_mb)
    print(f"exported {args.run_dir} ({args.format}) to {path}")
    return 0


def register(sub) -> dict:
    p = sub.add_parser("export", help="turn a run's checkpoint into a Hugging Face folder or one torch file",
                       description="Export a DCP checkpoint of RUN_DIR (newest complete, or --step N).")
    p.add_argument("run_dir", help="a train.output_dir with spec.yaml and checkpoints/")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--format", choices=("hf", "torch"), default="hf")
    p.add_argument("--out", required=True)
    p.add_argument("--max-shard-mb", type=float, default=2048.0, help="hf: safetensors shard size limit")
    return {"export": cmd_export}
