"""Issue #32: the copy-free, head-chunk pipelined Ulysses layer (``seqshard.parallel.ulysses_layer``)
on real gloo ranks: a native model under ``parallelize`` equals the same model on one device, loss
and every parameter's gradient (fp32, relative 1e-5), with 1, 2 and the most chunks; GQA with kv
heads split and replicated (sp > kv heads), kv heads shared by chunks and expanded inside a chunk,
q/k norm, q/k/v biases, sinks, sliding windows, soft-caps, packed documents, zigzag, USP, a rank
holding only padding, and the configurations that run the unchanged path (uneven heads). The
copy-free path is asserted to have run (or not) from the step's collective log."""
import pytest

from seqshard.models.config import RopeScalingConfig

from tests.helpers.ranks import run_ranks
from tests.parallel.ulysses_layer_checks import check_layer, check_layer_and_saved_bytes

U = dict(sp_method="ulysses")
PATTERNS = dict(qk_norm=True, qkv_bias=True, attn_sinks=True, layer_types="SF", sliding_window=5, attn_softcap=3.0)

CASES_2 = [
    ("gqa c1", {}, [37, 20, 7], dict(U, ulysses_chunks=1), True),
    ("gqa kv shared by chunks c2", {}, [37, 20, 7], dict(U, ulysses_chunks=2), True),
    ("h8 kv4 c4", dict(n_heads=8, n_kv_heads=4), [30, 33], dict(U, ulysses_chunks=4), True),
    ("h12 kv6 c2 expanded", dict(n_heads=12, n_kv_heads=6, dim=96), [30, 33], dict(U, ulysses_chunks=2), True),
    ("norm bias sinks window softcap c2", PATTERNS, [25, 14], dict(U, ulysses_chunks=2), True),
    ("zigzag c2", {}, [37, 20], dict(U, layout="zigzag", ulysses_chunks=2), True),
    ("auto", {}, [37, 20], dict(U, ulysses_chunks="auto"), True),
    # comm_dtype bf16: loss within 2e-3 relative of the fp32 reference, gradients within 2e-2 (the
    # payload is rounded to bfloat16 on each of the four exchanges; compute stays fp32)
    ("bf16 wire c2", {}, [37, 20], dict(U, ulysses_chunks=2, comm_dtype="bf16"), True),
]
CASES_4 = [
    ("usp 2x2 c2", {}, [41, 22], dict(sp_method="usp", ulysses=2, ulysses_chunks=2), True),
    # sp 4 > 2 kv heads (each rank receives the one kv head it reads) and rank 3 holds only padding
    ("sp4 > kv2, padding-only rank, c2", dict(n_heads=8, n_kv_heads=2), [3, 2], dict(U, ulysses_chunks=2), True),
]
CASES_3 = [("uneven heads: unchanged path", {}, [23, 9], dict(U, ulysses_chunks=1), False)]


def test_copy_free_layer_two_ranks():
    """... and the layer saves no more for backward than the unchanged path plus RoPE tables."""
    assert all(run_ranks(2, check_layer_and_saved_bytes, CASES_2))


def test_copy_free_layer_four_ranks():
    assert all(run_ranks(4, check_layer, CASES_4))


@pytest.mark.slow
def test_uneven_heads_take_the_unchanged_path():
    assert all(run_ranks(3, check_layer, CASES_3))


def _matrix(world, configs):
    """Every config with 1, 2 and the most chunks (the query heads per rank) that divide the heads."""
    out = []
    for tag, kw, lengths, cfg in configs:
        hq = kw.get("n_heads", 4) // cfg.get("ulysses", world) if cfg["sp_method"] == "usp" else \
            kw.get("n_heads", 4) // world
        for c in sorted({1, 2, hq}):
            if hq % c == 0:
                out.append((f"{tag} c{c}", kw, lengths, dict(cfg, ulysses_chunks=c), True))
    return out


SLOW_2 = _matrix(2, [("patterns", PATTERNS, [25, 14, 6], U),
                     ("patterns zigzag", PATTERNS, [25, 14, 6], dict(U, layout="zigzag")),
                     ("h8 kv2", dict(n_heads=8, n_kv_heads=2), [40, 17], U),
                     ("mha h8 kv8", dict(n_heads=8, n_kv_heads=8), [40, 17], U),
                     ("chunked attention", dict(layer_types="CF", attn_chunk_size=8), [40, 17], U),
                     ("bf16 wire", dict(n_heads=8, n_kv_heads=2), [40, 17], dict(U, comm_dtype="bf16")),
                     ("llama3 rope scaling", dict(rope_scaling=RopeScalingConfig(
                         type="llama3", factor=8.0, original_max_position_embeddings=16)), [40, 17], U),
                     ("gemma block, local rope theta", dict(block="gemma", qk_norm=True, layer_types="SF",
                                                            sliding_window=6, rope_theta=1e6,
                                                            local_rope_theta=1e4), [40, 17], U)])
SLOW_4 = _matrix(4, [("sp4 kv1", dict(n_kv_heads=1), [41, 22, 9], U),
                     ("sp4 h8 kv2 patterns", dict(PATTERNS, n_heads=8, n_kv_heads=2), [41, 22, 9], U),
                     ("sp4 h16 kv8", dict(n_heads=16, n_kv_heads=8), [41, 22, 9], U),
                     ("usp 2x2 patterns", PATTERNS, [41, 22], dict(sp_method="usp", ulysses=2)),
                     ("usp 2x2 h8", dict(n_heads=8, n_kv_heads=2), [41, 22], dict(sp_method="usp", ulysses=2)),
                     ("padding-only rank", dict(n_heads=8, n_kv_heads=4), [3, 2], U)])


@pytest.mark.slow
def test_copy_free_layer_matrix_two_ranks():
    assert all(run_ranks(2, check_layer, SLOW_2))


@pytest.mark.slow
def test_copy_free_layer_matrix_four_ranks():
    assert all(run_ranks(4, check_layer, SLOW_4))


def test_auto_chunks_rule():
    """auto: the most chunks (<= 4, dividing the local query heads) whose smallest per-peer message
    is >= 256 KiB; 1 when two chunks would already be smaller."""
    from seqshard.parallel.ulysses_layer import auto_chunks, chunk_heads

    assert auto_chunks(8, 2, 64, 64, 4) == 1  # 64 tokens: tiny messages
    assert auto_chunks(8, 2, 16384, 128, 4) == 4
    assert auto_chunks(6, 6, 16384, 128, 4) == 3  # 4 does not divide 6
    assert auto_chunks(1, 1, 1 << 20, 128, 4) == 1
    # chunks of 2 over one kv head: the kv head travels with the first chunk only
    assert [c.width for c in chunk_heads(4, 1, 2)] == [4, 2]
    assert [(c.kv_new, c.kv_need) for c in chunk_heads(6, 3, 2)] == [((0, 2), (0, 2)), ((2, 3), (1, 3))]
