"""Built-in example models: small, seeded, with example inputs. The CLI and the tests use them.

``build(name)`` returns a :class:`ZooModel` (model, args, kwargs). Names: see ``NAMES``.
Hugging Face ones are built from tiny configs with random weights (no download).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from . import handwritten, huggingface


@dataclasses.dataclass
class ZooModel:
    name: str
    model: torch.nn.Module
    args: tuple
    kwargs: dict
    description: str


_BUILDERS: dict[str, tuple[Callable[[], tuple[torch.nn.Module, tuple, dict]], str]] = {
    "mlp": (handwritten.mlp, "3-layer MLP with ReLU"),
    "cnn": (handwritten.cnn, "CNN: conv -> BatchNorm -> ReLU (x2), pool, linear head"),
    "gpt": (handwritten.gpt, "pre-norm GPT: LayerNorm, GELU MLP, learned positions, tied embeddings"),
    "llama": (handwritten.llama, "Llama-style: RMSNorm, SwiGLU, RoPE, grouped-query attention"),
    "hf-gpt2": (huggingface.gpt2, "Hugging Face GPT2LMHeadModel (Conv1D weights), tiny config"),
    "hf-llama": (huggingface.llama, "Hugging Face LlamaForCausalLM with GQA, tiny config"),
    "hf-qwen2": (huggingface.qwen2, "Hugging Face Qwen2ForCausalLM (qkv biases), tiny config"),
    "hf-bert": (huggingface.bert, "Hugging Face BertModel (post-norm), tiny config"),
    "hf-mixtral": (huggingface.mixtral, "Hugging Face MixtralForCausalLM (MoE), tiny config"),
}
NAMES = tuple(_BUILDERS)
DEFAULT = "gpt"


def build(name: str, seed: int = 0) -> ZooModel:
    """Build the named example model with its example inputs, deterministically from ``seed``."""
    if name not in _BUILDERS:
        raise KeyError(f"unknown example model {name!r}; choose one of {', '.join(NAMES)}")
    builder, description = _BUILDERS[name]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model, args, kwargs = builder()
    return ZooModel(name, model.eval(), args, kwargs, description)


def describe() -> list[tuple[str, str]]:
    return [(name, description) for name, (_, description) in _BUILDERS.items()]
