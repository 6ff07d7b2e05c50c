"""``widen_heads``: grow the key/query size ``k -> k'`` and the value size ``v -> v'`` of every head
(Gesmundo & Maile, transformations 3 and 4).

Value size. ``head_e = softmax(.) v_e`` with ``v_e = W_V^e x``; the output is ``W_O [head_1; ...]``. New value
dims get rows of ``W_V`` (the policy's copies) and ``W_O``'s matching columns; with ``init="zero"`` those are
**zero**, so the output is unchanged (``clone``/``net2net`` replicate dims and divide ``W_O``: also exact).

Key/query size. Scores are ``q_e . k_e / sqrt(k)``. New query dims are anything (noisy copies), new key dims
are **zero**, so ``q'.k' = q.k``. If the attention uses its default temperature ``1/sqrt(d)`` (no ``scale=``),
it becomes ``1/sqrt(k')``, and the old key rows (and biases) are scaled by ``sqrt(k'/k)`` to cancel it; if the
graph passes an explicit ``scale=`` (Hugging Face does), the temperature is unchanged and keys are not
scaled. Only ``init="zero"`` is exact here (replicating dims would count them twice in the dot product).
A fused q|k|v projection (GPT-2's ``c_attn``) is filled part by part: its key rows as keys, its query rows
by the policy, its value rows unchanged. With one head there is no heads x head_dim view: the head dim is the
projections' own output axis, and the key projection's rows and bias (or the key part of a fused one) are
keys all the same. Refused with the reason: rotary position embeddings on the head
dim (their frequencies depend on ``head_dim``, so a native module could not stay exact), and a projection
feeding queries and keys that is not split into separate parts.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch
import torch.fx

from rewrite.analysis.dims import DimGroup
from rewrite.errors import GrowthError
from rewrite.ir.graph import Graph
from rewrite.ops import WEIGHTED, canonical_kind
from rewrite.analysis.layout import Layout, identity
from rewrite.transform.growth_ops import Scale, seed_for
from rewrite.transform.policy import fused, pad

from rewrite.analysis.propagate import DERIVED, propagate

from .heads import Attention, HeadGrowth, attentions
from .policies import Policy, Zero, policy
from .width import Growth


class KeyScaled(Zero):
    """Key rows and biases: old ones scaled by ``scale`` (the temperature correction), new ones zero."""

    def __init__(self, scale: float):
        self.scale = scale

    def produces(self, axis, layout: Layout, seed):
        return [pad(axis, layout), Scale(self.scale, 0.0, axis, layout.old_positions)]

    along = produces


class Segmented(Policy):
    """A fused projection (q|k|v rows end to end): each part's rows made by that part's own policy."""

    def __init__(self, name: str, segments: list[tuple[int, int, int, Layout, Policy]]):
        self.name = name
        self.segments = segments  # (old offset, new offset, old size, part layout, part policy)

    def _each(self, role, axis, layout, seed):
        return fused(axis, [(old_at, new_at, part, getattr(chosen, role)(axis, part, seed_for(seed, old_at)))
                            for old_at, new_at, _, part, chosen in self.segments])

    def produces(self, axis, layout, seed):
        return self._each("produces", axis, layout, seed)

    def along(self, axis, layout, seed):
        return self._each("along", axis, layout, seed)


@dataclasses.dataclass
class WidenHeads(HeadGrowth):
    qk: int | None = None
    v: int | None = None
    kind = "widen_heads"

    @property
    def name(self) -> str:
        sizes = ", ".join(f"{k}={v}" for k, v in (("qk", self.qk), ("v", self.v)) if v is not None)
        return f"widen_heads({sizes})"

    def attentions(self, graph: Graph) -> list[Attention]:
        """One attention per (key/query, value) pair of head dims: RoPE tables couple the key/query dims of
        every layer, so the value dim tells the layers apart."""
        found = {}
        for attention in attentions(graph, self.layers):
            found.setdefault((id(attention.qk), id(attention.v)), attention)
        return list(found.values())

    def growths(self, graph: Graph, chosen: Policy) -> list[Growth]:
        growths = []
        for attention in self.attentions(graph):
            grown, own, reasons = {}, {}, []
            if self.qk is not None:
                _refuse_qk(graph, attention)
                own = propagate(attention.qk, self.qk, attention.site, "widen_heads")
                _fused_parts(attention, own)  # refuses a fused projection it cannot split before anything runs
                grown.update(own)
                if chosen.name != "zero":
                    reasons.append(
                        f"the attention scores q.k over a {chosen.name}-grown key/query size count replicated "
                        f"dims twice; init='zero' (new keys zero) is exact"
                    )
            if self.v is not None:
                grown.update(propagate(attention.v, self.v, attention.site, "widen_heads"))
            # the key/query dim's only reduction is the attention temperature, which the payload corrects
            growths.append(Growth(attention.site, grown, (attention.qk,), reasons, (attention, own)))
        return growths

    def payload(self, graph, growths, sizes, grown, chosen):
        """Keys: old rows scaled by ``sqrt(k'/k)`` when the temperature is implicit, new rows zero; a fused
        q|k|v projection made part by part."""
        overrides = {}
        for growth in growths:
            attention, own = growth.context
            if not own:
                continue
            scale = math.sqrt(self.qk / attention.qk.size) if attention.implicit_scale else 1.0
            sides = _sides(attention, own)
            for group, side in sides.items():
                if side == "key" and group.members:
                    overrides[group] = KeyScaled(scale)
            key_side = _ancestors(attention.keys) - _ancestors(attention.query)
            for member in attention.qk.members:  # one head: the head dim is the projections' own axis
                if {node for _, node in member.roles} & key_side:
                    overrides[member.tensor] = KeyScaled(scale)
            for whole, parts in _fused_parts(attention, own).items():
                segments, old_at, new_at = [], 0, 0
                split = next(c.node for c in whole.compositions if c.how == "concat" and c.whole is whole)
                for index, part in enumerate(parts):
                    layout = grown.get(part) or identity(part.size)
                    side = sides.get(part) if part is not attention.qk else \
                        "key" if _part_node(graph, split, index) in key_side else "query"
                    part_policy = KeyScaled(scale) if side == "key" else chosen
                    segments.append((old_at, new_at, part.size, layout, part_policy))
                    old_at, new_at = old_at + part.size, new_at + layout.new_size
                overrides[whole] = Segmented(chosen.name, segments)
        return overrides, None


def _refuse_qk(graph: Graph, attention: Attention) -> None:
    """Refuse a key/query head dim that rotary tables act on (a table read along it, or an axis it is
    composed with). With one head the head dim is the projections' own output axis: their weights and
    biases are members then, not tables."""
    group = attention.qk
    others = [c for c in group.compositions if c.how not in DERIVED or group is c.whole]
    tables = [m for m in group.members if not all(_projection_role(graph, role, node) for role, node in m.roles)]
    if tables or others:
        where = others[0].node if others else tables[0].tensor
        raise GrowthError(
            f"widen_heads(qk) at {attention.site}: rotary position embeddings act on the key/query head dim "
            f"({where}); their frequencies depend on head_dim, so growing it cannot stay exact"
        )


def _projection_role(graph: Graph, role: str, node: str) -> bool:
    """Is this how a projection's weight or bias is read (not a table multiplied in)?"""
    return role in ("produces", "consumes") or role == "along" and canonical_kind(graph, graph.node(node)) in WEIGHTED


def _part_node(graph: Graph, split: str, index: int) -> str | None:
    """The node that takes part ``index`` of the split ``split`` (its ``getitem``)."""
    for user in graph.node(split).users:
        if user.target is operator.getitem and user.args[1] == index:
            return user.name
    return None


def _ancestors(node: torch.fx.Node) -> set[str]:
    seen, todo = set(), [node]
    while todo:
        current = todo.pop()
        if current.name in seen:
            continue
        seen.add(current.name)
        todo.extend(current.all_input_nodes)
    return seen


def _sides(attention: Attention, sizes: dict[DimGroup, int]) -> dict[DimGroup, str]:
    """For each group the key/query growth resizes: on the path to the keys only ("key"), the queries
    only ("query"), or both ("both": a fused projection)."""
    q_side, k_side = _ancestors(attention.query), _ancestors(attention.keys)
    sides = {}
    for group in sizes:
        if group is attention.qk:
            continue
        names = {ref[2:] for ref, _ in group.activations if "#" not in ref}  # a split's own node feeds all parts
        to_keys, to_queries = bool(names & k_side), bool(names & q_side)
        sides[group] = "both" if to_keys and to_queries else "key" if to_keys else "query" if to_queries else ""
    return sides


def _fused_parts(attention: Attention, sizes: dict[DimGroup, int]) -> dict[DimGroup, list[DimGroup]]:
    """Each grown group feeding both queries and keys, with the parts it is split into (q | k | v).

    Refused when such a group is not a concatenation whose parts each feed one side."""
    sides = _sides(attention, sizes)
    fused = {}
    for group, side in sides.items():
        if side != "both" or not group.members:
            continue
        splits = [c for c in group.compositions if c.how == "concat" and c.whole is group]
        if len(splits) != 1 or any(sides.get(p, "") == "both" for p in splits[0].parts):
            raise GrowthError(
                f"widen_heads(qk) at {attention.site}: queries and keys come from one projection "
                f"({group.members[0].tensor}) that is not split into separate parts"
            )
        fused[group] = splits[0].parts
    return fused


def widen_heads(
    qk: int | None = None,
    v: int | None = None,
    init: "str | Policy" = "zero",
    *,
    layers: list[int] | None = None,
    exact: bool = True,
    seed: int = 0,
) -> WidenHeads:
    """Grow every head's key/query size to ``qk`` and/or its value size to ``v``."""
    if qk is None and v is None:
        raise GrowthError("widen_heads needs qk= (key/query size) and/or v= (value size)")
    policy(init)
    return WidenHeads(qk=qk, v=v, init=init, layers=layers, exact=exact, seed=seed)
