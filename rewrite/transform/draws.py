"""Seeded normal draws: the same bits on every device and every thread count, drawn on every core.

**The scheme** (``SCHEME``, recorded in every growth map). A seeded draw of ``n`` values with seed ``s`` is the
stream ``z[0], z[1], .., z[n - 1]`` of float32 ``N(0, 1)`` values cut into chunks of ``CHUNK`` values; chunk
``c`` is ``torch.randn(CHUNK, generator=torch.Generator().manual_seed(chunk_seed(s, c)))`` on the CPU (the last
chunk is shorter), with ``chunk_seed`` a 63-bit BLAKE2b hash of ``(s, c)``. A tensor filled from a draw takes
the values in row-major order. So:

* every chunk is independent of the others: chunks are drawn by a pool of threads (torch's Mersenne Twister
  is serial, but each chunk has its own generator), in any order, and the bits do not depend on how many
  threads there are;
* the values are made on the CPU in float32 and then moved to the tensor's device and dtype (a CUDA generator
  would give other bits than the CPU's): the same bits on every device; a tensor is filled piece by piece, so
  the scratch on the CPU stays about ``PIECE`` values however large the tensor.

A :class:`Stream` reads a draw in order, any number of values at a time; ``fill_``, ``add_`` write one into a
tensor (or a region of it), where it lives: a contiguous CPU tensor chunk by chunk in place, on the draw
threads; anything else piece by piece through a CPU scratch.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

CHUNK = 1 << 16  # values per generator: a chunk is the unit of parallel drawing
PIECE = 1 << 20  # values of CPU scratch at a time when a draw goes into a tensor
SCHEME = f"chunks of {CHUNK} float32 normals, chunk c from a CPU mt19937 seeded by blake2b(seed/c)"

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def chunk_seed(seed: int, chunk: int) -> int:
    """The seed of chunk ``chunk`` of a draw with ``seed``: a 63-bit hash of both."""
    digest = hashlib.blake2b(f"{seed}/{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _generator(seed: int, chunk: int) -> torch.Generator:
    """The CPU generator chunk ``chunk`` of the draw with ``seed`` is drawn from."""
    return torch.Generator().manual_seed(chunk_seed(seed, chunk))


def _draw_chunk(seed: int, chunk: int, out: torch.Tensor) -> None:
    torch.randn(out.shape, generator=_generator(seed, chunk), out=out)


def _threads() -> int:
    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1))


def _draw_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max(1, os.cpu_count() or 1), thread_name_prefix="growfx-draw")
        return _pool


class Stream:
    """The draw with ``seed``, read in order: ``take(k)`` gives its next ``k`` values (a float32 CPU tensor).
    Whole chunks go straight into the result, a chunk cut by its end is kept for the next ``take``."""

    def __init__(self, seed: int, total: int):
        self.seed, self.total = seed, total
        self.at = 0  # values given so far
        self.left = torch.empty(0)  # the rest of the chunk cut by the last take

    def take(self, k: int) -> torch.Tensor:
        if self.at + k > self.total:
            raise ValueError(f"a draw of {self.total} values has no {k} more after {self.at}")
        out = torch.empty(k)
        held = min(k, len(self.left))
        out[:held] = self.left[:held]
        self.left = self.left[held:]
        position, end = self.at + held, self.at + k  # on a chunk's edge once what was held is used up
        jobs, tail = [], None
        while position < end:
            chunk = position // CHUNK
            size = min(CHUNK, self.total - chunk * CHUNK)
            at = position - self.at  # where the chunk starts in ``out``
            if position + size <= end:
                jobs.append((chunk, out[at:at + size]))
            else:  # cut by the end of this take: the rest is held for the next
                tail = (at, torch.empty(size))
                jobs.append((chunk, tail[1]))
            position += size
        _run(self.seed, jobs)
        if tail is not None:
            at, values = tail
            out[at:] = values[:k - at]
            self.left = values[k - at:]
        self.at += k
        return out


def _run(seed: int, jobs: list[tuple[int, torch.Tensor]]) -> None:
    """Draw each ``(chunk, out)``, on the draw threads when there are several and torch may use several."""
    _spread(jobs, lambda batch: [_draw_chunk(seed, chunk, out) for chunk, out in batch])


def _spread(jobs: list, work) -> None:
    """``work(batch)`` on consecutive batches of ``jobs``, one a draw thread, as many as torch uses threads."""
    threads = _threads()
    if len(jobs) <= 1 or threads == 1:
        work(jobs)
        return
    per = -(-len(jobs) // threads)
    futures = [_draw_pool().submit(work, jobs[i:i + per]) for i in range(0, len(jobs), per)]
    for future in futures:
        future.result()


def normal(count: int, seed: int) -> torch.Tensor:
    """The whole draw of ``count`` values with ``seed`` (float32, on the CPU)."""
    return Stream(seed, count).take(count)


def pieces(target: torch.Tensor, seed: int):
    """``(piece, values)``: ``target`` cut along its first axis into pieces of about ``PIECE`` values, each with
    its values of the draw (float32, CPU, shaped like the piece), in the row-major order of ``target``."""
    total = target.numel()
    stream = Stream(seed, total)
    if target.dim() == 0 or total == 0:
        yield target, stream.take(total).reshape(target.shape)
        return
    rows, per_row = target.shape[0], total // max(target.shape[0], 1)
    step = max(1, PIECE // max(per_row, 1))
    for start in range(0, rows, step):
        piece = target.narrow(0, start, min(step, rows - start))
        yield piece, stream.take(piece.numel()).view(piece.shape)


def fill_(target: torch.Tensor, seed: int, std: float = 1.0) -> torch.Tensor:
    """``target <- std * z`` (the draw with ``seed``), computed in float32 and rounded once to ``target``'s
    dtype, on ``target``'s device."""
    if target.dtype == torch.float32:
        def fill(view, generator):  # straight into place
            torch.randn(view.shape, generator=generator, out=view).mul_(std)
    else:
        def fill(view, generator):
            view.copy_(torch.randn(view.shape, generator=generator).mul_(std))
    return _each_chunk(target, seed, fill, lambda piece, values: piece.copy_(values.mul_(std)))


def add_(target: torch.Tensor, seed: int, alpha: float) -> torch.Tensor:
    """``target += alpha * z`` (the draw with ``seed``) on ``target``'s device: in ``target``'s dtype for
    float32 and wider, in float32 rounded once for bfloat16/float16."""
    low = target.is_floating_point() and torch.finfo(target.dtype).bits < 32

    def add(piece, values):
        values = values.to(piece.device)
        if low:
            piece.copy_(piece.float().add_(values, alpha=alpha))
        else:
            piece.add_(values.to(piece.dtype), alpha=alpha)
    return _each_chunk(target, seed, lambda view, generator: add(view, torch.randn(view.shape, generator=generator)),
                       add)


def _each_chunk(target: torch.Tensor, seed: int, in_place, by_piece) -> torch.Tensor:
    """Apply a draw to ``target``: on a contiguous CPU tensor, ``in_place(view, generator)`` on each chunk's
    slice of it, on the draw threads (the draw and its arithmetic on 64K values at a time, in cache); elsewhere
    (a device tensor, a region that is not contiguous) ``by_piece(piece, values)`` with :func:`pieces`. The
    arithmetic is element by element, so both give the same bits."""
    if target.device.type != "cpu" or not target.is_contiguous() or target.numel() == 0:
        for piece, values in pieces(target, seed):
            by_piece(piece, values)
        return target
    flat = target.view(-1)
    jobs = [(chunk, flat[chunk * CHUNK:(chunk + 1) * CHUNK]) for chunk in range(chunks_of(flat.numel()))]

    def work(batch):
        for chunk, view in batch:
            in_place(view, _generator(seed, chunk))
    _spread(jobs, work)
    return target


def chunks_of(count: int) -> int:
    """How many chunks (generators) a draw of ``count`` values uses."""
    return math.ceil(count / CHUNK)
