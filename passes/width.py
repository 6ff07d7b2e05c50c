"""The one way to write a width pass: say which groups grow to which sizes; the base checks and plans.

A width pass grows dimension groups (``rewrite.dim_groups``). Its ``growths`` say, site by site, which groups
grow to which sizes (propagated through the compositions the pass handles: heads, fused projections); the
base ``plan`` checks every grown group once (``rewrite.transform.resize.check_resize``: a refusal raises
``GrowthError`` naming the site; a reason it is not exact is collected, and raises ``NotExactError`` when the
pass demands exactness), lays out the grown axes with the policy, asks the pass for its ``payload`` (policy
overrides such as scaled norm gains, a ``finish`` edit such as an epsilon) and returns a ``WidthPlan``.
``run`` consumes that plan and recomputes nothing: it resizes by the plan's layouts, policy and payload.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from rewrite.analysis.dims import DimGroup
from rewrite.analysis.layout import Layout
from rewrite.analysis.propagate import layouts
from rewrite.errors import GrowthError, NotExactError
from rewrite.ir.graph import Graph
from rewrite.transform.plan import WidthPlan
from rewrite.transform.policy import Policy
from rewrite.transform.resize import check_resize, refuse_blocked, resize

from .policies import policy


@dataclasses.dataclass
class Growth:
    """One site's growth: each group with its new size; ``unchecked``: groups the pass checks itself;
    ``reasons``: why it is not exact, as the pass found; ``context``: what its payload needs from the site."""

    site: str
    sizes: dict[DimGroup, int]
    unchecked: tuple[DimGroup, ...] = ()
    reasons: list[str] = dataclasses.field(default_factory=list)
    context: Any = None


class WidthPass:
    """Base of the width passes (a mixin for dataclasses with ``init``, ``exact`` and ``seed`` fields)."""

    handled: tuple[str, ...] = ()  # compositions this pass resizes consistently itself (factor, concat)
    init: "str | Policy"
    exact: bool
    seed: int

    @property
    def name(self) -> str:
        raise NotImplementedError

    def where(self, site: str) -> str:
        """How refusals name this pass at one site."""
        return f"{self.name} at {site}"

    # -- what a pass says --------------------------------------------------------------------------------------
    def growths(self, graph: Graph, chosen: Policy) -> list[Growth]:
        raise NotImplementedError

    def check(self, graph: Graph, site: str, group: DimGroup, size: int, chosen: Policy) -> str | None:
        """Raises ``GrowthError`` when ``group`` cannot grow to ``size``; returns why it would not be exact."""
        result = check_resize(graph, group, size, chosen, self.handled)
        if result.refusal:
            raise GrowthError(f"{self.where(site)}: {result.refusal}")
        return result.not_exact

    def not_exact(self, graph: Graph, chosen: Policy, site: str, group: DimGroup | None, size: int,
                  reason: str) -> NotExactError:
        return NotExactError(f"{self.name} with init={chosen.name!r} is not exact: {reason}")

    def payload(self, graph: Graph, growths: list[Growth], sizes: dict[DimGroup, int],
                grown: dict[DimGroup, Layout], chosen: Policy) -> tuple[dict, Any]:
        """(policy overrides by group or tensor name, ``finish(module)`` or None) for ``resize``."""
        return {}, None

    # -- the shared skeleton -----------------------------------------------------------------------------------
    def plan(self, graph: Graph) -> WidthPlan:
        chosen = policy(self.init)
        growths = self.growths(graph, chosen)
        sizes: dict[DimGroup, int] = {}
        reasons: list[tuple[str, DimGroup | None, int, str]] = []
        for growth in growths:
            reasons += [(growth.site, None, 0, reason) for reason in growth.reasons]
            for group, size in growth.sizes.items():
                if group in sizes:
                    continue
                sizes[group] = size
                if any(group is u for u in growth.unchecked):
                    continue
                reason = self.check(graph, growth.site, group, size, chosen)
                if reason:
                    reasons.append((growth.site, group, size, reason))
        if reasons and self.exact:
            raise self.not_exact(graph, chosen, *reasons[0])
        grown = layouts(sizes, chosen, torch.Generator().manual_seed(self.seed))
        refuse_blocked(grown)  # the groups it grows, and those their compositions grow with them
        overrides, finish = self.payload(graph, growths, sizes, grown, chosen)
        reason = reasons[0][3] if reasons else None
        return WidthPlan([g.site for g in growths], not reasons, reason, groups=list(sizes.items()), policy=chosen,
                         layouts=grown, overrides=overrides, finish=finish, seed=self.seed,
                         refusals=[] if sizes else self.explain(graph))

    def explain(self, graph: Graph) -> list[tuple[str, str]]:
        """(site, reason) for the candidates the pass considered and left, when it matched nothing."""
        return []

    def run(self, graph: Graph, plan: WidthPlan) -> Graph:
        return resize(graph, plan.layouts, plan.policy, plan.seed, plan.overrides, plan.finish)
