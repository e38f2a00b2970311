"""Build a tiny Hugging Face Llama and Gemma (random weights) and a BPE tokenizer trained on the stdlib
corpus, locally, so examples/hf_llama.yaml (native import) and examples/hf_gemma_wrap.yaml (generic
wrap) run with nothing downloaded.

    python examples/make_tiny_hf.py runs/tiny_hf    # writes runs/tiny_hf/{model,gemma,tokenizer}
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM

from seqshard.data.corpus import stdlib_files

VOCAB = 512


def make_tokenizer(folder: Path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train(stdlib_files()[:200], trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}))


def make_model(folder: Path):
    cfg = LlamaConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=4096,
                      bos_token_id=0, eos_token_id=1, pad_token_id=2,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 256,
                                    "rope_theta": 500000.0})
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)


def make_gemma(folder: Path):
    """A causal LM seqshard has no native code for: trained through model.impl: transformers."""
    cfg = GemmaConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, vocab_size=VOCAB, max_position_embeddings=4096,
                      bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(0)
    GemmaForCausalLM(cfg).save_pretrained(folder)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny_hf")
    make_tokenizer(out / "tokenizer")
    make_model(out / "model")
    make_gemma(out / "gemma")
    print(f"wrote {out}/model, {out}/gemma and {out}/tokenizer")
