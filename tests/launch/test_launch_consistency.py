"""Launch commands agree with themselves, and multi-node launches run for real on one machine."""
import os
import socket
import subprocess
import sys

import pytest

from seqshard.launch.launchers import launch_command
from tests.helpers.ranks import run_ranks
from tests.helpers.training import ROOT, SMALL, assert_losses_close, read_metrics, small_spec, train_rank

TINY = str(ROOT / "examples/tiny.yaml")
SHORT = ["train.steps=3"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")


def test_slurm_script_uses_one_per_node_value(tmp_path):
    spec = small_spec(tmp_path, 8, ["launch.launcher=slurm", "launch.nnodes=2", "launch.nproc_per_node=4",
                                    "data.tokens_per_step=2048"])
    script = launch_command(spec, TINY)
    assert "#SBATCH --gpus-per-node=4" in script and "--nproc-per-node=4" in script
    assert "#SBATCH --ntasks-per-node=1" in script and "#SBATCH --nodes=2" in script  # one torchrun per node
    srun = launch_command(small_spec(tmp_path, 8, ["launch.launcher=srun", "launch.nnodes=2",
                                                   "launch.nproc_per_node=4", "data.tokens_per_step=2048"]), TINY)
    assert srun[0] == "srun" and "--ntasks-per-node=4" in srun and "--nodes=2" in srun
    assert "torch.distributed.run" not in srun and srun[srun.index("-m") + 1:srun.index("-m") + 3] == ["seqshard", "train"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single_node(tmp_path_factory):
    return run_ranks(1, train_rank, str(tmp_path_factory.mktemp("one")), SHORT)[0]


def _command(tmp_path, world_size, extra):
    overrides = SMALL + SHORT + [f"train.output_dir={tmp_path}"] + extra
    return launch_command(small_spec(tmp_path, world_size, SHORT + extra), TINY, overrides)


def _wait_all(procs, timeout=300):
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]


@pytest.mark.slow
def test_two_torchrun_nodes_on_loopback_match_one_node(single_node, tmp_path):
    """What `seqshard launch` prints for a 2-node spec, started twice: the c10d rendezvous on 127.0.0.1."""
    cmd = _command(tmp_path, 2, ["launch.nnodes=2", "launch.nproc_per_node=1", f"launch.master_port={_free_port()}"])
    assert "--rdzv-backend=c10d" in cmd and "--nnodes=2" in cmd
    nodes = [subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    _wait_all(nodes)
    assert_losses_close([r["loss"] for r in read_metrics(tmp_path)], single_node)


@pytest.mark.slow
def test_mpirun_with_a_loopback_hostfile_matches_one_node(single_node, tmp_path):
    """Open MPI folds localhost / 127.0.0.1 into one node, so the hostfile is one node with 2 slots."""
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=2\n")
    cmd = _command(tmp_path, 2, ["launch.launcher=mpirun", f"launch.hostfile={hosts}", "launch.nproc_per_node=2"])
    assert "--hostfile" in cmd and "ppr:2:node" in cmd
    _wait_all([subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)])
    assert_losses_close([r["loss"] for r in read_metrics(tmp_path)], single_node)


@pytest.mark.slow
def test_srun_tasks_bootstrap_from_slurm_env(single_node, tmp_path):
    """The srun launcher's per-task command, with the environment srun gives each task (no srun here)."""
    cmd = _command(tmp_path, 2, ["launch.launcher=srun", "launch.nproc_per_node=2"])
    task = cmd[cmd.index(sys.executable):]
    port = str(_free_port())
    tasks = [subprocess.Popen(task, env=dict(ENV, SLURM_PROCID=str(r), SLURM_NTASKS="2", SLURM_LOCALID=str(r),
                                             MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    _wait_all(tasks)
    assert_losses_close([r["loss"] for r in read_metrics(tmp_path)], single_node)
