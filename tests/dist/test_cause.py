"""A rank that dies outside a guarded region strands its peers inside an SP collective: they end
on the broken connection, long before the collective timeout, and their error names the dead
rank's cause (published to the rendezvous store on its way out, dist/cause.py)."""
import time

import torch
import torch.distributed as dist

from seqshard.dist.cause import first_failure, publish
from seqshard.dist.comm_stats import CollectiveError
from seqshard.parallel.comm import all_to_all
from tests.helpers.ranks import run_ranks

TIMEOUT_S = 60  # the collective timeout: a peer that waited this long was not told


def _rank_one_dies_in_a_step(rank, world):
    dist.barrier()
    if rank == 1:
        time.sleep(0.5)  # rank 0 is inside the all-to-all by now
        publish("train", ValueError("injected failure in the MLP\nsecond line"))  # what the CLI does on its way out
        dist.destroy_process_group()  # its connections close, as when the process exits
        return None
    start = time.monotonic()
    try:
        all_to_all(torch.zeros(world, 4), dist.group.WORLD, "ulysses.qkv")
    except CollectiveError as err:
        publish("train", err)  # a later failure does not replace the first one
        return time.monotonic() - start, str(err), first_failure()
    return None


def test_a_rank_dying_in_a_step_ends_its_peers_promptly_naming_the_cause():
    waited, message, first = run_ranks(2, _rank_one_dies_in_a_step, timeout=180, collective_timeout=TIMEOUT_S)[0]
    assert waited < TIMEOUT_S / 2, f"rank 0 waited {waited:.1f}s"
    assert message.startswith("rank 0: collective 'ulysses.qkv'"), message
    assert "[first failure: rank 1: train: ValueError: injected failure in the MLP]" in message, message
    assert first == "rank 1: train: ValueError: injected failure in the MLP"
