"""Taking positions along axes, the tensor work under ``Take``: allocated once, filled by slices.

:func:`take` makes ``x.index_select(axis, index)`` with zeros where ``index`` is -1 (optionally multiplied by a
factor per new position as it is copied); :func:`take_together` takes several axes in one allocation;
:func:`region` hands out the entries at some positions to edit in place. ``index`` and ``positions`` are CPU
tensors (read for their runs); where one must be a tensor operand it goes to ``x``'s device first.
"""

from __future__ import annotations

import contextlib
import itertools
import math

import torch

from rewrite.transform.growth_ops import Take, run_starts, runs


@contextlib.contextmanager
def region(x: torch.Tensor, axis: int | None, positions: torch.Tensor | None):
    """The entries at ``positions`` along ``axis`` (all when None) to edit in place: a view where the positions
    are one run, else a gathered copy written back afterwards."""
    if positions is None:
        yield x
        return
    items = runs(positions)
    if len(items) == 1 and items[0][0] >= 0:
        yield x.narrow(axis, items[0][0], items[0][1])
        return
    positions = positions.to(x.device)
    region = x.index_select(axis, positions)
    yield region
    x.index_copy_(axis, positions, region)


def take(x: torch.Tensor, axis: int, index: torch.Tensor, max_runs: int = 16,
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
    factors = None if factors is None else factors.to(x.device)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype if factors is None else factors.dtype, device=x.device)
    starts = run_starts(index)
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
        scale = None if factors is None else along(factors[start:end], axis, x.dim())
        if int(part[0]) >= 0 and not (position == 1 and scattered):
            source = x.narrow(axis, int(part[0]), end - start)
            target.copy_(source) if scale is None else torch.mul(source, scale, out=target)
            continue
        if position == 1 and scattered:
            gather_into(target, x, axis, part)
        else:
            target.zero_()
        if scale is not None:
            target.mul_(scale)
    return out


def gather_into(target: torch.Tensor, x: torch.Tensor, axis: int, index: torch.Tensor) -> None:
    """``target = x.index_select(axis, index)``, zeros where ``index`` is -1, written in place without a scratch
    copy. Along the first axis whole rows are copied; along another, ``gather`` writes row by row, where
    ``index_select`` would write column by column (and take the fresh pages in that order, 4x slower)."""
    source = x.to(target.dtype)  # a float32 target: a bfloat16 source taken to compute in
    index = index.to(device=x.device, dtype=torch.long)
    if axis == 0 and target.is_contiguous():
        torch.index_select(source, 0, index.clamp(min=0), out=target)
    else:
        torch.gather(source, axis, along(index.clamp(min=0), axis, x.dim()).expand(target.shape), out=target)
    missing = torch.nonzero(index < 0).flatten()
    if len(missing):
        target.index_fill_(axis, missing, 0)


def take_together(x: torch.Tensor, takes: list[Take], max_blocks: int = 64) -> torch.Tensor | None:
    """The Takes (on distinct axes) in one allocation, filled block by block: each index cut into its runs
    (consecutive positions, or -1s), each block of the output a copy of one block of ``x`` or zeros. The same
    values as taking axis after axis, without the tensors in between. None when the runs make too many blocks
    (a random replication map): take them one at a time."""
    cuts = []
    for take in takes:
        bounds = run_starts(take.index) + [len(take.index)]
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


def along(values: torch.Tensor, axis: int, rank: int) -> torch.Tensor:
    shape = [1] * rank
    shape[axis] = -1
    return values.view(shape)
