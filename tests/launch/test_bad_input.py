"""Every invalid spec is one line naming a key path, before any process starts (issue 27 item 8).

A table of the audit's mutations (each failed to be caught before), the file-level cases (duplicate
YAML keys, an output_dir that is a file, a large first JSON-lines record, an empty corpus, HF
folders), and a hypothesis property over the example specs: a value of the wrong type, a
non-finite number, a negative count or an unknown key put anywhere is refused by key path.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest

from seqshard.launch.spec import SpecError, apply_overrides, from_dict, load_raw, load_spec
from tests.helpers.training import ROOT

TINY = ROOT / "examples" / "tiny.yaml"
EXAMPLES = ["tiny.yaml", "sweep.yaml"]


def refused(overrides, world_size=2) -> SpecError:
    with pytest.raises(SpecError) as caught:
        load_spec(TINY, overrides, world_size)
    return caught.value


@pytest.mark.parametrize("override, key", [
    ("train.beta1=1.5", "train.beta1"), ("train.beta2=-1", "train.beta2"), ("train.beta2=1.0", "train.beta2"),
    ("train.lr=.nan", "train.lr"), ("train.lr=.inf", "train.lr"), ("model.rope_theta=.nan", "model.rope_theta"),
    ("train.min_lr_ratio=.nan", "train.min_lr_ratio"), ("train.collective_timeout_s=1e30", "train.collective_timeout_s"),
    ("parallel.planner.time_limit_s=1e30", "parallel.planner.time_limit_s"),
    ("model.dim=100000000", "model.dim"), ("model.n_layers=100000000", "model.n_layers"),
    ("data.max_seq_len=10000000000", "data.max_seq_len"), ("train.steps=10000000000000", "train.steps"),
    ("train.on_nonfinite=ignore", "train.on_nonfinite"), ("train.max_nonfinite_in_row=0", "train.max_nonfinite_in_row"),
    ("train.keep_checkpoints=-1", "train.keep_checkpoints"), ("model.attn_head_dim=-8", "model.attn_head_dim"),
])
def test_audit_mutations_are_refused_by_key(override, key):
    err = refused([override])
    assert err.path == key, str(err)


def test_skip_on_nonfinite_is_refused_with_deepspeed():
    assert refused(["train.on_nonfinite=skip", "train.engine=deepspeed"]).path == "train.on_nonfinite"


def test_duplicate_yaml_keys_are_an_error(tmp_path):
    spec = tmp_path / "dup.yaml"
    spec.write_text(TINY.read_text() + "train: {steps: 3}\n")
    with pytest.raises(SpecError, match=r"not valid YAML at line \d+.*duplicate key 'train' \(first at line"):
        load_raw(spec)
    spec.write_text("name: a\nseed: 1\nseed: 2\n")
    with pytest.raises(SpecError, match="duplicate key 'seed'"):
        load_raw(spec)


def test_output_dir_must_be_a_writable_folder(tmp_path):
    file = tmp_path / "a_file"
    file.write_text("x")
    assert "is a file" in str(refused([f"train.output_dir={file}"]))
    assert "is a file" in str(refused([f"train.output_dir={file}/run"]))


def test_a_large_first_jsonl_record_is_read_whole(tmp_path):
    data = tmp_path / "big.jsonl"
    data.write_text(json.dumps({"text": "word " * 500_000}) + "\n" + json.dumps({"text": "short"}) + "\n")
    assert data.stat().st_size > 2**21
    load_spec(TINY, [f"data.source={data}"], 2)  # valid: no "Unterminated string"


def test_an_empty_text_corpus_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("  \n\n")
    err = refused([f"data.source={tmp_path}"])
    assert err.path == "data.source" and "holds no text" in str(err)


def test_hf_folders_are_checked_before_launch(tmp_path):
    pytest.importorskip("transformers")
    import torch

    from seqshard.models import from_hf
    from tests.helpers.hf_models import save_hf_model

    # a .bin-only folder (the older format) loads through torch's weights_only reader, same logits
    save_hf_model("llama", tmp_path / "safe")
    model = save_hf_model("llama", tmp_path / "bin")
    (tmp_path / "bin" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    assert (tmp_path / "bin" / "pytorch_model.bin").is_file()
    tokens, positions = torch.arange(12) % 300, torch.arange(12)
    from seqshard.models import VarlenContext

    ctx = VarlenContext.from_lengths([12])
    with torch.no_grad():
        a = from_hf(tmp_path / "safe")(tokens, positions, ctx)
        b = from_hf(tmp_path / "bin")(tokens, positions, ctx)
    assert torch.equal(a, b)
    # a sharded folder with a shard missing: one line naming it
    save_hf_model("llama", tmp_path / "sharded").save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(SpecError, match=f"model.hf: .*{shards[-1].name}.* missing"):
        load_spec(ROOT / "examples" / "hf_llama.yaml", [f"model.hf={tmp_path / 'sharded'}", "data.tokenizer=byte"], 2)


def test_wrap_refuses_an_unknown_model_type_and_accepts_classifier_dropout(tmp_path):
    pytest.importorskip("transformers")
    from tests.helpers.hf_models import save_hf_model

    folder = tmp_path / "m"
    save_hf_model("llama", folder)
    config = json.loads((folder / "config.json").read_text())
    base = ["model.impl=transformers", f"model.hf={folder}", "data.tokenizer=byte"]
    (folder / "config.json").write_text(json.dumps({**config, "classifier_dropout": 0.1}))
    load_spec(ROOT / "examples" / "hf_llama.yaml", base, 2)  # a classification head's dropout: unused
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "no_such_model"}))
    with pytest.raises(SpecError, match="model_type 'no_such_model' is not known"):
        load_spec(ROOT / "examples" / "hf_llama.yaml", base, 2)


def test_validate_cli_prints_one_line_and_exits_2(tmp_path):
    for override in ("train.beta1=1.5", "train.lr=.nan", "model.dim=100000000"):
        proc = subprocess.run([sys.executable, "-m", "seqshard", "validate", str(TINY), "--set", override],
                              capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith(f"seqshard: error: {override.split('=')[0]}: ")


# ---- property: mutating any leaf of the example specs into something invalid is caught ----

def _leaves(d, prefix=()):
    for key, value in d.items():
        if isinstance(value, dict):
            yield from _leaves(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def _set(d, path, value):
    for key in path[:-1]:
        d = d.setdefault(key, {})
    d[path[-1]] = value


def _invalid_values(value):
    """Values of the wrong kind for a leaf holding ``value`` (each invalid for any key of that kind)."""
    if isinstance(value, bool):
        return ["yes please", 3, [True]]
    if isinstance(value, int):
        return ["many", 1.5, [value], {"a": 1}, -(10**12)]
    if isinstance(value, float):
        return ["fast", float("nan"), float("inf"), -float("inf"), [value]]
    if isinstance(value, str):
        return [12345, 1.5, [value], {"a": 1}]
    return []


def test_property_every_invalid_mutation_is_one_line_naming_its_key():
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    raws = {name: load_raw(ROOT / "examples" / name) for name in EXAMPLES}
    cases = [(name, path, bad) for name, raw in raws.items() for path, value in _leaves(raw)
             for bad in _invalid_values(value) if path not in (("name",),)]

    @given(st.sampled_from(cases), st.booleans())
    @settings(max_examples=150, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    def check(case, unknown_key):
        name, path, bad = case
        raw = copy.deepcopy(raws[name])
        if unknown_key:  # an unknown key beside a real one
            path = path[:-1] + ("no_such_key",)
        _set(raw, path, bad)
        dotted = ".".join(map(str, path))
        with pytest.raises(SpecError) as caught:
            from_dict(apply_overrides(raw, []), 2)
        err = caught.value
        assert "\n" not in str(err)
        assert err.path == dotted or (dotted.startswith(err.path) and err.path), (dotted, str(err))

    check()
