"""Long-context evaluation: loss by position and passkey retrieval (train/long_eval.py).

The scores equal a full-logits oracle on one process, and sp 2 (ring, ulysses) and dp 2 give the
same numbers as one process (1e-5); bad flags and keys exit 2 naming them before any process
group; training with ``train.eval_long`` writes ``eval_long.jsonl`` and the report shows it.
"""
import json

import pytest
import torch
import torch.nn.functional as F

from seqshard.launch.spec import SpecError
from seqshard.train.long_eval import bucket_edges, passkey_overhead, passkey_rows, token_scores
from tests.helpers.ranks import run_ranks
from tests.helpers.training import small_spec

HELD = ["data.eval.fraction=0.05"]
LONG = HELD + ["train.eval_long.bucket=64", "train.eval_long.max_len=512", "train.eval_long.documents=3",
               "train.eval_long.passkey.lengths=[200,384]", "train.eval_long.passkey.depths=[0,0.5,1]",
               "train.eval_long.passkey.trials=2"]
LAYOUTS = {"dp2": [], "ring2": ["parallel.sp=2", "parallel.sp_method=ring"],
           "ulysses2": ["parallel.sp=2", "parallel.sp_method=ulysses"]}
REL = 1e-5


def test_token_scores_match_full_logits():
    torch.manual_seed(0)
    hidden, weight = torch.randn(37, 16), torch.randn(50, 16)
    labels = torch.randint(0, 50, (37,))
    loss, hit = token_scores(hidden, weight, labels, chunk=5)  # 8 chunks, the last one short
    logits = hidden @ weight.t()
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels, reduction="none"), rtol=1e-5, atol=1e-5)
    assert torch.equal(hit, logits.argmax(-1) == labels)


def test_bucket_edges_cover_the_scored_positions():
    assert bucket_edges(512, 128) == [(0, 128), (128, 256), (256, 384), (384, 511)]
    assert bucket_edges(10, 4) == [(0, 4), (4, 8), (8, 9)]


class _Corpus:
    def __init__(self, docs):
        self.docs = [torch.tensor(d, dtype=torch.int64) for d in docs]
        self.lengths = torch.tensor([len(d) for d in docs]).numpy()

    def __len__(self):
        return len(self.docs)

    def tokens(self, i):
        return self.docs[i]


def test_passkey_rows_hide_the_key_at_the_depth_and_label_only_the_key():
    from seqshard.data.hf_tokenizer import load_tokenizer
    from seqshard.data.tokenizer import decode

    tok = load_tokenizer("byte")
    corpus = _Corpus([tok.encode("x = 1\n" * 60), tok.encode("y = 2\n" * 60)])
    rows, cells = passkey_rows(corpus, tok, [160, 300], [0.0, 0.5, 1.0], 2, seed=3)
    assert cells == [(n, d) for n in (160, 300) for d in (0.0, 0.5, 1.0) for _ in range(2)]
    for row, (length, depth) in zip(rows, cells):
        assert len(row) == length and row.doc_lens == [length] and row.positions[-1] == length - 1
        text = decode(row.tokens)
        key = text.rsplit("The pass key is ", 1)[1]
        assert len(key) == 5 and key.isdigit() and f"The pass key is {key}. Remember it." in text
        labelled = row.labels != -100
        assert int(labelled.sum()) == 6 and decode(row.labels[labelled]) == " " + key  # " 71432"
        needle = f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
        if depth == 0.0:
            assert text.startswith(needle)  # right after BOS (which decode drops)
        if depth == 1.0:
            assert text.endswith(needle + f"\nWhat is the pass key? The pass key is {key}")
    assert len({decode(r.tokens) for r in rows}) == len(rows)  # fresh key / haystack per trial
    assert passkey_overhead(tok) == 1 + len("\nThe pass key is 99999. Remember it. 99999 is the pass key.\n") \
        + len("\nWhat is the pass key? The pass key is") + 6


def _long_eval(rank, world_size, root, layouts, oracle=False):
    """Per layout: (by-position, passkey) of the seed's initial weights; with ``oracle``, also the
    single-device full-logits computation of the by-position buckets."""
    from seqshard.train.long_eval import LongEval
    from seqshard.train.trainer import setup

    out = {}
    for name, extra in layouts.items():
        spec = small_spec(f"{root}/{name}", world_size, LONG + extra)
        run = setup(spec)
        evaluate = LongEval(spec, run.held_out, spec.train.eval_long)
        out[name] = evaluate(run)
        if oracle:
            out["oracle"] = _oracle(run, evaluate)
    return out


def _oracle(run, evaluate):
    from seqshard.models import VarlenContext

    model, sums = run.engine.model, {}
    with torch.no_grad():
        for row in evaluate.position_rows:
            logits = model(row.tokens, row.positions, VarlenContext.from_lengths(row.doc_lens))  # [L, V]
            loss = F.cross_entropy(logits[:-1], row.labels[:-1], reduction="none")
            for p, x in enumerate(loss.tolist()):
                s = sums.setdefault(p // evaluate.cfg.bucket, [0.0, 0])
                s[0] += x
                s[1] += 1
    return [s / n for s, n in (sums[k] for k in sorted(sums))]


def _assert_same(a, b, what):
    for x, y in zip(a["by_position"], b["by_position"]):
        assert (x["start"], x["end"], x["tokens"]) == (y["start"], y["end"], y["tokens"]), what
        assert abs(x["loss"] - y["loss"]) <= REL * abs(y["loss"]), (what, x, y)
    for x, y in zip(a["passkey"], b["passkey"]):
        assert (x["length"], x["depth"], x["accuracy"], x["trials"]) == (y["length"], y["depth"], y["accuracy"],
                                                                          y["trials"]), what
        assert abs(x["key_prob"] - y["key_prob"]) <= REL * abs(y["key_prob"]) + 1e-30, (what, x, y)


def test_sp2_and_dp2_equal_one_process_and_the_full_logits_oracle(tmp_path):
    single = run_ranks(1, _long_eval, str(tmp_path), {"single": []}, True)[0]
    ref, oracle = single["single"], single["oracle"]
    assert [b["tokens"] for b in ref["by_position"]] == [3 * 64] * 7 + [3 * 63]
    for b, want in zip(ref["by_position"], oracle):
        assert abs(b["loss"] - want) <= REL * want, (b, want)
    assert len(ref["passkey"]) == 6 and all(c["trials"] == 2 for c in ref["passkey"])
    multi = run_ranks(2, _long_eval, str(tmp_path), LAYOUTS)
    for name in LAYOUTS:
        _assert_same(multi[0][name], ref, name)
        _assert_same(multi[1][name], ref, name)  # every rank returns the result


@pytest.mark.slow
def test_fsdp2_and_adaptive_equal_one_process(tmp_path):
    """fsdp2 (the head's weight gathered inside the forward) and adaptive groups (a 512-token row
    needs a group of 2 at 256 memory tokens) give the one-process numbers."""
    ref = run_ranks(1, _long_eval, str(tmp_path), {"single": []})[0]["single"]
    layouts = {"fsdp2_ulysses2": ["train.engine=fsdp2", "parallel.sp=2", "parallel.sp_method=ulysses"],
               "adaptive": ["parallel.sp_method=adaptive", "parallel.max_sp=2", "parallel.planner.memory_tokens=256"]}
    multi = run_ranks(2, _long_eval, str(tmp_path), layouts)
    for name in layouts:
        _assert_same(multi[0][name], ref, name)


def _train_with_long_eval(rank, world_size, root):
    from seqshard.train.trainer import train

    extra = LONG + ["train.steps=2", "train.eval_long.every=1", "parallel.sp=2", "parallel.sp_method=ring"]
    return [m.get("long_eval_loss") for m in train(small_spec(root, world_size, extra))]


def test_training_writes_eval_long_and_the_report_shows_it(tmp_path):
    from seqshard.report.long_eval import add_to_report

    losses = run_ranks(2, _train_with_long_eval, str(tmp_path / "run"))[0]
    records = [json.loads(x) for x in (tmp_path / "run" / "eval_long.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(x is not None for x in losses)
    assert records[0]["trained_len"] == 256 and records[0]["max_len"] == 512
    assert len(records[1]["by_position"]) == 8 and len(records[1]["passkey"]) == 6
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.md").write_text("# report\n")
    (tmp_path / "report" / "report.html").write_text("<html><body><h1>report</h1></body></html>\n")
    pngs = add_to_report(tmp_path / "report", [tmp_path])
    html = (tmp_path / "report" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and html.index("Long-context") < html.index("</body>")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Long-context evaluation: run (steps 1, 2)" in md and "| 384 | 0.5 |" in md
    assert "| positions | step 1 (trained at 256) | step 2 (trained at 256) |" in md and "| 448-510 |" in md
    assert {p.name for p in pngs} == {"long_eval_run.png", "passkey_run.png"} and all(p.stat().st_size for p in pngs)


@pytest.mark.parametrize("overrides, key", [
    (["train.eval_long.bucket=-1"], "train.eval_long.bucket"),
    (["train.eval_long.bucket=256"], "train.eval_long.bucket"),  # 255 scored positions at max_len 256
    (["train.eval_long.max_len=1"], "train.eval_long.max_len"),
    (["train.eval_long.every=5"], "train.eval_long.every"),  # nothing to evaluate
    (["train.eval_long.passkey.lengths=[512]", "data.eval.fraction=0.0"], "train.eval_long.passkey.lengths"),
    (["train.eval_long.passkey.lengths=[60]"], "train.eval_long.passkey.lengths"),  # no room for a haystack
    (["train.eval_long.passkey.lengths=[4K]"], "train.eval_long.passkey.lengths"),
    (["train.eval_long.passkey.lengths=[512]", "train.eval_long.passkey.depths=[0.5,1.5]"],
     "train.eval_long.passkey.depths"),
    (["train.eval_long.passkey.lengths=[512]", "train.eval_long.passkey.trials=0"], "train.eval_long.passkey.trials"),
    (["train.eval_long.passkey.lengths=[512,2000000]", "train.device_memory_gb=2"], "train.eval_long.passkey.lengths"),
])
def test_bad_eval_long_keys_name_the_key(overrides, key):
    with pytest.raises(SpecError) as err:
        small_spec("/tmp/unused", 1, HELD + overrides)
    assert err.value.path == key, str(err.value)


def test_memory_fit_names_the_longest_length_that_fits():
    with pytest.raises(SpecError, match=r"at most \d+ fit") as err:
        small_spec("/tmp/unused", 1, HELD + ["train.eval_long.passkey.lengths=[2000000]", "train.device_memory_gb=2"])
    fit = int(str(err.value).split("at most ")[1].split()[0])
    small_spec("/tmp/unused", 1, HELD + [f"train.eval_long.passkey.lengths=[{fit}]", "train.device_memory_gb=2"])
    longer = [f"train.eval_long.passkey.lengths=[{fit * 6 // 5}]", "train.device_memory_gb=2"]
    with pytest.raises(SpecError, match="raise parallel.sp"):
        small_spec("/tmp/unused", 1, HELD + longer)
    small_spec("/tmp/unused", 2, HELD + longer + ["parallel.sp=2", "parallel.sp_method=ring"])  # sp 2 holds it


@pytest.mark.parametrize("flags, flag", [
    (["--by-position", "0"], "--by-position"),
    (["--by-position", "600", "--max-len", "512"], "--by-position"),
    (["--by-position", "64", "--max-len", "two"], "--max-len"),
    (["--by-position", "64", "--documents", "0"], "--documents"),
    (["--passkey", "512,4X"], "--passkey"),
    (["--passkey", "32"], "--passkey"),
    (["--passkey", "512", "--depths", "0,2"], "--depths"),
    (["--passkey", "512,2000K", "--set", "train.device_memory_gb=2"], "--passkey"),
    (["--by-position", "64", "--max-len", "2000K", "--set", "train.device_memory_gb=2"], "--max-len"),
    (["--max-len", "4K"], "--max-len"),
    (["--by-position", "64", "--compare", "no/such.json"], "--compare"),
])
def test_bad_eval_flags_exit_2_naming_the_flag(tmp_path, capsys, flags, flag):
    """Checked against the run's spec.yaml before the checkpoint is looked up or a group starts."""
    import yaml

    from seqshard.launch.cli import main

    spec = small_spec(str(tmp_path), 1, HELD)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    rc = main(["eval", str(tmp_path), *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"seqshard: error: {flag}:"), err
    import torch.distributed as dist

    assert not dist.is_initialized()


def _train_then_eval_cli(rank, world_size, root):
    from seqshard.launch.cli import main
    from seqshard.train.trainer import train

    train(small_spec(root, world_size, HELD + ["train.steps=2"]))
    first = main(["eval", root, "--by-position", "128", "--max-len", "1K", "--documents", "2",
                  "--out", f"{root}/eval/short.json"])
    second = main(["eval", root, "--by-position", "128", "--max-len", "1K", "--documents", "2", "--passkey",
                   "300", "--depths", "0,1", "--trials", "1", "--compare", f"short={root}/eval/short.json",
                   "--label", "again"])
    return first, second


def test_cli_eval_writes_json_and_png(tmp_path, capsys):
    root = tmp_path / "run"
    assert run_ranks(1, _train_then_eval_cli, str(root))[0] == (0, 0)
    short = json.loads((root / "eval" / "short.json").read_text())
    assert [(b["start"], b["end"]) for b in short] == bucket_edges(1024, 128)
    assert all(b["tokens"] == 2 * (b["end"] - b["start"]) for b in short)
    again = json.loads((root / "eval" / "by_position_step2.json").read_text())
    assert again == short  # the same checkpoint, the same documents
    cells = json.loads((root / "eval" / "by_position_step2_passkey.json").read_text())
    assert [(c["length"], c["depth"], c["trials"]) for c in cells] == [(300, 0.0, 1), (300, 1.0, 1)]
    for png in ("short.png", "by_position_step2.png", "by_position_step2_passkey.png"):
        assert (root / "eval" / png).read_bytes()[:4] == b"\x89PNG", png


def test_an_earlier_stage_checkpoint_is_evaluated_with_its_own_rope(tmp_path):
    """spec.yaml is the last stage's (theta 160000); step_400's trainer.json says 10000 and 512."""
    from seqshard.launch.eval_cli import checkpoint_spec

    spec = small_spec(str(tmp_path), 1, HELD + ["model.rope_theta=160000.0", "data.max_seq_len=1024"])
    ckpt = tmp_path / "checkpoints" / "step_400"
    ckpt.mkdir(parents=True)
    stage0 = small_spec(str(tmp_path), 1, HELD + ["data.max_seq_len=512"]).to_dict()  # theta 10000
    (ckpt / "trainer.json").write_text(json.dumps({"step": 400, "spec": stage0}))
    mine, trained = checkpoint_spec(spec, ckpt, [])
    assert (mine.model.rope_theta, trained) == (10000.0, 512) and mine.data == spec.data
    theirs, _ = checkpoint_spec(spec, ckpt, ["model.rope_theta=160000.0"])  # asked for at eval time
    assert theirs.model.rope_theta == 160000.0


def _staged_run_then_eval(rank, world_size, root):
    from seqshard.launch.cli import main
    from seqshard.train.trainer import train

    stages = ("train.stages=[{steps: 30}, {steps: 1, set: {data.max_seq_len: 512, model.rope_theta: 1000.0, "
              "data.tokens_per_step: 1024}}]")
    extra = HELD + ["train.steps=31", "train.eval_long.every=30", "train.eval_long.bucket=64",
                    "train.eval_long.max_len=512", "train.eval_long.documents=3", stages]
    train(small_spec(root, world_size, extra))
    flags = ["--step", "30", "--by-position", "64", "--max-len", "512", "--documents", "3"]
    return (main(["eval", root, *flags, "--out", f"{root}/eval/step30.json"]),
            main(["eval", root, *flags, "--out", f"{root}/eval/step30_theta1000.json", "--set",
                  "model.rope_theta=1000.0"]))


def test_staged_run_eval_of_the_first_stage_matches_its_in_training_eval(tmp_path):
    """Stage 0 (256 tokens, theta 10000) then stage 1 (512, theta 1000): after the run, spec.yaml
    is stage 1's, yet ``seqshard eval --step 30`` reproduces the in-training evaluation at step 30;
    ``--set model.rope_theta=1000`` evaluates that checkpoint with the other RoPE (and differs)."""
    root = tmp_path / "run"
    assert run_ranks(1, _staged_run_then_eval, str(root))[0] == (0, 0)
    records = {r["step"]: r for r in map(json.loads, (root / "eval_long.jsonl").read_text().splitlines())}
    assert sorted(records) == [30, 31] and (records[30]["trained_len"], records[31]["trained_len"]) == (256, 512)
    after = json.loads((root / "eval" / "step30.json").read_text())
    for x, y in zip(after, records[30]["by_position"]):
        assert x["tokens"] == y["tokens"] and abs(x["loss"] - y["loss"]) <= REL * y["loss"], (x, y)
    other = json.loads((root / "eval" / "step30_theta1000.json").read_text())
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(other, after)) > 1e-3


def test_every_invalid_mutation_of_the_example_is_one_line_naming_its_key():
    """Each leaf of examples/extend_context.yaml (train.eval_long included) set to a wrong type or an
    absurd value, or an unknown key beside it: one SpecError line naming it (tests/launch/test_bad_input.py)."""
    import copy

    from seqshard.launch.spec import apply_overrides, from_dict, load_raw
    from tests.helpers.training import ROOT
    from tests.launch.test_bad_input import _invalid_values, _leaves, _set

    raw = load_raw(ROOT / "examples" / "extend_context.yaml")
    cases = [(path, bad) for path, value in _leaves(raw) for bad in _invalid_values(value) if path != ("name",)]
    assert any(path[:2] == ("train", "eval_long") for path, _ in cases)
    for path, bad in cases:
        for where in (path, path[:-1] + ("no_such_key",)):
            mutated = copy.deepcopy(raw)
            _set(mutated, where, bad)
            dotted = ".".join(map(str, where))
            with pytest.raises(SpecError) as caught:
                from_dict(apply_overrides(mutated, []), 2)
            err = caught.value
            assert "\n" not in str(err) and (err.path == dotted or (err.path and dotted.startswith(err.path))), \
                (dotted, bad, str(err))
