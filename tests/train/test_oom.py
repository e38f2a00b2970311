"""An out-of-memory on one rank ends the run with exit code 3 and a line naming step, length and
rank; the other rank does not hang (it fails its collective and exits too)."""
import resource
import time

import pytest

from tests.helpers.ranks import run_ranks
from tests.helpers.training import small_spec


def train_with_memory_cap(rank, world, out_dir):
    from seqshard.train.trainer import train

    spec = small_spec(out_dir, world, ["parallel.sp=2", "parallel.sp_method=ulysses", "data.max_seq_len=65536",
                                       "data.tokens_per_step=65536", "train.steps=2"])
    if rank == 1:  # libraries and corpus mapped first; then the address space + 400 MiB: a 64K step needs more
        from seqshard.data.corpus import load_corpus

        load_corpus("stdlib")
        with open("/proc/self/statm") as f:
            vm = int(f.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (vm + (400 << 20), resource.RLIM_INFINITY))
    train(spec)


@pytest.mark.slow
def test_oom_on_one_rank_exits_nonzero_without_hang(tmp_path, capfd):
    start = time.perf_counter()
    with pytest.raises(AssertionError) as err:
        run_ranks(2, train_with_memory_cap, str(tmp_path), timeout=240)
    assert "code 3" in str(err.value), str(err.value)[:500]
    assert time.perf_counter() - start < 200
    assert "rank 1: out of memory at step 1 (data.max_seq_len 65536 tokens)" in capfd.readouterr().err
