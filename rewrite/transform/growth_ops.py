"""Growth ops: the vocabulary of steps that make a grown tensor from an old one.

* :class:`Take` (``axis``, ``index``): new position ``j`` along ``axis`` takes old position ``index[j]``, or
  zero where ``index[j] = -1``; ``old_positions[i]`` is where old unit ``i`` now sits. Every width growth is
  one Take per grown axis: old units kept, new ones copied from ``index`` (Net2Net, clone) or zero.
* :class:`Split` (``axis``, ``divisors``): ``x[.., j, ..] /= divisors[j]``: a consumer column of a unit that
  was split into ``n`` parts (Net2WiderNet, uniform cloning) keeps ``1/n`` of its weight.
* :class:`Scale` (``axis``, ``positions``, ``factor``, ``offset``): ``x <- (x + c) * s - c`` on some positions
  (or all): the temperature correction of keys, RMSNorm gains over a zero-padded axis (``c + w`` gains
  included), residual branches folded into their output layers.
* :class:`Noise` (``axis``, ``positions``, ``seed``, ``relative``): ``x += z * relative * std(r)`` on some
  positions, with ``r`` the tensor before the last Take (its own scale) and ``z`` the seeded draw of
  ``rewrite.transform.draws`` (the same bits on every device): symmetry breaking, reproducible from the seed.
* :class:`Redraw` (``seed``): ``x <- z * std(x)``: a copied matrix drawn afresh at its source's scale.
* :class:`Fill`: how a tensor with no source starts (zeros, a seeded normal, or an opaque stored value).

Index vectors, divisors and positions are CPU tensors (a map's description, not data): whatever runs an op
moves them to the device of the tensor it edits. Every op serialises to JSON (``to_dict``, ``op_from_dict``;
index vectors as runs). Running ops: ``rewrite.transform.run_ops`` (weights) and ``rewrite.transform.dual``
(gradients and optimizer state); what running them costs: ``rewrite.transform.work``.
"""

from __future__ import annotations

import base64
import dataclasses
import math
import zlib
from typing import Union

import torch

from rewrite.analysis.layout import new_positions
from rewrite.transform import draws

NOISE = 1e-2  # relative scale of the symmetry-breaking noise the built-in policies draw


# -- index vectors as runs ---------------------------------------------------------------------------------
def runs(index: torch.Tensor) -> list[list[int]]:
    """``[0, 1, 2, 7, 8, -1, -1]`` -> ``[[0, 3], [7, 2], [-1, 2]]``: (first value, length) of each run that
    counts up by one (``-1`` runs repeat)."""
    starts = run_starts(index)
    ends = starts[1:] + [len(index)]
    firsts = index[starts].tolist() if starts else []
    return [[first, end - start] for first, start, end in zip(firsts, starts, ends)]


def run_starts(index: torch.Tensor) -> list[int]:
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
    """``x += z * relative * std(r)`` at ``positions`` along ``axis``; ``r``: the tensor before the last Take, ``z``:
    the draw with ``seed`` (``rewrite.transform.draws``) in the row-major order of the positions' entries."""

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
    """``x <- z * std(x)`` with ``z`` the draw with ``seed`` (``rewrite.transform.draws``): a fresh matrix at its
    source's scale."""

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
    if low_precision(dtype):
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
        return (*earlier, PassEnd(dtype if low_precision(dtype) else None), *later)
    return (*earlier, *later)


@dataclasses.dataclass(frozen=True)
class Fill:
    """How a tensor with no source starts: ``zeros``, ``normal`` (``std`` times the draw with ``seed``) or
    ``value`` (an opaque value a rule computed, stored in the map). ``make(device)`` makes it there."""

    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    seed: int | None = None
    std: float | None = None
    value: torch.Tensor | None = None

    def make(self, device: torch.device | str | None = None) -> torch.Tensor:
        if self.kind == "zeros":
            return torch.zeros(self.shape, dtype=self.dtype, device=device)
        if self.kind == "normal":
            return draws.fill_(torch.empty(self.shape, dtype=self.dtype, device=device), self.seed, self.std)
        return self.value.clone() if device is None else self.value.to(device, copy=True)

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


# -- precision ----------------------------------------------------------------------------------------------
def low_precision(dtype: torch.dtype) -> bool:
    """bfloat16, float16 (and narrower): a tensor whose arithmetic runs in float32 and is rounded once."""
    return dtype.is_floating_point and torch.finfo(dtype).bits < 32


def rounded_by(ops: tuple[Op, ...] | list[Op], dtype: torch.dtype) -> list[float]:
    """The factors among ``ops`` (divisions by replica counts, scalings) that ``dtype`` cannot hold exactly
    after the multiplication: any factor but a power of two rounds the weights it touches in bfloat16/float16,
    so an exact plan computes its function only up to that rounding. Empty for float32 and wider."""
    if not low_precision(dtype):
        return []
    factors = []
    for op in ops:
        if isinstance(op, Split):
            factors += [1 / d for d in set(op.divisors.tolist()) if d not in (0, 1)]
        elif isinstance(op, Scale) and op.factor != 0:
            factors.append(op.factor)
    return sorted({f for f in factors if math.frexp(abs(f))[0] != 0.5})


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
