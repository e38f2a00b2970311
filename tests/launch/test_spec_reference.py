"""docs/spec.md is generated from the spec dataclasses and never stale; every key has help."""
from __future__ import annotations

from seqshard.launch.spec_reference import keys, missing_help, reference_markdown
from tests.helpers.training import ROOT


def test_every_spec_key_has_help():
    assert missing_help() == [], "add a comment beside the field or a line in spec_reference.HELP"


def test_docs_spec_md_is_current():
    page = (ROOT / "docs" / "spec.md").read_text()
    assert page == reference_markdown(), "docs/spec.md is stale: run `seqshard spec --out docs/spec.md`"


def test_the_reference_lists_every_key_with_its_default():
    text = reference_markdown()
    for k in keys():
        assert f"| `{k['key']}` |" in text
    assert "| `train.on_nonfinite` | str | `'stop'` | stop, skip |" in text
