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
        found = []
        for group in dim_groups(graph):
            block = _block_of(group)
            if block is None or group.reductions:
                continue
            if any(c.how != "concat" or c.whole is group for c in group.compositions):
                continue  # split into heads, or itself a fused whole (found through its parts instead)
            fused = [c.whole for c in group.compositions]  # gate|up projections that chunk splits
            if not (group.role("produces") or any(w.role("produces") for w in fused)) or not group.role("consumes"):
                continue
            if not in_layers(block, self.layers):
                continue
            found.append((block, group))
        return found


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
