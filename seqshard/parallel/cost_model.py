"""Cost model of one sequence of length L trained in an SP group of d devices (Ulysses inside).

Per layer and token, forward + backward = 3x the forward FLOPs:
- linear terms: projections q, k, v, o and the SwiGLU MLP, ``2 * params_per_layer`` FLOPs per
  token forward;
- attention: causal scores and weighted sum, ``2 * 2 * L * dim / 2`` FLOPs per token forward
  (``QK^T`` and ``PV``, half the pairs under the causal mask), quadratic in L overall;
both divided by d (Ulysses splits heads across the group).
Communication: Ulysses moves q, k, v in and the output back with all-to-alls, 4 in the forward
and 4 in the backward per layer, each sending ``(d-1)/d`` of the local ``L/d x dim`` activations,
over the slowest link the group spans (NVLink inside a node, the network across nodes).
Memory: activations of ``L/d`` tokens per device; the planner bounds that by ``memory_tokens``.
"""
from __future__ import annotations

from dataclasses import dataclass

from .hardware import HardwareProfile


@dataclass(frozen=True)
class CostModel:
    profile: HardwareProfile
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    bytes_per_element: int = 2

    @classmethod
    def from_model_config(cls, cfg, profile: HardwareProfile, bytes_per_element: int = 2):
        return cls(profile, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, bytes_per_element)

    @property
    def params_per_layer(self) -> int:
        head_dim = self.dim // self.n_heads
        attn = self.dim * head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        return attn + 3 * self.dim * self.ffn_dim

    def flops(self, length):
        """Training FLOPs (fwd + bwd) of one sequence, all layers."""
        linear = 2.0 * self.params_per_layer * length
        attention = 2.0 * length * length * self.dim  # 2 matmuls x 2 FLOPs x L^2/2 pairs x dim
        return 3.0 * self.n_layers * (linear + attention)

    def compute_time(self, length, d: int):
        return self.flops(length) / d / (self.profile.peak_flops * self.profile.mfu)

    def link_bandwidth(self, d: int) -> float:
        """Bandwidth of an aligned group of d devices: NVLink if it fits in one node."""
        p = self.profile
        return p.intra_node_bw if d <= p.devices_per_node else p.inter_node_bw

    def comm_bytes(self, length, d: int):
        """Bytes one device sends for a sequence: 8 all-to-alls per layer (fwd + bwd)."""
        if d == 1:
            return 0.0 * length
        local = length / d * self.dim * self.bytes_per_element
        return 8.0 * self.n_layers * local * (d - 1) / d

    def comm_time(self, length, d: int):
        if d == 1:
            return 0.0 * length
        latency = 8 * self.n_layers * self.profile.collective_latency_s
        return self.comm_bytes(length, d) / self.link_bandwidth(d) + latency

    def time(self, length, d: int):
        """Predicted seconds for sequences of ``length`` tokens (a number or a numpy array) on a
        group of ``d`` devices."""
        return self.compute_time(length, d) + self.comm_time(length, d)

    def memory_per_device(self, length: int, d: int, bytes_per_token: float) -> float:
        return length / d * bytes_per_token
