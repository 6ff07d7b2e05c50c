"""Growth ops: the steps that make a grown tensor from an old one, and running them.

* :class:`Take` (``axis``, ``index``): new position ``j`` along ``axis`` takes old position ``index[j]``, or
  zero where ``index[j] = -1``; ``old_positions[i]`` is where old unit ``i`` now sits. Every width growth is
  one Take per grown axis: old units kept, new ones copied from ``index`` (Net2Net, clone) or zero.
* :class:`Split` (``axis``, ``divisors``): ``x[.., j, ..] /= divisors[j]``: a consumer column of a unit that
  was split into ``n`` parts (Net2WiderNet, uniform cloning) keeps ``1/n`` of its weight.
* :class:`Scale` (``axis``, ``positions``, ``factor``, ``offset``): ``x <- (x + c) * s - c`` on some positions
  (or all): the temperature correction of keys, RMSNorm gains over a zero-padded axis (``c + w`` gains
  included), residual branches folded into their output layers.
* :class:`Noise` (``axis``, ``positions``, ``seed``, ``relative``): ``x += N(0, 1) * relative * std(r)`` on some
  positions, with ``r`` the tensor before the last Take (its own scale) and the normal draws from
  ``torch.Generator().manual_seed(seed)``: symmetry breaking, reproducible from the seed alone.
* :class:`Redraw` (``seed``): ``x <- N(0, 1) * std(x)``: a copied matrix drawn afresh at its source's scale.
* :class:`Fill`: how a tensor with no source starts (zeros, a seeded normal, or an opaque stored value).

``run_ops`` is the one implementation: the passes build grown tensors with it and ``GrowthMap.apply`` remakes
them with it. Every op serialises to JSON (``to_dict``, ``op_from_dict``; index vectors as runs).

**Duals.** Gradients do not follow the weight map; they follow its dual (``run_dual``). With the function
preserved, a unit split into ``n`` parts (a Take whose ``fill`` is ``split``: Net2WiderNet, uniform cloning)
gives each part ``g/n`` on its producer rows and along-members, while its consumer columns, divided by ``n`` in
the weights, receive the full ``g`` (the Split's dual multiplies by ``n``). Other fills (a copy whose consumer
columns are zero, zero padding) keep the old entries' gradient and give new ones none. A Scale by ``s`` that
preserves the function (key temperature, RMSNorm gains) divides the gradient by ``s``; Noise changes nothing.
``second_moment`` squares every factor (``v/n^2``); ``preserve`` keeps old entries as they are and zeroes new ones
(SPARKLING's asymmetric reset).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import itertools
import math
import zlib
from typing import Union

import torch

from rewrite.analysis.layout import new_positions, padding_index

NOISE = 1e-2  # relative scale of the symmetry-breaking noise the built-in policies draw


# -- index vectors as runs ---------------------------------------------------------------------------------
def runs(index: torch.Tensor) -> list[list[int]]:
    """``[0, 1, 2, 7, 8, -1, -1]`` -> ``[[0, 3], [7, 2], [-1, 2]]``: (first value, length) of each run that
    counts up by one (``-1`` runs repeat)."""
    starts = _run_starts(index)
    ends = starts[1:] + [len(index)]
    firsts = index[starts].tolist() if starts else []
    return [[first, end - start] for first, start, end in zip(firsts, starts, ends)]


def _run_starts(index: torch.Tensor) -> list[int]:
    """Where each run of ``index`` starts (see ``runs``)."""
    if len(index) == 0:
        return []
    index = index.long()
    missing = index < 0
    continues = ((index[1:] - index[:-1] == 1) & ~missing[1:] & ~missing[:-1]) | (missing[1:] & missing[:-1])
    return [0] + (torch.nonzero(~continues).flatten() + 1).tolist()


def from_runs(items: list[list[int]]) -> torch.Tensor:
    parts = [torch.full((n,), -1) if first == -1 else torch.arange(first, first + n) for first, n in items]
    return torch.cat(parts).long() if parts else torch.zeros(0, dtype=torch.long)


def value_runs(values: torch.Tensor) -> list[list[int]]:
    """``[1, 1, 2, 2, 2]`` -> ``[[1, 2], [2, 3]]``: (value, how many times)."""
    out: list[list[int]] = []
    for value in values.tolist():
        if out and out[-1][0] == value:
            out[-1][1] += 1
        else:
            out.append([value, 1])
    return out


def from_value_runs(items: list[list[int]]) -> torch.Tensor:
    return torch.cat([torch.full((n,), v) for v, n in items]).long() if items else torch.zeros(0, dtype=torch.long)


def _describe_runs(items: list[list[int]]) -> str:
    """Runs of positions as text: ``[[0, 24], [30, 1]]`` -> ``0-23, 30``."""
    return ", ".join(f"{first}" if n == 1 else f"{first}-{first + n - 1}" for first, n in items)


def _offsets(items):
    at = 0
    for first, n in items:
        yield at, n
        at += n


def seed_for(base: int, *parts: object) -> int:
    """A seed for one tensor (and axis) of a growth, independent of the order tensors are grown in."""
    return zlib.crc32("/".join(map(str, (base, *parts))).encode()) & 0x7FFFFFFF


# -- ops -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Take:
    """New position ``j`` along ``axis`` takes old position ``index[j]`` (zero where -1); ``fill`` says how the
    new positions came to be: ``split`` (one of the parts of a split unit), ``copy``, ``zero``, ``noise``."""

    axis: int
    index: torch.Tensor
    old_positions: torch.Tensor
    fill: str

    def new_positions(self) -> torch.Tensor:
        return new_positions(len(self.index), self.old_positions)

    def to_dict(self) -> dict:
        return {"op": "take", "axis": self.axis, "index": runs(self.index),
                "old_positions": runs(self.old_positions), "fill": self.fill}

    def describe(self, shape) -> str:
        axis_name = _axis_name(self.axis, len(shape))
        kept = _describe_runs([[0, len(self.old_positions)]]) if _prefix(self.old_positions) else "moved"
        new = self.new_positions()
        if not len(new):
            return f"{axis_name} reordered"
        return (f"{axis_name} {kept} kept, {_describe_runs(runs(new))} {self.fill}" if kept != "moved"
                else f"{axis_name}: old units moved, {len(new)} new ({self.fill})")


@dataclasses.dataclass(frozen=True)
class Split:
    """``x[.., j, ..] /= divisors[j]`` along ``axis``: each part of a unit split ``n`` ways carries ``1/n``."""

    axis: int
    divisors: torch.Tensor

    def to_dict(self) -> dict:
        return {"op": "split", "axis": self.axis, "divisors": value_runs(self.divisors)}

    def describe(self, shape) -> str:
        counts = sorted(set(self.divisors.tolist()) - {1})
        return f"{_axis_name(self.axis, len(shape))} divided by their replica counts ({', '.join(map(str, counts))})"


@dataclasses.dataclass(frozen=True)
class Scale:
    """``x <- (x + offset) * factor - offset`` at ``positions`` along ``axis`` (everywhere when None)."""

    factor: float
    offset: float = 0.0
    axis: int | None = None
    positions: torch.Tensor | None = None

    def to_dict(self) -> dict:
        return {"op": "scale", "factor": self.factor, "offset": self.offset, "axis": self.axis,
                "positions": None if self.positions is None else runs(self.positions)}

    def describe(self, shape) -> str:
        where = "" if self.positions is None else (
            f" at {_axis_name(self.axis, len(shape))} {_describe_runs(runs(self.positions))}")
        what = f"({self.offset:g} + w) * {self.factor:.6g} - {self.offset:g}" if self.offset else f"* {self.factor:.6g}"
        return f"scaled {what}{where}"


@dataclasses.dataclass(frozen=True)
class Noise:
    """``x += N(0, 1) * relative * std(r)`` at ``positions`` along ``axis``; ``r``: the tensor before the last Take."""

    axis: int
    positions: torch.Tensor
    seed: int
    relative: float = NOISE

    def to_dict(self) -> dict:
        return {"op": "noise", "axis": self.axis, "positions": runs(self.positions), "seed": self.seed,
                "relative": self.relative}

    def describe(self, shape) -> str:
        return (f"+ noise {self.relative:g} x std at {_axis_name(self.axis, len(shape))} "
                f"{_describe_runs(runs(self.positions))} (seed {self.seed})")


@dataclasses.dataclass(frozen=True)
class Redraw:
    """``x <- N(0, 1) * std(x)`` with normal draws from ``seed``: a fresh matrix at its source's scale."""

    seed: int

    def to_dict(self) -> dict:
        return {"op": "redraw", "seed": self.seed}

    def describe(self, shape) -> str:
        return f"drawn afresh at the source's std (seed {self.seed})"


@dataclasses.dataclass(frozen=True)
class PassEnd:
    """Where one pass's ops end in a composed recipe (``GrowthMap.then``), when running them in one go would not
    give the bits of running the passes one after another (:func:`joins`): the tensor is rounded to ``dtype``
    here (a bfloat16/float16 plan rounds at the end of every pass; None: a wider plan, nothing to round), and
    noise after it is scaled by the tensor here. ``run_ops(x, a + (PassEnd(dtype),) + b) ==
    run_ops(run_ops(x, a), b)`` for a plan in ``dtype``."""

    dtype: torch.dtype | None = None

    def to_dict(self) -> dict:
        return {"op": "pass_end", "dtype": None if self.dtype is None else str(self.dtype).removeprefix("torch.")}

    def describe(self, shape) -> str:
        return "end of a pass" + ("" if self.dtype is None else f" (rounded to {self.dtype})".replace("torch.", ""))


Op = Union[Take, Split, Scale, Noise, Redraw, PassEnd]


def joins(dtype: torch.dtype, later: tuple[Op, ...] | list[Op]) -> bool:
    """Whether a pass's ops ``later`` may run in one go with the ops before them, ``run_ops(run_ops(x, a), b) ==
    run_ops(x, a + b)``: float32/float64/integer tensors (a bfloat16/float16 one is rounded at the end of every
    pass), and no noise in ``later`` before its first Take (noise is scaled by the tensor before the last Take:
    in one run that would be a tensor of the passes before)."""
    if _low_precision(dtype):
        return False
    for op in later:
        if isinstance(op, Take):
            return True
        if isinstance(op, Noise):
            return False
    return True


def composed(dtype: torch.dtype, earlier: tuple[Op, ...], later: tuple[Op, ...]) -> tuple[Op, ...]:
    """The ops of two passes in a row, with a :class:`PassEnd` between them where they do not join."""
    if earlier and later and not joins(dtype, later):
        return (*earlier, PassEnd(dtype if _low_precision(dtype) else None), *later)
    return (*earlier, *later)


@dataclasses.dataclass(frozen=True)
class Fill:
    """How a tensor with no source starts: ``zeros``, ``normal`` (``N(0, std^2)`` from ``seed``) or ``value``
    (an opaque value a rule computed, stored in the map)."""

    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    seed: int | None = None
    std: float | None = None
    value: torch.Tensor | None = None

    def make(self) -> torch.Tensor:
        if self.kind == "zeros":
            return torch.zeros(self.shape, dtype=self.dtype)
        if self.kind == "normal":
            generator = torch.Generator().manual_seed(self.seed)
            return torch.randn(self.shape, generator=generator).mul_(self.std).to(self.dtype)
        return self.value.clone()

    def to_dict(self) -> dict:
        out = {"kind": self.kind, "shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch.")}
        if self.kind == "normal":
            out.update(seed=self.seed, std=self.std)
        if self.kind == "value":
            raw = self.value.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            out["value"] = base64.b64encode(raw).decode("ascii")
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Fill":
        dtype = getattr(torch, d["dtype"])
        value = None
        if d["kind"] == "value":
            raw = bytearray(base64.b64decode(d["value"]))
            value = torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(d["shape"]).clone()
        return cls(d["kind"], tuple(d["shape"]), dtype, d.get("seed"), d.get("std"), value)

    def describe(self) -> str:
        if self.kind == "normal":
            return f"normal, std {self.std:g} (seed {self.seed})"
        return "zeros" if self.kind == "zeros" else "a value the rule computed (opaque: stored in the map)"


# -- running ops ---------------------------------------------------------------------------------------------
def run_ops(tensor: torch.Tensor, ops: tuple[Op, ...] | list[Op]) -> torch.Tensor:
    """The tensor ``ops`` make of ``tensor`` (never written to; a new tensor when any op runs). Arithmetic on a
    bfloat16 or float16 tensor runs in float32 and is rounded once at the end (``rounded_by`` says when that
    rounding makes an exact plan inexact)."""
    x = tensor.detach()
    if x.is_meta:  # planning without weights: only the shape matters, and only a Take changes it
        shape = list(x.shape)
        for op in ops:
            if isinstance(op, Take):
                shape[op.axis] = len(op.index)
        return torch.empty(shape, dtype=x.dtype, device="meta")
    reference = x
    fresh = False
    low = _low_precision(x.dtype)
    pending = None  # (a later Take, the tensor it makes): the tensor until then is written into its leading slice
    ops = list(ops)
    with torch.no_grad():
        i = 0
        while i < len(ops):
            op = ops[i]
            i += 1
            if isinstance(op, PassEnd):  # what the pass before made, rounded; noise after it is scaled by it,
                x = reference = x if op.dtype is None else x.to(op.dtype)  # the next op that writes copies it
                fresh = False
                continue
            if isinstance(op, Take):
                # Takes in a row on distinct axes at once, unless noise follows (it is scaled by the tensor
                # before the last Take, which taking them at once never makes)
                takes = [op]
                while (i < len(ops) and isinstance(ops[i], Take) and ops[i].axis not in {t.axis for t in takes}
                       and not _noise_ahead(ops, i)):
                    takes.append(ops[i])
                    i += 1
                together = _take_together(x, takes) if len(takes) > 1 else None
                if pending is not None and op is pending[0]:  # x is the leading slice of this Take's result
                    # later noise is scaled by x as it is now, which ops on the result may change: its sample
                    reference, x = _sample(x).clone(), _take(x, op.axis, op.index, out=pending[1],
                                                             done=x.shape[op.axis])
                    pending = None
                elif len(takes) == 1 and i < len(ops) and isinstance(ops[i], Split) and ops[i].axis == op.axis:
                    # the Split's division made as the Take writes each entry: one pass over the grown tensor,
                    # not two (the same products, in float32 for a bfloat16/float16 tensor as below)
                    factors = ops[i].divisors.to(torch.float32 if low else x.dtype).reciprocal()
                    i += 1
                    pending, into = _into_next_take(x, [op], ops, i) if not low else (None, None)
                    reference, x = x, _take(x, op.axis, op.index, factors=factors, out=into)
                elif len(takes) == 1 and not low:
                    pending, into = _into_next_take(x, takes, ops, i)
                    reference, x = x, _take(x, op.axis, op.index, out=into)
                elif together is None:
                    for take in takes:
                        reference, x = x, _take(x, take.axis, take.index)
                else:
                    x = together
                fresh = True
                continue
            if isinstance(op, Scale) and op.factor == 0 and op.offset == 0 and op.positions is None:
                x, fresh = torch.zeros_like(x), True  # a zeroed tensor (a new block's output): no arithmetic
                continue
            rounded_next = i == len(ops) or isinstance(ops[i], PassEnd) and ops[i].dtype == tensor.dtype
            if isinstance(op, Redraw):  # a fresh draw at x's scale, piece by piece (float32 draws, scaled in
                # float32 for a bfloat16/float16 tensor), straight into its dtype when it is rounded next
                std, shape = float(x.float().std()), x.shape
                arithmetic = torch.float32 if low else x.dtype
                x = None  # freed before the draw
                x, fresh = torch.empty(shape, dtype=tensor.dtype if low and rounded_next else arithmetic), True
                drawn_in_place = x.dtype == arithmetic == torch.get_default_dtype()  # no conversion between
                for piece, generator in _pieces(x, op.seed):
                    if drawn_in_place:  # the same draws and products, written once
                        torch.randn(piece.shape, generator=generator, out=piece).mul_(std)
                    else:
                        piece.copy_(torch.randn(piece.shape, generator=generator).to(arithmetic).mul_(std))
                continue
            if isinstance(op, Noise) and low and x.dtype != torch.float32 and rounded_next:
                # the last op on a bfloat16/float16 tensor: only the noised entries need float32, piece by piece
                x = x if fresh else x.clone()
                with _region(x, op.axis, op.positions) as target:
                    _add_noise_in_pieces(target, op.seed, op.relative * _std(reference))
                fresh = True
                continue
            if low and x.dtype != torch.float32:
                x, fresh = x.float(), True
            if not fresh:
                x, fresh = x.clone(), True
            if isinstance(op, Split):
                x.mul_(_along(op.divisors.to(x.dtype).reciprocal(), op.axis, x.dim()))
            elif isinstance(op, Scale):
                with _region(x, op.axis, op.positions) as target:
                    target.add_(op.offset).mul_(op.factor).sub_(op.offset)
            elif isinstance(op, Noise):  # drawn piece by piece: no scratch of the region's size
                with _region(x, op.axis, op.positions) as target:
                    scale = op.relative * _std(reference)
                    for piece, generator in _pieces(target, op.seed):
                        piece.add_(torch.randn(piece.shape, generator=generator, dtype=x.dtype), alpha=scale)
            else:
                raise TypeError(f"unknown growth op {op!r}")
    return x.to(tensor.dtype)


DRAW_COST = 4  # a seeded normal value costs about four written ones (torch's Mersenne Twister is serial:
# about 4 ns a value against about 1 ns to write one, on a 2-core x86 machine)


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
    low = _low_precision(dtype)
    if low and arithmetic and isinstance(ops[-1], (Noise, Redraw)):
        arithmetic = arithmetic[:-1]  # drawn in pieces
    extra = 4 * largest if low and arithmetic else 0
    if any(isinstance(op, Redraw) for op in arithmetic):
        extra += 4 * largest
    return (start + math.prod(shape)) * size + extra


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


def _low_precision(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and torch.finfo(dtype).bits < 32


def rounded_by(ops: tuple[Op, ...] | list[Op], dtype: torch.dtype) -> list[float]:
    """The factors among ``ops`` (divisions by replica counts, scalings) that ``dtype`` cannot hold exactly
    after the multiplication: any factor but a power of two rounds the weights it touches in bfloat16/float16,
    so an exact plan computes its function only up to that rounding. Empty for float32 and wider."""
    if not _low_precision(dtype):
        return []
    factors = []
    for op in ops:
        if isinstance(op, Split):
            factors += [1 / d for d in set(op.divisors.tolist()) if d not in (0, 1)]
        elif isinstance(op, Scale) and op.factor != 0:
            factors.append(op.factor)
    return sorted({f for f in factors if math.frexp(abs(f))[0] != 0.5})


GRADIENT, SECOND_MOMENT, PRESERVE = "gradient", "second_moment", "preserve"


def run_dual(tensor: torch.Tensor, ops: tuple[Op, ...] | list[Op], kind: str) -> torch.Tensor:
    """What ``ops`` make of a tensor that transforms like a gradient (``kind="gradient"``: first moments,
    momentum buffers), like its square (``"second_moment"``) or that keeps its old entries (``"preserve"``)."""
    if kind not in (GRADIENT, SECOND_MOMENT, PRESERVE):
        raise ValueError(f"unknown kind {kind!r}: weight, gradient, second_moment or preserve")
    power = 2 if kind == SECOND_MOMENT else 1
    x = tensor.detach().clone()
    with torch.no_grad():
        for op in ops:
            if isinstance(op, Take):
                if op.fill == "split" and kind != PRESERVE:
                    counts = torch.bincount(op.index[op.index >= 0], minlength=x.shape[op.axis])
                    shares = counts.index_select(0, op.index.clamp(min=0)).to(x.dtype) ** power
                    x = _take(x, op.axis, op.index).div_(_along(shares, op.axis, x.dim()))
                else:
                    x = _take(x, op.axis, padding_index(len(op.index), op.old_positions))
            elif isinstance(op, Split) and kind != PRESERVE:
                x.mul_(_along(op.divisors.to(x.dtype) ** power, op.axis, x.dim()))
            elif isinstance(op, Scale) and kind != PRESERVE:
                with _region(x, op.axis, op.positions) as target:
                    target.mul_(0.0 if op.factor == 0 else 1.0 / op.factor ** power)
            elif isinstance(op, Redraw):
                x.zero_()  # a fresh draw has no gradient identity with what it replaced
            elif isinstance(op, PassEnd):
                continue
    return x


@contextlib.contextmanager
def _region(x: torch.Tensor, axis: int | None, positions: torch.Tensor | None):
    """The entries at ``positions`` along ``axis`` (all when None) to edit in place: a view where the positions
    are one run, else a gathered copy written back afterwards."""
    if positions is None:
        yield x
        return
    items = runs(positions)
    if len(items) == 1 and items[0][0] >= 0:
        yield x.narrow(axis, items[0][0], items[0][1])
        return
    region = x.index_select(axis, positions)
    yield region
    x.index_copy_(axis, positions, region)


def _take(x: torch.Tensor, axis: int, index: torch.Tensor, max_runs: int = 16,
          factors: torch.Tensor | None = None, out: torch.Tensor | None = None, done: int = 0) -> torch.Tensor:
    """``x.index_select(axis, index)`` with zeros where ``index`` is -1, allocated once and filled by slices
    where the index runs consecutively (kept units are one run, uniform clones whole blocks); a scattered
    remainder (a random replication map) is gathered after the leading run, straight into its place. With
    ``factors`` (one per new position, of the dtype to compute in), the result times ``factors`` along ``axis``:
    a run is multiplied as it is copied, a gathered remainder once it is in place. ``out``: the result's
    tensor, given; ``done``: its first positions along ``axis`` already hold their values (``x`` may be that
    slice of ``out`` itself: ``index`` starts ``0, 1, .., done - 1``, the leading run).
    """
    shape = list(x.shape)
    shape[axis] = len(index)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype if factors is None else factors.dtype, device=x.device)
    starts = _run_starts(index)
    scattered = len(starts) > max_runs
    if scattered:
        starts = starts[:2]  # the leading run by slices, the rest gathered at once
    bounds = starts + [len(index)]
    for position, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if end <= done:
            continue
        target = out.narrow(axis, start, end - start)
        part = index[start:end]
        # with factors, the same products as multiplying after the Take, each run multiplied as it is copied
        scale = None if factors is None else _along(factors[start:end], axis, x.dim())
        if int(part[0]) >= 0 and not (position == 1 and scattered):
            source = x.narrow(axis, int(part[0]), end - start)
            target.copy_(source) if scale is None else torch.mul(source, scale, out=target)
            continue
        if position == 1 and scattered:
            _gather_into(target, x, axis, part)
        else:
            target.zero_()
        if scale is not None:
            target.mul_(scale)
    return out


def _gather_into(target: torch.Tensor, x: torch.Tensor, axis: int, index: torch.Tensor) -> None:
    """``target = x.index_select(axis, index)``, zeros where ``index`` is -1, written in place without a scratch
    copy. Along the first axis whole rows are copied; along another, ``gather`` writes row by row, where
    ``index_select`` would write column by column (and take the fresh pages in that order, 4x slower)."""
    source, index = x.to(target.dtype), index.long()  # a float32 target: a bfloat16 source taken to compute in
    if axis == 0 and target.is_contiguous():
        torch.index_select(source, 0, index.clamp(min=0), out=target)
    else:
        torch.gather(source, axis, _along(index.clamp(min=0), axis, x.dim()).expand(target.shape), out=target)
    missing = torch.nonzero(index < 0).flatten()
    if len(missing):
        target.index_fill_(axis, missing, 0)


def _take_together(x: torch.Tensor, takes: list[Take], max_blocks: int = 64) -> torch.Tensor | None:
    """The Takes (on distinct axes) in one allocation, filled block by block: each index cut into its runs
    (consecutive positions, or -1s), each block of the output a copy of one block of ``x`` or zeros. The same
    values as taking axis after axis, without the tensors in between. None when the runs make too many blocks
    (a random replication map): take them one at a time."""
    cuts = []
    for take in takes:
        bounds = _run_starts(take.index) + [len(take.index)]
        cuts.append([(take.axis, start, end - start, int(take.index[start]))
                     for start, end in zip(bounds[:-1], bounds[1:])])
    if math.prod(len(runs_) for runs_ in cuts) > max_blocks:
        return None
    shape = list(x.shape)
    for take in takes:
        shape[take.axis] = len(take.index)
    out = torch.empty(shape, dtype=x.dtype, device=x.device)
    for block in itertools.product(*cuts):
        target, source = out, x
        for axis, start, n, first in block:
            target = target.narrow(axis, start, n)
            source = None if source is None or first < 0 else source.narrow(axis, first, n)
        target.zero_() if source is None else target.copy_(source)
    return out


PIECE = 1 << 20  # float32 values of scratch at a time when noise goes into a bfloat16/float16 tensor


def _add_noise_in_pieces(target: torch.Tensor, seed: int, scale: float) -> None:
    """``target += scale * randn(target.shape)`` (seeded), computed in float32 and rounded into ``target``'s
    dtype piece by piece (:func:`_pieces`): what converting the whole tensor to float32, adding, and rounding
    at the end gives, without the float32 copy of the whole tensor."""
    for piece, generator in _pieces(target, seed):
        piece.copy_(piece.float().add_(torch.randn(piece.shape, generator=generator), alpha=scale))


def _pieces(target: torch.Tensor, seed: int):
    """``target`` in pieces of about ``PIECE`` values along its first axis, each with the generator seeded with
    ``seed`` to draw it from: the pieces' ``randn`` draws are those of one ``randn`` of the whole shape. A CPU
    normal fill of 16 values or more takes one uniform per value and pairs them within blocks of 16, so pieces
    of a multiple of 16 values (the last one at least 16) continue one stream (``tests/test_materialise.py``
    checks it); a tensor of under 32 values is one piece."""
    generator = torch.Generator().manual_seed(seed)
    if target.dim() == 0 or target.numel() < 32:
        yield target, generator
        return
    rows, per_row = target.shape[0], target.numel() // target.shape[0]
    align = 16 // math.gcd(per_row, 16)  # rows per piece: a multiple of this holds a multiple of 16 values
    step = max(align, PIECE // max(per_row, 1) // align * align)
    starts = list(range(0, rows, step))
    if len(starts) > 1 and (rows - starts[-1]) * per_row < 16:
        starts.pop()  # a last piece under 16 values is drawn differently: it joins the one before
    for start, end in zip(starts, [*starts[1:], rows]):
        yield target.narrow(0, start, end - start), generator


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


def _along(values: torch.Tensor, axis: int, rank: int) -> torch.Tensor:
    shape = [1] * rank
    shape[axis] = -1
    return values.view(shape)


def _prefix(positions: torch.Tensor) -> bool:
    return bool(torch.equal(positions, torch.arange(len(positions))))


def _axis_name(axis: int | None, rank: int) -> str:
    if axis is None:
        return "all"
    if rank == 2:
        return ("rows", "columns")[axis]
    return f"axis {axis}"


def op_from_dict(d: dict) -> Op:
    kind = d["op"]
    if kind == "take":
        return Take(d["axis"], from_runs(d["index"]), from_runs(d["old_positions"]), d["fill"])
    if kind == "split":
        return Split(d["axis"], from_value_runs(d["divisors"]))
    if kind == "scale":
        positions = None if d["positions"] is None else from_runs(d["positions"])
        return Scale(d["factor"], d["offset"], d["axis"], positions)
    if kind == "noise":
        return Noise(d["axis"], from_runs(d["positions"]), d["seed"], d["relative"])
    if kind == "redraw":
        return Redraw(d["seed"])
    if kind == "pass_end":
        return PassEnd(None if d["dtype"] is None else getattr(torch, d["dtype"]))
    raise ValueError(f"unknown growth op {kind!r} in a growth map")
