"""Init policies for width growth: how a grown axis's new slices are filled, role by role.

The protocol (``rewrite.transform.policy.Policy``) is in the engine; these are the library's policies. A group
of coupled axes grows from ``n`` to ``n'`` units. A policy first picks a replication map
``g: [n'] -> [n]`` (``g(j) = j`` for old units; axes made of others inherit it, see ``rewrite.layout``),
then fills each member by its role:

    role        zero (Gesmundo & Maile)    clone (uniform x k)          net2net (Net2WiderNet)        sparkling
    produces    rows via g, + noise        rows repeated: W[g(j)]       rows via g: W[g(j)]           rows via g, + noise
    along       copied via g               copied via g                 copied via g                  copied via g
    consumes    old columns, new = 0       W[:, g(j)] / k               W[:, g(j)] / count(g(j))      all columns * sqrt(n/n')

``g`` is ``j mod n`` for clone (each unit exactly k = n'/n times) and zero (any source is exact there; blocks
copy fastest), uniform random for net2net.
Each policy declares the reductions along the grown axis it keeps (``preserves``); exact when every op that
mixes values along the axis is one of them (known before anything runs, see ``Policy.exact``):
* zero: new units reach the output only through zero columns, so no op may mix values along the axis;
* clone: any element-wise op, and means/norms along the axis (LayerNorm, RMSNorm keep mean and variance
  under uniform replication); not sums, softmax or attention temperature;
* net2net: element-wise ops and maxima; not norms (non-uniform replication moves the mean);
* sparkling: never; it keeps activation RMS for mid-training growth and breaks symmetry.
"""

from __future__ import annotations

import math

import torch

from rewrite.transform.growth_ops import NOISE, Noise, Scale
from rewrite.transform.policy import Policy, pad, replicate

NORM_STATISTICS = frozenset({"layer_norm", "rms_norm", "mean", "var", "std"})  # kept by uniform replication
MAXIMA = frozenset({"amax", "amin", "max", "min", "any", "all"})  # kept by any replication


class Zero(Policy):
    """Zero fan-in of the consumers for new units; new producer rows are noisy copies (they can learn)."""

    name = "zero"

    def mapping(self, n, n_new, generator):
        # Any source is exact (consumers see zero columns) and the noise breaks symmetry, so new units copy
        # the old ones in order: whole blocks, copied by slices instead of gathered.
        return torch.arange(n, n_new) % n

    def produces(self, axis, layout, seed):
        return [replicate(axis, layout, "copy"), Noise(axis, layout.new_positions(), seed, NOISE)]

    def along(self, axis, layout, seed):
        return [replicate(axis, layout, "copy")]

    def consumes(self, axis, layout, seed):
        return [pad(axis, layout)]


class Clone(Policy):
    """Uniform replication: every unit k times (HyperCloning); n' must be a multiple of n."""

    name = "clone"
    preserves = NORM_STATISTICS | MAXIMA

    def mapping(self, n, n_new, generator):
        return torch.arange(n, n_new) % n

    def check(self, n, n_new):
        return super().check(n, n_new) or (
            None if n_new % n == 0 else f"clone needs an integer factor: {n_new} is not a multiple of {n}"
        )


class Net2Net(Policy):
    """Net2WiderNet: random replication map, consumer columns divided by each unit's replica count."""

    name = "net2net"
    preserves = MAXIMA


class Sparkling(Zero):
    """RMS-consistent growth (SPARKLING): keeps activation RMS, not the function; for mid-training growth."""

    name = "sparkling"

    def exact(self, reductions):
        return "sparkling keeps activation RMS, not the function (it is meant to break symmetry)"

    def consumes(self, axis, layout, seed):
        # noisy copies for the new columns, then every column scaled by sqrt(n/n')
        return [*self.produces(axis, layout, seed), Scale(math.sqrt(layout.old_size / layout.new_size))]


class AnySize(Policy):
    """A policy's exactness rule without its size rule: for axes whose sizes a rule derives (heads x head
    size); the policy's own size rule is checked on the axes it lays out."""

    def __init__(self, inner: Policy):
        self.inner = inner
        self.name = inner.name
        self.preserves = inner.preserves

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


__all__ = ["POLICIES", "AnySize", "Clone", "Net2Net", "Policy", "Sparkling", "Zero", "policy"]
