"""The one DeviceMesh of a run, built once from the spec's degrees (STYLE rule 2).

Dims: ``("dp", "sp")``; for USP ``("dp", "ring", "ulysses")`` with ``("ring", "ulysses")``
flattened into ``"sp"`` (so sp rank = ring index * ulysses + ulysses index: Ulysses groups are
consecutive ranks, the fast links inside a node). Everything that communicates receives the
mesh or a group from it as an argument.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass(frozen=True)
class ParallelDims:
    """The degrees of a run, checked against the world size once."""
    world_size: int
    dp: int
    sp: int
    ulysses: int = 1

    def __post_init__(self):
        if min(self.dp, self.sp, self.ulysses) < 1 or self.dp * self.sp != self.world_size \
                or self.sp % self.ulysses:
            raise ValueError(f"parallel degrees dp {self.dp} x sp {self.sp} (ulysses {self.ulysses}) do not fit "
                             f"world size {self.world_size}: dp x sp must equal world size {self.world_size}, "
                             f"and ulysses {self.ulysses} must divide sp {self.sp}")

    @property
    def ring(self) -> int:
        return self.sp // self.ulysses


def build_mesh(dims: ParallelDims, device_type: str = "cpu") -> DeviceMesh:
    if dims.ulysses > 1:
        mesh = init_device_mesh(device_type, (dims.dp, dims.ring, dims.ulysses),
                                mesh_dim_names=("dp", "ring", "ulysses"))
        mesh["ring", "ulysses"]._flatten("sp")
        return mesh
    return init_device_mesh(device_type, (dims.dp, dims.sp), mesh_dim_names=("dp", "sp"))


def build_expert_mesh(mesh: DeviceMesh, ep: int) -> DeviceMesh:
    """The run's mesh regrouped for expert parallelism (``parallel.ep``, parallel/ep.py): every dim
    flattened (rank order: dp-major, then sp) and cut into ``("ep_replica", "ep")``, so an EP group
    is ``ep`` consecutive ranks (inside one SP group when ``ep`` divides sp, across replicas
    otherwise) and ``ep_replica`` joins the ranks that hold the same experts."""
    names = mesh.mesh_dim_names
    flat = mesh[names]._flatten("ep_world") if len(names) > 1 else mesh
    world = flat.size()
    if ep < 1 or world % ep:
        raise ValueError(f"parallel.ep {ep} does not divide the {world} ranks of dp x sp")
    return flat._unflatten(0, (world // ep, ep), ("ep_replica", "ep"))
