"""The job spec's reference, generated from the spec dataclasses: ``seqshard spec --reference``
writes ``docs/spec.md`` (every key: type, default, allowed values, one line of help).

The help of a key is the comment beside its field (``launch/spec.py``, ``models/config.py``),
else the line in :data:`HELP`; allowed values come from the validators' tuples. A test fails when
a key has no help or when ``docs/spec.md`` differs from what this module writes.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import typing

HELP = {
    "name": "the run's name (logs, reports, W&B)",
    "seed": "initial weights and the data order derive from it alone (any layout reproduces the loss)",
    "model.dim": "hidden size",
    "model.n_layers": "decoder blocks",
    "model.n_heads": "query heads",
    "model.n_kv_heads": "key/value heads (GQA; divides n_heads)",
    "model.ffn_dim": "SwiGLU hidden size",
    "model.vocab_size": "embedding rows (>= the tokenizer's vocabulary)",
    "model.rope_theta": "RoPE base; on an HF checkpoint an override (context extension)",
    "model.norm_eps": "RMSNorm epsilon",
    "model.tie_embeddings": "the output head shares the embedding matrix",
    "model.rope_scaling.factor": "scaling factor (>= 1)",
    "model.moe.num_experts": "experts per MoE layer (0: dense SwiGLU MLP)",
    "model.moe.top_k": "experts each token is routed to",
    "model.minimax.linear_alpha": "MiniMax: residual scale of the normalised input, linear-attention layers",
    "model.minimax.linear_beta": "MiniMax: scale of the linear-attention output",
    "model.minimax.full_alpha": "MiniMax: residual scale of the normalised input, softmax layers",
    "model.minimax.full_beta": "MiniMax: scale of the softmax-attention output",
    "model.minimax.mlp_alpha": "MiniMax: residual scale of the normalised input, MLP",
    "model.minimax.mlp_beta": "MiniMax: scale of the MLP output",
    "data.source": "stdlib (the embedded corpus), a file or folder of .txt/.json/.jsonl/.parquet, or a "
                   "datasets save_to_disk folder",
    "data.text_field": "the text column of JSON / parquet / saved datasets",
    "data.max_seq_len": "the longest sequence (tokens) a step holds",
    "data.tokens_per_step": "tokens per optimizer step (all replicas)",
    "data.pack_method": "packing heuristic: bfd | ffd | spfhp | greedy",
    "data.min_seq_len": "decompose: the shortest bucket (a power of two)",
    "data.cache_dir": "where tokenized corpora are cached (default: beside the run)",
    "data.curriculum.cycles": "decompose: how many times the curriculum repeats over train.steps",
    "parallel.sp": "sequence-parallel degree (divides the world size; dp = world / sp)",
    "parallel.planner.time_limit_s": "milp: time limit per step",
    "parallel.planner.profile": "hardware profile of the cost model (a name, or a seqshard calibrate JSON)",
    "train.steps": "optimizer steps (with train.stages: their sum)",
    "train.lr": "peak learning rate (AdamW)",
    "train.min_lr_ratio": "the schedule ends at lr x this",
    "train.warmup_steps": "linear warmup steps",
    "train.weight_decay": "AdamW weight decay (matrices only)",
    "train.beta1": "AdamW beta1, in [0, 1)",
    "train.beta2": "AdamW beta2, in [0, 1)",
    "train.grad_clip": "global gradient-norm clip (0 disables)",
    "train.output_dir": "the run folder: metrics.jsonl, checkpoints/, run.json, spec.yaml",
    "train.log_every": "steps between log lines",
    "train.checkpoint_every": "steps between checkpoints (0: only the last step)",
    "train.collective_timeout_s": "a collective waiting longer fails, naming the rank and operation",
    "train.zero_stage": "deepspeed: ZeRO stage 0-3",
    "train.ds_config": "deepspeed: a JSON merged over the config seqshard derives",
    "launch.nproc_per_node": "ranks per node (GPUs per node)",
    "launch.nnodes": "nodes",
    "launch.node_rank": "this node's index (multi-node torchrun without rendezvous)",
    "launch.master_addr": "rendezvous host",
    "launch.master_port": "rendezvous port",
    "launch.rdzv_endpoint": "torchrun c10d rendezvous host:port (multi-node)",
    "launch.hostfile": "deepspeed / mpirun host file",
    "launch.slurm.partition": "sbatch --partition",
    "launch.slurm.account": "sbatch --account",
    "launch.slurm.time": "sbatch --time",
    "launch.slurm.job_name": "sbatch --job-name (default: name)",
}

_SECTIONS = {"model": "The model (`model:`)", "data": "Data (`data:`)", "parallel": "Parallelism (`parallel:`)",
             "train": "Training (`train:`)", "launch": "Launching (`launch:`)"}


def _comments(cls) -> dict[str, str]:
    """``{field: trailing comment}`` of a dataclass's field lines."""
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return {}
    out = {}
    for node in ast.parse("".join(lines)).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            line = lines[node.lineno - 1]
            if "#" in line:
                out[node.target.id] = line.split("#", 1)[1].strip()
    return out


def _choices() -> dict[str, tuple]:
    from seqshard.launch import validate as v
    from seqshard.data.chat import LOSS_ON
    from seqshard.data.sources import FORMATS, LONG_DOCUMENTS
    from seqshard.launch.validate_extras import LOGGERS, LR_SCHEDULES

    return {"model.arch": v.ARCHS, "model.linear_attn.decay": v.DECAYS, "parallel.sp_method": v.SP_METHODS,
            "parallel.layout": v.LAYOUTS, "parallel.softmax_method": v.SOFTMAX_SP, "data.batching": v.BATCHING,
            "data.pack_method": v.PACK_METHODS, "data.curriculum.schedule": v.SCHEDULES,
            "launch.launcher": v.LAUNCHERS, "train.lr_schedule": LR_SCHEDULES, "train.loggers": tuple(LOGGERS),
            "train.engine": ("torch", "fsdp2", "deepspeed"), "train.dtype": ("float32", "bfloat16"),
            "train.on_nonfinite": ("stop", "skip"), "parallel.planner.solver": ("greedy", "milp"),
            "data.format": FORMATS, "data.loss_on": LOSS_ON, "data.long_documents": LONG_DOCUMENTS,
            "parallel.comm_dtype": v.COMM_DTYPES, "parallel.ulysses_chunks": ("auto", "N >= 1")}


def keys(cls=None, prefix="") -> list[dict]:
    """Every leaf key of the spec: ``{key, type, default, help, choices}`` in declaration order."""
    from .spec import Spec

    cls = cls or Spec
    hints, comments, out = typing.get_type_hints(cls), _comments(cls), []
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(tp):
            out += keys(tp, path + ".")
            continue
        out.append({"key": path, "type": getattr(tp, "__name__", str(tp)), "default": default,
                    "help": comments.get(f.name) or HELP.get(path, ""), "choices": _choices().get(path, ())})
    return out


def missing_help() -> list[str]:
    return [k["key"] for k in keys() if not k["help"]]


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def reference_markdown() -> str:
    """The text of ``docs/spec.md``."""
    lines = ["# Job spec reference", "",
             "Generated by `seqshard spec --reference` from the spec dataclasses (`seqshard/launch/spec.py`,",
             "`seqshard/models/config.py`); `tests/launch/test_spec_reference.py` fails when this page is stale.",
             "Every key can also be set on the command line: `--set key.path=value` (the value is parsed as YAML).",
             "A bad value is refused before launch in one line naming the key path (exit 2).", ""]
    rows = keys()
    for top, title in [("", "Top level"), *_SECTIONS.items()]:
        section = [k for k in rows if (k["key"].split(".")[0] == top if top else "." not in k["key"])]
        lines += [f"## {title}", "", "| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        for k in section:
            default = "[]" if k["default"] == [] else repr(k["default"]) if isinstance(k["default"], str) \
                else str(k["default"]).lower() if isinstance(k["default"], bool) else k["default"]
            allowed = ", ".join(map(str, k["choices"]))
            lines.append(f"| `{k['key']}` | {_cell(k['type'])} | `{_cell(default)}` | {_cell(allowed)} | {_cell(k['help'])} |")
        lines.append("")
    return "\n".join(lines)
