"""``add_heads``: more attention heads with the head size unchanged (Gesmundo & Maile, transformation 2).

Algebra: attention is ``y = W_O [head_1; ...; head_E]`` with ``head_e = softmax(q_e k_e^T / sqrt(k)) v_e``
and ``q_e = W_Q^e x`` etc. A new head ``E+1`` gets rows of ``W_Q, W_K, W_V`` (anything: the policy's noisy
or replicated copies of an existing head) and its slice of ``W_O``'s columns; with ``init="zero"`` that
slice is **zero**, so ``y`` is unchanged. ``"clone"`` (every head k times) and ``"net2net"`` replicate whole
heads and divide ``W_O``'s columns by the replica count, also exact. The softmax runs over keys, not heads,
and ``1/sqrt(k)`` does not change, so no op mixes values across the heads axis.

Nothing here names modules. The heads axis is found from the attention (the query's heads axis of
``scaled_dot_product_attention``, or of ``softmax(q @ k^T) @ v`` written out: ``rewrite.ops.attention``), and
sizes propagate through the analysis' compositions: views into ``heads x head_dim`` grow the q/k/v
projections and ``W_O`` by whole heads; GPT-2's fused ``c_attn`` grows each of its q|k|v parts; with
grouped-query attention the query heads are ``kv_heads x group`` (the ``repeat_kv`` expand), the group size
is kept and whole KV heads are added, so ``n`` must be a multiple of the query/KV ratio. Literal sizes (view
shapes, split sizes) follow.
"""

from __future__ import annotations

import dataclasses

import torch

from rewrite.analysis.dims import DimGroup, dim_analysis
from rewrite.errors import GrowthError
from rewrite.ir.graph import Graph
from rewrite.names import in_layers
from rewrite.ops import attention
from rewrite.analysis.propagate import DERIVED, bases, propagate

from .policies import AnySize, Policy, policy
from .width import Growth, WidthPass


@dataclasses.dataclass(kw_only=True)
class HeadGrowth(WidthPass):
    """What the attention passes share: every attention (or those in ``layers``), head-derived sizes."""

    init: "str | Policy" = "zero"
    layers: list[int] | None = None
    exact: bool = True
    seed: int = 0
    handled = DERIVED
    kind = ""

    def where(self, site: str) -> str:
        return f"{self.kind} at {site}"

    def check(self, graph, site, group, size, chosen):
        return super().check(graph, site, group, size, AnySize(chosen))  # sizes derived from whole heads


@dataclasses.dataclass
class AddHeads(HeadGrowth):
    n: int
    kind = "add_heads"

    @property
    def name(self) -> str:
        return f"add_heads({self.n}{'' if self.layers is None else f', layers={self.layers}'})"

    def growths(self, graph: Graph, chosen: Policy) -> list[Growth]:
        growths = []
        for site, heads in self.select(graph):
            grown = propagate(heads, heads.size + self.n, site, "add_heads")
            if not any(group.members for group in grown):
                raise GrowthError(_no_projection(site, heads))
            for base in bases(grown):  # the policy's size rule holds on the axes it lays out
                refusal = chosen.check(base.size, grown[base])
                if refusal:
                    what = "query heads" if base is heads else "key-value heads of the grouped-query attention"
                    raise GrowthError(f"add_heads at {site}: {refusal} ({what}: {base.size} -> {grown[base]})")
            growths.append(Growth(site, grown))
        return growths

    def select(self, graph: Graph) -> list[tuple[str, DimGroup]]:
        """(attention module, query heads group) for every attention."""
        found = {}
        for attention in attentions(graph, self.layers):
            found.setdefault(id(attention.heads), (attention.site, attention.heads))
        return list(found.values())


def _no_projection(site: str, heads: DimGroup) -> str:
    why = (" With one head, a view that writes the head count as a literal 1 cannot be told from one that adds a "
           "broadcast axis; write it as -1 (view(b, t, -1, head_dim)) and the analysis sees the head."
           if heads.size == 1 else "")
    return (f"add_heads at {site}: no projection is split into the query's heads axis (size {heads.size}), so "
            f"nothing would grow.{why}")


@dataclasses.dataclass
class Attention:
    """One attention (``rewrite.ops.attention``: sdpa or written out) and the axis groups of its inputs."""

    site: str  # the attention module
    node: torch.fx.Node
    query: torch.fx.Node
    keys: torch.fx.Node
    heads: DimGroup  # the query's heads axis
    qk: DimGroup  # the query/key head dim
    v: DimGroup  # the value head dim
    implicit_scale: bool  # no scale= given: the temperature is 1/sqrt(head dim)


def attentions(graph: Graph, layers: list[int] | None = None) -> list[Attention]:
    """Every attention of the graph in the numbered blocks ``layers`` (all when None)."""
    analysis = dim_analysis(graph)
    found = []
    for node in graph.compute_nodes():
        op = attention(graph, node)
        if op is None:
            continue
        rank = len(graph.shape(op.query))
        heads = analysis.group_of(f"n:{op.query.name}", rank - 3)
        site = attention_site(heads) or graph.owner(node) or node.name
        if not in_layers(site, layers):
            continue
        qk = analysis.group_of(f"n:{op.query.name}", rank - 1)
        v = analysis.group_of(f"n:{op.value.name}", rank - 1)
        found.append(Attention(site, node, op.query, op.keys, heads, qk, v, op.implicit_scale))
    return found


def attention_site(heads: DimGroup) -> str | None:
    """The attention module: common owner of the projections the heads axis is made into."""
    owners = set()
    for comp in heads.compositions:
        for group in (comp.whole, *comp.parts):
            for member in group.role("produces") + group.role("consumes"):
                owners.add(member.tensor.rpartition(".")[0].rpartition(".")[0])
    return min(owners, key=len) if owners else None


def add_heads(
    n: int, init: "str | Policy" = "zero", *, layers: list[int] | None = None, exact: bool = True, seed: int = 0
) -> AddHeads:
    """Add ``n`` attention heads (head size unchanged) to every attention, or to those in ``layers``."""
    if not isinstance(n, int) or n < 1:
        raise GrowthError(f"add_heads needs a positive number of heads; got {n!r}")
    policy(init)
    return AddHeads(n=n, init=init, layers=layers, exact=exact, seed=seed)
