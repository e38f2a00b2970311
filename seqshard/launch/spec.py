"""YAML job spec -> frozen dataclasses, validated once, before any process group starts.

Every error is a :class:`SpecError` whose message names the key path and the reason, e.g.
``parallel.sp: 3 does not divide world size 2``. Code below the spec trusts it (STYLE rule 5).
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from seqshard.data.sources import UpsampleLong as UpsampleSpec
from seqshard.models.config import LinearAttnConfig, ModelConfig


class SpecError(ValueError):
    """A bad job spec. ``str(err)`` is the one line a user sees."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path, self.reason = path, reason

    exit_code = 2  # what the CLI exits with, also when the error was raised inside a guarded region


@dataclass(frozen=True)
class CurriculumSpec:
    schedule: str = "uniform"  # uniform | grow_p2 | grow_linear | shrink
    cycles: int = 1


@dataclass(frozen=True)
class EvalSpec:
    fraction: float = 0.0  # held-out share of data.source's documents (0 = none)
    source: str = ""  # or a separate local path (then data.source is all training data)
    text_field: str = ""  # "" = data.text_field
    split: str = ""  # a DatasetDict split of data.eval.source ("" = data.split)
    sources: list = field(default_factory=list)  # [{source, name, split, text_field}]: several held-out sources


@dataclass(frozen=True)
class DataSpec:
    source: str = "stdlib"
    text_field: str = "text"
    sources: list = field(default_factory=list)  # [{source, weight, name, split, text_field, format, loss_on, loss_weight, upsample_long}] (data/sources.py); [] = the single source of the keys below
    weight: float = 1.0  # sampling weight of the single source (data/mixture.py)
    name: str = ""  # the single source's key in tokens_by_source / loss_by_source ("" = its index, 0)
    format: str = "text"  # text | chat (a messages column, the tokenizer's chat template) | prompt_completion
    loss_on: str = "assistant"  # format chat: assistant | last | all (the tokens that carry loss)
    loss_weight: float = 1.0  # > 0: each of the source's loss tokens counts this much in the step loss sum_t w_t ce_t / sum_t w_t (only ratios matter; docs/data.md)
    upsample_long: UpsampleSpec = field(default_factory=UpsampleSpec)
    long_documents: str = "split"  # split | truncate | drop: a document longer than max_seq_len
    continue_positions: bool = False  # split: position ids run on across a document's pieces
    max_seq_len: int = 1024
    tokens_per_step: int = 4096
    micro_batch_tokens: int = 0  # tokens per forward pass on one replica; 0 = max_seq_len
    batching: str = "window"  # window | pack | decompose
    pack_method: str = "bfd"
    min_seq_len: int = 256
    curriculum: CurriculumSpec = field(default_factory=CurriculumSpec)
    max_documents: int = 0  # 0 = all; a cap for quick experiments
    cache_dir: str = ""
    eval: EvalSpec = field(default_factory=EvalSpec)
    tokenizer: str = "byte"  # byte | PATH (a local Hugging Face tokenizer folder); absent with model.hf: the checkpoint folder's
    split: str = "train"  # the split of a datasets save_to_disk folder
    num_proc: int = 1  # processes tokenizing the corpus (datasets map; cached either way)


@dataclass(frozen=True)
class PlannerSpec:
    solver: str = "greedy"  # greedy | milp
    time_limit_s: float = 0.05
    profile: str = "cpu_gloo"
    memory_tokens: int = 0  # tokens one device holds; 0 = by the memory model (train.device_memory_gb) or data.max_seq_len
    max_phases: int = 2  # 2: a step may run its long sequences first, then the rest (parallel/phases.py)


@dataclass(frozen=True)
class ParallelSpec:
    sp: int = 1
    sp_method: str = "none"  # none | ulysses | ring | allgather | usp | lasp1 | lasp2 | adaptive
    ulysses: int = 1  # usp: ulysses degree inside sp (ring degree = sp / ulysses)
    layout: str = "auto"  # auto | zigzag | contiguous | stream
    softmax_method: str = "allgather"  # hybrid models: SP method of the softmax layers
    max_sp: int = 4  # adaptive: largest group
    ep: int = 1  # expert parallelism: E/ep MoE experts per rank over groups of ep ranks (divides E and world; torch engine)
    ulysses_chunks: int | str = 1  # ulysses/usp/adaptive: N query-head chunks whose all-to-alls overlap attention, forward and backward (1 = one exchange each way; auto = up to 4 while each message stays >= 256 KiB); N must divide the query heads per rank
    comm_dtype: str = "fp32"  # dtype of the Ulysses all-to-all payload on the wire, forward and backward (fp32: the activations' own dtype; bf16 halves the bytes, compute keeps the model's dtype)
    planner: PlannerSpec = field(default_factory=PlannerSpec)


@dataclass(frozen=True)
class PasskeySpec:
    lengths: list = field(default_factory=list)  # context lengths in tokens; [] = no passkey retrieval
    depths: list = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # needle depth, 0 = start
    trials: int = 4  # keys per (length, depth)


@dataclass(frozen=True)
class EvalLongSpec:
    """Long-context evaluation (train/long_eval.py): loss by position and passkey retrieval."""
    every: int = 0  # steps between evaluations during training (0 = never; ``seqshard eval`` runs them)
    bucket: int = 0  # loss by position: bucket width in tokens (0 = off)
    max_len: int = 0  # tokens of each held-out document scored by position (0 = data.max_seq_len)
    documents: int = 8  # held-out documents of at least max_len tokens
    passkey: PasskeySpec = field(default_factory=PasskeySpec)


@dataclass(frozen=True)
class TrainSpec:
    steps: int = 100
    lr: float = 3.0e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: str = "float32"  # float32 | bfloat16
    output_dir: str = "runs/default"
    log_every: int = 1
    checkpoint_every: int = 50
    collective_timeout_s: float = 300.0
    engine: str = "torch"  # torch | fsdp2 | deepspeed
    zero_stage: int = 0
    ds_config: str = ""
    lr_schedule: str = "cosine"  # cosine | linear | constant | wsd (train/schedule.py)
    decay_fraction: float = 0.2  # wsd: share of train.steps spent decaying
    eval_every: int = 0  # steps between evaluations on data.eval (0 = only with data.eval, at the end)
    eval_tokens: int = 0  # held-out tokens per evaluation; 0 = data.tokens_per_step
    loggers: list = field(default_factory=lambda: ["jsonl"])  # jsonl | tensorboard | wandb
    reshard_after_forward: bool = True  # fsdp2: free gathered block parameters after forward
    offload_params: bool = False  # fsdp2: parameters, gradients and optimizer states on CPU
    async_checkpoint: bool = False  # dcp.async_save; committed only after every rank finished
    activation_checkpointing: str = "none"  # none | full | selective | lean (per block; train/memory.py)
    offload_activations: bool = False  # checkpointed block inputs to host memory (CUDA; CPU: no-op)
    mlp_tiles: int = 1  # SwiGLU over sequence tiles; 1 = untiled, 0 = auto (ceil(tokens / dim))
    device_memory_gb: float = 0.0  # per-rank memory for the fit check (parallel/memory_model.py); 0 = skip
    eval_long: EvalLongSpec = field(default_factory=EvalLongSpec)  # loss by position, passkey retrieval
    on_nonfinite: str = "stop"  # stop | skip: a step whose loss or gradient norm is not finite (train/guards.py)
    max_nonfinite_in_row: int = 3  # skip: stop after this many non-finite steps in a row
    keep_checkpoints: int = 0  # keep the newest N committed checkpoints (0 = keep all)
    stages: list = field(default_factory=list)  # [{steps, set: {key.path: value}}] (launch/stages.py)


@dataclass(frozen=True)
class SlurmSpec:
    partition: str = ""
    account: str = ""
    time: str = "01:00:00"
    gpus_per_node: int = 0  # 0 = launch.nproc_per_node (the one value the script uses)
    job_name: str = ""
    signal_s: int = 120  # SIGUSR1 this many seconds before the time limit (checkpoint, exit 75); 0 = none


@dataclass(frozen=True)
class LaunchSpec:
    launcher: str = "torchrun"  # torchrun | deepspeed | mpirun | slurm | srun
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    rdzv_endpoint: str = ""
    hostfile: str = ""
    slurm: SlurmSpec = field(default_factory=SlurmSpec)


@dataclass(frozen=True)
class Spec:
    name: str = "run"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataSpec = field(default_factory=DataSpec)
    parallel: ParallelSpec = field(default_factory=ParallelSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    launch: LaunchSpec = field(default_factory=LaunchSpec)

    @property
    def world_size(self) -> int:
        return self.launch.nproc_per_node * self.launch.nnodes

    def dp(self, world_size: int) -> int:
        return 1 if self.parallel.sp_method == "adaptive" else world_size // self.parallel.sp

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def stage_specs(self, world_size: int | None = None) -> list:
        """``train.stages``: the validated spec of each stage, in order (``[]`` without stages)."""
        from .stages import stage_specs

        return stage_specs(self, world_size)


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _coerce(value, tp, path):
    if isinstance(tp, types.UnionType):  # e.g. ``int | str`` (a count or "auto"): the first that fits
        for member in typing.get_args(tp):
            try:
                return _coerce(value, member, path)
            except SpecError:
                pass
        names = " or ".join(_TYPE_NAMES.get(m, m.__name__) for m in typing.get_args(tp))
        raise SpecError(path, f"expected {names}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SpecError(path, f"expected a mapping, got {type(value).__name__} {value!r}")
        return _build(tp, value, path)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    ok = (isinstance(value, bool) if tp is bool else
          isinstance(value, (int, float)) and not isinstance(value, bool) if tp is float else
          isinstance(value, int) and not isinstance(value, bool) if tp is int else isinstance(value, tp))
    if not ok:
        raise SpecError(path, f"expected {_TYPE_NAMES.get(tp, tp.__name__)}, got {value!r}")
    if tp is float and not math.isfinite(value):
        raise SpecError(path, f"must be a finite number, got {value!r}")
    return float(value) if tp is float else value


def _build(cls, raw: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise SpecError(path, f"unknown key (known: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def _set_path(raw: dict, dotted: str, value):
    keys = dotted.split(".")
    node = raw
    for i, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise SpecError(".".join(keys[:i + 1]), f"is not a mapping, cannot set {dotted}")
        node = child
    node[keys[-1]] = value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``--set key.path=value`` overrides, each value parsed as YAML (so ``sp=2`` is an int)."""
    for item in overrides or []:
        if "=" not in item:
            raise SpecError("--set", f"'{item}' is not key.path=value")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise SpecError(key, f"value {text!r} is not valid YAML ({err.problem})") from None
        _set_path(raw, key.strip(), value)
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (plain YAML
    keeps the last one silently, so a second ``train:`` section would erase the first)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_raw(path) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise SpecError("", f"cannot read spec {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise SpecError("", f"spec {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError("", f"{path} is not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError("", f"{path}: the spec must be a YAML mapping, got {type(raw).__name__}")
    return raw


def from_dict(raw: dict, world_size: int | None = None) -> Spec:
    from .hf_spec import resolve_hf_model
    from .stages import prepare_stages

    spec = _build(Spec, resolve_hf_model(prepare_stages(raw)), "")
    from .validate import validate

    validate(spec, spec.world_size if world_size is None else world_size)
    spec.stage_specs(world_size)  # every stage is checked before anything starts
    return spec


def load_spec(path, overrides=None, world_size: int | None = None) -> Spec:
    """Read, override, type and validate a spec. ``world_size`` defaults to the launch section's."""
    return from_dict(apply_overrides(load_raw(path), overrides), world_size)


__all__ = ["Spec", "SpecError", "ModelConfig", "LinearAttnConfig", "DataSpec", "ParallelSpec",
           "TrainSpec", "LaunchSpec", "EvalSpec", "EvalLongSpec", "PasskeySpec", "SlurmSpec", "PlannerSpec", "CurriculumSpec", "UpsampleSpec",
           "load_spec", "from_dict", "apply_overrides", "load_raw"]
