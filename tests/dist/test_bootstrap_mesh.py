"""Bootstrap (launcher env -> DistEnv) and the one DeviceMesh, on real gloo ranks."""
from __future__ import annotations

import pytest

from seqshard.dist.bootstrap import _first_slurm_host, detect_env
from seqshard.dist.mesh import ParallelDims, build_mesh
from tests.helpers.ranks import run_ranks

LAUNCH_VARS = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK",
               "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"]


@pytest.fixture
def bare_env(monkeypatch):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_detect_env_torchrun(bare_env):
    bare_env.setenv("RANK", "3")
    bare_env.setenv("WORLD_SIZE", "8")
    bare_env.setenv("LOCAL_RANK", "1")
    env = detect_env()
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (3, 8, 1, "env")


def test_detect_env_slurm_and_single(bare_env):
    assert detect_env().launcher == "single"
    bare_env.setenv("SLURM_PROCID", "5")
    bare_env.setenv("SLURM_NTASKS", "16")
    bare_env.setenv("SLURM_LOCALID", "1")
    env = detect_env()
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (5, 16, 1, "slurm")


@pytest.mark.parametrize("nodelist,host", [("node[01-04,07]", "node01"), ("gpu7,gpu8", "gpu7"),
                                           ("a100-[3,5]", "a100-3"), ("solo", "solo")])
def test_first_slurm_host(nodelist, host):
    assert _first_slurm_host(nodelist) == host


def test_parallel_dims_reject_bad_degrees():
    assert ParallelDims(8, 2, 4, 2).ring == 2
    with pytest.raises(ValueError, match="dp 3 x sp 4 .*world size 8"):
        ParallelDims(8, 3, 4)
    with pytest.raises(ValueError, match="ulysses 3 must divide sp 4"):
        ParallelDims(8, 2, 4, 3)


def mesh_groups(rank, world_size, ulysses):
    import torch.distributed as dist

    mesh = build_mesh(ParallelDims(world_size, 1, world_size, ulysses))
    names = mesh.mesh_dim_names
    ranks = {n: dist.get_process_group_ranks(mesh[n].get_group()) for n in names}
    ranks["sp"] = dist.get_process_group_ranks(mesh["sp"].get_group())
    return names, ranks


def test_mesh_dims_and_usp_groups_are_consecutive():
    (names, ranks), *_ = run_ranks(4, mesh_groups, 1)
    assert names == ("dp", "sp") and ranks["sp"] == [0, 1, 2, 3]
    results = run_ranks(4, mesh_groups, 2)
    assert results[0][0] == ("dp", "ring", "ulysses")
    # Ulysses groups are consecutive ranks (fast links inside a node); ring strides across them.
    assert [r[1]["ulysses"] for r in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r[1]["ring"] for r in results] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert all(r[1]["sp"] == [0, 1, 2, 3] for r in results)
