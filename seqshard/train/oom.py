"""Out of memory on a rank: say where (step, sequence length, rank) and leave without a hang.

The other ranks of the step are blocked in a collective this rank will never join; waiting for
them would hang, and a clean ``destroy_process_group`` needs them too. So the rank writes one
line to stderr, leaves that line in the rendezvous store (``dist/cause.py``) and ends its process
at once with exit code 3 (``os._exit``: no atexit handlers, no collective). Its peers then fail
their collective on the broken connection (gloo; their error names this rank's line) or at
``train.collective_timeout_s`` (NCCL's watchdog) and exit non-zero too; the launcher
(torchrun, deepspeed, mpirun) tears the job down once one rank has died.
A CPU process the Linux OOM killer ends (SIGKILL) raises nothing and cannot report itself.
"""
from __future__ import annotations

import os
import sys

from seqshard.dist.cause import publish

OOM_EXIT_CODE = 3


def is_oom(err: BaseException) -> bool:
    """CUDA's ``torch.OutOfMemoryError``, Python's ``MemoryError``, or the CPU allocator's failure
    (a plain ``RuntimeError`` "DefaultCPUAllocator: can't allocate memory")."""
    import torch

    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(err, RuntimeError) and ("can't allocate memory" in str(err) or "out of memory" in str(err)))


def exit_on_oom(err: BaseException, step: int, seq_len: int, rank: int):
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    print(f"seqshard: error: rank {rank}: out of memory at step {step} (data.max_seq_len {seq_len} tokens): "
          f"{first}; try `seqshard plan SPEC` and train.activation_checkpointing / train.mlp_tiles / parallel.sp",
          file=sys.stderr, flush=True)
    publish(f"out of memory at step {step}", err)  # named in the peers' collective errors
    os._exit(OOM_EXIT_CODE)
