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


Builder = Callable[[], tuple[torch.nn.Module, tuple, dict]]

_BUILDERS: dict[str, tuple[Builder, str]] = {
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
# Hugging Face families outside the zoo, each built from a tiny config: what the passes meet beyond the zoo
# (tests/test_families.py, examples/bench_families.py). ``build`` takes their names too.
_MORE: dict[str, tuple[Builder, str]] = {
    "hf-gemma": (huggingface.gemma, "Hugging Face GemmaForCausalLM: norms multiply by 1 + w"),
    "hf-gemma2": (huggingface.gemma2, "Hugging Face Gemma2ForCausalLM: sandwich norms, sliding/full layers"),
    "hf-opt": (huggingface.opt, "Hugging Face OPTForCausalLM: stream flattened between units, ffn_dim"),
    "hf-phi3": (huggingface.phi3, "Hugging Face Phi3ForCausalLM: fused qkv and gate_up projections"),
    "hf-falcon": (huggingface.falcon, "Hugging Face FalconForCausalLM: parallel attention, x @ W.T linears"),
}
FAMILIES = tuple(_MORE)
ALL = NAMES + FAMILIES  # every name ``build`` takes
_EVERY = _BUILDERS | _MORE


def build(name: str, seed: int = 0) -> ZooModel:
    """Build the named example model with its example inputs, deterministically from ``seed``."""
    if name not in _EVERY:
        raise KeyError(f"unknown example model {name!r}; choose one of {', '.join(ALL)}")
    builder, description = _EVERY[name]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model, args, kwargs = builder()
    return ZooModel(name, model.eval(), args, kwargs, description)


def describe() -> list[tuple[str, str]]:
    return [(name, description) for name, (_, description) in _EVERY.items()]
