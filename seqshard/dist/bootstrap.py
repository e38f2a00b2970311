"""Process-group bootstrap from whichever launcher started this process.

- torchrun and the ``deepspeed`` launcher: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR`` and ``MASTER_PORT`` are set;
- ``mpirun`` (Open MPI, MPICH): rank and size come from mpi4py; rank 0 picks a free port and
  broadcasts the rendezvous address over MPI;
- SLURM ``srun`` without torchrun: ``SLURM_PROCID`` / ``SLURM_NTASKS``; the first host of the
  job's node list is the rendezvous, the port derives from the job id;
- nothing: one process, a private rendezvous.
gloo on CPU, NCCL on CUDA. Every collective gets ``timeout`` (a hung peer raises instead of
hanging forever; ``comm_stats.record`` names the rank and operation).
"""
from __future__ import annotations

import atexit
import os
import re
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # env (torchrun or the deepspeed launcher) | mpirun | slurm | single | external


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    """``node[01-04,07],other`` -> ``node01`` (enough for the rendezvous host)."""
    m = re.match(r"([^,\[]+)(?:\[([^\],]+))?", nodelist)
    if not m:
        return nodelist
    prefix, ranges = m.group(1), m.group(2)
    return prefix + ranges.split("-")[0].split(",")[0] if ranges else prefix


def detect_env() -> DistEnv:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "env")
    if "OMPI_COMM_WORLD_SIZE" in env or "PMI_SIZE" in env or "PMIX_RANK" in env:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        local = int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", env.get("MPI_LOCALRANKID", 0)))
        return DistEnv(comm.Get_rank(), comm.Get_size(), local, "mpirun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                       int(env.get("SLURM_LOCALID", 0)), "slurm")
    return DistEnv(0, 1, 0, "single")


def _init_method(denv: DistEnv) -> str:
    env = os.environ
    if denv.launcher == "env":
        return "env://"
    if denv.launcher == "mpirun":
        from mpi4py import MPI

        addr = None
        if denv.rank == 0:
            host = env.get("MASTER_ADDR") or socket.gethostbyname(socket.gethostname())
            addr = f"tcp://{host}:{env.get('MASTER_PORT') or _free_port()}"
        return MPI.COMM_WORLD.bcast(addr, root=0)
    if denv.launcher == "slurm":
        host = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        return f"tcp://{host}:{port}"
    return f"file://{_private_rendezvous_dir()}/rendezvous"


def _private_rendezvous_dir() -> str:
    """A fresh temp folder for a single-process rendezvous, removed when the process exits."""
    folder = tempfile.mkdtemp(prefix="seqshard-pg-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


_STARTED: dict[str, DistEnv] = {}  # the env of the group this module started (a second call returns it)


def _die_with_launcher(denv: DistEnv) -> None:
    """A worker started by a launcher (torchrun's agent, mpirun, srun) is killed by the kernel
    when that launcher dies (Linux ``PR_SET_PDEATHSIG``), instead of training on alone or
    hanging in a collective until the timeout."""
    if denv.launcher == "single" or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() == 1:  # the launcher died before the call above
        os._exit(1)


def init_distributed(timeout_s: float = 300.0) -> tuple[DistEnv, torch.device]:
    """Start the default process group (idempotent) and return this process's env and device."""
    if dist.is_initialized():  # started here before, or by the caller (tests, an outer framework)
        denv = _STARTED.get("env") or DistEnv(dist.get_rank(), dist.get_world_size(),
                                              detect_env().local_rank, "external")
    else:
        denv = detect_env()
        _die_with_launcher(denv)
    if torch.cuda.is_available():
        device = torch.device("cuda", denv.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=_init_method(denv), rank=denv.rank,
                                world_size=denv.world_size, timeout=timedelta(seconds=timeout_s))
        _STARTED["env"] = denv
    return denv, device
