"""Schedules survive resume, held-out loss is layout-independent, TensorBoard / W&B are written."""
import glob
import json
import math

import pytest

from seqshard.launch.spec import SpecError
from seqshard.launch import validate_extras
from seqshard.train.schedule import SCHEDULES, lr_at
from tests.helpers.ranks import run_ranks
from tests.helpers.training import ROOT, assert_losses_close, read_metrics, small_spec

RESUME = ["train.steps=6", "train.warmup_steps=1", "train.decay_fraction=0.5"]
EVAL = ["train.steps=2", "train.eval_every=1", "data.eval.fraction=0.05"]
LAYOUTS = {"dp2": [], "ulysses2": ["parallel.sp=2", "parallel.sp_method=ulysses"],
           "ring2": ["parallel.sp=2", "parallel.sp_method=ring"]}


def test_schedule_shapes():
    base = small_spec("/tmp/unused", 1, ["train.steps=10", "train.warmup_steps=2", "train.min_lr_ratio=0.1",
                                         "train.decay_fraction=0.3"]).train
    t = {name: base.__class__(**{**base.__dict__, "lr_schedule": name}) for name in SCHEDULES}
    lrs = {name: [lr_at(s, t[name]) for s in range(1, 11)] for name in SCHEDULES}
    for name in SCHEDULES:  # shared warmup
        assert lrs[name][:2] == [base.lr / 2, base.lr], name
    assert lrs["constant"][2:] == [base.lr] * 8
    assert lrs["wsd"][2:7] == [base.lr] * 5 and lrs["wsd"][-1] == pytest.approx(0.1 * base.lr)
    assert lrs["wsd"][7] > lrs["wsd"][8] > lrs["wsd"][9]
    assert lrs["linear"][-1] == pytest.approx(0.1 * base.lr) and lrs["cosine"][-1] == pytest.approx(0.1 * base.lr)
    mid = [(lrs["linear"][i], lrs["cosine"][i]) for i in range(3, 9)]
    assert all(cos > lin for lin, cos in mid[:2]), mid  # cosine stays higher early in the decay
    cos_expected = base.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 8)))
    assert lrs["cosine"][4] == cos_expected  # bit-identical to the original hand-written cosine


def _resume_schedule(rank, world_size, root, name):
    from seqshard.train.trainer import train

    o = RESUME + [f"train.lr_schedule={name}"]
    full = train(small_spec(f"{root}/full", world_size, o))
    split = small_spec(f"{root}/split", world_size, o)
    first = train(split, stop_after=3)
    rest = train(split, resume=True)
    return [[(m["loss"], m["lr"]) for m in run] for run in (full, first + rest)]


@pytest.mark.parametrize("name", [n if n == "wsd" else pytest.param(n, marks=pytest.mark.slow) for n in SCHEDULES])
def test_resume_keeps_the_schedule(tmp_path, name):
    """3 steps, checkpoint, 3 more steps == 6 uninterrupted steps (1 process; wsd in the default suite)."""
    full, resumed = run_ranks(1, _resume_schedule, str(tmp_path), name)[0]
    assert [lr for _, lr in resumed] == [lr for _, lr in full] == [lr_at(s, small_spec(
        "/tmp/unused", 1, RESUME + [f"train.lr_schedule={name}"]).train) for s in range(1, 7)]
    assert_losses_close([x for x, _ in resumed], [x for x, _ in full], rel=1e-6)
    state = json.loads((tmp_path / "split/checkpoints/step_3/trainer.json").read_text())
    assert state["schedule"]["name"] == name and state["schedule"]["last_step"] == 3


def _eval_losses(rank, world_size, root, layouts):
    from seqshard.train.trainer import train

    return {name: [(m["eval_loss"], m["eval_ppl"], m["eval_tokens"]) for m in
                   train(small_spec(f"{root}/{name}", world_size, EVAL + extra))]
            for name, extra in layouts.items()}


def test_eval_loss_same_for_every_layout_and_loggers_write(tmp_path, monkeypatch):
    """One process (with TensorBoard and W&B on) vs dp 2, ulysses 2, ring 2: the same eval loss."""
    monkeypatch.setenv("WANDB_MODE", "offline")  # never the network, even where a W&B key is set
    single = run_ranks(1, _eval_losses, str(tmp_path),
                       {"single": ["train.loggers=[jsonl,tensorboard,wandb]"]})[0]["single"]
    assert len(single) == 2 and single[0][0] > single[1][0]  # it learns on held-out text
    for loss, ppl, tokens in single:
        assert ppl == pytest.approx(math.exp(loss)) and tokens > 1000
    multi = run_ranks(2, _eval_losses, str(tmp_path), LAYOUTS)
    assert multi[0] == multi[1]
    for name in LAYOUTS:
        assert_losses_close([x[0] for x in multi[0][name]], [x[0] for x in single])
    _check_loggers(tmp_path / "single")


def _check_loggers(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = read_metrics(out)
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    for key in ("loss", "lr", "eval_loss", "tokens_per_s", "loss_by_source/0"):
        events = acc.Scalars(key)
        want = [r[key] if "/" not in key else r[key.split("/")[0]][key.split("/")[1]] for r in rows]
        assert [e.step for e in events] == [r["step"] for r in rows], key
        assert [e.value for e in events] == pytest.approx(want, rel=1e-6), key
    for r in rows:  # one source: its loss is the step's loss, its held-out loss the eval loss
        assert r["loss_by_source"]["0"] == pytest.approx(r["loss"], rel=1e-6)
        assert r["eval_loss_by_source"]["0"] == pytest.approx(r["eval_loss"], rel=1e-6)
    assert "config" in "".join(acc.Tags()["tensors"])
    runs = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1, runs
    blob = open(runs[0], "rb").read()  # W&B's offline log: history values are stored as JSON text
    for r in rows:
        assert json.dumps(r["loss"]).encode() in blob and json.dumps(r["eval_loss"]).encode() in blob
    assert b"launch_command" in blob and b"lr_schedule" in blob
    info = json.loads((out / "run.json").read_text())
    assert info["engine"] == {"engine": "torch", "precision": "float32"} and "launch_command" in info


@pytest.mark.parametrize("overrides, key", [
    (["train.lr_schedule=step"], "train.lr_schedule"),
    (["train.loggers=[jsonl,mlflow]"], "train.loggers"),
    (["data.eval.fraction=1.0"], "data.eval.fraction"),
    (["data.eval.fraction=0.5", "data.max_documents=1"], "data.eval.fraction"),
    (["train.eval_every=10"], "train.eval_every"),
    (["data.eval.fraction=0.1", "train.eval_tokens=1000"], "train.eval_tokens"),
    (["train.lr_schedule=wsd", "train.decay_fraction=0.9"], "train.decay_fraction"),
    (["launch.launcher=slurm", "launch.slurm.gpus_per_node=8"], "launch.slurm.gpus_per_node"),
])
def test_bad_trainer_keys_name_the_key(overrides, key):
    with pytest.raises(SpecError) as err:
        small_spec("/tmp/unused", 1, overrides)
    assert err.value.path == key, str(err.value)


def test_missing_logger_package_exits_2_naming_the_fix(monkeypatch, capsys):
    from seqshard.launch.cli import main

    monkeypatch.setitem(validate_extras.LOGGERS, "wandb", "wandb_is_not_installed_here")
    rc = main(["validate", str(ROOT / "examples/tiny.yaml"), "--set", "train.loggers=[wandb]"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "train.loggers" in err and "pip install" in err, err


def test_held_out_split_is_disjoint_and_refuses_an_empty_training_set(tmp_path):
    from seqshard.data.corpus import DataError, load_corpus
    from seqshard.train.evaluate import split_held_out

    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": f"document {i} " * (i + 1)}) + "\n"
                                                 for i in range(20)))
    corpus = load_corpus(str(tmp_path / "docs.jsonl"), cache_dir=str(tmp_path / "cache"))
    train, held = split_held_out(corpus, 0.2, seed=0)
    assert len(held) == 4 and len(train) == 16
    assert not set(train.indices) & set(held.indices)
    assert sorted(int(corpus.lengths[i]) for i in held.indices) == sorted(held.lengths.tolist())
    assert (held.indices == split_held_out(corpus, 0.2, seed=0)[1].indices).all()  # fixed by the seed
    with pytest.raises(DataError, match="data.eval.fraction"):
        split_held_out(corpus, 0.99, seed=0)


def test_progress_lines_carry_eta_when_not_a_terminal():
    import logging

    from seqshard.train.logs import Progress

    lines = []
    log = logging.getLogger("seqshard-test-progress")
    log.handlers = [logging.Handler()]
    log.handlers[0].emit = lambda record: lines.append(record.getMessage())
    log.setLevel(logging.INFO)
    m = {"loss": 2.5, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1000.0, "step_time_s": 0.1}
    with Progress(4, 10, rank=0) as bar:  # resumed at step 4; stderr is captured, not a TTY
        assert bar.bar is None
        bar.update({**m, "step": 5}, log)
        bar.update({**m, "step": 6, "eval_loss": 2.0, "eval_ppl": math.exp(2.0)}, log)
    assert lines[0].startswith("step 5/10 loss 2.5000") and "1000 tok/s" in lines[0]
    assert lines[0].split(" eta ")[1] == "0m00s" and "eval_loss 2.0000 eval_ppl 7.39" in lines[1]
