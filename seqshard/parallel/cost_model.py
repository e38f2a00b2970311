"""Cost model of one sequence of length L trained in an SP group of d devices.

The group runs Ulysses, Ring or USP inside (:meth:`CostModel.methods` lists those a size allows;
:meth:`CostModel.time` takes the fastest, :meth:`CostModel.method_for` names it).

Per layer and token, forward + backward = 3x the forward FLOPs:
- linear terms: projections q, k, v, o and the SwiGLU MLP, ``2 * params_per_layer`` FLOPs per
  token forward;
- attention: causal scores and weighted sum, ``2 * 2 * L * dim / 2`` FLOPs per token forward
  (``QK^T`` and ``PV``, half the pairs under the causal mask), quadratic in L overall;
both divided by d (Ulysses splits heads across the group).
Communication: Ulysses moves q, k, v in and the output back with all-to-alls, 4 in the forward
and 4 in the backward per layer, each sending ``(d-1)/d`` of the local ``L/d x dim`` activations,
over the slowest link the group spans (NVLink inside a node, the network across nodes).
Ring (Liu et al., 2023): K and V (``2 * kv_dim`` per token) travel d-1 hops per layer in the
forward, K, V and their gradients (2x that) in the backward, one P2P latency per hop; each hop
overlaps with the attention block it feeds, so attention costs ``max(attention compute, P2P)``.
USP (Fang & Zhao, 2024): Ulysses over U = gcd(heads, d) consecutive ranks (all-to-all bytes as
Ulysses on U), Ring over R = d/U of them carrying ``kv_dim / U`` per token.
Memory: activations of ``L/d`` tokens per device whatever the method; the planner bounds that
by ``memory_tokens``.
Attention patterns (issue #29): ``attn_layers`` lists each layer's ``(kind, size)``; attention
compute is priced by the masked area, not L^2: ``L^2`` per full layer (twice the causal pairs),
``2 L W - W^2`` per sliding layer of window W (``L^2`` while L <= W), ``L C`` per chunked layer of
chunk C (``L^2`` while L <= C), averaged over layers. Ring P2P stays priced as the full ring
(an upper bound: the window-aware ring sends only the keys in reach).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from functools import cached_property

import numpy as np

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
    # tokens per device of one packed micro-batch (the adaptive runtime packs a group of d up to
    # d x memory_tokens): a calibrated fixed cost per micro-batch is shared by the sequences packed
    # together, so one sequence of L tokens pays L / (d x pack_tokens) of it; None: a whole one
    pack_tokens: int | None = None
    # per layer ("full", 0) | ("window", W) | ("chunk", C); empty: every layer full causal
    attn_layers: tuple = ()

    @classmethod
    def from_model_config(cls, cfg, profile: HardwareProfile, bytes_per_element: int = 2):
        return cls(profile, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, bytes_per_element,
                   attn_layers=attention_layers(cfg))

    def attention_area(self, length):
        """``L^2`` for full causal attention, less for windows and chunks (see the module doc):
        twice the query-key pairs the masks keep, averaged over the layers."""
        length = np.asarray(length, dtype=np.float64)
        if not self.attn_layers:
            return length * length
        total = 0.0 * length
        for (kind, size), count in Counter(self.attn_layers).items():
            if kind == "window":
                area = np.where(length <= size, length * length, 2.0 * length * size - float(size) ** 2)
            elif kind == "chunk":
                area = np.where(length <= size, length * length, length * size)
            else:
                area = length * length
            total = total + count * area
        return total / len(self.attn_layers)

    @property
    def params_per_layer(self) -> int:
        head_dim = self.dim // self.n_heads
        attn = self.dim * head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        return attn + 3 * self.dim * self.ffn_dim

    def flops(self, length):
        """Training FLOPs (fwd + bwd) of one sequence, all layers."""
        linear = 2.0 * self.params_per_layer * length
        attention = 2.0 * self.attention_area(length) * self.dim  # 2 matmuls x 2 FLOPs x area/2 pairs x dim
        return 3.0 * self.n_layers * (linear + attention)

    def compute_time(self, length, d: int):
        return self.flops(length) / d / (self.profile.peak_flops * self.profile.mfu)

    def attention_compute_time(self, length, d: int):
        """The attention part of :meth:`compute_time` (what ring P2P overlaps with)."""
        area = self.attention_area(length)
        return 3.0 * self.n_layers * 2.0 * area * self.dim / d / (self.profile.peak_flops * self.profile.mfu)

    def link_bandwidth(self, d: int) -> float:
        """Bandwidth of an aligned group of d devices: the profile's measured figure for that
        group size if it has one, else NVLink if it fits in one node, else the network."""
        p = self.profile
        if p.bw_by_group_size:  # a size between two listed ones gets the larger one's figure
            covering = [bw for size, bw in p.bw_by_group_size if size >= d]
            return covering[0] if covering else p.bw_by_group_size[-1][1]
        return p.intra_node_bw if d <= p.devices_per_node else p.inter_node_bw

    def latency(self, d: int) -> float:
        """Seconds of one collective call over d devices: the profile's measured figure for that
        group size if it has one (the next larger listed size for one between), else its
        single ``collective_latency_s``."""
        p = self.profile
        if p.latency_by_group_size:
            covering = [s for size, s in p.latency_by_group_size if size >= d]
            return covering[0] if covering else p.latency_by_group_size[-1][1]
        return p.collective_latency_s

    def curve(self, d: int, method: str):
        """The calibrated ``(c0, lengths, per_token)`` of one micro-batch on d devices running
        ``method`` (``HardwareProfile.microbatch_curve``, as arrays), or None."""
        key = ("curve", d, method)
        if key not in self._terms:
            entry = next((e for e in self.profile.microbatch_curve if e[0] == d and e[1] == method), None)
            self._terms[key] = None if entry is None else (
                float(entry[2]), np.array([x for x, _ in entry[3]], dtype=np.float64),
                np.array([h for _, h in entry[3]], dtype=np.float64))
        return self._terms[key]

    @staticmethod
    def _curve_seconds(curve, lengths):
        """``L x`` the per-token seconds of documents of length L: linear between the measured
        lengths, the first value below them, the last segment's slope continued past them (the
        attention's share of a token grows with L)."""
        _, xs, hs = curve
        per_token = np.interp(lengths, xs, hs)
        if len(xs) > 1:
            slope = max((hs[-1] - hs[-2]) / (xs[-1] - xs[-2]), 0.0)
            per_token = np.where(lengths > xs[-1], hs[-1] + slope * (lengths - xs[-1]), per_token)
        return lengths * per_token

    def methods(self, d: int) -> list[str]:
        """SP methods a group of d devices can run: ulysses when d <= the head count (uneven heads
        per rank when d does not divide it), usp when a factor > 1 of d divides it, ring always.
        Where the profile has calibrated curves for d, only the methods it measured."""
        fitted = [e[1] for e in self.profile.microbatch_curve if e[0] == d]
        if fitted:
            return fitted
        if d == 1:
            return ["local"]
        out = []
        even = self.n_heads % d == 0
        if d <= self.n_heads and (not even or self.n_kv_heads % d == 0 or d % self.n_kv_heads == 0):
            out.append("ulysses")  # uneven heads per rank when d does not divide them (kv expanded)
        u = math.gcd(self.n_heads, d)
        if 1 < u < d and (self.n_kv_heads % u == 0 or u % self.n_kv_heads == 0):
            out.append("usp")
        return out + ["ring"]

    def kv_dim(self) -> int:
        return self.dim // self.n_heads * self.n_kv_heads

    def ring_p2p_time(self, length, d: int, ring: int):
        """Seconds of ring P2P for one sequence: ``ring - 1`` hops per layer, forward (K, V) and
        backward (K, V, dK, dV), each hop carrying K/V of ``L/d`` tokens x all kv heads (USP:
        ``U L/d`` tokens x ``1/U`` of the heads, the same bytes)."""
        if ring <= 1:
            return 0.0 * length
        hop = length / d * 2 * self.kv_dim() * self.bytes_per_element
        hops = 3 * self.n_layers * (ring - 1)
        return hops * hop / self.link_bandwidth(d) + hops * self.latency(d)

    def terms(self, d: int, method: str) -> tuple[float, ...]:
        """``(a0, a1, a2, b2, p0, p1)`` of the analytic model (no calibrated curve): a sequence of
        L tokens on d devices running ``method`` takes ``a0 + a1 L + a2 L^2 + max(b2 L^2, p0 + p1 L)``
        seconds (the max: ring attention overlapping its P2P hops; 0 for the others). Read off
        the per-term functions above at L = 0 and 1, so they stay the one statement of the model;
        cached per (d, method) (and :meth:`method_times` caches its stacked form per tuple of
        sizes)."""
        key = (d, method)
        if key not in self._terms:
            self._terms[key] = self._derive_terms(d, method)
        return self._terms[key]

    @cached_property
    def _terms(self) -> dict:
        return {}

    def _derive_terms(self, d: int, method: str) -> tuple[float, ...]:
        att = float(self.attention_compute_time(1.0, d))
        lin = float(self.compute_time(1.0, d)) - att
        if method == "local":
            return (0.0, lin, att, 0.0, 0.0, 0.0)
        if method == "ulysses":  # the rank with the most heads sets the pace: ceil(H/d) of H
            heavy = math.ceil(self.n_heads / d) * d / self.n_heads
            c0 = float(self.comm_time(0.0, d))
            return (heavy * c0, lin + heavy * (float(self.comm_time(1.0, d)) - c0), heavy * att, 0.0, 0.0, 0.0)
        u = math.gcd(self.n_heads, d) if method == "usp" else 1
        c0 = float(self.comm_time_over(0.0, d, u))
        p0 = float(self.ring_p2p_time(0.0, d, d // u))
        return (c0, lin + float(self.comm_time_over(1.0, d, u)) - c0, 0.0, att,
                p0, float(self.ring_p2p_time(1.0, d, d // u)) - p0)

    def _evaluate(self, coef, length):
        a0, a1, a2, b2, p0, p1 = coef
        squared = self.attention_area(length)  # L^2, or the masked area of windowed / chunked layers
        return a0 + a1 * length + a2 * squared + np.maximum(b2 * squared, p0 + p1 * length)

    def method_time(self, length, d: int, method: str):
        """Predicted seconds of a sequence on a group of d devices running ``method``. With a
        calibrated curve, the sequence pays the micro-batch's fixed cost ``c0`` whole, or with
        ``pack_tokens`` its share ``L / (d x pack_tokens)`` of a packed micro-batch's."""
        length = np.asarray(length, dtype=np.float64)
        curve = self.curve(d, method)
        if curve is None:
            return self._evaluate(self.terms(d, method), length)
        share = length / (d * self.pack_tokens) if self.pack_tokens else 1.0
        return curve[0] * share + self._curve_seconds(curve, length)

    def method_times(self, lengths, sizes) -> tuple[list[list[str]], np.ndarray]:
        """Every length on every size and method at once: per size its :meth:`methods`, and the
        times ``[most methods, n, len(sizes)]`` (inf past a size's own methods), which equal
        :meth:`method_time` exactly (the planner's hot path: the analytic pairs in one broadcast,
        not a call per pair)."""
        key = ("table",) + tuple(sizes)
        if key not in self._terms:
            names = [self.methods(d) for d in sizes]
            coef = np.zeros((6, max(map(len, names)), len(sizes)))
            coef[0] = np.inf
            curves = []  # (method index, size index, d, method) of the calibrated pairs
            for k, (d, ms) in enumerate(zip(sizes, names)):
                for m, method in enumerate(ms):
                    if self.curve(d, method) is None:
                        coef[:, m, k] = self.terms(d, method)
                    else:
                        coef[0, m, k] = 0.0
                        curves.append((m, k, d, method))
            self._terms[key] = names, coef[:, :, None], curves  # coef [6, methods, 1, sizes]
        names, coef, curves = self._terms[key]
        lengths = np.asarray(lengths, dtype=np.float64)
        times = self._evaluate(coef, lengths[:, None])
        for m, k, d, method in curves:
            times[m, :, k] = self.method_time(lengths, d, method)
        return names, times

    def comm_bytes(self, length, d: int):
        """Bytes one device sends for a sequence: 8 all-to-alls per layer (fwd + bwd)."""
        if d == 1:
            return 0.0 * length
        local = length / d * self.dim * self.bytes_per_element
        return 8.0 * self.n_layers * local * (d - 1) / d

    def comm_time(self, length, d: int):
        return self.comm_time_over(length, d, d)

    def comm_time_over(self, length, d: int, u: int):
        """Ulysses all-to-all seconds over ``u`` ranks of a d-device group (u = d: plain Ulysses),
        each rank holding ``L/d`` tokens."""
        if u == 1:
            return 0.0 * length
        latency = 8 * self.n_layers * self.latency(u)
        local = length / d * self.dim * self.bytes_per_element
        return 8.0 * self.n_layers * local * (u - 1) / u / self.link_bandwidth(u) + latency

    def time(self, length, d: int):
        """Predicted seconds for sequences of ``length`` tokens (a number or a numpy array) on a
        group of ``d`` devices, running the fastest method the group allows."""
        times = [self.method_time(length, d, m) for m in self.methods(d)]
        return times[0] if len(times) == 1 else np.minimum.reduce(times)

    def method_for(self, length, d: int) -> str:
        """The method :meth:`time` uses for a sequence of ``length`` tokens on d devices."""
        ms = self.methods(d)
        return min(ms, key=lambda m: float(self.method_time(length, d, m)))

    def microbatch_time(self, doc_lengths, d: int, method: str) -> float:
        """Predicted seconds of one packed micro-batch (documents ``doc_lengths``, one varlen
        stream) on d devices running ``method``: attention and linear compute per document, but
        ONE set of collectives for the whole stream (Ulysses all-to-alls, ring hops carry every
        document's K/V), plus the profile's fixed cost per micro-batch."""
        docs = np.asarray(doc_lengths, dtype=np.float64)
        total = float(docs.sum())
        curve = self.curve(d, method)
        if curve is not None:
            return curve[0] + float(self._curve_seconds(curve, docs).sum())
        attn = float(self.attention_compute_time(docs, d).sum())
        linear = float(self.compute_time(docs, d).sum()) - attn
        overhead = self.profile.microbatch_overhead_s
        if method == "local" or d == 1:
            return linear + attn + overhead
        if method == "ulysses":
            heavy = math.ceil(self.n_heads / d) * d / self.n_heads
            return linear + heavy * attn + heavy * float(self.comm_time(total, d)) + overhead
        u = math.gcd(self.n_heads, d) if method == "usp" else 1
        a2a = float(self.comm_time_over(total, d, u)) if u > 1 else 0.0
        return linear + a2a + max(attn, float(self.ring_p2p_time(total, d, d // u))) + overhead

    def memory_per_device(self, length: int, d: int, bytes_per_token: float) -> float:
        return length / d * bytes_per_token


def attention_layers(cfg) -> tuple:
    """``CostModel.attn_layers`` of a model config: each layer's mask kind and size."""
    if not hasattr(cfg, "layer_type") or getattr(cfg, "arch", "llama") != "llama":
        return ()
    sizes = {"sliding_attention": ("window", getattr(cfg, "sliding_window", 0)),
             "chunked_attention": ("chunk", getattr(cfg, "attn_chunk_size", 0))}
    layers = tuple(sizes.get(cfg.layer_type(i), ("full", 0)) for i in range(cfg.n_layers))
    return () if all(kind == "full" for kind, _ in layers) else layers
