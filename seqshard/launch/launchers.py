"""Launcher commands built from the spec's ``launch:`` section. Building never starts anything.

Each builder returns argv (a list) for ``torchrun``, ``deepspeed``, ``mpirun``, or, for
``slurm``, the text of an sbatch script that runs ``srun`` + ``torchrun`` with the rendezvous
taken from the ``SLURM_*`` environment. The command re-enters ``seqshard train`` with the same
spec and ``--set`` overrides, so every rank validates the same spec.
"""
from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

from .spec import Spec


def tool_path(name: str) -> str:
    """The ``name`` executable installed beside this interpreter (a venv's ``bin/``, which need
    not be on ``PATH``), else the one on ``PATH``, else ``name`` (the launch then fails naming it)."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name) or name


def _train_args(spec_path: str, overrides: list[str], extra: list[str]) -> list[str]:
    args = ["train", spec_path]
    for o in overrides or []:
        args += ["--set", o]
    return args + list(extra or [])


def torchrun_command(spec: Spec, spec_path, overrides=None, extra=None) -> list[str]:
    ln = spec.launch
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ln.nproc_per_node}",
           f"--nnodes={ln.nnodes}"]
    if ln.nnodes > 1 or ln.rdzv_endpoint:
        endpoint = ln.rdzv_endpoint or f"{ln.master_addr}:{ln.master_port}"
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={spec.name}"]
    else:  # one node: a private rendezvous on a free port, so concurrent jobs never collide
        cmd += ["--standalone"]
    return cmd + ["-m", "seqshard"] + _train_args(spec_path, overrides, extra)


def deepspeed_command(spec: Spec, spec_path, overrides=None, extra=None) -> list[str]:
    ln = spec.launch
    cmd = [tool_path("deepspeed")]
    if ln.hostfile:
        cmd += ["--hostfile", ln.hostfile, "--num_nodes", str(ln.nnodes)]
    else:
        cmd += ["--num_nodes", str(ln.nnodes)]
    cmd += ["--num_gpus", str(ln.nproc_per_node), "--master_addr", ln.master_addr,
            "--master_port", str(ln.master_port), "--module", "seqshard"]
    return cmd + _train_args(spec_path, overrides, extra)


def mpirun_command(spec: Spec, spec_path, overrides=None, extra=None) -> list[str]:
    ln = spec.launch
    cmd = [tool_path("mpirun"), "-np", str(ln.nproc_per_node * ln.nnodes)]
    if os.geteuid() == 0:  # containers often run as root; Open MPI refuses that by default
        cmd += ["--allow-run-as-root"]
    if ln.hostfile:
        cmd += ["--hostfile", ln.hostfile, "--map-by", f"ppr:{ln.nproc_per_node}:node"]
    else:
        cmd += ["--oversubscribe"]  # one host: allow more ranks than detected slots
    return cmd + [sys.executable, "-m", "seqshard"] + _train_args(spec_path, overrides, extra)


def srun_command(spec: Spec, spec_path, overrides=None, extra=None) -> list[str]:
    """``srun``, one task per GPU and no torchrun: every task bootstraps from ``SLURM_PROCID``
    (dist/bootstrap.py). Run it inside an allocation (``salloc`` or an sbatch script)."""
    ln = spec.launch
    return ["srun", f"--nodes={ln.nnodes}", f"--ntasks-per-node={ln.nproc_per_node}",
            f"--ntasks={ln.nnodes * ln.nproc_per_node}", "--kill-on-bad-exit=1",
            sys.executable, "-m", "seqshard"] + _train_args(spec_path, overrides, extra)


def slurm_script(spec: Spec, spec_path, overrides=None, extra=None) -> str:
    """sbatch script; ``--gpus-per-node``, ``--ntasks-per-node`` and torchrun's
    ``--nproc-per-node`` all derive from the one value ``launch.nproc_per_node``."""
    ln, sl = spec.launch, spec.launch.slurm
    per_node = ln.nproc_per_node  # GPUs per node = ranks per node (validated against slurm.gpus_per_node)
    lines = ["#!/bin/bash", f"#SBATCH --job-name={sl.job_name or spec.name}", f"#SBATCH --nodes={ln.nnodes}",
             "#SBATCH --ntasks-per-node=1",  # one torchrun per node; it starts the per-GPU ranks
             f"#SBATCH --gpus-per-node={per_node}", f"#SBATCH --time={sl.time}"]
    lines += [f"#SBATCH --partition={sl.partition}"] if sl.partition else []
    lines += [f"#SBATCH --account={sl.account}"] if sl.account else []
    # SIGUSR1 signal_s before the time limit: torchrun forwards it, every rank checkpoints and exits 75
    lines += [f"#SBATCH --signal=USR1@{sl.signal_s}"] if sl.signal_s else []
    train = " ".join(shlex.quote(a) for a in _train_args(spec_path, overrides, extra))
    lines += ["set -euo pipefail",
              'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
              f"MASTER_PORT={ln.master_port}",
              "srun torchrun --nnodes=\"$SLURM_NNODES\" --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 "
              f"--nproc-per-node={per_node} --rdzv-id=\"$SLURM_JOB_ID\" --rdzv-backend=c10d "
              f"--rdzv-endpoint=\"$MASTER_ADDR:$MASTER_PORT\" -m seqshard {train}"]
    return "\n".join(lines) + "\n"


BUILDERS = {"torchrun": torchrun_command, "deepspeed": deepspeed_command, "mpirun": mpirun_command,
            "srun": srun_command}


def launch_command(spec: Spec, spec_path, overrides=None, extra=None):
    """argv for the spec's launcher, or the sbatch script text for ``slurm``."""
    if spec.launch.launcher == "slurm":
        return slurm_script(spec, spec_path, overrides, extra)
    return BUILDERS[spec.launch.launcher](spec, spec_path, overrides, extra)
