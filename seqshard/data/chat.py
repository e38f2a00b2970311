"""``format: chat`` and ``format: prompt_completion`` sources: token ids with a loss mask.

A chat row holds ``messages``: a list of ``{role, content}`` (roles: system, user, assistant,
tool). It is rendered by the tokenizer's own chat template (transformers'
``apply_chat_template``; seqshard writes no template). The tokens that carry loss are those of the
assistant turns (``loss_on: assistant``), of the last assistant turn only (``last``) or every token
(``all``). An assistant turn's tokens are found by rendering prefixes: turn ``k`` spans from the
end of ``messages[:k]`` rendered with the generation prompt to the end of ``messages[:k+1]``;
the template must render a conversation's prefixes as prefixes of its tokens (else DataError).

A ``prompt_completion`` row holds ``prompt`` and ``completion`` text: ``[BOS] prompt completion
[EOS]`` with loss on the completion and EOS.

Storage: a document's ids are *signed*: a token that is not a loss target is stored as
``-(id + 1)``; :func:`~seqshard.data.batches.make_row` decodes them (a text document's ids are
all >= 0, every token a target), so every builder slices and packs these documents unchanged,
and a packed conversation stays its own document (no attention across conversations).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

ROLES = ("system", "user", "assistant", "tool")
LOSS_ON = ("assistant", "last", "all")
FORMAT_COLUMNS = {"chat": ("messages",), "prompt_completion": ("prompt", "completion")}


class ChatError(ValueError):
    """A row the format cannot read; the message says why (the caller names the file and row)."""


def has_chat_template(tokenizer: str) -> bool:
    """Whether the local tokenizer folder defines a chat template (no tokenizer is loaded)."""
    import json

    folder = Path(tokenizer)
    if tokenizer == "byte" or not folder.is_dir():
        return False
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    config = folder / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))


@lru_cache(maxsize=4)
def chat_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise ChatError(f"'messages' is {type(messages).__name__}, not a non-empty list of {{role, content}}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ChatError(f"messages[{i}] is not a {{role, content}} mapping with text content")
        if m.get("role") not in ROLES:
            raise ChatError(f"messages[{i}] has unknown role {m.get('role')!r} (roles: {', '.join(ROLES)})")


def _render(tok, messages, generation_prompt=False) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                  return_dict=True)
    return list(out["input_ids"])


def encode_chat(tok, messages, loss_on: str = "assistant") -> tuple[list[int], list[bool]]:
    """(ids, target): ``target[j]`` is whether token ``j`` carries loss (module doc)."""
    check_messages(messages)
    ids = _render(tok, messages)
    if loss_on == "all":
        return ids, [True] * len(ids)
    target = [False] * len(ids)
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if loss_on == "last":
        turns = turns[-1:]
    for k in turns:
        start = len(_render(tok, messages[:k], generation_prompt=True)) if k else 0
        through = _render(tok, messages[:k + 1])
        if ids[:len(through)] != through:
            raise ChatError(f"the chat template does not render messages[:{k + 1}] as a prefix of the "
                            "conversation; the assistant turns cannot be located")
        target[start:len(through)] = [True] * (len(through) - start)
    return ids, target


def encode_prompt_completion(encode, bos, eos, prompt, completion) -> tuple[list[int], list[bool]]:
    """``encode``: text -> ids without special tokens."""
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise ChatError("'prompt' and 'completion' must both be text")
    head = ([bos] if bos is not None else []) + encode(prompt)
    tail = encode(completion) + ([eos] if eos is not None else [])
    return head + tail, [False] * len(head) + [True] * len(tail)


def signed(ids, target) -> list[int]:
    """The storage form of the module doc: non-targets as ``-(id + 1)``."""
    return [i if t else -i - 1 for i, t in zip(ids, target)]
