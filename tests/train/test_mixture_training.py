"""Training on ``data.sources``: per-step ``tokens_by_source``, exact resume in the middle of a
mixture run, and layouts (sp 2, dp 2, adaptive) reproducing the single-process losses (issue #30)."""
from __future__ import annotations

import json

import pytest

from tests.helpers.ranks import run_ranks
from tests.helpers.training import assert_losses_close, read_metrics, train_rank

SMALLER = ["data.max_seq_len=128", "data.tokens_per_step=512", "train.steps=6", "data.max_documents=60"]


def mixture_overrides(tmp_path, batching="pack"):
    code = tmp_path / "code.jsonl"
    code.write_text("".join(json.dumps({"content": f"def f{i}(x):\n    return x * {i}\n" * (1 + i % 7)}) + "\n"
                            for i in range(80)))
    return SMALLER + [f"data.batching={batching}",
                      f"data.sources=[{{source: stdlib, weight: 0.7, name: py, "
                      f"upsample_long: {{min_len: 2000, factor: 3}}}}, "
                      f"{{source: {code}, weight: 0.3, name: code, text_field: content}}]"]


SLOW = pytest.mark.slow  # ~30 s each on 2 shared CPU cores


@pytest.mark.parametrize("batching", [pytest.param("window", marks=SLOW), "pack", pytest.param("decompose", marks=SLOW)])
def test_resume_mid_mixture_reproduces_the_run(tmp_path, batching):
    overrides = mixture_overrides(tmp_path, batching)
    if batching == "decompose":
        overrides += ["data.min_seq_len=32"]
    whole = run_ranks(1, train_rank, str(tmp_path / "whole"), overrides)[0]
    overrides_ckpt = overrides + ["train.checkpoint_every=3"]
    first = run_ranks(1, train_rank, str(tmp_path / "cut"), overrides_ckpt, {"stop_after": 3})[0]
    rest = run_ranks(1, train_rank, str(tmp_path / "cut"), overrides_ckpt, {"resume": True})[0]
    assert first + rest == whole  # exact: same data, same order, same floats
    metrics = read_metrics(tmp_path / "whole")
    for m in metrics:
        assert set(m["tokens_by_source"]) == {"py", "code"}
        assert sum(m["tokens_by_source"].values()) == m["tokens"]


@pytest.mark.parametrize("layout", [
    pytest.param(["parallel.sp=2", "parallel.sp_method=ulysses"], marks=SLOW),
    pytest.param(["parallel.sp=1"], marks=SLOW),  # dp 2
    pytest.param(["parallel.sp_method=adaptive", "parallel.max_sp=2"], marks=SLOW),
])
def test_layouts_reproduce_the_single_process_mixture(tmp_path, layout):
    overrides = mixture_overrides(tmp_path, "pack") + ["data.continue_positions=true"]
    ref = run_ranks(1, train_rank, str(tmp_path / "ref"), overrides)[0]
    got = run_ranks(2, train_rank, str(tmp_path / "two"), overrides + layout)
    assert got[0] == got[1]
    assert_losses_close(got[0], ref, rel=1e-4)


def chat_overrides(tmp_path):
    from tests.data.test_chat import chat_tokenizer_folder, conversations

    folder = chat_tokenizer_folder(tmp_path / "tok")
    data = conversations(tmp_path / "chat.jsonl", n=40)
    return SMALLER + ["data.batching=pack", "data.long_documents=truncate", "model.vocab_size=300", f"data.tokenizer={folder}",
                      f"data.sources=[{{source: {data}, format: chat, weight: 0.5, name: chat}}, "
                      "{source: stdlib, weight: 0.5, name: py}]"]


@pytest.mark.parametrize("layout", [
    ["parallel.sp=2", "parallel.sp_method=ulysses"],
    pytest.param(["parallel.sp=1"], marks=SLOW),  # dp 2
    pytest.param(["parallel.sp_method=adaptive", "parallel.max_sp=2"], marks=SLOW),
])
def test_layouts_reproduce_the_single_process_chat_loss(tmp_path, layout):
    pytest.importorskip("transformers")
    overrides = chat_overrides(tmp_path)
    ref = run_ranks(1, train_rank, str(tmp_path / "ref"), overrides)[0]
    got = run_ranks(2, train_rank, str(tmp_path / "two"), overrides + layout)
    assert got[0] == got[1]
    assert_losses_close(got[0], ref, rel=1e-4)
    steps = read_metrics(tmp_path / "ref")
    chat = [m for m in steps if m["tokens_by_source"]["chat"] > 0]
    assert chat and all(m["tokens"] - m["loss_tokens"] > 16 for m in chat)  # masked chat tokens in the mix


def test_a_checkpoint_recorded_before_data_sources_still_resumes():
    from pathlib import Path

    from seqshard.launch.spec import Spec
    from seqshard.train.rundir import RunDirError, check_resume_spec

    now = Spec().to_dict()
    old = {**now, "data": {k: v for k, v in now["data"].items()
                           if k not in ("sources", "upsample_long", "long_documents", "format", "weight")}}
    assert check_resume_spec(old, now, Path("step_3"), Spec().to_dict()) == []
    changed = {**now, "data": {**now["data"], "long_documents": "drop"}}
    with pytest.raises(RunDirError, match="data.long_documents"):
        check_resume_spec(old, changed, Path("step_3"), Spec().to_dict())
