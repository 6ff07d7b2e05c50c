"""``net2deeper``: Net2DeeperNet. Insert an identity layer after a layer's activation (Chen et al., 2016).

Algebra. After ``h = phi(layer(x))`` (a BatchNorm between the layer and ``phi`` is allowed) insert
``h' = phi(I h + 0)``: an identity matrix for a linear layer, an identity kernel (1 at the centre tap of
channel ``c`` for output ``c``, "same" padding) for a convolution, and a copy of the activation. Then
``h' = phi(h) = phi(phi(v))``, which equals ``h = phi(v)`` exactly when ``phi`` is idempotent (ReLU, ReLU6,
hardtanh); GELU, SiLU, tanh and sigmoid are not, so they are refused with ``exact=True``. The new layer has
no BatchNorm, so nothing depends on data statistics. Its parameters are ``<layer>_deeper.weight``/``.bias``.
"""

from __future__ import annotations

import dataclasses

import torch

from rewrite.transform.edit import Editor
from rewrite.errors import GrowthError
from rewrite.ir.graph import Graph
from rewrite.ops import ACTIVATIONS, IDEMPOTENT, canonical_kind
from rewrite.transform.pattern import Match, op, optional
from rewrite.transform.plan import RulePlan
from rewrite.transform.rules import Rule


def _idempotent(match: Match) -> str | None:
    kind = canonical_kind(match.graph, match["act"])
    if kind in IDEMPOTENT:
        return None
    return (f"{kind} after {match.site} is not idempotent (phi(phi(v)) != phi(v)), so phi(I phi(v)) != phi(v); "
            f"only {', '.join(sorted(IDEMPOTENT))} are")


def _insert_identity(match: Match, edit: Editor) -> None:
    layer, act = match["layer"], match["act"]
    shape = match.graph.shape(act)
    kind = canonical_kind(match.graph, layer)
    weight = edit.tensor(match.weight("layer"))
    name = f"{match.module('layer')}_deeper"
    if kind == "conv":
        channels, kernel = shape[1], [k if k % 2 else 1 for k in weight.shape[2:]]
        identity = torch.zeros(channels, channels, *kernel, dtype=weight.dtype)
        identity[(torch.arange(channels), torch.arange(channels), *(torch.full((channels,), k // 2) for k in kernel))] = 1
    else:
        channels = shape[-1]
        identity = torch.eye(channels, dtype=weight.dtype)
    edit.add_parameter(f"{name}.weight", identity)
    edit.add_parameter(f"{name}.bias", torch.zeros(channels, dtype=weight.dtype))
    owner = name
    if kind == "conv":
        w, b = edit.at(act).get(f"{name}.weight"), edit.get(f"{name}.bias")
        dims = len(kernel)
        new = edit.call(torch.ops.aten.convolution.default, act, w, b, [1] * dims, [k // 2 for k in kernel],
                        [1] * dims, False, [0] * dims, 1, owner=owner)
    else:
        new = edit.at(act).linear(act, f"{name}.weight", f"{name}.bias", owner=owner)
    mapping = edit.copy([act], {act.args[0]: new})
    edit.replace_uses(act, mapping[act], keep={new})


@dataclasses.dataclass
class Net2Deeper(Rule):
    after: str = ""  # the layer (module name) the identity layer follows

    def plan(self, graph: Graph) -> RulePlan:
        plan = super().plan(graph)
        if plan.empty and not plan.refusals:
            raise GrowthError(f"{self.name}: no linear or convolution named {self.after!r} followed by an "
                              f"activation (optionally after a BatchNorm)")
        return plan


def net2deeper(after: str, *, exact: bool = True) -> Rule:
    """Insert an identity layer and a copy of the activation after the layer (module name) ``after``."""
    pattern = (op({"linear", "conv"}, "layer", where=lambda g, n: g.owner(n) == after)
               >> optional(op("batch_norm")) >> op(ACTIVATIONS, "act"))
    return Net2Deeper(pattern, _insert_identity, exactness=_idempotent, name=f"net2deeper({after})", exact=exact,
                      after=after)
