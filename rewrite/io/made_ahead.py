"""Tensors made a few at a time and handed over in order, within a budget of bytes in flight.

A streaming writer writes tensor ``k`` while the next ones are being made: their arithmetic (a bfloat16 tensor
widened in float32, a seeded normal draw) overlaps the write and each other. Memory
stays bounded: each tensor comes with the bytes it holds while made (``rewrite.transform.work
.working_bytes`` for a growth), and a tensor is started only while those of the tensors started and not yet
handed back (the one being written included) stay within ``budget``; one tensor alone always starts. With the
budget at the most any one tensor holds, what is in flight at once is at most what the largest holds alone.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch


def made_in_order(items: list[tuple[str, int]], make: Callable[[str], torch.Tensor], *, workers: int,
                  budget: int) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, make(name))`` for each ``(name, bytes)`` of ``items``, in order; up to ``workers`` tensors are
    made at once (the next ones start while the caller holds one), within ``budget`` bytes (see the module
    docstring). The caller should drop each tensor before asking for the next. An error in ``make`` is raised
    in order, and tensors not started yet are not made."""
    if workers <= 1:
        for name, _ in items:
            yield name, make(name)
        return
    pending: collections.deque = collections.deque()  # (name, bytes, future), in order
    upcoming = iter(items)
    following = next(upcoming, None)
    in_flight = 0
    pool = ThreadPoolExecutor(workers)
    try:
        while pending or following is not None:
            while following is not None and len(pending) <= workers and (
                    not pending or in_flight + following[1] <= budget):
                name, size = following
                pending.append((name, size, pool.submit(make, name)))
                in_flight += size
                following = next(upcoming, None)
            name, size, future = pending.popleft()
            tensor = future.result()
            yield name, tensor
            del tensor
            in_flight -= size
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


__all__ = ["made_in_order"]
