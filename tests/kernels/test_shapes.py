"""Kernel ops on edge shapes and strong decays (issue 16).

- ``linear_attention``, ``rms_norm``, ``apply_rope``, ``linear_cross_entropy`` accept zero-length
  documents and ``T = 0`` on the torch reference and the Triton path (interpreter), with the
  reference's results (an empty document's final state is its initial state).
- The chunked linear attention (torch, and the Triton kernel on small shapes) against the fp64
  per-token recurrence: rel <= 1e-5 with fp32 inputs for per-token log decays from 0 to -30,
  chunk sizes 16/32/64, with and without document resets: output, final state and the gradients
  of q, k, v, g and the initial state.
"""
import functools

import pytest
import torch

from seqshard.kernels import apply_rope, linear_cross_entropy, rms_norm
from seqshard.kernels.linear_attention import chunk_linear_attention, linear_attention, naive_linear_attention

TOL = 1e-5  # fp32, relative to the reference's largest entry


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes: intra-op threads only contend (10x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def close(name, got, want, tol=TOL):
    assert got.shape == want.shape, f"{name}: {tuple(got.shape)} != {tuple(want.shape)}"
    if want.numel():
        err = ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()
        assert err <= tol, f"{name}: rel err {err:.2e} > {tol:.0e}"


def grads_of(fn, inputs, weights):
    """Forward, a weighted sum of every output, backward -> outputs and input gradients."""
    ins = [None if x is None else x.clone().requires_grad_() for x in inputs]
    outs = fn(*ins)
    loss = sum((o.double() * w).sum() for o, w in zip(outs, weights) if o is not None)
    loss.backward()
    return [o.detach() for o in outs if o is not None], [None if x is None else x.grad for x in ins]


def linear_inputs(t, n_docs, h=2, dk=4, dv=3, decay=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, t, h, dk, generator=gen), torch.randn(1, t, h, dk, generator=gen)
    v = torch.randn(1, t, h, dv, generator=gen)
    g = torch.nn.functional.logsigmoid(torch.randn(1, t, h, generator=gen)) if decay is None else decay
    return q, k, v, g, torch.randn(n_docs, h, dk, dv, generator=gen)


# lengths 0, 3, 0, 17, 0 around real documents; a stream of empty documents; no document at all
EMPTY_CASES = [[0, 3, 3, 20, 20], [0, 0], [0], [0, 0, 0]]
PATHS = ["chunk", "triton"]


def _run(path, q, k, v, g, s0, cu):
    if path == "triton":
        pytest.importorskip("triton")
        from seqshard.kernels.linear_attention.triton_chunk import triton_linear_attention

        return triton_linear_attention(q, k, v, g, None, s0, True, cu)
    return linear_attention(q, k, v, g, None, s0, True, cu, impl=chunk_linear_attention)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bounds", EMPTY_CASES, ids=str)
def test_linear_attention_zero_length_documents_and_empty_stream(path, bounds):
    cu = torch.tensor(bounds, dtype=torch.int32)
    q, k, v, g, s0 = linear_inputs(bounds[-1], len(bounds) - 1)
    weights = [torch.linspace(-1, 1, v.numel()).view_as(v).double(), torch.linspace(1, -2, s0.numel()).view_as(s0).double()]
    got = grads_of(functools.partial(_run, path, cu=cu), (q, k, v, g, s0), weights)
    ref = grads_of(lambda *a: linear_attention(*a[:4], None, a[4], True, cu, impl=naive_linear_attention),
                   (q, k, v, g, s0), weights)
    for name, a, b in zip(["o", "final_state"], got[0], ref[0]):
        close(f"{path} {name}", a, b)
    for name, a, b, x in zip(["dq", "dk", "dv", "dg", "d initial_state"], got[1], ref[1], (q, k, v, g, s0)):
        zero = torch.zeros_like(x)  # an input no output reads (T = 0) may get no gradient at all
        close(f"{path} {name}", zero if a is None else a, zero if b is None else b)
    lens = (cu[1:] - cu[:-1]).tolist()
    for i, n in enumerate(lens):
        if n == 0:  # an empty document hands its initial state through unchanged
            close(f"{path} empty document {i} final state", got[0][1][i], s0[i])


@pytest.mark.parametrize("path", PATHS)
def test_linear_attention_batched_t0(path):
    q, k, v, g, s0 = linear_inputs(0, 2)
    q, k, v, g = (torch.cat([x, x]) for x in (q, k, v, g))  # a batch of 2 rows of 0 tokens
    o, state = _run(path, q, k, v, g, s0, None) if path == "triton" else \
        chunk_linear_attention(q, k, v, g, None, s0, True)
    assert o.shape == (2, 0, 2, 3)
    close(f"{path} state passes through", state, s0)


@pytest.mark.parametrize("mode", ["force_reference", "force_triton"])
def test_pointwise_ops_accept_t0(mode, request):
    request.getfixturevalue(mode)
    x, w = torch.randn(0, 8, requires_grad=True), torch.randn(8, requires_grad=True)
    y = rms_norm(x, w)
    y.sum().backward()
    assert y.shape == (0, 8) and x.grad.shape == (0, 8) and torch.equal(w.grad, torch.zeros(8))
    x = torch.randn(0, 2, 8, requires_grad=True)
    y = apply_rope(x, torch.zeros(0, dtype=torch.long))
    y.sum().backward()
    assert y.shape == (0, 2, 8) and x.grad.shape == (0, 2, 8)
    for reduction in ("sum", "mean"):
        h, w = torch.randn(0, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
        loss = linear_cross_entropy(h, w, torch.zeros(0, dtype=torch.long), reduction=reduction)
        loss.backward()
        assert loss.item() == 0 and h.grad.shape == (0, 8) and torch.equal(w.grad, torch.zeros(20, 8))


# Strong decays: per-token log decays from 0 to -30 (a document reset is a decay near -30)
def decay_patterns(t, h, gen):
    uniform = -30 * torch.rand(1, t, h, generator=gen)
    strong_then_weak = uniform.clone()
    strong_then_weak[:, t // 3:] = -1e-3 * torch.rand(1, t - t // 3, h, generator=gen)
    resets = -0.05 * torch.rand(1, t, h, generator=gen)
    resets[:, ::29] = -30.0
    consts = {f"const {c}": torch.full((1, t, h), c) for c in (0.0, -1.0, -10.0, -30.0)}
    return {**consts, "uniform 0..-30": uniform, "strong then weak": strong_then_weak, "sparse -30": resets}


def fp64_reference(q, k, v, g, s0, cu):
    """The per-token recurrence in fp64 (inputs upcast), per document."""
    return linear_attention(q.double(), k.double(), v.double(), g.double(), None,
                            None if s0 is None else s0.double(), True, cu, impl=naive_linear_attention)


GRAD_NAMES = ("o", "final_state", "dq", "dk", "dv", "dg", "d initial_state")


def check_against_fp64(impls, t, cu, seed, init=False):
    """Every ``impls`` entry ``(q, k, v, g, s0, cu) -> (o, final_state)`` against the fp64
    recurrence (computed once per decay pattern): outputs and the gradients of q, k, v, g (and of
    a random initial state when ``init``)."""
    gen = torch.Generator().manual_seed(seed)
    h, dk, dv = 2, 8, 8
    q, k, v = (torch.randn(1, t, h, d, generator=gen) for d in (dk, dk, dv))
    cu = torch.tensor([0, t] if cu is None else cu, dtype=torch.int32)
    n = len(cu) - 1
    s0 = torch.randn(n, h, dk, dv, generator=gen) if init else None
    weights = [torch.randn(1, t, h, dv, generator=gen).double(), torch.randn(n, h, dk, dv, generator=gen).double()]
    for label, g in decay_patterns(t, h, gen).items():
        ref = grads_of(lambda *a: fp64_reference(*a, cu), [None if x is None else x.double() for x in (q, k, v, g, s0)],
                       weights)
        for impl_name, impl in impls.items():
            got = grads_of(lambda *a: impl(*a, cu), (q, k, v, g, s0), weights)
            for name, x, y in zip(GRAD_NAMES, got[0] + got[1], ref[0] + ref[1]):
                if y is not None:
                    close(f"{impl_name}, {label}: {name}", x, y)


def chunked(chunk):
    impl = functools.partial(chunk_linear_attention, chunk_size=chunk)
    return lambda q, k, v, g, s0, cu: linear_attention(q, k, v, g, None, s0, True, cu, impl=impl)


@pytest.mark.parametrize("resets", [False, True], ids=["one document", "document resets"])
def test_chunked_matches_fp64_recurrence_under_strong_decays(resets):
    """Chunk sizes 16, 32, 64; documents of 37, 1, 62 and 50 tokens with resets."""
    check_against_fp64({f"chunk {c}": chunked(c) for c in (16, 32, 64)}, 150,
                       [0, 37, 38, 100, 150] if resets else None, seed=int(resets), init=resets)


def triton_chunked(chunk, monkeypatch):
    """The Triton kernel (interpreter) with ``chunk`` tokens per chunk."""
    pytest.importorskip("triton")
    from seqshard.kernels.linear_attention import triton_chunk

    def run(q, k, v, g, s0, cu):
        monkeypatch.setattr(triton_chunk, "CHUNK", chunk)
        return triton_chunk.triton_linear_attention(q, k, v, g, None, s0, True, cu)

    return run


@pytest.mark.parametrize("t,cu", [(70, [0, 3, 4, 70]), pytest.param(150, None, marks=pytest.mark.slow),
                                  pytest.param(150, [0, 37, 38, 100, 150], marks=pytest.mark.slow)],
                         ids=["document resets", "one long document", "long document resets"])
def test_triton_chunk_matches_fp64_recurrence_under_strong_decays(t, cu, monkeypatch):
    """Output, final state and every gradient (dg and d initial_state included) of the Triton
    kernel, chunk sizes 16, 32, 64 (the 66-token document spans 2 to 5 chunks), small shapes."""
    check_against_fp64({f"triton chunk {c}": triton_chunked(c, monkeypatch) for c in (16, 32, 64)}, t, cu,
                       seed=3, init=True)


def test_triton_decay_gradient_under_constant_strong_decay():
    """dg is ~exp(-30) here; the kernel sums each of its terms with its own exponent (the identity
    ``revcumsum(q . dq - k . dk)`` + final-state term had rel err ~1e6 on this case)."""
    pytest.importorskip("triton")
    from seqshard.kernels.linear_attention.triton_chunk import triton_linear_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 40, 1, 16, generator=gen) for _ in range(3))
    g = torch.full((1, 40, 1), -30.0)
    w = [torch.randn(1, 40, 1, 16, generator=gen).double(), torch.randn(1, 1, 16, 16, generator=gen).double()]
    got = grads_of(lambda *a: triton_linear_attention(*a, output_final_state=True), (q, k, v, g), w)
    ref = grads_of(lambda *a: naive_linear_attention(*a, output_final_state=True), [x.double() for x in (q, k, v, g)], w)
    assert ref[1][3].abs().max() < 1e-11  # the case stays one where dg is tiny
    close("dg", got[1][3], ref[1][3])
