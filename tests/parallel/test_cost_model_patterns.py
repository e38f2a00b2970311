"""Issue #29: the cost model prices windowed and chunked documents by their masked area, not L^2,
and the planner's batched table still equals the per-call prices."""
import numpy as np
import pytest

from seqshard.models import ModelConfig
from seqshard.parallel.cost_model import CostModel
from seqshard.parallel.hardware import get_profile

PROFILE = get_profile("h100_nvlink_ib400")


def model(**kw):
    return CostModel.from_model_config(ModelConfig(dim=1024, n_layers=6, n_heads=16, n_kv_heads=4, ffn_dim=4096,
                                                   **kw), PROFILE)


def test_attention_area_follows_the_mask():
    full, win = model(), model(sliding_window=1024)
    assert win.attn_layers == (("window", 1024),) * 6
    L = np.array([512.0, 65536.0])
    np.testing.assert_allclose(win.attention_area(L), [512.0 ** 2, 2 * 65536 * 1024 - 1024 ** 2])
    np.testing.assert_allclose(full.attention_area(L), L * L)
    chunk = model(attn_chunk_size=2048)
    np.testing.assert_allclose(chunk.attention_area(L), [512.0 ** 2, 65536 * 2048])
    # Gemma 3 style 5:1: the average of five windowed layers and one full one
    mixed = model(sliding_window=1024, sliding_window_pattern=6)
    np.testing.assert_allclose(mixed.attention_area(L[1:]), (5 * (2 * 65536 * 1024 - 1024 ** 2) + 65536 ** 2) / 6)


def test_windowed_long_document_is_priced_near_linear():
    full, win = model(), model(sliding_window=1024)
    att_full = float(full.attention_compute_time(65536, 8))
    att_win = float(win.attention_compute_time(65536, 8))
    assert att_win / att_full == pytest.approx((2 * 65536 * 1024 - 1024 ** 2) / 65536 ** 2)
    assert float(win.time(65536, 8)) < float(full.time(65536, 8))
    # doubling a windowed document roughly doubles its attention, it does not quadruple it
    assert float(win.attention_compute_time(131072, 8)) / att_win < 2.05


def test_table_equals_per_call_prices_for_windowed_models():
    win = model(sliding_window=1024, sliding_window_pattern=3)
    lengths = np.array([300.0, 1024.0, 5000.0, 70000.0])
    names, table = win.method_times(lengths, [1, 2, 8])
    for k, d in enumerate([1, 2, 8]):
        for m, method in enumerate(names[k]):
            np.testing.assert_allclose(table[m, :, k], win.method_time(lengths, d, method), rtol=1e-12)


def test_mask_work_counts_kept_pairs_and_layouts_balance_windows():
    """ShardPlan.mask_work equals a brute-force count of kept pairs, and the zigzag / contiguous
    layouts keep windowed and chunked work balanced (max over mean, measured: 1.008-1.018 for a
    1K window, 1.0-1.14 for 8K chunks on 8 ranks)."""
    import torch

    from seqshard.kernels.attention.masks import make_mask, visible
    from seqshard.parallel.plan import ShardPlan

    small = ShardPlan.build([0, 37, 50], 2, "zigzag")
    for mask in (make_mask(True, (5, 0)), make_mask(True, chunk_size=8), make_mask(True, (5, 0), chunk_size=8)):
        for rank in range(2):
            brute = 0
            for p in small.pieces[rank]:
                doc_len = small.cu_seqlens[p.doc + 1] - small.cu_seqlens[p.doc]
                pq = torch.arange(p.start, p.start + p.real_len)
                brute += int(visible(pq, torch.arange(doc_len), mask).sum())
            assert small.mask_work(rank, mask) == brute
    lengths = np.cumsum([0, 65536, 20000, 3000]).tolist()
    for mask, bound in ((make_mask(True, (1023, 0)), 1.03), (make_mask(True, chunk_size=8192), 1.2)):
        for layout in ("zigzag", "contiguous"):
            plan = ShardPlan.build(lengths, 8, layout)
            work = [plan.mask_work(r, mask) for r in range(8)]
            assert max(work) / np.mean(work) <= bound, (layout, work)
