"""data.sources / data.eval.sources / long-document keys and the HF tokenizer default, checked
before launch: each bad input is one line naming its key path (and the file), exit 2 (issue #30)."""
from __future__ import annotations

import json

import pytest
import yaml

from seqshard.data.sources import sources_of
from seqshard.launch.cli import main
from seqshard.launch.spec import SpecError, load_spec
from tests.helpers.training import ROOT

TINY = ROOT / "examples" / "tiny.yaml"


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def refused(overrides) -> SpecError:
    with pytest.raises(SpecError) as caught:
        load_spec(TINY, overrides, 2)
    return caught.value


@pytest.fixture
def files(tmp_path):
    return (jsonl(tmp_path / "a.jsonl", [{"text": "hello"}, {"text": "world"}]),
            jsonl(tmp_path / "b.jsonl", [{"content": "def f(): pass"}]))


def test_sources_list_and_single_form(files):
    a, b = files
    spec = load_spec(TINY, [f"data.sources=[{{source: {a}, weight: 0.6, name: books, "
                            "upsample_long: {min_len: 64, factor: 4}}, "
                            f"{{source: {b}, weight: 0.4, text_field: content}}]"], 2)
    got = sources_of(spec.data)
    assert [(s.source, s.weight, s.name, s.text_field) for s in got] == [(a, 0.6, "books", "text"), (b, 0.4, "1", "content")]
    assert got[0].upsample_long.factor == 4 and got[0].upsample_long.min_len == 64
    single = sources_of(load_spec(TINY, [f"data.source={b}", "data.text_field=content", "data.name=code"], 2).data)
    assert [(s.source, s.name, s.text_field) for s in single] == [(b, "code", "content")]


@pytest.mark.parametrize("entries, key", [
    ("[{source: A, weight: 0}]", "data.sources[0].weight"),
    ("[{source: A, weight: -1.0}]", "data.sources[0].weight"),
    ("[{source: A}, {weight: 0.5}]", "data.sources[1].source"),  # a weight that names no source
    ("[{source: A, wieght: 1}]", "data.sources[0].wieght"),
    ("[{source: A, name: x}, {source: A, name: x}]", "data.sources[1].name"),
    ("[{source: A, format: chat}]", "data.sources[0].format"),
    ("[{source: A, format: markdown}]", "data.sources[0].format"),
    ("[{source: A}, {source: A, name: b, loss_weight: 0}]", "data.sources[1].loss_weight"),
    ("[{source: A}, {source: A, name: b, loss_weight: -0.5}]", "data.sources[1].loss_weight"),
    ("[{source: A}, {source: A, name: b, loss_weight: .nan}]", "data.sources[1].loss_weight"),
    ("[{source: A}, {source: A, name: b, loss_weight: .inf}]", "data.sources[1].loss_weight"),
    ("[{source: A}, {source: A, name: b, loss_weight: heavy}]", "data.sources[1].loss_weight"),
    ("[{source: A, upsample_long: {min_len: 10, factor: 0}}]", "data.sources[0].upsample_long"),
    ("[{source: /nonexistent/x.jsonl}]", "data.sources[0].source"),
    ("[A]", "data.sources[0]"),
])
def test_bad_sources_are_refused_by_key(files, entries, key):
    err = refused([f"data.sources={entries.replace('A', files[0])}"])
    assert err.path == key, str(err)


def test_weight_beside_the_list_names_no_source(files):
    assert refused([f"data.sources=[{{source: {files[0]}}}]", "data.weight=0.5"]).path == "data.weight"


def test_missing_text_field_names_the_entry_and_file(files, tmp_path, capsys):
    a, b = files
    spec = yaml.safe_load(TINY.read_text())
    spec["data"]["sources"] = [{"source": a}, {"source": b}]  # b has 'content', not 'text'
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["validate", str(path)]) == 2
    line = capsys.readouterr().err.strip()
    assert line.count("\n") == 0 and "data.sources[1].text_field" in line and b in line, line


@pytest.mark.parametrize("overrides, key", [
    (["data.long_documents=cut"], "data.long_documents"),
    (["data.long_documents=drop", "data.continue_positions=true"], "data.continue_positions"),
    (["data.eval.split=nope", "data.eval.source=SAVED"], "data.eval.split"),
    (["data.eval.sources=[{source: SAVED, split: nope}]"], "data.eval.sources[0].split"),
])
def test_long_document_and_eval_keys_are_checked(saved_dict, overrides, key):
    err = refused([o.replace("SAVED", saved_dict) for o in overrides])
    assert err.path == key, str(err)


def test_eval_fraction_needs_one_plain_source(files):
    err = refused([f"data.sources=[{{source: {files[0]}}}, {{source: {files[1]}, text_field: content}}]",
                   "data.eval.fraction=0.1"])
    assert err.path == "data.eval.fraction"


@pytest.fixture
def saved_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a b c"] * 4}),
                          "test": datasets.Dataset.from_dict({"text": ["held out"] * 2})}).save_to_disk(str(folder))
    return str(folder)


def test_eval_split_loads_that_split(saved_dict):
    from seqshard.train.evaluate import _load_all

    spec = load_spec(TINY, [f"data.source={saved_dict}", f"data.eval.source={saved_dict}", "data.eval.split=test"], 2)
    train, held = _load_all(spec.data)
    assert len(train) == 4 and len(held) == 2  # not the training split again
    listed = load_spec(TINY, [f"data.source={saved_dict}",
                              f"data.eval.sources=[{{source: {saved_dict}, split: test, name: t}}]"], 2)
    assert len(_load_all(listed.data)[1]) == 2


def test_weights_written_1e_minus_1_are_numbers(files):
    spec = load_spec(TINY, [f"data.sources=[{{source: {files[0]}, weight: 1e-1}}, {{source: {files[0]}, weight: 9e-1}}]"], 2)
    assert [s.weight for s in sources_of(spec.data)] == [0.1, 0.9]


def test_loss_weights_are_accepted_and_typed(files):
    spec = load_spec(TINY, [f"data.sources=[{{source: {files[0]}, loss_weight: 2.0}}, "
                            f"{{source: {files[0]}, name: b, loss_weight: 5e-1}}]"], 2)
    assert [s.loss_weight for s in sources_of(spec.data)] == [2.0, 0.5]
    assert sources_of(load_spec(TINY, [f"data.source={files[0]}", "data.loss_weight=3"], 2).data)[0].loss_weight == 3.0
    assert refused([f"data.source={files[0]}", "data.loss_weight=0"]).path == "data.loss_weight"
    err = refused([f"data.source={files[0]}", f"data.eval.sources=[{{source: {files[0]}, loss_weight: 2.0}}]"])
    assert err.path == "data.eval.sources[0].loss_weight" and "unweighted" in str(err), str(err)


def test_eval_every_with_eval_sources(files):
    a = files[0]
    spec = load_spec(TINY, [f"data.source={a}", f"data.eval.sources=[{{source: {a}, name: held}}]",
                            "train.eval_every=2"], 2)
    assert spec.train.eval_every == 2  # data.eval.sources is held-out data too
    err = refused([f"data.source={a}", f"data.eval.sources=[{{source: {a}}}]", "data.eval.fraction=0.1"])
    assert err.path == "data.eval", str(err)
