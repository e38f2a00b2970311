"""Every kind of bad spec gives one line naming the key path, exit code 2, no traceback."""
import subprocess
import sys
from pathlib import Path

import pytest

from seqshard.launch.spec import SpecError, load_spec

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "tiny.yaml"

BAD = [
    (["model.foo=1"], "model.foo: unknown key"),
    (["train.lr=abc"], "train.lr: expected a number, got 'abc'"),
    (["model.n_layers=2.5"], "model.n_layers: expected an integer"),
    (["train.steps=0"], "train.steps: must be >= 1, got 0"),
    (["parallel.sp=3"], "parallel.sp: 3 does not divide world size 2"),
    (["data.tokens_per_step=1000"], "data.tokens_per_step: 1000 is not a multiple of max_seq_len x dp"),
    (["parallel.sp_method=warp"], "parallel.sp_method: 'warp' is not one of"),
    # issue #32: the copy-free / pipelined Ulysses keys
    (["parallel.sp=2", "parallel.sp_method=ulysses", "parallel.ulysses_chunks=3"],
     "parallel.ulysses_chunks: 3 does not divide the 2 query heads per rank"),
    (["parallel.sp=2", "parallel.sp_method=ulysses", "parallel.ulysses_chunks=0"],
     "parallel.ulysses_chunks: must be >= 1, got 0"),
    (["parallel.sp=2", "parallel.sp_method=ulysses", "parallel.ulysses_chunks=many"],
     "parallel.ulysses_chunks: 'many' is not one of auto"),
    (["parallel.sp=2", "parallel.sp_method=ulysses", "parallel.ulysses_chunks=1.5"],
     "parallel.ulysses_chunks: expected an integer or a string, got 1.5"),
    (["parallel.sp=2", "parallel.sp_method=ulysses", "parallel.comm_dtype=fp8"],
     "parallel.comm_dtype: 'fp8' is not one of fp32, bf16"),
    (["parallel.sp=2", "parallel.sp_method=ring", "parallel.ulysses_chunks=2"],
     "parallel.ulysses_chunks: only used by the Ulysses all-to-all"),
    (["parallel.sp=2", "parallel.sp_method=ring", "parallel.comm_dtype=bf16"],
     "parallel.comm_dtype: only used by the Ulysses all-to-all"),
    (["parallel.sp=2", "parallel.sp_method=ulysses", "parallel.ulysses_chunks=2",
      "train.activation_checkpointing=full"], "parallel.ulysses_chunks: the copy-free Ulysses layer is not used"),
    (["parallel.sp=2", "parallel.sp_method=ulysses", "parallel.comm_dtype=bf16", "train.activation_checkpointing=lean"],
     "parallel.comm_dtype: the copy-free Ulysses layer is not used under train.activation_checkpointing: lean"),
    (["parallel.sp=2", "parallel.sp_method=ulysses", "parallel.comm_dtype=bf16", "model.impl=transformers"],
     "parallel.comm_dtype: only used by seqshard's native attention layer"),
    (["parallel.sp=2", "parallel.sp_method=ulysses", "model.n_heads=1", "model.n_kv_heads=1",
      "model.dim=64"], "parallel.sp: ulysses needs model.n_heads 1 >= sp 2"),
    (["parallel.sp=2", "parallel.sp_method=usp", "parallel.ulysses=4"],
     "parallel.ulysses: 4 does not divide parallel.sp 2"),
    (["parallel.sp=2", "parallel.sp_method=usp"], "parallel.ulysses: 1 (the default) leaves usp a plain ring"),
    (["parallel.sp=2", "parallel.sp_method=none"], "parallel.sp_method: none cannot run sp 2"),
    (["model.n_kv_heads=3"], "model.n_kv_heads: 3 does not divide model.n_heads 4"),
    (["model.arch=hybrid", "model.layer_pattern=LX"], "model.layer_pattern: 'LX' must be 2 letters"),
    (["train.dtype=float8"], "train.dtype: 'float8' is not one of"),
    (["launch.launcher=pbs"], "launch.launcher: 'pbs' is not one of"),
    (["model=3"], "model: expected a mapping"),
    (["parallel.sp_method=adaptive", "parallel.planner.max_phases=3"], "parallel.planner.max_phases: 3 is not 1 or 2"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[1].split(":")[0] + str(i) for i, b in enumerate(BAD)])
def test_bad_spec_names_key_path(overrides, message):
    with pytest.raises(SpecError) as err:
        load_spec(TINY, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unreadable_yaml_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {dim: 128\ntrain: [")
    with pytest.raises(SpecError, match="is not valid YAML at line"):
        load_spec(bad)


def test_set_overrides_are_typed_like_yaml():
    spec = load_spec(TINY, ["parallel.sp=2", "parallel.sp_method=ring", "train.lr=1e-3", "name=other"],
                     world_size=4)
    assert spec.parallel.sp == 2 and spec.train.lr == 1e-3 and spec.name == "other"
    assert spec.dp(4) == 2


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_validate(example, tmp_path, monkeypatch):
    if example.name.startswith("hf_"):  # needs its local HF folders (examples/make_tiny_hf.py)
        pytest.importorskip("transformers")
        from tests.helpers.hf_models import save_hf_model, save_tokenizer

        save_hf_model("llama", tmp_path / "runs" / "tiny_hf" / "model")
        save_hf_model("gemma", tmp_path / "runs" / "tiny_hf" / "gemma")
        save_tokenizer(tmp_path / "runs" / "tiny_hf" / "tokenizer")
        monkeypatch.chdir(tmp_path)
    assert load_spec(example).name


def test_cli_validate_exit_code_and_single_line():
    bad = subprocess.run([sys.executable, "-m", "seqshard", "validate", str(TINY), "--set", "parallel.sp=3"],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "seqshard: error: parallel.sp: 3 does not divide world size 2"
    assert "Traceback" not in bad.stderr
    good = subprocess.run([sys.executable, "-m", "seqshard", "validate", str(TINY)], capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert "valid" in good.stdout


def test_train_refuses_bad_spec_before_any_process_group(tmp_path):
    """Under no launcher the world is 1: sp 2 is refused before torch.distributed starts."""
    out = subprocess.run([sys.executable, "-m", "seqshard", "train", str(TINY), "--set", "parallel.sp=2",
                          "--set", "parallel.sp_method=ulysses", "--set", f"train.output_dir={tmp_path}"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == "seqshard: error: parallel.sp: 2 does not divide world size 1"
    assert not (tmp_path / "metrics.jsonl").exists()


def test_memory_keys_and_fit_check_fail_with_one_line(tmp_path):
    from seqshard.launch.spec import SpecError, apply_overrides, from_dict, load_raw

    def spec(*over):
        return from_dict(apply_overrides(load_raw("examples/tiny.yaml"), list(over)), 2)

    with pytest.raises(SpecError, match="train.activation_checkpointing: 'some' is not one of none, full, selective"):
        spec("train.activation_checkpointing=some")
    with pytest.raises(SpecError, match="train.offload_activations: .*full, selective or lean"):
        spec("train.offload_activations=true")
    with pytest.raises(SpecError, match="train.mlp_tiles"):
        spec("train.mlp_tiles=-1")
    long = ["data.max_seq_len=1048576", "data.tokens_per_step=2097152", "train.device_memory_gb=2"]
    with pytest.raises(SpecError) as err:
        spec(*long)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("data.max_seq_len: 1048576 tokens need ") and "GiB per rank" in msg
    assert "parallel.sp=" in msg and "train.offload_activations" in msg
    spec(*long[:2])  # device_memory_gb 0: no fit check
    spec("data.max_seq_len=4096", "data.tokens_per_step=8192", "train.device_memory_gb=2")


def test_chunk_keys_refused_where_the_copy_free_layer_cannot_run():
    """Uneven heads (4 over sp 3) take the unchanged Ulysses exchange: chunks would do nothing."""
    with pytest.raises(SpecError, match="parallel.ulysses_chunks: model.n_heads 4 over sp 3 is the uneven-heads"):
        load_spec(TINY, ["parallel.sp=3", "parallel.sp_method=ulysses", "parallel.ulysses_chunks=2", "model.n_kv_heads=1",
                         "data.tokens_per_step=3072"], world_size=3)
