"""Training compute: ``6 * N * tokens`` plus attention.

``6 N`` per token is the matrix products with the weights, forward (2N) and backward (4N) (Kaplan et al.).
Attention's products between activations (``q k^T`` and ``p v``) have no weights, so ``6 N`` misses them:
``attention_per_token`` measures them once per model size, with ``torch.utils.flop_counter`` on one forward
pass of a batch (the scaled-dot-product-attention kernels and batched matrix products, where a written-out
attention does its ``q k^T`` and ``p v``), per token, times three for forward and backward. It grows with the
sequence length, which is why it is measured on a real batch. A batched matrix product that is not attention
(an expert stack written with ``bmm``) is counted as attention too; ``6 N`` already counts its weights.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

ACTIVATION_PRODUCTS = ("bmm", "baddbmm", "_scaled_dot_product")


def _cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """The CPU kernel of scaled dot-product attention, which the flop counter has no formula for: the same
    count as the others (``4 * batch * heads * queries * keys * head size``, causal masking not discounted)."""
    return sdpa_flop_count(query, key, value)


FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa}


def attention_per_token(model: torch.nn.Module, args: tuple, kwargs: dict, tokens: int) -> float:
    """Training FLOPs per token of attention's activation-by-activation products (see the module docstring)."""
    counter = FlopCounterMode(display=False, custom_mapping=FORMULAS)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), counter:
            model(*args, **kwargs)
    finally:
        model.train(was_training)
    forward = sum(count for op, count in counter.get_flop_counts().get("Global", {}).items()
                  if any(name in str(op) for name in ACTIVATION_PRODUCTS))
    return 3.0 * forward / max(tokens, 1)


def per_token(model: torch.nn.Module, args: tuple, kwargs: dict, tokens: int) -> float:
    """Training FLOPs per token: ``6 N`` plus attention, measured on a batch of ``tokens`` tokens (once per model
    size: neither changes while the model trains)."""
    return 6.0 * parameters(model) + attention_per_token(model, args, kwargs, tokens)


def parameters(model: torch.nn.Module) -> int:
    """Every parameter (frozen ones too: the backward still passes through them)."""
    return sum(p.numel() for p in model.parameters())
