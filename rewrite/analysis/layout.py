"""Layouts: where each unit of a grown axis comes from, and where the old units went.

A ``Layout`` for an axis grown from ``n`` to ``n'`` units has ``source`` (``[n']``: new unit ``j`` starts as
old unit ``source[j]``) and ``old_positions`` (``[n]``: old unit ``i`` now sits at ``old_positions[i]``).
Growth that appends units keeps the old ones in front; an axis made of others inherits its layout:

* ``factor`` (a view into heads x head_dim, outer part first): mixed radix. With part sizes ``n_i -> n_i'``,
  new index ``(d_1, ..., d_k)`` in radix ``n'`` starts as old index ``(src_1[d_1], ..., src_k[d_k])`` in radix
  ``n``; adding heads to ``[heads, head_dim]`` appends whole heads.
* ``concat`` (GPT-2's fused ``c_attn`` = q | k | v): parts laid end to end, so old units of later parts
  move (``old_positions`` is not a prefix) and the fill and the verifier's projection follow it.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class Layout:
    source: torch.Tensor
    old_positions: torch.Tensor

    @property
    def old_size(self) -> int:
        return len(self.old_positions)

    @property
    def new_size(self) -> int:
        return len(self.source)

    @property
    def prefix(self) -> bool:
        """Old units stay in front, in order (new ones appended)."""
        return bool(torch.equal(self.old_positions, torch.arange(self.old_size)))

    def new_positions(self) -> torch.Tensor:
        return new_positions(self.new_size, self.old_positions)


def new_positions(size: int, old_positions: torch.Tensor) -> torch.Tensor:
    """The positions of an axis of ``size`` units that no old unit occupies."""
    keep = torch.ones(size, dtype=torch.bool)
    keep[old_positions] = False
    return torch.nonzero(keep).flatten()


def padding_index(size: int, old_positions: torch.Tensor) -> torch.Tensor:
    """For each of ``size`` positions, the old unit placed there, or -1 where no old unit is."""
    index = torch.full((size,), -1, dtype=torch.long)
    index[old_positions] = torch.arange(len(old_positions))
    return index


def identity(n: int) -> Layout:
    return Layout(torch.arange(n), torch.arange(n))


def appended(n: int, new_sources: torch.Tensor) -> Layout:
    """Old units in place, new units appended, each starting as the old unit ``new_sources[k]``."""
    return Layout(torch.cat([torch.arange(n), new_sources.long()]), torch.arange(n))


def factor(parts: list[Layout]) -> Layout:
    """The layout of an axis that is the product of ``parts`` (outer first)."""
    source = torch.zeros(1, dtype=torch.long)
    positions = torch.zeros(1, dtype=torch.long)
    for part in parts:
        source = (source[:, None] * part.old_size + part.source[None, :]).flatten()
        positions = (positions[:, None] * part.new_size + part.old_positions[None, :]).flatten()
    return Layout(source, positions)


def concat(parts: list[Layout]) -> Layout:
    """The layout of an axis made of ``parts`` laid end to end."""
    sources, positions = [], []
    old_offset = new_offset = 0
    for part in parts:
        sources.append(part.source + old_offset)
        positions.append(part.old_positions + new_offset)
        old_offset += part.old_size
        new_offset += part.new_size
    return Layout(torch.cat(sources), torch.cat(positions))
