"""What a growth pass promises before it runs: where it matched, how it grows, and whether it is exact."""

from __future__ import annotations

import dataclasses
from collections import Counter

from rewrite.analysis.dims import DimGroup


@dataclasses.dataclass
class Plan:
    sites: list[str]  # where the pass matched (module names)
    groups: list[tuple[DimGroup, int]]  # each group with its new size (width passes)
    exact: bool
    reason: str | None = None  # why it is not exact
    matches: list = dataclasses.field(default_factory=list)  # pattern matches to rewrite (structural rules)
    refusals: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (site, reason) left alone

    @property
    def empty(self) -> bool:
        return not self.groups and not self.matches

    def describe(self) -> str:
        counts = Counter((g.size, n) for g, n in self.groups)
        growth = ", ".join(f"{old} -> {new}" + (f" (x{c})" if c > 1 else "") for (old, new), c in counts.items())
        verdict = "exact" if self.exact else f"approximate ({self.reason})"
        where = ", ".join(compact(list(dict.fromkeys(self.sites)))) or "nothing"
        return f"{where}: {growth}; {verdict}" if growth else f"{where}; {verdict}"


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
        tail = f".{suffix}" if suffix else ""
        if len(numbers) > 2 and numbers == list(range(numbers[0], numbers[-1] + 1)):
            out.append(f"{prefix}.{{{numbers[0]}-{numbers[-1]}}}{tail}")
        else:
            out.extend(f"{prefix}.{n}{tail}" for n in numbers)
    return out
