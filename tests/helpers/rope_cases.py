"""RoPE extensions of tiny transformers checkpoints, and transformers' logits at 4x the original
length (the parity reference of tests/models/test_rope_extension.py and tests/parallel/)."""
from __future__ import annotations

import torch

ORIG = 16  # original_max_position_embeddings of the tiny checkpoints
LONG = 4 * ORIG  # the extended length every parity check runs at
LENGTHS = [LONG, 21, LONG - 7]  # one document at the full extended length, two shorter
HALF = 8  # head_dim / 2 of tests/helpers/hf_models.py's COMMON (64 / 4 / 2)

# name -> transformers config keywords (rope_scaling as transformers 5 takes it)
CASES = {
    "theta": dict(rope_theta=160000.0),
    "linear": dict(rope_scaling={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}),
    "dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0},
                    max_position_embeddings=ORIG),
    "yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                               "original_max_position_embeddings": ORIG, "beta_fast": 16.0, "beta_slow": 2.0},
                 max_position_embeddings=LONG),
    "yarn_mscale": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                      "original_max_position_embeddings": ORIG, "mscale": 0.8,
                                      "mscale_all_dim": 0.5, "truncate": False},
                        max_position_embeddings=LONG),
    "llama3": dict(rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "rope_theta": 500000.0,
                                 "original_max_position_embeddings": ORIG},
                   max_position_embeddings=LONG),
    "longrope": dict(rope_scaling={"rope_type": "longrope", "factor": 4.0, "rope_theta": 10000.0,
                                   "original_max_position_embeddings": ORIG,
                                   "short_factor": [1.0 + 0.1 * i for i in range(HALF)],
                                   "long_factor": [1.0 + 0.5 * i for i in range(HALF)]},
                     max_position_embeddings=LONG),
}


def packed_tokens(vocab=300, lengths=LENGTHS, seed=1):
    tokens = torch.randint(0, vocab, (sum(lengths),), generator=torch.Generator().manual_seed(seed))
    return tokens, torch.cat([torch.arange(n) for n in lengths])


def padded_reference(hf, tokens, lengths=LENGTHS):
    """transformers' logits of each document, run as one right-padded ``[docs, max_len]`` batch: the
    positions transformers sees run to ``max_len - 1`` for every row, so ``dynamic`` and
    ``longrope`` take their frequencies for ``max_len`` (the training row length), as seqshard's
    ``seq_len`` does. Returns the real tokens' logits, concatenated ``[tokens, vocab]``."""
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    start = 0
    for i, n in enumerate(lengths):
        ids[i, :n], mask[i, :n] = tokens[start:start + n], 1
        start += n
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=mask).logits
    return torch.cat([logits[i, :n] for i, n in enumerate(lengths)])
