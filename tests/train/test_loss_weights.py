"""Per-source ``loss_weight`` and the per-step ``loss_by_source`` metric (issue #30).

The step loss is ``sum_t w_s(t) ce_t / sum_t w_s(t)`` over the global step's loss tokens
(train/source_loss.py). Three small sources share every step: prose, code and chat (loss on the
assistant turns only), weighted 2.0 / 0.5 / 1.5, on a tiny transformers Llama checkpoint. Checked:
the single-process first step against an independent hand computation with transformers' model on
each packed document alone (1e-5); layouts (sp 2 by default; dp 2, adaptive, ring, micro-batches,
fsdp2, MoE and MiniMax aux losses, the generic transformers wrap: slow) reproducing the single-process weighted trajectory and ``loss_by_source`` (1e-4);
uniform weights giving the unweighted trajectory (only ratios count)."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from tests.data.test_chat import chat_spec, chat_tokenizer_folder, conversations  # noqa: E402
from tests.helpers.hf_models import save_hf_model  # noqa: E402
from tests.helpers.ranks import run_ranks  # noqa: E402
from tests.helpers.training import assert_losses_close  # noqa: E402

SLOW = pytest.mark.slow
WEIGHTS = {"prose": 2.0, "code": 0.5, "chat": 1.5}


def code_rows(path, n=40):
    path.write_text("".join(json.dumps({"content": f"def f{i}(x):\n    return x * {i}\n" * (1 + i % 4)}) + "\n"
                            for i in range(n)))
    return path


def prose_rows(path, n=60):
    words = "the of long context data mixture weighted loss source token step".split()
    path.write_text("".join(json.dumps({"text": " ".join(words[(i * j) % len(words)] for j in range(8 + i % 23))})
                            + "\n" for i in range(n)))
    return path


def weighted_raw(tmp_path, weights=WEIGHTS, layout=None, family="llama"):
    """The spec (a raw dict): window batching over the three sources, 4 steps of 512 tokens."""
    folder = tmp_path / "hf"
    if not folder.exists():
        save_hf_model(family, folder)
        chat_tokenizer_folder(folder)
        conversations(tmp_path / "chat.jsonl", n=40)
        code_rows(tmp_path / "code.jsonl", n=60)
        prose_rows(tmp_path / "prose.jsonl")
    raw = chat_spec(folder, tmp_path / "chat.jsonl", tmp_path / "run", cache_dir=str(tmp_path / "cache"),
                    max_seq_len=128, batching="window")
    for key in ("format", "source"):
        del raw["data"][key]
    raw["data"]["sources"] = [
        {"source": str(tmp_path / "prose.jsonl"), "weight": 0.3, "name": "prose", "loss_weight": weights["prose"]},
        {"source": str(tmp_path / "code.jsonl"), "weight": 0.4, "name": "code", "text_field": "content",
         "loss_weight": weights["code"]},
        {"source": str(tmp_path / "chat.jsonl"), "weight": 0.3, "name": "chat", "format": "chat",
         "loss_weight": weights["chat"]}]
    raw["data"]["eval"] = {"sources": [
        {"source": str(tmp_path / "code.jsonl"), "text_field": "content", "name": "code"},
        {"source": str(tmp_path / "chat.jsonl"), "format": "chat", "name": "chat"}]}
    raw["train"].update(steps=4, warmup_steps=2, log_every=100, lr=3e-3, eval_every=4, eval_tokens=512)
    raw["parallel"] = dict(layout or {})
    return raw


def run_steps(rank, world, raw, out):
    """Train; return each step's (loss, loss_by_source, loss_tokens_by_source, tokens_by_source) and,
    on one process, the first step's rows (tokens, labels, sources, doc_lens) as plain lists."""
    from seqshard.launch.spec import from_dict
    from seqshard.train.evaluate import load_data
    from seqshard.train.trainer import build_batch_builder, train

    raw = {**raw, "train": {**raw["train"], "output_dir": out}}
    spec = from_dict(raw, world)
    history = train(spec)
    steps = [(m["loss"], m["loss_by_source"], m["loss_tokens_by_source"], m["tokens_by_source"]) for m in history]
    if "aux_loss" in history[0]:  # MoE: the load-balancing loss, its documents weighted too
        steps = [(*s, m["aux_loss"]) for s, m in zip(steps, history)]
    evals = [(m["eval_loss"], m["eval_loss_by_source"], m["eval_loss_tokens_by_source"]) for m in history
             if "eval_loss" in m]
    rows = None
    if world == 1:  # the same first batch again: the builder depends on the seed and the step only
        batch = build_batch_builder(spec, load_data(spec, rank)[0]).next_batch()
        rows = [(r.tokens.tolist(), r.labels.tolist(), r.sources.tolist(), r.doc_lens) for r in batch.rows]
    return steps, rows, evals


def by_hand(folder, rows, names):
    """transformers' model on each document alone: per-source cross-entropy sums and loss-token counts."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ce_sum, count = torch.zeros(len(names), dtype=torch.float64), torch.zeros(len(names), dtype=torch.float64)
    mixed_rows = 0
    with torch.no_grad():
        for tokens, labels, sources, doc_lens in rows:
            tokens, labels, sources = torch.tensor(tokens), torch.tensor(labels), torch.tensor(sources)
            mixed_rows += len(set(sources.tolist())) > 1
            start = 0
            for n in doc_lens:  # each document (or window piece) alone, its positions from 0
                seg, lab, src = tokens[start:start + n], labels[start:start + n], sources[start:start + n]
                assert len(set(src.tolist())) == 1  # one source per document
                ce = torch.nn.functional.cross_entropy(hf(input_ids=seg[None]).logits[0], lab, ignore_index=-100,
                                                       reduction="none").double()
                ce_sum[int(src[0])] += ce[lab != -100].sum()
                count[int(src[0])] += int((lab != -100).sum())
                start += n
    assert mixed_rows and all(count > 0), (mixed_rows, count)  # packed rows mixing the sources
    return ce_sum, count


def check_first_step_by_hand(folder, step, rows):
    logged, by_source, loss_tokens, tokens = step
    names = list(WEIGHTS)
    ce_sum, count = by_hand(folder, rows, names)
    w = torch.tensor([WEIGHTS[n] for n in names], dtype=torch.float64)
    want = float((w * ce_sum).sum() / (w * count).sum())
    assert abs(logged - want) <= 1e-5 * want, (logged, want)
    # the check can fail: the unweighted mean and the weighted sum over the loss-token count are
    # each many tolerances away (the random model's per-source losses differ by ~1%)
    unweighted, count_normalised = float(ce_sum.sum() / count.sum()), float((w * ce_sum).sum() / count.sum())
    assert min(abs(want - unweighted), abs(want - count_normalised)) > 20 * 1e-5 * want, (want, unweighted)
    assert loss_tokens == {n: int(c) for n, c in zip(names, count)}
    assert tokens["chat"] > 2 * loss_tokens["chat"]  # most chat tokens carry no loss (not the assistant's)
    for i, n in enumerate(names):
        mean = float(ce_sum[i] / count[i])
        assert abs(by_source[n] - mean) <= 1e-5 * mean, (n, by_source[n], mean)


def assert_steps_close(got, ref, rel=1e-4):
    assert len(got) == len(ref)
    for i, ((loss, by_source, n, tokens, *aux), (ref_loss, ref_by_source, ref_n, ref_tokens, *ref_aux)) in enumerate(
            zip(got, ref), 1):
        assert len(aux) == len(ref_aux) and all(abs(a - b) <= rel * b for a, b in zip(aux, ref_aux)), (i, aux, ref_aux)
        assert (n, tokens) == (ref_n, ref_tokens), i
        assert abs(loss - ref_loss) <= rel * ref_loss, (i, loss, ref_loss)
        for name, want in ref_by_source.items():
            have = by_source[name]
            assert (have is None) == (want is None), (i, name, have, want)
            assert want is None or abs(have - want) <= rel * want, (i, name, have, want)


def assert_loss_is_the_weighted_mean(steps, weights):
    """The logged loss against its definition, from the logged per-source numbers."""
    for i, (loss, mean, n, _, *aux) in enumerate(steps, 1):
        want = sum(weights[s] * n[s] * mean[s] for s in n if n[s]) / sum(weights[s] * n[s] for s in n)
        assert not aux
        assert abs(loss - want) <= 1e-6 * want, (i, loss, want)
        assert all(n[s] > 0 for s in n), (i, n)  # every source carries loss in every step


@pytest.mark.parametrize("layout", [
    {"sp": 2, "sp_method": "ulysses"},
    pytest.param({"sp": 1}, marks=SLOW),  # dp 2
    pytest.param({"sp_method": "adaptive", "max_sp": 2}, marks=SLOW),
    pytest.param({"sp": 2, "sp_method": "ring"}, marks=SLOW),  # zigzag shards
])
def test_weighted_loss_by_hand_and_under_every_layout(tmp_path, layout):
    """The single-process first step equals the hand computation with transformers (1e-5); the
    layout reproduces the single-process weighted trajectory and ``loss_by_source`` (1e-4)."""
    raw = weighted_raw(tmp_path)
    ref, rows, ref_eval = run_ranks(1, run_steps, raw, str(tmp_path / "ref"))[0]
    check_first_step_by_hand(tmp_path / "hf", ref[0], rows)
    assert_loss_is_the_weighted_mean(ref, WEIGHTS)
    check_eval_is_unweighted(ref_eval)
    got = run_ranks(2, run_steps, weighted_raw(tmp_path, layout=layout), str(tmp_path / "two"))
    assert got[0][0] == got[1][0]
    assert_steps_close(got[0][0], ref)
    (loss, by_source, n), = got[0][2]
    assert n == ref_eval[0][2] and abs(loss - ref_eval[0][0]) <= 1e-4 * loss
    assert all(abs(by_source[s] - ref_eval[0][1][s]) <= 1e-4 * by_source[s] for s in n)


def check_eval_is_unweighted(evals):
    """The held-out loss is the plain mean over its loss tokens (training weighs chat 1.5, code 0.5)."""
    (loss, by_source, n), = evals
    assert set(n) == {"code", "chat"} and all(n.values()), n
    want = sum(n[s] * by_source[s] for s in n) / sum(n.values())
    weighted = sum(WEIGHTS[s] * n[s] * by_source[s] for s in n) / sum(WEIGHTS[s] * n[s] for s in n)
    assert abs(loss - want) <= 1e-6 * want, (loss, want)
    assert abs(weighted - want) > 20 * 1e-6 * want, (weighted, want)  # the check can fail


@pytest.mark.parametrize("extra", [
    pytest.param({"data": {"micro_batch_tokens": 256}}, marks=SLOW),  # 2 micro-batches per step
    pytest.param({"train": {"engine": "fsdp2"}}, marks=SLOW),
])
def test_weighted_loss_with_micro_batches_and_fsdp2(tmp_path, extra):
    raw = weighted_raw(tmp_path)
    ref = run_ranks(1, run_steps, raw, str(tmp_path / "ref"))[0][0]
    two = weighted_raw(tmp_path, layout={"sp": 2, "sp_method": "ulysses"})
    for section, values in extra.items():
        two[section] = {**two[section], **values}
    got = run_ranks(2, run_steps, two, str(tmp_path / "two"))
    assert_steps_close(got[0][0], ref)


@SLOW
@pytest.mark.parametrize("family, model, layout", [
    ("qwen3_moe", {}, {"sp": 2, "sp_method": "ulysses"}),  # the aux loss weighs documents by their weights
    ("minimax", {}, {"sp": 2, "sp_method": "lasp2", "softmax_method": "allgather"}),
    ("llama", {"impl": "transformers"}, {"sp": 2, "sp_method": "ulysses"}),  # the generic wrap's fused loss
])
def test_weighted_loss_of_moe_and_wrapped_models_under_sp(tmp_path, family, model, layout):
    raw = weighted_raw(tmp_path, family=family)
    raw["model"].update(model)
    ref = run_ranks(1, run_steps, raw, str(tmp_path / "ref"))[0][0]
    two = weighted_raw(tmp_path, layout=layout, family=family)
    two["model"].update(model)
    got = run_ranks(2, run_steps, two, str(tmp_path / "two"))
    assert_steps_close(got[0][0], ref)
    if family != "llama":
        assert all(len(s) == 5 and s[4] > 0 for s in ref)  # aux_loss reported and compared


@SLOW
def test_uniform_weights_give_the_unweighted_run(tmp_path):
    """Only the ratios count: weights 3.0 everywhere run the weighted code path and reproduce the
    unweighted trajectory (1e-6); a skewed weighting does change the loss."""
    def losses(weights, name):
        raw = weighted_raw(tmp_path, weights=dict(zip(WEIGHTS, weights)))
        return [s[0] for s in run_ranks(1, run_steps, raw, str(tmp_path / name))[0][0]]

    plain, three = losses((1.0, 1.0, 1.0), "plain"), losses((3.0, 3.0, 3.0), "three")
    assert_losses_close(three, plain, rel=1e-6)
    skewed = losses((2.0, 0.5, 1.5), "skewed")
    assert abs(skewed[0] - plain[0]) > 1e-4 * plain[0]
