"""Copy-free, head-chunk pipelined Ulysses for seqshard's native attention layer (issue #32).

:mod:`.ulysses` exchanges q, k and v that the model has already projected, normed and rotated:
it packs them into the all-to-all send layout with one copy (``torch.cat`` of three strided
views), and its backward assembles dq, dk and dv into one buffer the same way; on the way back
``gather_heads`` transposes the received output into the o-projection's ``[T/P, H*D]`` input.
Here the whole layer (q/k/v projection -> exchange -> q/k norm, RoPE, attention -> exchange ->
o-projection) is one ``autograd.Function`` whose buffers are laid out for the wire:

- **Projection into the send buffer.** The rows of ``wq``, ``wk`` and ``wv`` are regrouped per
  destination rank (an ``index_select`` of the ``[dim]``-wide weight rows, O(dim^2), every
  forward: the parameters stay ``wq``/``wk``/``wv``, so checkpoints, export and FSDP are
  unchanged), and ``x @ W_j`` is written by ``torch.mm(out=)`` straight into destination j's
  slot of one contiguous ``[P, T/P, (hq + 2 hk) D]`` send buffer.
- **Norm and RoPE after the exchange.** Both are per head and per token, so they run on the
  received ``[T, h, D]`` tokens with the positions of those tokens: all-gathered once per step
  (the ShardPlan's shards, int64, ``T`` values) and cached on the step's context, not per layer.
- **KV heads.** With fewer kv heads than ranks each rank receives exactly the one kv head its
  query heads read (``kv_head_map``, as in :mod:`.ulysses`): no rank receives a head it does not
  use, so there is no replica left to drop from the wire.
- **Output exchange in the o-projection's layout.** The attention output (rank-major tokens) is
  the send buffer ``[P, T/P, hq D]`` as it is; what comes back is ``[P(src), T/P, hq D]`` and the
  o-projection consumes it as ``out = sum_j back[j] @ Wo[:, heads_j]^T`` (``addmm_`` into one
  ``[T/P, dim]`` output; ``Wo[:, heads_j]`` is a strided view, no transpose copy, no ``[P, T/P,
  dim]`` temporary as a bmm + sum would allocate).
- **Backward.** ``dOut @ Wo[:, heads_j]`` is written straight into the backward send buffer's
  slot j; after the exchange, the attention, RoPE and norm backward run per chunk (autograd on
  the graphs the forward kept) and dq, dk, dv are written once each into the backward send
  buffer of the q/k/v exchange (cast to the wire dtype by the same write); the received
  ``[P, T/P, C]`` gradient goes back through the projection as ``dx += g[j] @ W_j^T`` (``addmm_``)
  and ``dW_j = g[j]^T x`` (index-added into the weights' rows).
- **Pipelining** (``parallel.ulysses_chunks``): each rank's query heads are split into N chunks
  (a kv head travels with the first chunk whose query heads read it). Forward: every chunk's
  projection is followed at once by its asynchronous all-to-all, so chunk i+1's projection and
  exchange overlap; chunk i's attention runs while chunks > i are on the wire; chunk i's output
  exchange runs while chunk i+1 attends. Backward, in reverse chunk order: every chunk's output
  gradient exchange is started first; chunk i's attention backward runs while the others travel;
  its q/k/v gradient exchange overlaps chunk i-1's attention backward. N = 1 is one exchange each
  way (the copy-free layout without the overlap).
- **Wire dtype** (``parallel.comm_dtype``): ``bf16`` casts the exchanged payload (both
  exchanges, forward and backward) to bfloat16 for the wire only; compute stays in the model's
  dtype.

USP uses the same Function for its Ulysses part (the chunk's attention is then the ring over
the ring group). Configurations it cannot honour run the unchanged path of
:func:`seqshard.models.llama.Attention.standard_forward` (see :func:`fast_path_reason`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.graph import get_gradient_edge

from seqshard.dist.comm_stats import record

from .comm import graph_anchor
from .ulysses import _orders, kv_head_map

WIRE_DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # None: the activations' own dtype
# all_to_all_single payload dtypes each backend sends (gloo bf16: exercised on torch 2.13 by the
# comm_dtype bf16 cases of tests/parallel/test_ulysses_layer.py, forward and backward; NCCL sends bf16)
BACKEND_WIRE = {"gloo": ("fp32", "bf16"), "nccl": ("fp32", "bf16")}


def wire_dtype_supported(backend: str, comm_dtype: str) -> bool:
    return comm_dtype in BACKEND_WIRE.get(backend, ("fp32",))
AUTO_MAX_CHUNKS = 4
AUTO_MIN_CHUNK_BYTES = 256 * 1024  # per peer per chunk: smaller messages cost more than they overlap


@dataclass(frozen=True)
class Chunk:
    q: tuple  # local query heads [lo, hi)
    kv_new: tuple  # local kv heads first read by this chunk (sent with it) [lo, hi)
    kv_need: tuple  # local kv heads this chunk's query heads read [lo, hi)

    @property
    def width(self) -> int:  # heads per destination in this chunk's send buffer: q, k, v
        return (self.q[1] - self.q[0]) + 2 * (self.kv_new[1] - self.kv_new[0])


@dataclass(frozen=True)
class Layout:
    """Which rows of ``cat(wq, wk, wv)`` each destination gets in each chunk."""
    world: int
    n_heads: int
    n_kv: int
    head_dim: int
    hq: int  # query heads per rank
    hk: int  # kv heads per rank (1 when kv heads are replicated)
    chunks: tuple
    rows: tuple  # per chunk: LongTensor [P * width * D] of rows of cat(wq, wk, wv)


def chunk_heads(hq: int, hk: int, n: int) -> tuple:
    """Split ``hq`` local query heads into ``n`` chunks; each kv head goes with the first chunk
    that reads it (``hq / hk`` query heads read one kv head)."""
    size, ratio, sent, out = hq // n, hq // hk, 0, []
    for c in range(n):
        lo, hi = c * size, (c + 1) * size
        need = (lo // ratio, (hi - 1) // ratio + 1)
        out.append(Chunk((lo, hi), (max(sent, need[0]), need[1]), need))
        sent = max(sent, need[1])
    return tuple(out)


_LAYOUTS: dict = {}


def layout(n_heads: int, n_kv: int, head_dim: int, world: int, chunks: int) -> Layout:
    key = (n_heads, n_kv, head_dim, world, chunks)
    if key in _LAYOUTS:
        return _LAYOUTS[key]
    kv_map = kv_head_map(n_heads, n_kv, world)
    hq = n_heads // world
    if chunks < 1 or hq % chunks:
        raise ValueError(f"parallel.ulysses_chunks {chunks} must divide the {hq} query heads per rank "
                         f"({n_heads} heads over {world} ranks)")
    hk = 1 if kv_map is not None else n_kv // world
    plan = chunk_heads(hq, hk, chunks)
    k_base, v_base = n_heads * head_dim, (n_heads + n_kv) * head_dim

    def kv_global(j, h):
        return kv_map[j] if kv_map is not None else j * hk + h

    rows = []
    for ch in plan:
        idx = []
        for j in range(world):
            heads = [(0, j * hq + h) for h in range(*ch.q)]
            heads += [(k_base, kv_global(j, h)) for h in range(*ch.kv_new)]
            heads += [(v_base, kv_global(j, h)) for h in range(*ch.kv_new)]
            for base, h in heads:
                idx.extend(range(base + h * head_dim, base + (h + 1) * head_dim))
        rows.append(torch.tensor(idx, dtype=torch.long))
    out = Layout(world, n_heads, n_kv, head_dim, hq, hk, plan, tuple(rows))
    _LAYOUTS[key] = out
    return out


def auto_chunks(hq: int, hk: int, local_tokens: int, head_dim: int, element_size: int) -> int:
    """``ulysses_chunks: 0`` (auto): the most chunks (<= 4, dividing the local query heads) whose
    smallest per-peer message stays >= 256 KiB; 1 when even two chunks would be smaller."""
    best = 1
    for n in range(2, min(AUTO_MAX_CHUNKS, hq) + 1):
        if hq % n:
            continue
        smallest = min(ch.width for ch in chunk_heads(hq, hk, n))
        if local_tokens * smallest * head_dim * element_size >= AUTO_MIN_CHUNK_BYTES:
            best = n
    return best


def _start(send, group, op):
    """Start an all-to-all of ``send`` ``[P, ...]``; returns (received, wait)."""
    recv = torch.empty_like(send)
    world = dist.get_world_size(group)
    work = dist.all_to_all_single(recv, send, group=group, async_op=True)
    nbytes = send.numel() * send.element_size() * (world - 1) // world

    def wait():
        with record(op, nbytes):  # the time not hidden behind compute
            work.wait()
        return recv

    return wait


def _wire(t, wire_dtype):
    return t if wire_dtype is None or t.dtype == wire_dtype else t.to(wire_dtype)


def _unwire(t, dtype):
    return t if t.dtype == dtype else t.to(dtype)


def gathered_positions(positions, ctx, group):
    """Positions of the tokens the head split holds (rank-major: rank 0's shard first), one
    all-gather per step and group, cached on the step's context."""
    cache = ctx.__dict__.setdefault("_ulysses_positions", {})
    key = (id(group), positions.data_ptr(), positions.shape[0])
    if key not in cache:
        world = dist.get_world_size(group)
        out = positions.new_empty(world * positions.shape[0])
        with record("ulysses.positions", positions.numel() * positions.element_size() * (world - 1)):
            dist.all_gather_single(out, positions.contiguous(), group=group)
        cache[key] = out
    return cache[key]


def _perms(plan, ctx, device):
    """(to_padded, to_rank_major) index tensors, or (None, None) when the rank-major order is
    already the plan's padded order (the stream layout): then no token is moved."""
    cache = ctx.__dict__.setdefault("_ulysses_perms", {})
    if id(plan) not in cache:
        cache[id(plan)] = _orders(plan, device)
    return cache[id(plan)]


class LayerSetup:
    """Everything the Function needs besides tensors (one per layer call): the module (its
    ``rotate``), the layout, the group, the received tokens' positions, the chunk attention
    ``attend(q, k, v, chunk)``, the wire dtype, the op name for the comm log, the padded-order
    permutations (None: identity) and whether autograd records (``grad``)."""

    def __init__(self, module, lay, group, positions_rm, attend, wire_dtype, op, perm=None, inv_perm=None,
                 grad=False):
        self.module, self.lay, self.group, self.pos = module, lay, group, positions_rm
        self.attend, self.wire, self.op = attend, wire_dtype, op
        self.perm, self.inv_perm, self.grad = perm, inv_perm, grad


def _send_weights(wq, bq, wk, bk, wv, bv, lay):
    """Per chunk: W ``[P, dim, C]`` (a transposed view of the regrouped rows) and bias ``[P, 1, C]``."""
    w_cat = torch.cat([wq, wk, wv])
    b_cat = torch.cat([bq, bk, bv]) if bq is not None else None
    out = []
    for ch, rows in zip(lay.chunks, lay.rows):
        c = ch.width * lay.head_dim
        w = w_cat.index_select(0, rows).view(lay.world, c, -1).transpose(1, 2)
        b = b_cat.index_select(0, rows).view(lay.world, 1, c) if b_cat is not None else None
        out.append((w, b))
    return out


class _UlyssesLayer(torch.autograd.Function):
    """x ``[T/P, dim]`` -> attention output after ``wo`` ``[T/P, dim]`` (see the module doc)."""

    @staticmethod
    def forward(ctx, setup, x, _anchor, wq, bq, wk, bk, wv, bv, wo, *params):
        lay, group, wire, op = setup.lay, setup.group, setup.wire, setup.op
        mod = setup.module
        world, n, dim, d = lay.world, x.shape[0], x.shape[1], lay.head_dim
        grad = setup.grad  # forward runs under no_grad: the caller's mode decides
        x = x.contiguous()
        weights = _send_weights(wq, bq, wk, bk, wv, bv, lay)
        # 1. project every chunk straight into its send buffer and start its exchange
        waits = []
        for c, (ch, (w, b)) in enumerate(zip(lay.chunks, weights)):
            send = x.new_empty(world, n, ch.width * d)
            for j in range(world):
                if b is None:
                    torch.mm(x, w[j], out=send[j])
                else:
                    torch.addmm(b[j], x, w[j], out=send[j])
            waits.append(_start(_wire(send, wire), group, f"{op}.qkv"))
            del send
        # 2. per chunk: norm + RoPE + attention on the head split, then start the output exchange
        graphs, ks, vs, outs = [], [], [], []
        hq_c = lay.chunks[0].q[1] - lay.chunks[0].q[0]
        for c, ch in enumerate(lay.chunks):
            recv = _unwire(waits[c](), x.dtype).view(world * n, ch.width, d)
            nk = ch.kv_new[1] - ch.kv_new[0]
            with torch.enable_grad() if grad else torch.no_grad():
                qr, kr, vr = recv[:, :hq_c], recv[:, hq_c:hq_c + nk], recv[:, hq_c + nk:]
                edges = None
                if grad:  # graph entries that hold no reference to the receive buffer (see _Entry)
                    anchor = torch.empty(0, device=x.device, requires_grad=True)
                    qr, kr, vr = (_Entry.apply(anchor, t) for t in (qr, kr, vr))
                    edges = tuple(get_gradient_edge(t) for t in (qr, kr, vr))
                q, k = mod.rotate(qr, setup.pos, "q"), (mod.rotate(kr, setup.pos, "k") if nk else kr)
                v = vr
                perm = setup.perm
                if perm is not None:
                    q, k, v = q[perm], k[perm], v[perm]
                elif v.shape[1]:
                    v = v.contiguous()  # frees the receive buffer once q and k are rotated
            qa = q.detach().requires_grad_() if grad else q
            ks.append(k.detach().requires_grad_() if grad else k)
            vs.append(v.detach().requires_grad_() if grad else v)
            graphs.append((edges, q, k, v))
            del qr, kr, vr
            with torch.enable_grad() if grad else torch.no_grad():
                kc, vc = _kv_gather(ch, lay.chunks, ks, vs)
                out = setup.attend(qa, kc, vc, ch)
            outs.append((qa, out))
            o = out.detach()
            if setup.inv_perm is not None:
                o = o[setup.inv_perm]
            waits[c] = _start(_wire(o.reshape(world, n, hq_c * d), wire), group, f"{op}.out")
            del recv
        # 3. o-projection from the received [P(src), T/P, hq_c D] chunks, no transpose copy
        wo_v = wo.view(dim, world, len(lay.chunks), hq_c * d)
        result, backs = None, []
        for c in range(len(lay.chunks)):
            back = _unwire(waits[c](), x.dtype)
            backs.append(back)
            for j in range(world):
                w_jc = wo_v[:, j, c].t()
                result = torch.mm(back[j], w_jc) if result is None else result.addmm_(back[j], w_jc)
        if grad:
            ctx.setup = setup
            ctx.graphs, ctx.ks, ctx.vs, ctx.outs = graphs, ks, vs, outs
            ctx.params = params
            ctx.has_bias = bq is not None
            ctx.save_for_backward(x, wq, bq, wk, bk, wv, bv, wo, *backs)
        return result

    @staticmethod
    def backward(ctx, gout):
        setup = ctx.setup
        lay, group, wire, op = setup.lay, setup.group, setup.wire, setup.op
        x, wq, bq, wk, bk, wv, bv, wo, *backs = ctx.saved_tensors
        world, n, dim, d = lay.world, x.shape[0], x.shape[1], lay.head_dim
        chunks = lay.chunks
        nc, hq_c = len(chunks), chunks[0].q[1] - chunks[0].q[0]
        gout = gout.contiguous()
        wo_v = wo.view(dim, world, nc, hq_c * d)
        g_wo = torch.empty_like(wo)
        g_wo_v = g_wo.view(dim, world, nc, hq_c * d)
        # 1. o-projection backward, written into the output exchange's backward send buffers;
        #    every chunk's exchange starts at once (the last chunk first: its attention backward
        #    runs first)
        out_waits = {}
        for c in reversed(range(nc)):
            gb = gout.new_empty(world, n, hq_c * d)
            for j in range(world):
                torch.mm(gout, wo_v[:, j, c], out=gb[j])
            g_wo_v[:, :, c] = torch.matmul(gout.t(), backs[c]).transpose(0, 1)
            out_waits[c] = _start(_wire(gb, wire), group, f"{op}.out.bwd")
            del gb
        # 2. per chunk in reverse: attention backward, then (once the chunk's kv heads have all
        #    their readers' gradients) RoPE/norm backward into the q/k/v exchange's send buffer
        params = [p for p in ctx.params if p is not None and p.requires_grad]
        g_params = [None] * len(params)
        dk = [None] * nc
        dv = [None] * nc
        qkv_waits = {}
        weights = _send_weights(wq, bq, wk, bk, wv, bv, lay)
        g_x = None
        g_wcat = torch.zeros(wq.shape[0] + wk.shape[0] + wv.shape[0], dim, dtype=x.dtype, device=x.device)
        g_bcat = torch.zeros(g_wcat.shape[0], dtype=x.dtype, device=x.device) if ctx.has_bias else None

        def finish(c):  # the q/k/v gradient exchange of chunk c is back: through the projection
            nonlocal g_x
            g = _unwire(qkv_waits.pop(c)(), x.dtype)  # [P, T/P, C]
            w, _ = weights[c]
            rows = lay.rows[c].view(world, -1)
            for j in range(world):
                g_x = torch.mm(g[j], w[j].t()) if g_x is None else g_x.addmm_(g[j], w[j].t())
                g_wcat.index_add_(0, rows[j], torch.mm(g[j].t(), x))
                if g_bcat is not None:
                    g_bcat.index_add_(0, rows[j], g[j].sum(0))

        for c in reversed(range(nc)):
            ch = chunks[c]
            go = _unwire(out_waits.pop(c)(), x.dtype).view(world * n, hq_c, d)
            if setup.perm is not None:
                go = go[setup.perm]
            qa, out = ctx.outs[c]
            users = [e for e, other in enumerate(chunks) if _overlap(ch.kv_need, other.kv_new)]
            inputs = [qa] + [ctx.ks[e] for e in users] + [ctx.vs[e] for e in users] + params
            grads = torch.autograd.grad(out, inputs, go, allow_unused=True)
            dq = grads[0]
            for i, e in enumerate(users):
                dk[e] = _acc(dk[e], grads[1 + i])
                dv[e] = _acc(dv[e], grads[1 + len(users) + i])
            for i, gp in enumerate(grads[1 + 2 * len(users):]):
                g_params[i] = _acc(g_params[i], gp)
            ctx.outs[c] = None
            # every reader of chunk c's kv heads is a chunk >= c: all done
            edges, q, k, v = ctx.graphs[c]
            nk = ch.kv_new[1] - ch.kv_new[0]
            send = x.new_empty(world * n, ch.width, d, dtype=wire or x.dtype)
            outs_, gouts_, ins_ = [q], [dq], [edges[0]]
            if nk:
                outs_ += [k, v]
                gouts_ += [_zeros_if_none(dk[c], k), _zeros_if_none(dv[c], v)]
                ins_ += [edges[1], edges[2]]
            grads = torch.autograd.grad(outs_, ins_ + params, gouts_, allow_unused=True)
            # dq, dk, dv written once each into the exchange's send buffer (cast to the wire dtype)
            for i, (lo, hi) in enumerate([(0, hq_c), (hq_c, hq_c + nk), (hq_c + nk, ch.width)][:len(ins_)]):
                if grads[i] is None:
                    send[:, lo:hi].zero_()
                else:
                    send[:, lo:hi].copy_(grads[i])
            for i, gp in enumerate(grads[len(ins_):]):
                g_params[i] = _acc(g_params[i], gp)
            ctx.graphs[c] = None
            qkv_waits[c] = _start(send.view(world, n, ch.width * d), group, f"{op}.qkv.bwd")
            del send
            if c + 1 < nc:
                finish(c + 1)  # its exchange overlapped this chunk's attention backward
        finish(0)
        hq_rows, hk_rows = wq.shape[0], wk.shape[0]
        g_wq, g_wk, g_wv = g_wcat.split([hq_rows, hk_rows, hk_rows])
        g_b = g_bcat.split([hq_rows, hk_rows, hk_rows]) if g_bcat is not None else (None, None, None)
        g_by_param = {id(p): g for p, g in zip(params, g_params)}
        g_extra = tuple(g_by_param.get(id(p)) if p is not None else None for p in ctx.params)
        ctx.ks = ctx.vs = None
        return (None, g_x, None, g_wq, g_b[0], g_wk, g_b[1], g_wv, g_b[2], g_wo, *g_extra)


class _Entry(torch.autograd.Function):
    """Where a chunk's graph starts: a view of the receive buffer that requires grad (through
    ``anchor``). Backward reads the gradient at its edge (``get_gradient_edge``); neither the node
    nor the edge refers to the buffer, so it is freed once RoPE has made q and k (a leaf view
    would keep it alive until backward)."""

    @staticmethod
    def forward(ctx, anchor, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return None, None


def _overlap(a, b):
    return max(a[0], b[0]) < min(a[1], b[1])


def _acc(total, g):
    if g is None:
        return total
    return g if total is None else total + g


def _zeros_if_none(g, like):
    return torch.zeros_like(like) if g is None else g


def _kv_gather(ch, chunks, ks, vs):
    """k, v ``[T, h, D]`` of the local kv heads chunk ``ch`` reads, from the chunks that carried
    them; expanded to one kv head per query head when the chunk's query heads do not fall into
    whole groups (e.g. 6 query heads over 3 kv heads in 2 chunks of 3)."""
    parts_k, parts_v = [], []
    for d, other in enumerate(chunks):
        lo, hi = max(ch.kv_need[0], other.kv_new[0]), min(ch.kv_need[1], other.kv_new[1])
        if lo < hi:
            a = lo - other.kv_new[0]
            parts_k.append(ks[d][:, a:a + hi - lo])
            parts_v.append(vs[d][:, a:a + hi - lo])
    k = parts_k[0] if len(parts_k) == 1 else torch.cat(parts_k, dim=1)
    v = parts_v[0] if len(parts_v) == 1 else torch.cat(parts_v, dim=1)
    nq, nk = ch.q[1] - ch.q[0], ch.kv_need[1] - ch.kv_need[0]
    total_q, total_k = chunks[-1].q[1], chunks[-1].kv_need[1]
    ratio = total_q // total_k  # query heads per kv head on this rank
    if nq % nk == 0 and nq // nk == ratio or (nk == 1 and nq <= ratio):
        return k, v
    idx = torch.tensor([(ch.q[0] + i) // ratio - ch.kv_need[0] for i in range(nq)], device=k.device)
    return k.index_select(1, idx), v.index_select(1, idx)


class FusedUlysses:
    """``layer.sp_layer_fn``: the copy-free (and, with chunks, pipelined) Ulysses layer.

    ``chunks``: ``parallel.ulysses_chunks`` (0 = ``auto``); ``comm_dtype``: ``parallel.comm_dtype``.
    Called as ``fn(module, x, positions, ctx)``; runs the module's unchanged path whenever
    :func:`fast_path_reason` names a reason.
    """

    def __init__(self, chunks: int = 1, comm_dtype: str = "fp32", kernel=None):
        self.chunks, self.wire = chunks, WIRE_DTYPES[comm_dtype]
        self.kernel = kernel  # bench only: ``kernel(q, k, v)`` instead of attention (bench/ulysses_comm.py)

    def __call__(self, module, x, positions, ctx):
        why = fast_path_reason(module, x, ctx)
        if why:
            return module.standard_forward(x, positions, ctx)
        method = getattr(ctx, "method", None)
        usp = method == "usp" or (method is None and getattr(ctx, "ring_group", None) is not None)
        group = ctx.ulysses_group if usp else ctx.group
        world = dist.get_world_size(group)
        chunks = self.chunks or auto_chunks(module.n_heads // world,
                                            1 if module.n_kv_heads < world else module.n_kv_heads // world,
                                            x.shape[0], module.head_dim,
                                            (self.wire.itemsize if self.wire is not None else x.element_size()))
        lay = layout(module.n_heads, module.n_kv_heads, module.head_dim, world, chunks)
        pos = gathered_positions(positions, ctx, group)
        pattern = dict(module.pattern)
        sinks = getattr(module, "sinks", None)
        me = dist.get_rank(group)
        if usp:
            from .ring import ring_attention
            from .usp import ring_plan

            rplan = ring_plan(ctx.plan, world)
            perm = inv = None

            def attend(q, k, v, ch):
                s = None if sinks is None else sinks[me * lay.hq + ch.q[0]: me * lay.hq + ch.q[1]]
                return ring_attention(q, k, v, rplan, ctx.ring_group, causal=True, sinks=s, **pattern)
        else:
            from seqshard.kernels import attention

            perm, inv = _perms(ctx.plan, ctx, x.device)
            cu = torch.tensor(ctx.plan.padded_cu_seqlens(), dtype=torch.int32, device=x.device)
            max_len = int((cu[1:] - cu[:-1]).max()) if len(cu) > 1 else 0

            def attend(q, k, v, ch):
                s = None if sinks is None else sinks[me * lay.hq + ch.q[0]: me * lay.hq + ch.q[1]]
                return attention(q, k, v, cu, cu, max_len, max_len, causal=True, sinks=s, **pattern)

        if self.kernel is not None:
            kernel = self.kernel

            def attend(q, k, v, ch):
                return kernel(q, k, v)

        setup = LayerSetup(module, lay, group, pos, attend, self.wire, "usp.ulysses" if usp else "ulysses",
                           perm, inv, torch.is_grad_enabled())
        qn, kn = getattr(module, "q_norm", None), getattr(module, "k_norm", None)
        params = (qn.weight if qn is not None else None, kn.weight if kn is not None else None, sinks)
        weights = [module.wq.weight, module.wq.bias, module.wk.weight, module.wk.bias, module.wv.weight,
                   module.wv.bias, module.wo.weight]
        device = x.device.type
        if torch.is_autocast_enabled(device):  # the Linears' autocast, done by hand: mm(out=) has none
            dt = torch.get_autocast_dtype(device)
            x = x.to(dt)
            weights = [w.to(dt) if w is not None else None for w in weights]
            with torch.autocast(device, enabled=False):
                return _UlyssesLayer.apply(setup, x, graph_anchor(x), *weights, *params)
        return _UlyssesLayer.apply(setup, x, graph_anchor(x), *weights, *params)


def fast_path_reason(module, x, ctx) -> str:
    """Why the copy-free path cannot run this call ('' when it can); the unchanged path runs then."""
    method = getattr(ctx, "method", None)
    if method not in (None, "ulysses", "usp"):
        return f"the step's group runs {method}"
    if getattr(ctx, "plan", None) is None or getattr(ctx, "group", None) is None:
        return "not a sequence-parallel context"
    usp = method == "usp" or (method is None and getattr(ctx, "ring_group", None) is not None)
    group = ctx.ulysses_group if usp else ctx.group
    world = dist.get_world_size(group)
    if module.n_heads % world:
        return "the query heads do not divide the Ulysses degree (uneven heads)"
    if module.n_kv_heads % world and world % module.n_kv_heads:
        return "kv heads and the Ulysses degree do not divide one another"
    for name in ("wq", "wk", "wv", "wo"):
        lin = getattr(module, name)
        if type(lin) is not nn.Linear:
            return f"{name} is a {type(lin).__name__}, not a plain Linear"
        if type(lin.weight) not in (torch.Tensor, nn.Parameter) or hasattr(lin.weight, "ds_id"):
            return f"{name}.weight is sharded or gathered by a wrapper (ZeRO-3 / DTensor)"
    if module.wo.bias is not None:
        return "wo has a bias"
    if x.dim() != 2:
        return "input is not [tokens, dim]"
    return ""
