"""Shared fixtures: a tiny random Llama with GQA, in float64 so that greedy ties never flip."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lshe.attention import use_lshe_attention

VOCAB = 256


def tiny_llama(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    """2 layers, 4 query heads sharing 2 KV heads, head_dim 16; no EOS so lengths are fixed."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
    )
    model = LlamaForCausalLM(config).eval().double()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="session")
def model() -> LlamaForCausalLM:
    return use_lshe_attention(tiny_llama())


def random_prompts(lengths: list[int], seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=generator) for n in lengths]


def left_pad(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with left padding (pad id 0)."""
    length = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, length - len(p) :] = p
        mask[i, length - len(p) :] = 1
    return ids, mask
