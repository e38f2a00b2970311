"""Training with pack and decompose batching runs, and its loss does not depend on the layout."""
import pytest

from tests.helpers.ranks import run_ranks
from tests.helpers.training import assert_losses_close, read_metrics, train_rank

CASES = {
    "pack": ["data.batching=pack", "data.pack_method=bfd"],
    "decompose": ["data.batching=decompose", "data.min_seq_len=32", "data.curriculum.schedule=grow_p2",
                  "data.curriculum.cycles=2"],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_batching_is_layout_independent(name, tmp_path):
    one = run_ranks(1, train_rank, str(tmp_path / "one"), CASES[name])[0]
    two = run_ranks(2, train_rank, str(tmp_path / "two"), CASES[name])[0]
    assert_losses_close(two, one)
    rows = read_metrics(tmp_path / "two")
    assert {"pad_fraction", "seq_len_mean", "seq_len_max", "attention_flops"} <= set(rows[0])
    if name == "decompose":  # one bucket per step, constant tokens per step
        assert all(r["tokens"] == 1024 for r in rows) and rows[0]["pad_fraction"] == 0.0
    else:
        assert all(0.0 <= r["pad_fraction"] < 0.5 for r in rows)
