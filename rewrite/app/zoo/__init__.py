"""Built-in example models: small, seeded, with example inputs. The CLI and the tests use them.

``build(name)`` returns a :class:`ZooModel` (model, args, kwargs). Names: see ``NAMES``.
Hugging Face ones are built from tiny configs with random weights (no download).
"""

from __future__ import annotations

import dataclasses
import functools
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

# name -> (builder, description, in the zoo proper). The zoo proper is what every test and benchmark runs; the
# other Hugging Face families, each from a tiny config, are what the passes meet beyond it
# (tests/test_families.py, examples/bench_families.py). ``build`` takes every name.
_EVERY: dict[str, tuple[Builder, str, bool]] = {
    "mlp": (handwritten.mlp, "3-layer MLP with ReLU", True),
    "cnn": (handwritten.cnn, "CNN: conv -> BatchNorm -> ReLU (x2), pool, linear head", True),
    "gpt": (handwritten.gpt, "pre-norm GPT: LayerNorm, GELU MLP, learned positions, tied embeddings", True),
    "llama": (handwritten.llama, "Llama-style: RMSNorm, SwiGLU, RoPE, grouped-query attention", True),
    "hf-gpt2": (huggingface.gpt2, "Hugging Face GPT2LMHeadModel (Conv1D weights), tiny config", True),
    "hf-llama": (huggingface.llama, "Hugging Face LlamaForCausalLM with GQA, tiny config", True),
    "hf-qwen2": (huggingface.qwen2, "Hugging Face Qwen2ForCausalLM (qkv biases), tiny config", True),
    "hf-bert": (huggingface.bert, "Hugging Face BertModel (post-norm), tiny config", True),
    "hf-mixtral": (huggingface.mixtral, "Hugging Face MixtralForCausalLM (MoE), tiny config", True),
    "hf-gemma": (huggingface.gemma, "Hugging Face GemmaForCausalLM: norms multiply by 1 + w", False),
    "hf-gemma2": (huggingface.gemma2, "Hugging Face Gemma2ForCausalLM: sandwich norms, sliding/full layers", False),
    "hf-opt": (huggingface.opt, "Hugging Face OPTForCausalLM: stream flattened between units, ffn_dim", False),
    "hf-phi3": (huggingface.phi3, "Hugging Face Phi3ForCausalLM: fused qkv and gate_up projections", False),
    "hf-falcon": (huggingface.falcon, "Hugging Face FalconForCausalLM: parallel attention, x @ W.T linears", False),
}
_EVERY.update({f"hf-{name}": (functools.partial(huggingface.more, name),
                              f"Hugging Face {model}: {what}", False)
               for name, (_, model, _, what) in huggingface.MORE.items()})
NAMES = tuple(name for name, (_, _, proper) in _EVERY.items() if proper)
FAMILIES = tuple(name for name, (_, _, proper) in _EVERY.items() if not proper)
ALL = NAMES + FAMILIES  # every name ``build`` takes
DEFAULT = "gpt"


def build(name: str, seed: int = 0) -> ZooModel:
    """Build the named example model with its example inputs, deterministically from ``seed``."""
    if name not in _EVERY:
        raise KeyError(f"unknown example model {name!r}; choose one of {', '.join(ALL)}")
    builder, description, _ = _EVERY[name]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model, args, kwargs = builder()
    return ZooModel(name, model.eval(), args, kwargs, description)


def describe() -> list[tuple[str, str]]:
    return [(name, description) for name, (_, description, _) in _EVERY.items()]
