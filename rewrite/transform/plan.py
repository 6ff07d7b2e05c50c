"""What a growth pass promises before it runs: where it matched, how it grows, and whether it is exact."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch.fx

from rewrite.analysis.dims import DimGroup
from rewrite.analysis.layout import Layout


@dataclasses.dataclass
class Plan:
    """What every pass states before it runs: where it matched, whether it is exact (and why not), and the
    matches it refused with their reasons."""

    sites: list[str]  # where the pass matched (module names)
    exact: bool
    reason: str | None = None  # why it is not exact
    refusals: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (site, reason) left alone

    @property
    def empty(self) -> bool:
        return not self.sites

    def growth(self) -> str:
        return ""

    def describe(self) -> str:
        growth = self.growth()
        verdict = "exact" if self.exact else f"approximate ({self.reason})"
        where = ", ".join(compact(list(dict.fromkeys(self.sites)))) or "nothing"
        return f"{where}: {growth}; {verdict}" if growth else f"{where}; {verdict}"


@dataclasses.dataclass
class WidthPlan(Plan):
    """A width pass's plan and the payload its run consumes: each group with its new size, the policy, each
    group's layout, the per-group or per-tensor policy overrides and a ``finish`` edit of the grown module."""

    groups: list[tuple[DimGroup, int]] = dataclasses.field(default_factory=list)
    policy: Any = None  # the rewrite.Policy that makes the grown tensors
    layouts: dict[DimGroup, Layout] = dataclasses.field(default_factory=dict)
    overrides: dict[Any, Any] = dataclasses.field(default_factory=dict)  # group or tensor name -> Policy
    finish: Callable[[torch.fx.GraphModule], None] | None = None
    seed: int = 0

    @property
    def empty(self) -> bool:
        return not self.groups

    def growth(self) -> str:
        counts = Counter((g.size, n) for g, n in self.groups)
        return ", ".join(f"{old} -> {new}" + (f" (x{c})" if c > 1 else "") for (old, new), c in counts.items())


@dataclasses.dataclass
class RulePlan(Plan):
    """A structural rule's plan: the pattern matches it will rewrite."""

    matches: list = dataclasses.field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.matches


def compact(sites: list[str]) -> list[str]:
    """``model.layers.0.mlp, model.layers.1.mlp, model.layers.2.mlp`` -> ``model.layers.{0-2}.mlp``: runs of
    three or more consecutive numbers in the last numbered component are written as a range."""
    out: list[str] = []
    runs: dict[tuple[str, str], list[int]] = {}
    order: list[tuple[str, str] | str] = []
    for site in sites:
        parts = site.split(".")
        index = next((i for i in range(len(parts) - 1, -1, -1) if parts[i].isdigit()), None)
        if index is None:
            order.append(site)
            continue
        key = (".".join(parts[:index]), ".".join(parts[index + 1:]))
        if key not in runs:
            runs[key] = []
            order.append(key)
        runs[key].append(int(parts[index]))
    for key in order:
        if isinstance(key, str):
            out.append(key)
            continue
        numbers = runs[key]
        prefix, suffix = key
        head, tail = (f"{prefix}." if prefix else ""), (f".{suffix}" if suffix else "")
        if len(numbers) > 2 and numbers == list(range(numbers[0], numbers[-1] + 1)):
            out.append(f"{head}{{{numbers[0]}-{numbers[-1]}}}{tail}")
        else:
            out.extend(f"{head}{n}{tail}" for n in numbers)
    return out
