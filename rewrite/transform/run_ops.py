"""Running a recipe's growth ops on a tensor (``run_ops``): what every grown tensor is made by.

The passes build grown tensors with it and ``GrowthMap.apply`` remakes them with it, on the device and in the
dtype of the tensor it is given (index and divisor tensors go there; seeded draws are made on the CPU by the
scheme of ``rewrite.transform.draws`` and moved, so the bits do not depend on the device). Arithmetic on a
bfloat16/float16 tensor runs in float32 and is rounded once at the end (``rounded_by`` says when that
rounding makes an exact plan inexact). The work is arranged so that each grown tensor is written about once:
Takes in a row are made together, a Split is multiplied in as its Take copies, and a tensor that a later
Take only extends is written straight into that Take's leading slice.
"""

from __future__ import annotations

import math

import torch

from rewrite.transform import draws
from rewrite.transform.growth_ops import Noise, Op, PassEnd, Redraw, Scale, Split, Take, low_precision
from rewrite.transform.take import along, region, take, take_together


def run_ops(tensor: torch.Tensor, ops: tuple[Op, ...] | list[Op]) -> torch.Tensor:
    """The tensor ``ops`` make of ``tensor``, where ``tensor`` lives (never written to; a new tensor when any op
    runs)."""
    x = tensor.detach()
    if x.is_meta:  # planning without weights: only the shape matters, and only a Take changes it
        shape = list(x.shape)
        for op in ops:
            if isinstance(op, Take):
                shape[op.axis] = len(op.index)
        return torch.empty(shape, dtype=x.dtype, device="meta")
    run = _Run(x, list(ops))
    with torch.no_grad():
        while run.at < len(run.ops):
            run.step()
    return run.x.to(tensor.dtype)


class _Run:
    """One run of ``ops`` on ``x``: ``x`` the tensor so far, ``reference`` what later noise is scaled by,
    ``fresh`` whether ``x`` is this run's own (may be written), ``pending`` a later Take and the tensor it makes,
    whose leading slice ``x`` is."""

    def __init__(self, x: torch.Tensor, ops: list[Op]):
        self.dtype, self.x, self.reference, self.ops = x.dtype, x, x, ops
        self.at, self.fresh, self.low, self.pending = 0, False, low_precision(x.dtype), None

    def step(self) -> None:
        op = self.ops[self.at]
        self.at += 1
        if isinstance(op, PassEnd):  # what the pass before made, rounded; noise after it is scaled by it,
            self.x = self.reference = self.x if op.dtype is None else self.x.to(op.dtype)  # the next op that
            self.fresh = False  # writes copies it
        elif isinstance(op, Take):
            self._takes(op)
        elif isinstance(op, Scale) and op.factor == 0 and op.offset == 0 and op.positions is None:
            self.x, self.fresh = torch.zeros_like(self.x), True  # a zeroed tensor (a new block's output)
        elif isinstance(op, Redraw):
            self._redraw(op)
        elif isinstance(op, Noise) and self.low and self.x.dtype != torch.float32 and self._rounded_next():
            # the last op on a bfloat16/float16 tensor: only the noised entries need float32, piece by piece
            self.x, self.fresh = self.x if self.fresh else self.x.clone(), True
            self._noise(op)
        else:
            self._arithmetic(op)

    def _noise(self, op: Noise) -> None:
        """Noise added in place at its positions, drawn piece by piece (no scratch of the region's size), in
        float32 and rounded once for a bfloat16/float16 ``x``."""
        with region(self.x, op.axis, op.positions) as target:
            draws.add_(target, op.seed, op.relative * _std(self.reference))

    def _rounded_next(self) -> bool:
        """Whether the tensor is rounded to its dtype right after the op just read."""
        following = self.ops[self.at] if self.at < len(self.ops) else None
        return following is None or isinstance(following, PassEnd) and following.dtype == self.dtype

    def _takes(self, op: Take) -> None:
        """``op`` and the Takes right after it on other axes, at once unless noise follows (it is scaled by the
        tensor before the last Take, which taking them at once never makes)."""
        ops, takes = self.ops, [op]
        while (self.at < len(ops) and isinstance(ops[self.at], Take)
               and ops[self.at].axis not in {t.axis for t in takes} and not _noise_ahead(ops, self.at)):
            takes.append(ops[self.at])
            self.at += 1
        x, self.fresh = self.x, True
        if self.pending is not None and op is self.pending[0]:  # x is the leading slice of this Take's result
            # later noise is scaled by x as it is now, which ops on the result may change: its sample
            self.reference = _sample(x).clone()
            self.x, self.pending = take(x, op.axis, op.index, out=self.pending[1], done=x.shape[op.axis]), None
        elif (len(takes) == 1 and self.at < len(ops) and isinstance(ops[self.at], Split)
              and ops[self.at].axis == op.axis):
            # the Split's division made as the Take writes each entry: one pass over the grown tensor, not two
            # (the same products, in float32 for a bfloat16/float16 tensor)
            divisors = ops[self.at].divisors.to(torch.float32 if self.low else x.dtype)  # to x's device in take
            self.at += 1
            self.pending, into = (None, None) if self.low else _into_next_take(x, [op], ops, self.at)
            self.reference, self.x = x, take(x, op.axis, op.index, factors=divisors.reciprocal(), out=into)
        elif len(takes) == 1 and not self.low:
            self.pending, into = _into_next_take(x, takes, ops, self.at)
            self.reference, self.x = x, take(x, op.axis, op.index, out=into)
        else:
            together = take_together(x, takes) if len(takes) > 1 else None
            if together is not None:
                self.x = together
                return
            for each in takes:
                self.reference, self.x = self.x, take(self.x, each.axis, each.index)

    def _redraw(self, op: Redraw) -> None:
        """A fresh draw at x's scale (float32 draws scaled in float32 for a bfloat16/float16 tensor), straight
        into its dtype when it is rounded next."""
        std, shape, device = float(self.x.float().std()), self.x.shape, self.x.device
        arithmetic = torch.float32 if self.low else self.x.dtype
        self.x = None  # freed before the draw
        dtype = self.dtype if self.low and self._rounded_next() else arithmetic
        self.x = draws.fill_(torch.empty(shape, dtype=dtype, device=device), op.seed, std)
        self.fresh = True

    def _arithmetic(self, op: Op) -> None:
        """A Split, Scale or Noise on a tensor of this run's own (in float32 for a bfloat16/float16 one)."""
        if self.low and self.x.dtype != torch.float32:
            self.x, self.fresh = self.x.float(), True
        if not self.fresh:
            self.x, self.fresh = self.x.clone(), True
        x = self.x
        if isinstance(op, Split):
            x.mul_(along(op.divisors.to(x.device, x.dtype).reciprocal(), op.axis, x.dim()))
        elif isinstance(op, Scale):
            with region(x, op.axis, op.positions) as target:
                target.add_(op.offset).mul_(op.factor).sub_(op.offset)
        elif isinstance(op, Noise):
            self._noise(op)
        else:
            raise TypeError(f"unknown growth op {op!r}")


def _sample(like: torch.Tensor, size: int = 65536) -> torch.Tensor:
    """The first ``size`` values of ``like`` in order, flattened: what noise's scale is computed from."""
    like = like.detach()
    if like.dim() > 1 and not like.is_contiguous():  # a slice of a larger tensor: flatten only its first rows
        like = like.narrow(0, 0, min(like.shape[0], -(-size // max(like[0].numel(), 1))))
    return like.reshape(-1)[:size]


def _std(like: torch.Tensor) -> float:
    """The scale noise is drawn at: the std of (a sample of) ``like``; 1 where that is not a positive number."""
    sample = _sample(like).float()
    scale = float(sample.std()) if sample.numel() > 1 else float(sample.abs().mean()) if sample.numel() else 1.0
    return scale if math.isfinite(scale) and scale > 0 else 1.0


def _into_next_take(x: torch.Tensor, takes: list[Take], ops: list[Op], start: int):
    """Where the Takes ``takes`` (on ``x``, ops up to ``ops[start]``) can write their result: ``(None, None)``
    to a tensor of their own; else ``((later, result), slice)`` when the ops after them only edit it in place
    (noise, splits, scalings) up to a ``later`` Take, alone, that keeps every position first, in order (its
    index starts ``0, 1, .., n - 1``), so what they make is ``later``'s leading slice: written there, ``later``
    fills only its new positions, and the tensor in between is never written on its own. A float32 or float64
    tensor only (a bfloat16 one computes in a float32 copy), and not into a Take made together with the op
    after it (another Take, or a Split on its axis, multiplied as it is copied)."""
    shape = list(x.shape)
    for take in takes:
        shape[take.axis] = len(take.index)
    for at in range(start, len(ops)):
        op = ops[at]
        if isinstance(op, Take):
            after = ops[at + 1] if at + 1 < len(ops) else None
            kept = shape[op.axis]
            if (isinstance(after, Take) or isinstance(after, Split) and after.axis == op.axis or len(op.index) <= kept
                    or not torch.equal(op.index[:kept], torch.arange(kept, dtype=op.index.dtype))):
                return None, None
            result = list(shape)
            result[op.axis] = len(op.index)
            made = torch.empty(result, dtype=x.dtype, device=x.device)
            return (op, made), made.narrow(op.axis, 0, kept)
        if not isinstance(op, (Noise, Split, Scale)) or (
                isinstance(op, Scale) and op.factor == 0 and op.offset == 0 and op.positions is None):
            return None, None  # a redraw or a zeroing makes a new tensor; a pass's end rounds or copies
    return None, None


def _noise_ahead(ops, start: int) -> bool:
    """Whether noise comes at or after ``ops[start]`` in the same pass (before a :class:`PassEnd`)."""
    for op in ops[start:]:
        if isinstance(op, PassEnd):
            return False
        if isinstance(op, Noise):
            return True
    return False
