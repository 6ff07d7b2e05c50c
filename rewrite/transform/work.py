"""What running a recipe costs: values drawn (``draw_counts``), values written (``work``, what a build orders
its tensors by) and the memory it holds at once (``working_bytes``, what a streamed build bounds its memory by).
"""

from __future__ import annotations

import math

import torch

from rewrite.transform.growth_ops import Noise, Op, PassEnd, Redraw, Take, low_precision


DRAW_COST = 4  # a seeded normal value costs about four written ones on one core (torch's Mersenne Twister: about
# 4 ns a value against about 1 ns to write one, on a 2-core x86 machine; ``draws`` spreads chunks over cores)


def draw_counts(ops: tuple[Op, ...] | list[Op], shape: tuple[int, ...]) -> list[int]:
    """How many normal values each seeded op among ``ops`` (noise, a redraw) draws when they run on a tensor of
    ``shape``."""
    shape, counts = list(shape), []
    for op in ops:
        if isinstance(op, Take):
            shape[op.axis] = len(op.index)
        elif isinstance(op, Redraw):
            counts.append(math.prod(shape))
        elif isinstance(op, Noise):
            counts.append(math.prod(shape) // max(shape[op.axis], 1) * len(op.positions))
    return counts


def work(ops: tuple[Op, ...] | list[Op], shape: tuple[int, ...]) -> int:
    """About what running ``ops`` on a tensor of ``shape`` costs, in values written: each op writes its result
    (a tensor no op changes is copied once), each normal draw counts ``DRAW_COST``. For ordering the tensors of
    a build, longest first."""
    drawn = sum(draw_counts(ops, shape))
    shape, written = list(shape), 0
    for op in ops:
        if isinstance(op, Take):
            shape[op.axis] = len(op.index)
        if not isinstance(op, PassEnd):
            written += math.prod(shape)
    return max(written, math.prod(shape)) + DRAW_COST * drawn


def working_bytes(ops: tuple[Op, ...] | list[Op], shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """About the most memory :func:`run_ops` holds at once making a tensor from a ``shape`` ``dtype`` one: the
    input, the result, a float32 working copy of the largest intermediate when a bfloat16/float16 tensor needs
    arithmetic on all of it (noise or a redraw as its last op is drawn in pieces and needs none), and one more
    float32 tensor of that size for a redraw that is not last (an allowance on the safe side: its standard
    deviation is read from a float32 copy of a bfloat16/float16 tensor)."""
    shape, size = list(shape), torch.empty((), dtype=dtype).element_size()
    start = largest = math.prod(shape)
    for op in ops:
        if isinstance(op, Take):
            shape[op.axis] = len(op.index)
            largest = max(largest, math.prod(shape))
    arithmetic = [op for op in ops if not isinstance(op, (Take, PassEnd))]
    low = low_precision(dtype)
    if low and arithmetic and isinstance(ops[-1], (Noise, Redraw)):
        arithmetic = arithmetic[:-1]  # drawn in pieces
    extra = 4 * largest if low and arithmetic else 0
    if any(isinstance(op, Redraw) for op in arithmetic):
        extra += 4 * largest
    return (start + math.prod(shape)) * size + extra
