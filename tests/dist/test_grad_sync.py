"""BucketedGradReducer: the default bucket size splits a small model (no bucket under 1 MB),
reductions start during backward, and the result is the flat all-reduce's sum (the exact
full-batch gradient)."""
import torch

from seqshard.dist.grad_sync import (MAX_BUCKET_MB, MIN_BUCKET_MB, MIN_BUCKETS, BucketedGradReducer,
                                     default_bucket_mb)
from tests.helpers.ranks import run_ranks

TINY = dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=384, vocab_size=259)  # examples/tiny.yaml


def _tiny_model():
    from seqshard.models import build_model
    from seqshard.models.config import ModelConfig

    torch.manual_seed(0)
    return build_model(ModelConfig(**TINY))


def test_default_bucket_size_caps_at_25mb_and_splits_small_models():
    assert default_bucket_mb([torch.nn.Parameter(torch.zeros(2**27))]) == MAX_BUCKET_MB  # 512 MB of fp32
    # 16 MB: a 25 MB bucket would be one; 8 buckets of 2 MB overlap with backward
    assert default_bucket_mb([torch.nn.Parameter(torch.zeros(2**22))]) == 16 / MIN_BUCKETS
    # but no bucket under 1 MB (each is a collective): examples/tiny.yaml's 1.76 MB model gets 2,
    # a model under 1 MB one
    assert default_bucket_mb([torch.nn.Parameter(torch.zeros(2**16))]) == MIN_BUCKET_MB
    assert len(BucketedGradReducer(_tiny_model().parameters()).buckets) == 2


def _bucketed_equals_flat(rank, world):
    import torch.distributed as dist

    from seqshard.dist.grad_sync import all_reduce_gradients
    from seqshard.models import VarlenContext

    grads = {}
    for mode in ("flat", "bucketed"):
        model = _tiny_model()
        reducer = BucketedGradReducer(model.parameters()) if mode == "bucketed" else None
        torch.manual_seed(1 + rank)  # a different batch per rank
        tokens = torch.randint(0, 259, (64,))
        loss = model(tokens, torch.arange(64), VarlenContext.from_lengths([64]), tokens)
        launched_in_backward = 0
        if reducer is not None:
            reducer.arm()
        loss.backward()
        if reducer is not None:
            launched_in_backward = len(reducer.works)
            reducer.finish()
        else:
            all_reduce_gradients(model.parameters())
        grads[mode] = [p.grad.clone() for p in model.parameters()]
    assert dist.get_world_size() == world
    for a, b in zip(grads["flat"], grads["bucketed"]):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    return launched_in_backward


def test_bucketed_reduction_starts_in_backward_and_equals_flat_sum():
    launched = run_ranks(2, _bucketed_equals_flat)
    assert all(n >= 1 for n in launched), launched  # some buckets went out before backward ended
