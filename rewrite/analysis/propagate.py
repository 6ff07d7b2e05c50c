"""Sizes and layouts through compositions: when one axis grows, which others must, and how.

``propagate`` follows ``factor`` compositions (a view into ``heads x head_dim``: the whole is the product of
its parts) and ``concat`` ones (fused q|k|v or gate|up projections: the whole is their sum) from a grown
group to every group it forces. Where a whole grows and its parts must absorb it (grouped-query
attention's ``heads = kv_heads x group``), the part that is not a pure broadcast axis takes it. ``layouts``
then gives every grown group a :class:`~rewrite.layout.Layout`: the policy's for *base* groups (not made of
other grown groups), derived by mixed radix or offsets for the rest; bases that are the same part of one
whole share one layout.
"""

from __future__ import annotations

import math

from rewrite.analysis.dims import DimGroup
from rewrite.errors import GrowthError
from rewrite.analysis.layout import Layout, concat, factor, identity

DERIVED = ("factor", "concat")


def propagate(start: DimGroup, size: int, site: str, rule: str) -> dict[DimGroup, int]:
    """New sizes of every group a resized group forces through factor and concat compositions
    (``rule`` and ``site`` name the pass in refusals)."""
    sizes = {start: size}
    changed = True
    while changed:
        changed = False
        for group in list(sizes):
            for comp in group.compositions:
                if comp.how not in DERIVED:
                    raise GrowthError(
                        f"{rule} at {site}: the axis is {comp.how}d at node {comp.node}, which this rule "
                        f"cannot resize"
                    )
                new = [sizes.get(p, p.size) for p in comp.parts]
                whole = math.prod(new) if comp.how == "factor" else sum(new)
                if any(p in sizes for p in comp.parts):
                    if comp.whole in sizes and sizes[comp.whole] != whole:
                        raise GrowthError(f"{rule} at {site}: inconsistent sizes at node {comp.node}")
                    if comp.whole not in sizes:
                        sizes[comp.whole] = whole
                        changed = True
                elif comp.whole in sizes:
                    changed |= _absorb(comp, sizes, f"{rule} at {site}")
    return sizes


def _absorb(comp, sizes: dict, where: str) -> bool:
    """A whole grew: the one part that is not a pure broadcast axis (the repeat_kv group) takes it."""
    candidates = [p for p in comp.parts if p.members or len(p.compositions) > 1]
    if comp.how != "factor" or len(candidates) != 1:
        raise GrowthError(f"{where}: cannot tell which axis of node {comp.node} takes the growth")
    part = candidates[0]
    others = math.prod(p.size for p in comp.parts if p is not part)
    if sizes[comp.whole] % others:
        raise GrowthError(
            f"{where}: grouped-query attention shares each key-value head among {others} query "
            f"heads; the number of heads added must be a multiple of {others}"
        )
    sizes[part] = sizes[comp.whole] // others
    return True


def bases(sizes: dict[DimGroup, int]) -> list[DimGroup]:
    """Grown groups whose layout comes from the policy: those not made of other grown groups."""
    return [
        g for g in sizes
        if not any(c.whole is g and c.how in DERIVED and any(p in sizes for p in c.parts) for c in g.compositions)
    ]


def layouts(sizes: dict[DimGroup, int], chosen, generator) -> dict[DimGroup, Layout]:
    """A layout for every grown group: ``chosen.layout`` (an init policy's) for bases, derived ones for the rest.

    Bases that are the same part of one whole (the key heads and the value heads that repeat_kv expands
    into the same query heads) share one layout, so every new query head reads keys and values of one
    source head.
    """
    result = {}
    representative = _siblings(bases(sizes), sizes)
    for group, first in representative.items():
        if first not in result:
            result[first] = chosen.layout(first.size, sizes[first], generator)
        result[group] = result[first]
    pending = [g for g in sizes if g not in result]
    while pending:
        for group in pending:
            for comp in group.compositions:
                if comp.whole is group and comp.how in DERIVED and all(p in result or p not in sizes for p in comp.parts):
                    parts = [result.get(p) or identity(p.size) for p in comp.parts]
                    result[group] = factor(parts) if comp.how == "factor" else concat(parts)
                    break
        still = [g for g in pending if g not in result]
        if len(still) == len(pending):
            raise GrowthError("circular compositions between grown axes")
        pending = still
    return result


def _siblings(groups: list[DimGroup], sizes: dict[DimGroup, int]) -> dict[DimGroup, DimGroup]:
    """Each base mapped to the first base it must share a layout with (same part of one grown whole)."""
    parent = {g: g for g in groups}

    def find(g):
        while parent[g] is not g:
            g = parent[g]
        return g

    first_at: dict[tuple, DimGroup] = {}
    for group in groups:
        for comp in group.compositions:
            if comp.how in DERIVED and group in comp.parts and comp.whole in sizes:
                key = (id(comp.whole), comp.parts.index(group))
                if key in first_at:
                    parent[find(group)] = find(first_at[key])
                else:
                    first_at[key] = group
    return {g: find(g) for g in groups}
