"""The dual of a recipe: what growth does to tensors that transform like gradients (``run_dual``).

Gradients do not follow the weight map; they follow its dual. With the function preserved, a unit split into
``n`` parts (a Take whose ``fill`` is ``split``: Net2WiderNet, uniform cloning) gives each part ``g/n`` on its
producer rows and along-members, while its consumer columns, divided by ``n`` in the weights, receive the full
``g`` (the Split's dual multiplies by ``n``). Other fills (a copy whose consumer columns are zero, zero padding)
keep the old entries' gradient and give new ones none. A Scale by ``s`` that preserves the function (key
temperature, RMSNorm gains) divides the gradient by ``s``; Noise changes nothing; a Redraw has no gradient
identity with what it replaced. ``second_moment`` squares every factor (``v/n^2``); ``preserve`` keeps old
entries as they are and zeroes new ones (SPARKLING's asymmetric reset).

The result lives where the given tensor does; a bfloat16/float16 one is computed in float32 and rounded once.
"""

from __future__ import annotations

import torch

from rewrite.analysis.layout import padding_index
from rewrite.transform.growth_ops import Op, PassEnd, Redraw, Scale, Split, Take, low_precision
from rewrite.transform.take import along, region, take

GRADIENT, SECOND_MOMENT, PRESERVE = "gradient", "second_moment", "preserve"


def run_dual(tensor: torch.Tensor, ops: tuple[Op, ...] | list[Op], kind: str) -> torch.Tensor:
    """What ``ops`` make of a tensor that transforms like a gradient (``kind="gradient"``: first moments,
    momentum buffers), like its square (``"second_moment"``) or that keeps its old entries (``"preserve"``)."""
    if kind not in (GRADIENT, SECOND_MOMENT, PRESERVE):
        raise ValueError(f"unknown kind {kind!r}: weight, gradient, second_moment or preserve")
    power = 2 if kind == SECOND_MOMENT else 1
    x = tensor.detach()
    x = x.float() if low_precision(x.dtype) else x.clone()
    with torch.no_grad():
        for op in ops:
            if isinstance(op, Take):
                x = _take_dual(x, op, kind, power)
            elif isinstance(op, Split) and kind != PRESERVE:
                x.mul_(along(op.divisors.to(x.device, x.dtype) ** power, op.axis, x.dim()))
            elif isinstance(op, Scale) and kind != PRESERVE:
                with region(x, op.axis, op.positions) as target:
                    target.mul_(0.0 if op.factor == 0 else 1.0 / op.factor ** power)
            elif isinstance(op, Redraw):
                x.zero_()  # a fresh draw has no gradient identity with what it replaced
            elif isinstance(op, PassEnd):
                continue
    return x.to(tensor.dtype)


def _take_dual(x: torch.Tensor, op: Take, kind: str, power: int) -> torch.Tensor:
    """A Take's dual: each part of a split unit gets ``1 / count`` (``** power``) of it; any other fill keeps
    the old entries and gives new ones zero."""
    if op.fill != "split" or kind == PRESERVE:
        return take(x, op.axis, padding_index(len(op.index), op.old_positions))
    counts = torch.bincount(op.index[op.index >= 0], minlength=x.shape[op.axis])
    shares = counts.index_select(0, op.index.clamp(min=0)).to(x.device, x.dtype) ** power
    return take(x, op.axis, op.index).div_(along(shares, op.axis, x.dim()))
