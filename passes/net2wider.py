"""``widen``: Net2WiderNet for any traced model. Grow the output axis of one module and all it couples to.

Algebra (``y = W x + b``, ``W`` of shape ``[out, in]``): growing the units of ``at`` from ``n`` to ``n'`` grows
one dimension group: the rows of every weight that produces the axis (``at`` and anything tied to it by
residual adds or element-wise ops), every bias, norm gain and BatchNorm statistic running along it, and the
columns of every weight that consumes it. With a replication map ``g`` and ``c(i) = |g^-1(i)|``:

    W_prod'[j] = W_prod[g(j)]        b'[j] = b[g(j)]        W_cons'[:, j] = W_cons[:, g(j)] / c(g(j))

so every consumer sees ``sum_j W_cons'[:, j] h[g(j)] = sum_i W_cons[:, i] h[i]``: the function is unchanged
for any element-wise activation. The init policy (``passes.policies``) picks ``g`` and the fill; whether the
result is exact follows from the policy and the ops that mix values along the axis, and is known before
anything runs. Axes split into heads, concatenated, tied, or reaching the model's output are refused with
the reason: they need the head-aware and residual-stream rules.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math

from rewrite.analysis.dims import dim_groups
from rewrite.errors import GrowthError, NotExactError
from rewrite.ir.graph import Graph
from rewrite.analysis.propagate import propagate
from rewrite.transform.resize import check_resize

from .policies import POLICIES, Policy, policy
from .width import Growth, WidthPass


def new_size(old: int, size: int | None, factor: float | None) -> int:
    """The grown size from exactly one of ``size`` (absolute) and ``factor`` (relative)."""
    if (size is None) == (factor is None):
        raise GrowthError("give exactly one of size= and factor=")
    target = size if size is not None else int(round(old * factor))
    if not isinstance(target, int) or target <= old:
        raise GrowthError(f"the new size must be larger than {old}; got {target}")
    return target


@dataclasses.dataclass
class Widen(WidthPass):
    at: str | list[str]
    size: int | None = None
    factor: float | None = None
    init: "str | Policy" = "net2net"
    exact: bool = True
    seed: int = 0
    propagates = ()  # compositions this pass grows through (widen_mlp: fused gate|up projections)

    @property
    def handled(self) -> tuple[str, ...]:
        return self.propagates

    @property
    def name(self) -> str:
        return f"widen({self.at if isinstance(self.at, str) else ', '.join(self.at)})"

    def where(self, site: str) -> str:
        return f"widen({site})"

    def select(self, graph: Graph) -> list[tuple[str, object]]:
        """(site name, group) pairs this pass grows."""
        return _groups_produced_by(graph, self.at)

    def growths(self, graph: Graph, chosen: Policy) -> list[Growth]:
        growths, seen = [], []
        for site, group in self.select(graph):
            if any(group is other for other in seen):
                growths.append(Growth(site, {}))
                continue
            seen.append(group)
            target = new_size(group.size, self.size, self.factor)
            through = bool(group.compositions) and all(c.how in self.propagates for c in group.compositions)
            growths.append(Growth(site, propagate(group, target, site, self.name) if through else {group: target}))
        return growths

    def not_exact(self, graph, chosen, site, group, size, reason):
        return NotExactError(f"{self.where(site)} with init={chosen.name!r} is not exact: {reason}. "
                             f"{_suggestion(graph, group, size, chosen.name)}")


def widen(
    at: str | list[str],
    size: int | None = None,
    factor: float | None = None,
    init: "str | Policy" = "net2net",
    *,
    exact: bool = True,
    seed: int = 0,
) -> Widen:
    """Grow the output units of the module named ``at`` to ``size`` or by ``factor``.

    ``at`` is a qualified module name, a glob over them (``"blocks.*.fc"``) or a list of either; every
    match grows in one rewrite.
    """
    policy(init)  # unknown policy names fail here, before any model is touched
    return Widen(at, size, factor, init, exact, seed)


def _groups_produced_by(graph: Graph, at: str | list[str]):
    """(module name, group) for every module matching ``at`` that produces an axis."""
    patterns = [at] if isinstance(at, str) else list(at)
    producers = {}
    for group in dim_groups(graph):
        for member in group.role("produces"):
            producers.setdefault(member.tensor.rpartition(".")[0], group)
    found = []
    for pattern in patterns:
        matches = [name for name in producers if fnmatch.fnmatchcase(name, pattern)]
        if not matches:
            close = [o for o in producers if pattern.rpartition(".")[2] in o][:5] or list(producers)[:5]
            raise GrowthError(
                f"no module matching {pattern!r} produces an axis; modules that do include: {', '.join(close)}"
            )
        found += [(name, producers[name]) for name in matches]
    return found


def _suggestion(graph: Graph, group, target: int, tried: str) -> str:
    for name in ("zero", "clone", "net2net"):
        if name == tried:
            continue
        candidate = POLICIES[name]
        size = target if not candidate.check(group.size, target) else group.size * math.ceil(target / group.size)
        check = check_resize(graph, group, size, candidate)
        if not check.refusal and not check.not_exact:
            hint = "" if size == target else f" with size={size} (a multiple of {group.size})"
            return f"init={name!r}{hint} would be exact"
    return "No init policy is exact here; pass exact=False to grow it approximately."
