"""Activation checkpointing (full, selective), offload and tiled MLP reproduce the plain run's
losses on real gloo ranks, and selective checkpointing repeats no attention collective."""
import pytest
import torch

from seqshard.models.llama import SwiGLU
from seqshard.train.memory import mlp_tile_count, tiled_mlp_forward
from tests.helpers.ranks import run_ranks
from tests.helpers.training import assert_losses_close, small_spec

MODES = {"full": ["train.activation_checkpointing=full"],
         "selective": ["train.activation_checkpointing=selective"],
         "lean": ["train.activation_checkpointing=lean", "train.mlp_tiles=0"],
         "offload": ["train.activation_checkpointing=full", "train.offload_activations=true"],
         "tiled_mlp": ["train.mlp_tiles=3"],
         "all": ["train.activation_checkpointing=selective", "train.offload_activations=true", "train.mlp_tiles=0"]}
METHODS = {"ulysses": ["parallel.sp=2", "parallel.sp_method=ulysses"],
           "ring": ["parallel.sp=2", "parallel.sp_method=ring", "parallel.layout=zigzag"],
           "usp": ["parallel.sp=4", "parallel.sp_method=usp", "parallel.ulysses=2"],
           "lasp2": ["parallel.sp=2", "parallel.sp_method=lasp2", "model.arch=linear_llama"],
           "hybrid": ["parallel.sp=2", "parallel.sp_method=lasp2", "model.arch=hybrid", "model.layer_pattern=LA"],
           "deepspeed": ["parallel.sp=2", "parallel.sp_method=ulysses", "train.engine=deepspeed",
                         "train.zero_stage=2"],
           "adaptive": ["parallel.sp_method=adaptive", "parallel.max_sp=2", "parallel.planner.memory_tokens=128"]}


def train_modes(rank, world, out_dir, method, modes, steps):
    """Train the plain run and each mode on these ranks (one spawn); losses and comm bytes per run."""
    from seqshard.train.trainer import train

    results = {}
    for mode in ["plain", *modes]:
        extra = METHODS[method] + [f"train.steps={steps}"] + MODES.get(mode, [])
        history = train(small_spec(f"{out_dir}/{method}_{mode}", world, extra))
        results[mode] = ([m["loss"] for m in history], [m["comm_bytes"] for m in history])
    return results


def _check(results, modes):
    plain_losses, plain_bytes = results["plain"]
    for mode in modes:
        assert_losses_close(results[mode][0], plain_losses, rel=1e-5)
    return plain_bytes


def test_modes_reproduce_plain_losses_ulysses_ring(tmp_path):
    """Default suite: 2 ranks, ulysses and ring zigzag; every mode; comm bytes under full exceed
    selective's, which equal the plain run's (backward repeats no collective)."""
    for method, modes in (("ulysses", ["full", "selective", "lean", "all"]), ("ring", ["full", "selective"])):
        results = run_ranks(2, train_modes, str(tmp_path), method, modes, 3)[0]
        plain_bytes = _check(results, modes)
        assert results["selective"][1] == plain_bytes, (method, results["selective"][1], plain_bytes)
        assert all(f > p > 0 for f, p in zip(results["full"][1], plain_bytes)), (method, results["full"][1])
        if "lean" in modes:  # lean repeats the exchanges (not the kernel): the same bytes as full
            assert results["lean"][1] == results["full"][1], (results["lean"][1], results["full"][1])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ulysses", "ring", "usp", "lasp2", "hybrid", "deepspeed", "adaptive"])
def test_modes_reproduce_plain_losses_5_steps(method, tmp_path):
    world = 4 if method == "usp" else 2
    modes = list(MODES)
    results = run_ranks(world, train_modes, str(tmp_path), method, modes, 5)[0]
    plain_bytes = _check(results, modes)
    if method != "adaptive":
        assert results["selective"][1] == plain_bytes
        assert sum(results["full"][1]) > sum(plain_bytes)


@pytest.mark.parametrize("mode,pattern", [("lean", {}), ("full", {}), ("selective", {}),
                                          ("lean", dict(attn_sinks=True, sliding_window=7, layer_types="FSF"))])
def test_lean_checkpointing_runs_each_attention_kernel_once(mode, pattern, monkeypatch):
    """One process, 3 layers, 2 documents: every checkpointing mode gives the plain run's loss and
    gradients (sinks and a sliding window included); ``lean`` and ``selective`` run the attention
    kernel once per layer (forward), ``full`` twice (the recomputation), and the backward kernel once
    per layer in every mode."""
    import importlib

    from seqshard.models.config import ModelConfig
    from seqshard.models.context import VarlenContext
    from seqshard.models.llama import build_llama
    from seqshard.train.memory import apply_memory_options
    from seqshard.launch.spec import TrainSpec

    attn_mod = importlib.import_module("seqshard.kernels.attention")  # the package, not the function
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=50, **pattern)
    plain = build_llama(cfg)
    if pattern:
        with torch.no_grad():
            for layer in plain.layers:
                layer.attn.sinks.normal_()  # non-zero sinks, so their gradient is checked
    model = build_llama(cfg)
    model.load_state_dict(plain.state_dict())
    apply_memory_options(model, TrainSpec(activation_checkpointing=mode, mlp_tiles=0))
    tokens = torch.randint(0, 50, (40,))
    positions = torch.cat([torch.arange(25), torch.arange(15)])
    ctx = VarlenContext.from_lengths([25, 15])
    labels = torch.roll(tokens, -1)
    ref = plain(tokens, positions, ctx, labels)
    ref.backward()
    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = attn_mod.attention_forward, attn_mod.attention_backward

    def count(name, fn):
        def wrapped(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)
        return wrapped

    monkeypatch.setattr(attn_mod, "attention_forward", count("fwd", fwd))
    monkeypatch.setattr(attn_mod, "attention_backward", count("bwd", bwd))
    loss = model(tokens, positions, ctx, labels)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert calls == {"fwd": 6 if mode == "full" else 3, "bwd": 3}, calls


@pytest.mark.parametrize("tiles", [0, 1, 3, 7])
def test_tiled_mlp_matches_plain(tiles):
    torch.manual_seed(0)
    mlp = SwiGLU(16, 40).double()
    x = torch.randn(29, 16, dtype=torch.float64, requires_grad=True)
    ref = mlp(x)
    ref.square().sum().backward()
    ref_grads = [x.grad.clone()] + [p.grad.clone() for p in mlp.parameters()]
    x.grad = None
    mlp.zero_grad()
    out = tiled_mlp_forward(mlp, x, tiles)
    out.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip([x.grad] + [p.grad for p in mlp.parameters()], ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert mlp_tile_count(29, 16, tiles) == {0: 2, 1: 1, 3: 3, 7: 7}[tiles]


def test_tiled_mlp_never_holds_full_ffn_intermediate():
    """Largest tensor saved for backward by a 4-tile MLP is one tile's [T/4, ffn] (or smaller)."""
    mlp = SwiGLU(8, 64)
    x = torch.randn(64, 8, requires_grad=True)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        tiled_mlp_forward(mlp, x, 4).sum().backward()
    assert max(sizes) <= 16 * 64, max(sizes)
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mlp(x).sum()
    assert max(sizes) == 64 * 64  # the untiled MLP does save [T, ffn]


def test_tiled_mlp_backward_writes_tile_gradients_into_one_buffer():
    """No tile's gradient is widened to the whole input: one split node takes all tile gradients
    (a SliceBackward per tile would zero-fill and add a full [T, dim] gradient n times)."""
    mlp = SwiGLU(8, 24)
    x = torch.randn(64, 8, requires_grad=True)
    out = tiled_mlp_forward(mlp, x, 8)
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(fn for fn, _ in node.next_functions)
    names = [type(n).__name__ for n in seen]
    assert names.count("SplitWithSizesBackward0") == 1, names
    assert not [n for n in names if n.startswith("Slice")], names
    out.square().sum().backward()
    torch.testing.assert_close(x.grad, torch.autograd.grad(mlp(x).square().sum(), x)[0])
