"""Init policies for width growth: how a grown axis's new slices are filled, role by role.

A group of coupled axes grows from ``n`` to ``n'`` units. A policy first picks a replication map
``g: [n'] -> [n]`` (``g(j) = j`` for old units; axes made of others inherit it, see ``rewrite.layout``),
then fills each member by its role:

    role        zero (Gesmundo & Maile)    clone (uniform x k)          net2net (Net2WiderNet)        sparkling
    produces    rows via g, + noise        rows repeated: W[g(j)]       rows via g: W[g(j)]           rows via g, + noise
    along       copied via g               copied via g                 copied via g                  copied via g
    consumes    old columns, new = 0       W[:, g(j)] / k               W[:, g(j)] / count(g(j))      all columns * sqrt(n/n')

``g`` is ``j mod n`` for clone (each unit exactly k = n'/n times) and zero (any source is exact there; blocks
copy fastest), uniform random for net2net.
Exact when (known before anything runs, see ``exact``):
* zero: new units reach the output only through zero columns, so no op may mix values along the axis;
* clone: any element-wise op, and means/norms along the axis (LayerNorm, RMSNorm keep mean and variance
  under uniform replication); not sums, softmax or attention temperature;
* net2net: element-wise ops and maxima; not norms (non-uniform replication moves the mean);
* sparkling: never; it keeps activation RMS for mid-training growth and breaks symmetry.
"""

from __future__ import annotations

import math

import torch

from rewrite.layout import Layout, appended
from rewrite.ops import REDUCTION_INVARIANCE

NOISE = 1e-2  # relative scale of the symmetry-breaking noise on new producer rows


class Policy:
    name = ""

    def mapping(self, n: int, n_new: int, generator: torch.Generator) -> torch.Tensor:
        """For each of the ``n_new - n`` new units, the old unit it starts from."""
        return torch.randint(0, n, (n_new - n,), generator=generator)

    def layout(self, n: int, n_new: int, generator: torch.Generator) -> Layout:
        """Old units in place, new ones appended per ``mapping``."""
        return appended(n, self.mapping(n, n_new, generator))

    def check(self, n: int, n_new: int) -> str | None:
        """Why this growth is impossible with the policy (None when it is possible)."""
        return None if n_new > n else f"new size {n_new} is not larger than {n}"

    def exact(self, reductions: list[tuple[str, str]]) -> str | None:
        """Why the result would not be exact (None when it is), from the ops mixing the axis."""
        for kind, node in reductions:
            if self.name not in REDUCTION_INVARIANCE.get(kind, set()):
                return f"{_describe(kind)} over the grown axis (node {node}) is not preserved by {self.name}"
        return None

    def produces(self, old: torch.Tensor, axis: int, layout: Layout, out: torch.Tensor, generator) -> None:
        gather(old, axis, layout.source, out)

    def along(self, old: torch.Tensor, axis: int, layout: Layout, out: torch.Tensor, generator) -> None:
        gather(old, axis, layout.source, out)

    def consumes(self, old: torch.Tensor, axis: int, layout: Layout, out: torch.Tensor, generator) -> None:
        gather(old, axis, layout.source, out)
        counts = torch.bincount(layout.source, minlength=old.shape[axis]).to(old.dtype)
        out.mul_(_along(counts.reciprocal().index_select(0, layout.source), axis, old.dim()))


class Zero(Policy):
    """Zero fan-in of the consumers for new units; new producer rows are noisy copies (they can learn)."""

    name = "zero"

    def mapping(self, n, n_new, generator):
        # Any source is exact (consumers see zero columns) and the noise breaks symmetry, so new units copy
        # the old ones in order: whole blocks, copied by slices instead of gathered.
        return torch.arange(n, n_new) % n

    def produces(self, old, axis, layout, out, generator):
        gather(old, axis, layout.source, out)
        new = layout.new_positions()
        if layout.prefix:
            add_noise(out.narrow(axis, layout.old_size, len(new)), old, generator)
        else:
            rows = out.index_select(axis, new)
            add_noise(rows, old, generator)
            out.index_copy_(axis, new, rows)

    def consumes(self, old, axis, layout, out, generator):
        if layout.prefix:
            out.narrow(axis, 0, layout.old_size).copy_(old)
            out.narrow(axis, layout.old_size, layout.new_size - layout.old_size).zero_()
        else:
            out.zero_()
            out.index_copy_(axis, layout.old_positions, old)


class Clone(Policy):
    """Uniform replication: every unit k times (HyperCloning); n' must be a multiple of n."""

    name = "clone"

    def mapping(self, n, n_new, generator):
        return torch.arange(n, n_new) % n

    def check(self, n, n_new):
        return super().check(n, n_new) or (
            None if n_new % n == 0 else f"clone needs an integer factor: {n_new} is not a multiple of {n}"
        )


class Net2Net(Policy):
    """Net2WiderNet: random replication map, consumer columns divided by each unit's replica count."""

    name = "net2net"


class Sparkling(Zero):
    """RMS-consistent growth (SPARKLING): keeps activation RMS, not the function; for mid-training growth."""

    name = "sparkling"

    def exact(self, reductions):
        return "sparkling keeps activation RMS, not the function (it is meant to break symmetry)"

    def consumes(self, old, axis, layout, out, generator):
        self.produces(old, axis, layout, out, generator)  # noisy copies for the new columns
        out.mul_(math.sqrt(layout.old_size / layout.new_size))


class AnySize(Policy):
    """A policy's exactness rule without its size rule: for axes whose sizes a rule derives (heads x head
    size); the policy's own size rule is checked on the axes it lays out."""

    def __init__(self, inner: Policy):
        self.inner = inner
        self.name = inner.name

    def exact(self, reductions):
        return self.inner.exact(reductions)


POLICIES = {p.name: p for p in (Zero(), Clone(), Net2Net(), Sparkling())}


def policy(name: "str | Policy") -> Policy:
    """A policy by name, or the given Policy object itself (user-written policies)."""
    if isinstance(name, Policy):
        return name
    if name not in POLICIES:
        raise ValueError(f"unknown init policy {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[name]


def gather(old: torch.Tensor, axis: int, index: torch.Tensor, out: torch.Tensor, max_runs: int = 16) -> None:
    """``out = old.index_select(axis, index)`` without temporaries where the index runs consecutively.

    Old units keep their places (one run) and uniform clones are whole blocks, so most growth is a few
    slice copies; only a scattered remainder is gathered.
    """
    breaks = torch.nonzero(index[1:] - index[:-1] != 1).flatten().tolist()
    starts = [0] + [b + 1 for b in breaks]
    ends = starts[1:] + [len(index)]
    if len(starts) > max_runs:  # scattered: copy the leading run, gather the rest
        first = ends[0]
        out.narrow(axis, 0, first).copy_(old.narrow(axis, int(index[0]), first))
        out.narrow(axis, first, len(index) - first).copy_(old.index_select(axis, index[first:]))
        return
    for start, end in zip(starts, ends):
        out.narrow(axis, start, end - start).copy_(old.narrow(axis, int(index[start]), end - start))


def add_noise(target: torch.Tensor, like: torch.Tensor, generator: torch.Generator) -> None:
    """``target += N(0, (NOISE * std(like))^2)``, in place; the scale is estimated on a sample of ``like``."""
    sample = like.detach().reshape(-1)[:65536].float()
    scale = float(sample.std()) if sample.numel() > 1 else float(sample.abs().mean()) if sample.numel() else 1.0
    scale = scale if math.isfinite(scale) and scale > 0 else 1.0
    noise = torch.randn(target.shape, generator=generator, dtype=target.dtype)
    target.add_(noise, alpha=NOISE * scale)


def _along(values: torch.Tensor, axis: int, rank: int) -> torch.Tensor:
    shape = [1] * rank
    shape[axis] = -1
    return values.view(shape)


def _describe(kind: str) -> str:
    names = {"layer_norm": "LayerNorm", "rms_norm": "RMSNorm", "softmax": "a softmax",
             "attention_scale": "attention's 1/sqrt(d) scale", "mean": "a mean"}
    return names.get(kind, f"a {kind}")
