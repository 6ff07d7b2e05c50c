"""``widen_hidden``: grow the residual stream ``h -> h'`` (Gesmundo & Maile, transformation 5; HyperCloning).

The residual stream is one dimension group: token (and position) embedding columns, every projection that
writes into it (``W_O``, the MLP output, their biases) and every one that reads it (``W_Q, W_K, W_V``, the MLP
input, the output head), and the gains of every norm on it. It is found from the analysis: the group an
embedding produces.

``init="zero"``: new residual dims stay **zero**. Producers' new entries are zero; readers' new columns are
anything (noisy copies, so they learn). An RMSNorm over ``[x, 0]`` sees ``mean(x^2) * h/h'``, so its gain is
scaled by ``sqrt(h/h')`` and its epsilon by ``h/h'`` (``nn.RMSNorm``, ``aten.rms_norm`` and the hand-written
``x * rsqrt(mean(x^2) + eps) * w`` alike): exact. A gain written with an offset, ``(c + w)`` (Gemma's
``1 + w``), is scaled as a whole: ``w' = s (c + w) - c``. An RMSNorm with no gain cannot absorb the scale: not
exact. A LayerNorm over a zero-padded axis moves the mean: refused, with ``clone`` suggested. A tied embedding/output head works (zero new columns serve both uses).

``init="clone"`` (uniform x k): embeddings and producers repeat their columns, readers' columns are divided by
k, norm gains and biases repeat; means and variances are unchanged, so LayerNorm and RMSNorm stay exact with
their epsilon. A tied embedding/head keeps its tie: its columns repeat (what the embedding needs), and the
head's extra factor k is taken out of the norm that feeds it, whose gain and bias are divided by k. That norm
is found by walking back from the head through ops that do not mix features, each used only on that path.
``net2net`` is never exact here (non-uniform replication under a norm).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.fx

from rewrite.analysis.dims import dim_groups
from rewrite.errors import GrowthError, NotExactError
from rewrite.ir.graph import Graph
from rewrite.transform.resize import check_resize
from rewrite.ops import FEATURE_LOCAL, canonical_kind, offset_parameter, real_users, rms_epsilon
from rewrite.transform.growth_ops import Scale
from rewrite.transform.policy import pad, replicate

from .net2wider import Widen, new_size
from .policies import Policy, Zero, policy
from .width import Growth

NORMS = ("rms_norm", "layer_norm")


class ResidualZero(Zero):
    """New residual dims stay zero: producers' and biases' new entries zero, readers' new columns noisy."""

    def produces(self, axis, layout, seed):
        return [pad(axis, layout)]

    along = produces

    def consumes(self, axis, layout, seed):
        return Zero.produces(self, axis, layout, seed)


class ScaledGain(Policy):
    """A norm's gain (and bias) copied through the layout, then scaled: only the old entries (an RMSNorm over
    a zero-padded axis, whose new entries see zeros) or all of them (the norm feeding a tied head, cloned).
    A gain the graph applies as ``offset + w`` is scaled as a whole: ``w' = scale * (offset + w) - offset``."""

    def __init__(self, name: str, scale: float, old_only: bool, offset: float = 0.0):
        self.name, self.scale, self.old_only, self.offset = name, scale, old_only, offset

    def along(self, axis, layout, seed):
        positions = layout.old_positions if self.old_only else None
        fill = "copy" if self.old_only else "split"  # a zero-padded axis's new gains see zeros; clone splits units
        return [replicate(axis, layout, fill), Scale(self.scale, self.offset, axis, positions)]


@dataclasses.dataclass
class WidenHidden(Widen):
    @property
    def name(self) -> str:
        return f"widen_hidden({f'size={self.size}' if self.size is not None else f'factor={self.factor}'})"

    def where(self, site: str) -> str:
        return "widen_hidden"

    def select(self, graph: Graph):
        """(the embeddings that write the residual stream, its group) for every group an embedding produces."""
        found = []
        for group in dim_groups(graph):
            embeddings = [
                member.tensor.rpartition(".")[0]
                for member in group.role("produces")
                if any(role == "produces" and canonical_kind(graph, graph.node(node)) == "embedding"
                       for role, node in member.roles)
            ]
            if embeddings:
                found.append((f"residual stream of {', '.join(embeddings)}", group))
        return found

    def growths(self, graph: Graph, chosen: Policy) -> list[Growth]:
        growths = []
        for site, group in self.select(graph):
            tied = _tied(group)
            if tied and chosen.name not in ("zero", "clone"):
                raise GrowthError(
                    f"widen_hidden with init={chosen.name!r}: {tied[0]} is a tied embedding and output head; "
                    f"use init='zero' or 'clone'"
                )
            for member in tied if chosen.name == "clone" else []:
                _head_norm(graph, group, member)  # refuses when the head is not fed by a norm alone
            growths.append(Growth(site, {group: new_size(group.size, self.size, self.factor)}))
        return growths

    def check(self, graph, site, group, size, chosen):
        result = check_resize(graph, group, size, chosen, tied=bool(_tied(group)))
        if result.refusal:
            raise GrowthError(f"widen_hidden: {result.refusal}")
        return _zero_exactness(graph, group) if chosen.name == "zero" else result.not_exact

    def not_exact(self, graph, chosen, site, group, size, reason):
        hint = "init='clone' would be exact" if chosen.name != "clone" and "LayerNorm" in reason else ""
        return NotExactError(f"{self.name} with init={chosen.name!r} is not exact: {reason}. {hint}".strip())

    def payload(self, graph, growths, sizes, grown, chosen):
        """clone: the norm feeding a tied head divided by k; zero: RMSNorm gains x sqrt(h/h') and their
        epsilons x h/h', the residual stream's new dims zero."""
        overrides, epsilons = {}, []
        if chosen.name == "clone":
            for group, size in sizes.items():
                for member in _tied(group):
                    for tensor, offset in _head_norm(graph, group, member):
                        overrides[tensor] = ScaledGain("clone", group.size / size, old_only=False, offset=offset)
            return overrides, None
        if chosen.name != "zero":
            return overrides, None
        for group, size in sizes.items():
            ratio = group.size / size
            for kind, node_name in group.reductions:
                if not _correctable_rms(graph, kind, node_name):
                    continue  # the plan already says approximate and why
                epsilons.append((node_name, kind, ratio))
                gain, offset = _gain_of(graph, graph.node(node_name), kind, group)
                overrides[gain] = ScaledGain("zero", math.sqrt(ratio), old_only=True, offset=offset)
            overrides[group] = ResidualZero()
        return overrides, lambda module: _scale_epsilons(module, epsilons)


def _tied(group) -> list:
    """Members that both produce and consume the residual stream: a tied embedding and output head."""
    return [m for m in group.members if {"produces", "consumes"} <= set(m.role_names)]


def _head_norm(graph: Graph, group, member) -> list[tuple[str, float]]:
    """(tensor, offset) for the gain and bias of the norm that alone feeds the tied head ``member``; refuses
    when there is none. The walk back from the head passes ops that do not mix features (casts, views, a
    last-token selection ``x[:, [-1], :]``) and products with a constant (a config scale); a norm is a norm
    op, or a written-out one ending in ``x * (c + gain)`` [``+ bias``] (Llama's, Gemma's, in ATen form)."""
    members = {m.tensor for m in group.members if "along" in m.role_names}
    heads = [graph.node(node) for role, node in member.roles if role == "consumes"]
    for head in heads:
        current, biases = head.args[0], []
        while isinstance(current, torch.fx.Node) and len(real_users(current)) == 1:
            kind = canonical_kind(graph, current)
            if kind in NORMS:
                names = [m.tensor for m in group.members if any(n == current.name for _, n in m.roles)]
                if names:
                    return [(name, 0.0) for name in names] + biases
                break
            tensors = [a for a in current.args if isinstance(a, torch.fx.Node)]
            parameters = [(a, offset_parameter(graph, a)) for a in tensors]
            parameters = [(a, p) for a, p in parameters if p is not None and str(p[0].target) in members]
            others = [a for a in tensors if all(a is not p for p, _ in parameters)]
            if kind in ("mul", "add") and len(parameters) == 1 and len(others) == 1:
                (_, (tensor, offset)), = parameters
                if kind == "mul":  # the gain: the end of a written-out norm
                    return [(str(tensor.target), offset)] + biases
                biases.append((str(tensor.target), 0.0))  # a bias after the gain
                current = others[0]
            elif kind in ("mul", "div") and len(tensors) == 1 and tensors[0] is current.args[0] and all(
                    isinstance(a, (int, float)) and not isinstance(a, bool) for a in current.args[1:]):
                current = tensors[0]  # a constant scale commutes with the head's factor
            elif kind in FEATURE_LOCAL or kind == "index" and tensors and current.args[0] is tensors[0]:
                current = current.args[0]  # index: picking tokens (x[:, [-1], :]) mixes no features
            else:
                break
        raise GrowthError(
            f"widen_hidden with init='clone': the tied head {member} is not fed by a norm alone (reached "
            f"{getattr(current, 'name', current)}), so the replicated columns cannot be compensated; use init='zero'"
        )
    return []


def _zero_exactness(graph: Graph, group) -> str | None:
    """Why zero-padding this residual group is not exact (None when every op on it can be corrected)."""
    for kind, node_name in group.reductions:
        if kind == "layer_norm":
            return f"LayerNorm over a zero-padded residual stream (node {node_name}) moves the mean"
        if not _correctable_rms(graph, kind, node_name):
            return f"a {kind} over the residual stream (node {node_name}) changes when it is zero-padded"
        if _gain_of(graph, graph.node(node_name), kind, group) is None:
            return (f"the RMSNorm at node {node_name} has no gain on the residual stream to absorb the "
                    f"sqrt(h'/h) its zero-padded input gives")
    return None


def _correctable_rms(graph: Graph, kind: str, node_name: str) -> bool:
    """Is this reduction an RMSNorm whose gain and epsilon can absorb zero padding (a module, aten.rms_norm,
    or the hand-written mean -> + eps -> rsqrt)?"""
    return kind == "rms_norm" or (kind == "mean" and rms_epsilon(graph.node(node_name)) is not None)


def _gain_of(graph: Graph, node: torch.fx.Node, kind: str, group) -> tuple[str, float] | None:
    """(gain tensor, offset) of the RMSNorm whose reduction is ``node``: the graph multiplies by
    ``offset + gain``. None when the norm has no gain on this group."""
    if kind == "rms_norm":
        if node.op == "call_module":
            has_gain = getattr(graph.module.get_submodule(node.target), "weight", None) is not None
            return (f"{node.target}.weight", 0.0) if has_gain else None
        weight = node.args[2] if len(node.args) > 2 else None
        if isinstance(weight, torch.fx.Node) and weight.op == "get_attr":
            return str(weight.target), 0.0
        return None
    # hand-written: mean -> add eps -> rsqrt -> mul(x, .) [-> to] -> mul(., [offset +] weight)
    rsqrt = real_users(rms_epsilon(node)[0])[0]
    current = real_users(rsqrt)[0]
    members = {m.tensor for m in group.members}
    for _ in range(4):
        for arg in current.args:
            gain = offset_parameter(graph, arg)
            if gain is not None and str(gain[0].target) in members:
                return str(gain[0].target), gain[1]
        users = real_users(current)
        if len(users) != 1:
            return None
        current = users[0]
    return None


def _scale_epsilons(module: torch.fx.GraphModule, epsilons) -> None:
    """eps -> eps * h/h' for every RMSNorm on the grown axis (module attribute or graph literal)."""
    nodes = {n.name: n for n in module.graph.nodes}
    for node_name, kind, ratio in epsilons:
        node = nodes[node_name]
        if kind == "rms_norm" and node.op == "call_module":
            norm = module.get_submodule(node.target)
            eps = norm.eps if norm.eps is not None else torch.finfo(norm.weight.dtype).eps
            norm.eps = eps * ratio
        elif kind == "rms_norm":
            args = list(node.args)
            eps = args[3] if len(args) > 3 and args[3] is not None else torch.finfo(torch.float32).eps
            args += [None] * (4 - len(args))
            args[3] = eps * ratio
            node.args = tuple(args)
        elif kind == "mean":
            add, index = rms_epsilon(node)
            args = list(add.args)
            args[index] = args[index] * ratio
            add.args = tuple(args)


def widen_hidden(
    size: int | None = None,
    factor: float | None = None,
    init: "str | Policy" = "zero",
    *,
    exact: bool = True,
    seed: int = 0,
) -> WidenHidden:
    """Grow the residual stream (hidden size) to ``size`` or by ``factor``."""
    policy(init)
    return WidenHidden("", size, factor, init, exact, seed)
