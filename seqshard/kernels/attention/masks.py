"""Attention patterns beyond plain causal: sliding windows, soft-capping, chunked local attention
and attention sinks, shared by every attention path (reference, blockwise, CPU flash, Triton).

Semantics follow ``flash_attn_varlen_func`` (flash-attn >= 2.6):

- ``window_size=(left, right)``: query at key-coordinate position ``p`` sees keys
  ``[p - left, p + right]``; -1 leaves a side unbounded; ``causal`` forces ``right = 0``.
  Positions are bottom-right aligned: query ``i`` of a length-Lq document sits at ``i + Lk - Lq``.
- ``softcap > 0``: scores become ``softcap * tanh(scale * q.k / softcap)`` (Gemma 2).
- ``chunk_size``: a query sees only keys of its own chunk, ``p // chunk == j // chunk``
  (Llama 4's chunked local attention), on top of causal / window.
- ``sinks``: one learned logit per query head that joins every row's softmax denominator and
  carries no value (GPT-OSS). It is applied after the blocks are merged (``apply_sinks``), so
  block-wise and ring paths add it exactly once (a returned lse includes it; a row that sees no
  key returns 0 with lse = sink); its gradient is
  ``-sum_rows exp(sink - lse) * rowsum(dO * O)`` (``sinks_grad``).

Ring attention computes block pairs whose queries and keys are not aligned bottom-right; it passes
each token's position in its document (``q_pos`` / ``k_pos``) and the mask is built from those.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Mask:
    """A normalised attention pattern: ``left`` / ``right`` are -1 when unbounded (``right`` is 0
    when causal), ``chunk`` 0 when there are no chunks, ``softcap`` 0.0 when off."""
    causal: bool = False
    left: int = -1
    right: int = -1
    chunk: int = 0
    softcap: float = 0.0

    @property
    def banded(self) -> bool:
        """True when some keys before or after a query are hidden beyond plain causality."""
        return self.left >= 0 or (self.right >= 0 and not self.causal) or self.chunk > 0

    @property
    def plain(self) -> bool:
        """Plain full or causal attention (what the Triton and CPU flash kernels do natively)."""
        return not self.banded and self.softcap == 0.0

    @property
    def band(self) -> int:
        """Most keys one query can see (0 when unbounded)."""
        widths = []
        if self.left >= 0 and self.right >= 0:
            widths.append(self.left + self.right + 1)
        if self.chunk:
            widths.append(self.chunk)
        return min(widths) if widths else 0

    def lowest(self, p: int) -> int | None:
        """Lowest key position query position ``p`` can see (None: no lower bound)."""
        bounds = [p - self.left] if self.left >= 0 else []
        if self.chunk:
            bounds.append(p // self.chunk * self.chunk)
        return max(bounds) if bounds else None

    def highest(self, p: int) -> int | None:
        """Highest key position query position ``p`` can see (None: no upper bound)."""
        bounds = [p + self.right] if self.right >= 0 else []
        if self.chunk:
            bounds.append(p // self.chunk * self.chunk + self.chunk - 1)
        return min(bounds) if bounds else None

    def sees_any(self, q_lo: int, q_hi: int, k_lo: int, k_hi: int) -> bool:
        """Whether some query in positions ``[q_lo, q_hi]`` sees some key in ``[k_lo, k_hi]``
        (inclusive; exact for windows, conservative for chunks)."""
        lo, hi = self.lowest(q_lo), self.highest(q_hi)  # the widest bounds over the queries
        if (lo is not None and k_hi < lo) or (hi is not None and k_lo > hi):
            return False
        if self.chunk:  # every query chunk in range vs every key chunk in range
            return q_lo // self.chunk <= k_hi // self.chunk and k_lo // self.chunk <= q_hi // self.chunk
        return True

    def sees_all(self, q_lo: int, q_hi: int, k_lo: int, k_hi: int) -> bool:
        """Whether every query in ``[q_lo, q_hi]`` sees every key in ``[k_lo, k_hi]`` (no mask needed)."""
        lo_ok, hi_ok = self.lowest(q_hi), self.highest(q_lo)  # the tightest bounds over the queries
        return (lo_ok is None or k_lo >= lo_ok) and (hi_ok is None or k_hi <= hi_ok)


def make_mask(causal=False, window_size=(-1, -1), chunk_size=None, softcap=0.0) -> Mask:
    """Check and normalise the keyword arguments of the attention entry points."""
    left, right = (int(x) for x in (window_size if window_size is not None else (-1, -1)))
    assert left >= -1 and right >= -1, f"window_size {window_size}: each side is -1 (unbounded) or >= 0"
    chunk = int(chunk_size or 0)
    assert chunk >= 0, f"chunk_size {chunk_size} must be positive"
    softcap = float(softcap or 0.0)
    assert softcap >= 0.0, f"softcap {softcap} must be >= 0"
    if causal:
        right = 0
    return Mask(bool(causal), left, right, chunk, softcap)


def without_unreachable_band(mask: Mask, span: int) -> Mask:
    """``mask`` without a window that cannot hide any key when no query-key distance reaches
    ``span`` (bottom-right documents: the longest query plus the longest key run): such a call is
    plain attention, which the fast kernels run. Exact, never an approximation. Chunks stay."""
    if not mask.banded:
        return mask
    left_free = mask.left < 0 or mask.left >= span
    right_free = mask.causal or mask.right < 0 or mask.right >= span
    if left_free and right_free and mask.chunk == 0:
        return Mask(mask.causal, -1, 0 if mask.causal else -1, 0, mask.softcap)
    return mask


def default_positions(lq: int, lk: int, device=None):
    """Bottom-right aligned positions of one document: ``(q_pos [Lq], k_pos [Lk])``."""
    return torch.arange(lk - lq, lk, device=device), torch.arange(lk, device=device)


def doc_positions(a, b, c, d, q_pos, k_pos, device):
    """Positions of the queries ``[a, b)`` and keys ``[c, d)`` of one document: the given ones,
    or bottom-right aligned."""
    if q_pos is None:
        return default_positions(b - a, d - c, device)
    return q_pos[a:b], k_pos[c:d]


def visible(pq, pk, mask: Mask):
    """Boolean ``[Lq, Lk]``: query at position ``pq[i]`` sees key at ``pk[j]``."""
    d = pk.unsqueeze(0) - pq.unsqueeze(1)  # key minus query position
    ok = torch.ones(d.shape, dtype=torch.bool, device=d.device)
    if mask.right >= 0:
        ok &= d <= mask.right
    if mask.left >= 0:
        ok &= d >= -mask.left
    if mask.chunk:
        ok &= (pk.unsqueeze(0) // mask.chunk) == (pq.unsqueeze(1) // mask.chunk)
    return ok


def cap_scores(s, softcap: float):
    """``(capped scores, d capped / d raw)``; the derivative is None without a soft-cap."""
    if not softcap:
        return s, None
    t = torch.tanh(s / softcap)
    return t * softcap, 1.0 - t * t


def apply_sinks(out, lse, sinks):
    """Add per-head sink logits ``[H]`` to merged ``(out [T, H, D], lse [H, T] fp32)``."""
    new = torch.logaddexp(lse, sinks.float().unsqueeze(1))
    w = torch.exp(lse - new).t().unsqueeze(-1)  # [T, H, 1]
    return (out.float() * w).to(out.dtype), new


def sinks_grad(dout, out, lse, sinks):
    """Gradient of the sink logits ``[H]`` given the final out and lse (sinks included)."""
    delta = (dout.float() * out.float()).sum(-1).t()  # [H, T]
    p_sink = torch.exp(sinks.float().unsqueeze(1) - lse)
    return -(p_sink * delta).sum(1).to(sinks.dtype)
