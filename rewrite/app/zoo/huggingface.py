"""Hugging Face models built from tiny configs with random weights (no download), and their inputs."""

from __future__ import annotations

import torch

from rewrite.io.hf import TOKENS, example_inputs

__all__ = ["TOKENS", "example_inputs"]


def _quiet_config(cls, **fields):
    fields.setdefault("bos_token_id", 0)
    fields.setdefault("eos_token_id", 1)
    fields.setdefault("pad_token_id", 0)
    return cls(**fields)


def _with_inputs(model):
    model.eval()
    args, kwargs = example_inputs(model)
    return model, args, kwargs


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = _quiet_config(GPT2Config, n_layer=2, n_embd=32, n_head=4, vocab_size=96, n_positions=64)
    return _with_inputs(GPT2LMHeadModel(config))


# Shared by the decoder-only families: 4 query heads over 2 key-value heads (grouped-query attention).
DECODER = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=96,
    max_position_embeddings=64,
)


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return _with_inputs(LlamaForCausalLM(_quiet_config(LlamaConfig, **DECODER)))


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _with_inputs(Qwen2ForCausalLM(_quiet_config(Qwen2Config, **DECODER)))


def bert():
    from transformers import BertConfig, BertModel

    config = _quiet_config(
        BertConfig,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=96,
        max_position_embeddings=64,
    )
    return _with_inputs(BertModel(config))


def mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    config = _quiet_config(
        MixtralConfig,
        **DECODER,
        num_local_experts=4,
        num_experts_per_tok=2,
        experts_implementation="batched_mm",  # the default grouped experts have no ONNX conversion
    )
    return _with_inputs(MixtralForCausalLM(config))


# -- more families, each with a structure the zoo above does not have (see tests/test_families.py) ------
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=96)


def gemma():
    """Norms multiply by ``1 + w``; the embedding is scaled by ``sqrt(hidden)``; tied head."""
    from transformers import GemmaConfig, GemmaForCausalLM

    return _with_inputs(GemmaForCausalLM(_quiet_config(GemmaConfig, **DECODER, head_dim=8)))


def gemma2():
    """Sandwich norms (each branch ends in a norm); sliding and full attention alternate per layer."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return _with_inputs(Gemma2ForCausalLM(_quiet_config(Gemma2Config, **DECODER, head_dim=8)))


def opt():
    """Batch and tokens flattened between residual units; ReLU MLP sized by ``ffn_dim``."""
    from transformers import OPTConfig, OPTForCausalLM

    config = _quiet_config(OPTConfig, **SMALL, ffn_dim=48, max_position_embeddings=64, word_embed_proj_dim=32)
    return _with_inputs(OPTForCausalLM(config))


def phi3():
    """Fused ``qkv_proj`` and ``gate_up_proj`` split by slicing and ``chunk``."""
    from transformers import Phi3Config, Phi3ForCausalLM

    return _with_inputs(Phi3ForCausalLM(_quiet_config(Phi3Config, **DECODER)))


def falcon():
    """Parallel attention and MLP added in place; linears written ``x @ W.T``; ``head_dim`` derived."""
    from transformers import FalconConfig, FalconForCausalLM

    return _with_inputs(FalconForCausalLM(_quiet_config(FalconConfig, **SMALL)))
