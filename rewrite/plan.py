"""What a growth pass promises before it runs: where it matched, how it grows, and whether it is exact."""

from __future__ import annotations

import dataclasses
from collections import Counter

from .dims import DimGroup


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
        where = ", ".join(dict.fromkeys(self.sites)) or "nothing"
        return f"{where}: {growth}; {verdict}" if growth else f"{where}; {verdict}"
