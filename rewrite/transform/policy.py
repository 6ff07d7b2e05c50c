"""The init-policy protocol: how a grown axis's new units are laid out, and how each member of its group is
made, as growth-map ops (``rewrite.transform.growth_map``).

A group of coupled axes grows from ``n`` to ``n'`` units. A policy picks a replication map ``g: [n'] -> [n]``
(``mapping``; ``g(j) = j`` for old units), then says, for each member by its role, which ops make the grown
tensor from the old one: ``produces`` (weight rows, conv out-channels, embedding columns), ``along`` (biases,
norm gains, BatchNorm statistics) and ``consumes`` (weight columns). The base class is Net2WiderNet's
replication: producers and along-members are copied through ``g``, consumers' columns are copied and divided
by each unit's replica count, so ``sum_j W'[:, j] h[g(j)] = sum_i W[:, i] h[i]``.

A policy declares on itself which reductions along the grown axis it leaves unchanged (``preserves``: kinds
such as ``layer_norm``, ``rms_norm``, ``mean``, ``max``), so the exactness analysis of any policy, a user's own
subclass included, is the same question: does every op that mixes values along the axis keep its value?
"""

from __future__ import annotations

import torch

from rewrite.analysis.layout import Layout, appended, padding_index
from rewrite.transform.growth_ops import Noise, Op, Scale, Split, Take

REDUCTION_NAMES = {"layer_norm": "LayerNorm", "rms_norm": "RMSNorm", "softmax": "a softmax",
                   "attention_scale": "attention's 1/sqrt(d) scale", "mean": "a mean"}


class Policy:
    name = ""
    preserves: frozenset[str] = frozenset()  # reductions along the grown axis whose value this policy keeps

    def mapping(self, n: int, n_new: int, generator: torch.Generator) -> torch.Tensor:
        """For each of the ``n_new - n`` new units, the old unit it starts from (uniformly at random)."""
        return torch.randint(0, n, (n_new - n,), generator=generator)

    def layout(self, n: int, n_new: int, generator: torch.Generator) -> Layout:
        """Old units in place, new ones appended per ``mapping``."""
        return appended(n, self.mapping(n, n_new, generator))

    def check(self, n: int, n_new: int) -> str | None:
        """Why this growth is impossible with the policy (None when it is possible)."""
        return None if n_new > n else f"new size {n_new} is not larger than {n}"

    def exact(self, reductions: list[tuple[str, str]]) -> str | None:
        """Why the result would not be exact (None when it is), from the ops mixing values along the axis."""
        for kind, node in reductions:
            if kind not in self.preserves:
                return (f"{REDUCTION_NAMES.get(kind, f'a {kind}')} over the grown axis (node {node}) is not "
                        f"preserved by {self.name or type(self).__name__}")
        return None

    # -- how each role's member is made: growth-map ops --------------------------------------------------------
    def produces(self, axis: int, layout: Layout, seed: int) -> list[Op]:
        return [replicate(axis, layout, "split")]

    def along(self, axis: int, layout: Layout, seed: int) -> list[Op]:
        return [replicate(axis, layout, "split")]  # a bias or gain is part of the unit that is split

    def consumes(self, axis: int, layout: Layout, seed: int) -> list[Op]:
        counts = torch.bincount(layout.source, minlength=layout.old_size)
        return [replicate(axis, layout, "split"), Split(axis, counts.index_select(0, layout.source))]


def replicate(axis: int, layout: Layout, fill: str) -> Take:
    """Every new unit a copy of its source unit (``layout.source``). ``fill``: ``split`` when the copies are
    parts of one unit (their consumer columns share its weight: gradients are shared too), ``copy`` when they
    are independent (their consumer columns are zero)."""
    return Take(axis, layout.source, layout.old_positions, fill)


def pad(axis: int, layout: Layout) -> Take:
    """Old units where the layout puts them, new units zero."""
    return Take(axis, padding_index(layout.new_size, layout.old_positions), layout.old_positions, "zero")


def fused(axis: int, parts: list[tuple[int, int, Layout, list[Op]]]) -> list[Op]:
    """The ops of a tensor whose ``axis`` is several parts laid end to end (a fused q|k|v projection), each
    part grown by its own ops: ``parts`` is (old offset, new offset, part layout, part ops) per part. One Take
    over the whole axis, then each part's other ops moved to its positions."""
    index, old_positions, after = [], [], []
    new_size = sum(layout.new_size for _, _, layout, _ in parts)
    for old_at, new_at, layout, ops in parts:
        take = ops[0]
        if not isinstance(take, Take) or take.axis != axis:
            raise ValueError("each part's ops must start with its Take along the fused axis")
        index.append(torch.where(take.index >= 0, take.index + old_at, take.index))
        old_positions.append(take.old_positions + new_at)
        for op in ops[1:]:
            after.append(_shifted(op, axis, new_at, layout.new_size, new_size))
    fills = "/".join(dict.fromkeys(ops[0].fill for _, _, _, ops in parts))  # "split" only if every part is
    return [Take(axis, torch.cat(index), torch.cat(old_positions), fills), *after]


def _shifted(op: Op, axis: int, start: int, size: int, total: int) -> Op:
    """``op`` of one part, applied at that part's positions of the whole axis."""
    if isinstance(op, Split):
        divisors = torch.ones(total, dtype=torch.long)
        divisors[start:start + size] = op.divisors
        return Split(axis, divisors)
    if isinstance(op, Scale):
        positions = torch.arange(size) if op.positions is None else op.positions
        return Scale(op.factor, op.offset, axis, positions + start)
    if isinstance(op, Noise):
        return Noise(axis, op.positions + start, op.seed, op.relative)
    raise ValueError(f"{type(op).__name__} cannot be applied to one part of a fused axis")
