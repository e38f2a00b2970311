"""`seqshard launch`: dry-run commands by meaning, and a real 2-rank run through every launcher."""
import json
import os
import subprocess
import sys
from pathlib import Path

from seqshard.launch.launchers import launch_command
from tests.helpers.training import ROOT, small_spec

TINY = str(ROOT / "examples/tiny.yaml")


def test_dry_run_commands_single_and_multi_node(tmp_path):
    one = small_spec(tmp_path, 2)
    cmd = launch_command(one, TINY)
    assert "--nproc-per-node=2" in cmd and "--standalone" in cmd and cmd[-2:] == ["train", TINY]
    def sixteen(extra):  # 2 nodes x 8 ranks; the batch divides over 16 replicas
        return small_spec(tmp_path, 16, ["data.tokens_per_step=4096", "launch.nnodes=2",
                                         "launch.nproc_per_node=8", *extra])

    multi = sixteen(["launch.master_addr=n0", "launch.master_port=29400"])
    cmd = launch_command(multi, TINY, ["parallel.sp=1"])
    assert "--nnodes=2" in cmd and "--rdzv-endpoint=n0:29400" in cmd and "--rdzv-backend=c10d" in cmd
    assert cmd[-2:] == ["--set", "parallel.sp=1"]
    ds = launch_command(sixteen(["launch.launcher=deepspeed", "launch.hostfile=hosts"]), TINY)
    assert Path(ds[0]).name == "deepspeed" and ds[ds.index("--hostfile") + 1] == "hosts" and ds[ds.index("--num_gpus") + 1] == "8"
    assert ds[ds.index("--module") + 1] == "seqshard"
    mpi = launch_command(sixteen(["launch.launcher=mpirun", "launch.hostfile=hosts"]), TINY)
    assert Path(mpi[0]).name == "mpirun" and mpi[1:3] == ["-np", "16"] and "ppr:8:node" in mpi
    script = launch_command(sixteen(["launch.launcher=slurm", "launch.slurm.partition=gpu"]), TINY)
    assert "#SBATCH --nodes=2" in script and "#SBATCH --partition=gpu" in script
    assert "srun torchrun" in script and "--nproc-per-node=8" in script and "SLURM_JOB_NODELIST" in script
    # SLURM's warning signal, forwarded by torchrun to every rank (checkpoint, exit 75)
    assert "#SBATCH --signal=USR1@120" in script and "SIGUSR1" in script.split("srun torchrun")[1]


def test_cli_dry_run_starts_nothing(tmp_path):
    out = subprocess.run([sys.executable, "-m", "seqshard", "launch", TINY, "--dry-run", "--set",
                          f"train.output_dir={tmp_path}"], capture_output=True, text=True, check=True)
    assert "torch.distributed.run" in out.stdout and not (tmp_path / "metrics.jsonl").exists()


def test_real_two_rank_launch_through_every_launcher(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    sets = ["train.steps=2", "model.dim=64", "data.max_seq_len=256", "data.tokens_per_step=1024",
            "launch.nproc_per_node=2"]
    losses = {}
    for launcher in ("torchrun", "deepspeed", "mpirun"):
        out = tmp_path / launcher
        args = [f"--set={s}" for s in sets + [f"launch.launcher={launcher}", f"train.output_dir={out}"]]
        proc = subprocess.run([sys.executable, "-m", "seqshard", "launch", TINY, *args], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{launcher}: {proc.stdout[-1500:]} {proc.stderr[-1500:]}"
        losses[launcher] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert json.loads((out / "run.json").read_text())["world_size"] == 2
    assert losses["torchrun"] == losses["deepspeed"] == losses["mpirun"], losses
