"""``widen_mlp``: grow the MLP intermediate size ``p -> p'`` of transformer blocks (Gesmundo & Maile, 1).

Algebra: the MLP is ``y = W_out act(W_in x + b_in) + b_out`` (SwiGLU: ``act(W_gate x) * (W_up x)``).
Its intermediate axis is one dimension group: rows of ``W_in`` (``W_gate``, ``W_up``) and ``b_in``
produce it, columns of ``W_out`` consume it, and only element-wise ops run along it. With ``init="zero"``
the ``p' - p`` new columns of ``W_out`` are zero, so the new units never reach ``y`` and the block
computes the same function for any activation; ``"clone"`` and ``"net2net"`` replicate units and divide
``W_out``'s columns (also exact); ``"sparkling"`` rescales for mid-training growth (approximate).

The MLP is found from the analysis, not from module names: a group with producers and consumers inside
one numbered block (``...layers.3...``), no op that mixes values along it (no norm, softmax or sum), not
split into heads. That finds ``fc -> GELU -> proj``, SwiGLU's gate/up -> down, GPT-2's ``Conv1D`` pair and
BERT's intermediate/output alike. A fused gate|up projection that ``chunk`` splits (Mixtral's experts) is a
``concat`` of the intermediate axis with itself: it grows by the same number of units per part, new units
appended to each part. Batched experts (``bmm`` of weights selected by expert index) are found the same
way, one group per block covering every expert. ``layers`` restricts it to some blocks.
"""

from __future__ import annotations

import dataclasses

from rewrite.analysis.dims import dim_groups
from rewrite.ir.graph import Graph
from rewrite.names import in_layers, numbered_block
from rewrite.ops import attention

from .net2wider import Widen
from .policies import Policy, policy

@dataclasses.dataclass
class WidenMLP(Widen):
    layers: list[int] | None = None
    propagates = ("concat",)

    @property
    def name(self) -> str:
        where = "" if self.layers is None else f" layers={self.layers}"
        growth = f"size={self.size}" if self.size is not None else f"factor={self.factor}"
        return f"widen_mlp({growth}{where})"

    def where(self, site: str) -> str:
        return f"widen_mlp at {site}"

    def select(self, graph: Graph):
        return [(block, group) for block, group, reason, _ in self._candidates(graph) if reason is None]

    def explain(self, graph: Graph) -> list[tuple[str, str]]:
        """Why no MLP matched: per block, the candidate axis that came closest, and the check it failed."""
        closest = {}
        for block, group, reason, stage in self._candidates(graph):
            if block is not None and stage > closest.get(block, (-1, ""))[0]:
                closest[block] = (stage, f"axis of {group.members[0]} (size {group.size}): {reason}")
        if not closest:
            return [("model", "no dimension group lives inside one numbered block: MLPs are found in the blocks "
                              "of a layer stack (`layers.0`, `layers.1`, ...), and this model has none")]
        return [(block, reason) for block, (_, reason) in closest.items()]

    def _candidates(self, graph: Graph):
        """(block, group, None, stage) for each MLP hidden axis; (block, group, why not, stage) for the other
        groups, ``stage`` counting the checks they passed."""
        head_axes = _attention_head_axes(graph)
        for group in dim_groups(graph):
            block = _block_of(group)
            against = [c for c in group.compositions if c.how != "concat" or c.whole is group]
            in_attention = next((head_axes[a] for a in group.activations if a in head_axes), None)
            if block is None:
                yield None, group, "not inside one numbered block", 0
            elif group.reductions:
                kind, node = group.reductions[0]
                yield block, group, f"mixed by {kind} at {node} (an MLP's hidden units are element-wise)", 1
            elif against:  # split into heads, or itself a fused whole (found through its parts instead)
                c = against[0]
                yield block, group, f"{c.how} {c.side(group)} at {c.node} (heads, or a fused projection)", 2
            elif in_attention is not None:  # with one head, nothing else tells a value head from an MLP axis
                yield block, group, f"the value head size of the attention at {in_attention}", 2
            elif not ((group.role("produces") or any(c.whole.role("produces") for c in group.compositions))
                      and group.role("consumes")):
                yield block, group, "no layer both produces and consumes it", 3
            elif not in_layers(block, self.layers):
                yield block, group, f"the MLP of a block not in layers={self.layers}", 4
            else:
                yield block, group, None, 5


def _attention_head_axes(graph: Graph) -> dict:
    """The head-size axis of every attention's query and value, as ``(ref, axis)`` -> attention node."""
    axes = {}
    for node in graph.compute_nodes():
        found = attention(graph, node)
        if found is not None:
            for operand in (found.query, found.value):  # (the keys may be stored transposed)
                axes[(f"n:{operand.name}", len(graph.shape(operand)) - 1)] = node.name
    return axes


def _block_of(group) -> str | None:
    """The numbered block every parameter member of the group lives in, or None."""
    blocks = {numbered_block(member.tensor.rpartition(".")[0]) for member in group.members}
    return blocks.pop() if len(blocks) == 1 and None not in blocks else None


def widen_mlp(
    size: int | None = None,
    factor: float | None = None,
    init: "str | Policy" = "zero",
    *,
    layers: list[int] | None = None,
    exact: bool = True,
    seed: int = 0,
) -> WidenMLP:
    """Grow every block's MLP intermediate size to ``size`` or by ``factor`` (``layers``: only these blocks)."""
    policy(init)
    return WidenMLP("", size, factor, init, exact, seed, layers)
