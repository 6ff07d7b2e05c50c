"""A grown graph's lineage after one more rewrite: the growth map composed, the node map and origins carried."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from rewrite.ir.graph import Lineage
from rewrite.transform.growth_map import GrowthMap


def grown_lineage(previous: Lineage, step: GrowthMap, *, node_map: Mapping[str, tuple[str, Callable]] | None = None,
                  origins: Mapping[str, str] | None = None) -> Lineage:
    """The lineage of a graph made from one with lineage ``previous`` by a rewrite whose map is ``step``
    (sources: the previous graph's tensors). The growth map becomes the composition, relating the new graph's
    tensors to the traced model's; ``node_map`` and ``origins`` replace the previous ones when given."""
    composed = step if previous.growth_map is None else previous.growth_map.then(step)
    return Lineage(
        node_map=previous.node_map if node_map is None else dict(node_map),
        origins=previous.origins if origins is None else dict(origins),
        growth_map=composed,
        step_map=step,
    )
