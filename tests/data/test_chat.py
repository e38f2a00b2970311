"""``format: chat`` / ``prompt_completion`` (data/chat.py): a tiny locally trained tokenizer with a
Jinja chat template; which tokens carry loss is checked by hand, bad chat data is refused by key
path before launch, and the loss seqshard logs on a packed chat batch equals transformers' loss on
each conversation alone with the same labels (issue #30 item 3)."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from seqshard.data.batches import make_row  # noqa: E402
from seqshard.data.chat import chat_tokenizer, encode_chat, encode_prompt_completion, signed  # noqa: E402
from seqshard.data.hf_tokenizer import load_tokenizer  # noqa: E402
from seqshard.launch.spec import SpecError, from_dict  # noqa: E402
from tests.helpers.hf_models import save_hf_model, save_tokenizer  # noqa: E402
from tests.helpers.ranks import run_ranks  # noqa: E402

TEMPLATE = ("{% for m in messages %}{{ bos_token }}{{ m['role'] }}:\n{{ m['content'] }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}{{ bos_token }}assistant:\n{% endif %}")
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def f(x):"},
                {"role": "assistant", "content": "return x"}, {"role": "user", "content": "and g?"},
                {"role": "assistant", "content": "pass"}]
REL = 1e-5  # fp32: seqshard's logged loss vs transformers per conversation


def chat_tokenizer_folder(folder):
    save_tokenizer(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return folder


def target_text(folder, loss_on):
    tok = chat_tokenizer(str(folder))
    ids, target = encode_chat(tok, CONVERSATION, loss_on)
    row = make_row([torch.tensor(signed(ids, target))])
    assert torch.equal(row.tokens, torch.tensor(ids))
    counted = [int(row.labels[j]) for j in range(len(ids)) if row.labels[j] != -100]  # the predicted tokens
    assert counted == [i for i, t in zip(ids, target) if t][1 if target[0] else 0:]
    spans, current = [], []
    for i, t in zip(ids, target):
        if t:
            current.append(i)
        elif current:
            spans.append(tok.decode(current))
            current = []
    return spans + ([tok.decode(current)] if current else [])


def test_assistant_turns_carry_the_loss(tmp_path):
    folder = chat_tokenizer_folder(tmp_path / "tok")
    assert target_text(folder, "assistant") == ["return x</s>", "pass</s>"]
    assert target_text(folder, "last") == ["pass</s>"]
    assert target_text(folder, "all") == ["<s>system:\nBe brief.</s><s>user:\ndef f(x):</s><s>assistant:\nreturn x</s>"
                                          "<s>user:\nand g?</s><s>assistant:\npass</s>"]


def test_prompt_completion_trains_on_the_completion(tmp_path):
    tok = load_tokenizer(str(save_tokenizer(tmp_path / "t") and tmp_path / "t"))
    ids, target = encode_prompt_completion(tok.encode_plain, tok.bos_id, tok.eos_id, "Q: 1+1?", " A: 2")
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert ids[target.index(True):] == tok.encode_plain(" A: 2") + [tok.eos_id] and all(target[target.index(True):])


def chat_spec(folder, data, out, **extra):
    return {"model": {"hf": str(folder)}, "seed": 0,
            "data": {"format": "chat", "source": str(data), "max_seq_len": 256, "tokens_per_step": 512,
                     "batching": "pack", **extra},
            "train": {"steps": 1, "warmup_steps": 1, "log_every": 1, "checkpoint_every": 0, "output_dir": str(out)},
            "launch": {"nproc_per_node": 1}}


def conversations(path, n=6, bad=None):
    rows = [{"messages": [{"role": "user", "content": f"item {i}: def f{i}():"},
                          {"role": "assistant", "content": f"return {i * i}"},
                          {"role": "user", "content": "again"}, {"role": "assistant", "content": "pass" * (1 + i % 3)}]}
            for i in range(n)]
    if bad is not None:
        rows[bad]["messages"][0]["role"] = "robot"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def checkpoint(tmp_path):
    folder = tmp_path / "hf"
    save_hf_model("llama", folder)
    chat_tokenizer_folder(folder)
    return folder


@pytest.mark.parametrize("case, key", [
    ("no_messages", "data.format"), ("unknown_role", "data.format"), ("no_template", "data.format"),
])
def test_bad_chat_input_is_refused_by_key(checkpoint, tmp_path, case, key):
    data = conversations(tmp_path / "chat.jsonl", bad=0 if case == "unknown_role" else None)
    extra = {}
    if case == "no_messages":
        data.write_text(json.dumps({"text": "hi"}) + "\n")
    if case == "no_template":
        extra = {"tokenizer": str(save_tokenizer(tmp_path / "plain") and tmp_path / "plain")}
    with pytest.raises(SpecError) as caught:
        from_dict(chat_spec(checkpoint, data, tmp_path / "run", **extra), 1)
    assert caught.value.path == key, str(caught.value)
    if case != "no_template":
        assert str(data) in str(caught.value)


def test_unknown_role_in_a_later_row_names_file_and_line(checkpoint, tmp_path):
    from seqshard.data.corpus import DataError, load_corpus

    data = conversations(tmp_path / "chat.jsonl", bad=3)
    with pytest.raises(DataError, match=r"chat.jsonl line 4: messages\[0\] has unknown role 'robot'"):
        load_corpus(str(data), tokenizer=str(checkpoint), fmt="chat", cache_dir=str(tmp_path / "cache"))


def first_step(rank, world, raw):
    from seqshard.train.evaluate import load_data
    from seqshard.train.trainer import build_batch_builder, train

    spec = from_dict(raw, world)
    loss = train(spec)[0]["loss"]
    batch = build_batch_builder(spec, load_data(spec, rank)[0]).next_batch()
    return loss, [(r.tokens.tolist(), r.labels.tolist(), r.doc_lens) for r in batch.rows]  # plain lists cross processes


def test_packed_chat_loss_equals_transformers_per_conversation(checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    raw = chat_spec(checkpoint, conversations(tmp_path / "chat.jsonl"), tmp_path / "run",
                    cache_dir=str(tmp_path / "cache"))
    logged, rows = run_ranks(1, first_step, raw)[0]
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    total, count, packed = 0.0, 0, 0
    with torch.no_grad():
        for tokens, labels, doc_lens in rows:
            tokens, labels = torch.tensor(tokens), torch.tensor(labels)
            packed += len(doc_lens) > 1
            start = 0
            for n in doc_lens:  # each conversation alone, its own positions from 0
                seg, lab = tokens[start:start + n], labels[start:start + n]
                logits = hf(input_ids=seg[None]).logits[0]
                total += float(torch.nn.functional.cross_entropy(logits, lab, ignore_index=-100, reduction="sum"))
                count += int((lab != -100).sum())
                start += n
    assert packed and count < sum(len(t) for t, _, _ in rows) / 2  # packed rows, most tokens masked
    assert abs(logged - total / count) <= REL * abs(total / count), (logged, total / count)
