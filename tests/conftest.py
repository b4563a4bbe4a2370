"""Tiny random models and data built in-process: no network, no downloads, seconds per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

ROOT = Path(__file__).resolve().parent.parent

CORPUS = (
    "The quick brown fox jumps over the lazy dog. A tiny model learns nothing but shapes. "
    "Pruning removes heads and channels; the checkpoint must still load and give the same logits. "
) * 40


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    values = dict(vocab_size=320, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  tie_word_embeddings=True, rms_norm_eps=1e-5)
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).eval()
    # Random init leaves every channel alike; spread the scales so rankings are meaningful.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embed" not in name:
                param.mul_(torch.rand(param.shape[1]) * 2 + 0.2)
    return model


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([CORPUS], trainer)
    from tokenizers import decoders

    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="</s>")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (GQA: 6 heads / 2 KV heads) saved as safetensors with a tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def text_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("text")
    calibration = folder / "calibration.txt"
    calibration.write_text(CORPUS)
    test = folder / "test.txt"
    test.write_text(CORPUS[::-1])
    jsonl = folder / "calibration.jsonl"
    jsonl.write_text("\n".join('{"text": "%s"}' % CORPUS[i:i + 200].replace('"', "") for i in range(0, 4000, 200)))
    return {"calibration": calibration, "test": test, "jsonl": jsonl}


@pytest.fixture()
def tiny_recipe(tiny_model_dir, text_files, tmp_path):
    """A small recipe dict for the tiny model (FLAP 30%, short calibration, 2 eval windows)."""
    return {
        "model": {"name": str(tiny_model_dir)},
        "calibration": {"source": "text", "path": str(text_files["calibration"]), "num_samples": 8,
                        "seq_len": 32, "batch_size": 4},
        "stages": [{"method": "flap", "sparsity": 0.3}],
        "export": {"output": str(tmp_path / "out")},
        "eval": {"ppl": 2, "text": str(text_files["test"]), "seq_len": 32},
    }


TINY_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
TINY_MOE_ARCHITECTURES = ("mixtral", "qwen3_moe", "olmoe")


def tiny_model(model_type: str, seed: int = 0):
    """A tiny random causal LM of one supported architecture (GQA, explicit head_dim), built in-process."""
    from transformers import (
        AutoModelForCausalLM,
        Gemma3TextConfig,
        MistralConfig,
        MixtralConfig,
        OlmoeConfig,
        Qwen2Config,
        Qwen3Config,
        Qwen3MoeConfig,
    )

    common = dict(vocab_size=320, hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=6,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=True)
    if model_type == "llama":
        return tiny_llama(seed)
    configs = {
        "mistral": lambda: MistralConfig(**common, sliding_window=16),
        "qwen2": lambda: Qwen2Config(**common),  # q/k/v biases
        "qwen3": lambda: Qwen3Config(**common),  # q/k norms
        "gemma3_text": lambda: Gemma3TextConfig(**{**common, "num_attention_heads": 4, "num_key_value_heads": 1,
                                                   "head_dim": 32}, sliding_window=8,
                                                layer_types=["sliding_attention", "sliding_attention",
                                                             "full_attention"]),
        # mixture of experts: 4 experts, 2 per token, fused 3-D expert tensors
        "mixtral": lambda: MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2),
        "qwen3_moe": lambda: Qwen3MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64),
        "olmoe": lambda: OlmoeConfig(**{k: v for k, v in common.items() if k != "head_dim"}, num_experts=4,
                                     num_experts_per_tok=2, eos_token_id=2, pad_token_id=1, bos_token_id=None),
    }
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(configs[model_type]()).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embed" not in name:
                param.mul_(torch.rand(param.shape[1]) * 2 + 0.2)
    return model
