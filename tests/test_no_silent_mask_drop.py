"""DESIGN.md invariant 10 (issue #29): no path drops a window, soft-cap, chunk or sink silently.

Every kernel path gives the patterned reference (which differs from plain causal attention on
these inputs); every SP callable and the default one take the pattern keywords; a model layer
with a pattern refuses an attention callable that cannot take it (TypeError, not full attention);
``from_hf`` keeps the window of a checkpoint. The SP methods' numbers are checked on gloo ranks
in ``tests/parallel/test_sp_patterns.py`` (each case asserts it can tell a dropped pattern)."""
import inspect

import pytest
import torch

from seqshard.kernels.attention import attention, attention_reference
from seqshard.models import ModelConfig, VarlenContext, build_llama
from seqshard.parallel.parallelize import SOFTMAX_METHODS

PATTERNS = [dict(window_size=(4, 0)), dict(chunk_size=6), dict(softcap=1.0), dict(sinks=torch.full((2,), 2.0))]


@pytest.mark.parametrize("kernels", ["reference", "blockwise", "auto", "triton"])
@pytest.mark.parametrize("pattern", PATTERNS, ids=["window", "chunk", "softcap", "sinks"])
def test_every_kernel_path_honours_the_pattern(monkeypatch, kernels, pattern):
    if kernels == "triton":
        pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(30, 2, 16, generator=gen) * 2 for _ in range(3))
    cu = torch.tensor([0, 30], dtype=torch.int32)
    want = attention_reference(q, k, v, cu, cu, causal=True, **pattern)
    plain = attention_reference(q, k, v, cu, cu, causal=True)
    assert (want - plain).abs().max() > 1e-2
    monkeypatch.setenv("SEQSHARD_KERNELS", kernels)
    torch.testing.assert_close(attention(q, k, v, cu, cu, causal=True, **pattern), want, rtol=2e-5, atol=2e-5)


def test_every_sp_callable_takes_the_pattern_keywords():
    from seqshard.models.context import causal_varlen_attention
    from seqshard.parallel.adaptive import adaptive_attention

    for name, fn in [*SOFTMAX_METHODS.items(), ("default", causal_varlen_attention), ("adaptive", adaptive_attention)]:
        params = inspect.signature(fn).parameters
        assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()), name


def test_a_layer_refuses_a_callable_without_pattern_keywords():
    cfg = ModelConfig(n_layers=2, layer_types="SF", sliding_window=4, vocab_size=50)
    model = build_llama(cfg)
    for layer in model.layers:
        layer.attn.attention_fn = lambda q, k, v, ctx: q  # knows nothing of windows
    tokens = torch.arange(12) % 50
    with pytest.raises(TypeError, match="window_size"):
        model(tokens, torch.arange(12), VarlenContext.from_lengths([12]))


def test_the_window_changes_the_model_output():
    """The same weights with and without the window differ: the layer really passes it on."""
    torch.manual_seed(0)
    windowed = build_llama(ModelConfig(n_layers=2, sliding_window=4, vocab_size=50))
    full = build_llama(ModelConfig(n_layers=2, vocab_size=50))
    full.load_state_dict(windowed.state_dict())
    tokens, ctx = torch.arange(24) % 50, VarlenContext.from_lengths([24])
    a, b = windowed(tokens, torch.arange(24), ctx), full(tokens, torch.arange(24), ctx)
    torch.testing.assert_close(a[:4], b[:4])  # the first 4 tokens see the same keys either way
    assert (a[4:] - b[4:]).abs().max() > 1e-4
