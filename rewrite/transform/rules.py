"""Rules: pattern + condition + rewrite, and rule sets. ``rewrite.apply`` is their pass manager.

A rule is declarative: *where* (a pattern from ``rewrite.pattern``), *whether* (a condition that returns
the reason it refuses a match, or None), *is it exact* (``exactness``: the reason a match would change the
function, or None) and *what* (a rewrite ``(match, edit)`` that edits a copy of the graph through
``rewrite.edit.Editor``)::

    @rewrite.rule(op("linear", "proj", module="*.attn.o"), exact=True)
    def adapter(match, edit): ...

    rules = adapter + other_rule                 # a RuleSet: applied in order
    grown = rewrite.apply(model, [rules], args)  # plans, runs, verifies and reports every rule

How a rule runs (``plan`` then ``run``): every match is found on the graph as it is; a match the condition
refuses is recorded with its reason and left alone; a match that is not exact is refused when the rule
demands exactness (``exact=True``), and ``NotExactError`` is raised when that leaves nothing to apply. The
remaining matches are rewritten on one copy of the graph, last match first (so inserting after a later
site never moves an earlier one). ``repeat=True`` matches and rewrites again until nothing matches (a
fixpoint), at most ``max_rounds`` times.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch.fx

from rewrite.transform.edit import Editor
from rewrite.errors import GrowthError, NotExactError
from rewrite.ir.graph import Graph
from rewrite.transform.pattern import Match, Pattern
from rewrite.transform.plan import RulePlan

Condition = Callable[[Match], "str | None"]
Rewrite = Callable[[Match, Editor], None]


@dataclasses.dataclass
class Rule:
    pattern: Pattern
    rewrite: Rewrite
    condition: Condition | None = None  # the reason a match is refused, or None
    exactness: Condition | None = None  # the reason a match is not exact, or None
    name: str = ""
    exact: bool = True  # refuse matches that are not exact
    approximate: str | None = None  # the reason the rule is never exact (e.g. residual splitting)
    repeat: bool = False
    max_rounds: int = 100
    select: Callable[[list[Match]], list[Match]] | None = None  # e.g. keep the first match per block

    def __post_init__(self):
        self.name = self.name or getattr(self.rewrite, "__name__", "rule")

    def __add__(self, other: "Rule | RuleSet") -> "RuleSet":
        return RuleSet([self]) + other

    # -- what a pass offers rewrite.apply ------------------------------------------------------------
    def plan(self, graph: Graph) -> RulePlan:
        matches = self.pattern.find(graph)
        if self.select is not None:
            matches = self.select(matches)
        accepted, refusals, inexact = [], [], []
        for match in matches:
            reason = self.condition(match) if self.condition else None
            if reason:
                refusals.append((match.site, reason))
                continue
            not_exact = self.approximate or (self.exactness(match) if self.exactness else None)
            if not_exact and self.exact and not self.approximate:
                refusals.append((match.site, f"not exact: {not_exact}"))
                inexact.append((match.site, not_exact))
                continue
            accepted.append((match, not_exact))
        if inexact and not accepted:
            site, reason = inexact[0]
            raise NotExactError(f"{self.name} at {site} would not be exact: {reason}; pass exact=False to "
                                f"apply it anyway (the report then carries the measured error)")
        if not matches:
            refusals = self.pattern.explain(graph)
        reasons = [r for _, r in accepted if r]
        return RulePlan(
            sites=[m.site for m, _ in accepted],
            exact=not reasons,
            reason=reasons[0] if reasons else None,
            matches=[m for m, _ in accepted],
            refusals=refusals,
        )

    def run(self, graph: Graph, plan: RulePlan) -> Graph:
        current = self._rewrite(graph, plan.matches)
        for _ in range(self.max_rounds if self.repeat else 0):
            more = self.plan(current)
            if not more.matches:
                return current
            current = self._rewrite(current, more.matches)
        if self.repeat:
            raise GrowthError(f"{self.name} still matches after {self.max_rounds} rounds (no fixpoint)")
        return current

    def _rewrite(self, graph: Graph, matches: list[Match]) -> Graph:
        edit = Editor(graph)
        order = {node.name: i for i, node in enumerate(graph.module.graph.nodes)}
        for match in sorted(matches, key=lambda m: -_position(m, order)):
            self.rewrite(match.rebind(edit.graph), edit)
        return edit.finish()


def _position(match: Match, order: dict[str, int]) -> int:
    """Where the match ends in the graph: its last captured node."""
    position = -1
    for value in match.captures.values():
        for item in value if isinstance(value, list) else [value]:
            node = getattr(item, "stream_out", item)
            if isinstance(node, torch.fx.Node):
                position = max(position, order[node.name])
    return position


@dataclasses.dataclass
class RuleSet:
    """Rules applied in order, each to the result of the one before (``rule_a + rule_b``)."""

    rules: list[Rule]

    def __add__(self, other: "Rule | RuleSet") -> "RuleSet":
        more = other.rules if isinstance(other, RuleSet) else [other]
        return RuleSet([*self.rules, *more])

    def __iter__(self):
        return iter(self.rules)


def rule(pattern: Pattern, *, condition: Condition | None = None, exactness: Condition | None = None,
         name: str | None = None, exact: bool = True, repeat: bool = False) -> Callable[[Rewrite], Rule]:
    """Decorator: turn ``rewrite(match, edit)`` into a :class:`Rule` matching ``pattern``."""

    def make(rewrite: Rewrite) -> Rule:
        return Rule(pattern, rewrite, condition, exactness, name or rewrite.__name__, exact, None, repeat)

    return make
