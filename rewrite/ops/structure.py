"""Op structure the structural rules read: transparent and homogeneous ops, weighted ops' operands, gains
written as ``c + w``, the hand-written RMSNorm, and attention (sdpa, or written out)."""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from .kinds import canonical_kind, real_users, short_name

# -- RMSNorm written out by hand (Hugging Face's LlamaRMSNorm and its many copies) -----------------
def rms_epsilon(mean_node: torch.fx.Node) -> tuple[torch.fx.Node, int] | None:
    """For ``mean(x.pow(2), -1, keepdim=True)`` followed by ``+ eps`` and ``rsqrt``: the ``add`` node and the
    index of its ``eps`` argument; None when the mean is not the denominator of an RMSNorm."""
    source = mean_node.args[0] if mean_node.args else None
    if not isinstance(source, torch.fx.Node) or short_name(source) not in ("pow", "square", "mul"):
        return None
    users = real_users(mean_node)
    if len(users) != 1:
        return None
    (add,) = users
    if short_name(add) != "add" or len(real_users(add)) != 1 or short_name(real_users(add)[0]) != "rsqrt":
        return None
    for index, value in enumerate(add.args):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return add, index
    return None


# -- structure: what the structural rules (rewrite.blocks, rewrite.edit) need to know about ops ---------
# Ops that pass their input through unchanged in eval mode (a cast counts: same stream, other dtype).
TRANSPARENT = {"dropout", "identity", "contiguous", "clone", "detach", "alias", "to", "_to_copy",
               "lift_fresh_copy", "float", "double", "half", "bfloat16", "type", "type_as"}
# Ops that move or pick values without mixing them across features (each output feature is one input feature).
FEATURE_LOCAL = TRANSPARENT | {"view", "slice", "select", "narrow", "getitem", "unsqueeze", "squeeze", "expand"}
# Ops that are positively homogeneous of degree one in their (first) tensor operand: f(c x) = c f(x)
# for c >= 0. Scaling a residual branch can pass through them to the layers that produce it.
HOMOGENEOUS = TRANSPARENT | {"view", "transpose", "numpy_T", "permute", "expand", "unsqueeze", "squeeze", "getitem",
                             "slice", "select", "narrow", "repeat", "flatten", "relu", "pool"}
HOMOGENEOUS_REDUCTIONS = {"sum", "mean", "amax", "max"}  # raw op names under the "mean" kind
# Activations with phi(phi(v)) = phi(v): an identity layer followed by a copy of them changes nothing.
IDEMPOTENT = {"relu", "relu6", "hardtanh", "identity"}
ACTIVATIONS = {"relu", "gelu", "silu", "tanh", "sigmoid", "leaky_relu", "elu", "mish", "hardswish",
               "hardsigmoid", "relu6", "hardtanh", "softplus", "logsigmoid"}
# Ops whose output is a weight applied to an input plus a bias: scaling both scales the output.
# Operand positions for the ATen / functional forms: role -> argument index.
WEIGHTED = {
    "linear": {"input": 0, "weight": 1, "bias": 2},
    "conv": {"input": 0, "weight": 1, "bias": 2},
    "addmm": {"bias": 0, "input": 1, "weight": 2},
    "embedding": {"weight": 0, "input": 1},
}


def offset_parameter(graph, value) -> tuple[torch.fx.Node, float] | None:
    """``value`` as (the ``get_attr`` node of a tensor ``w``, ``c``) when it computes ``c + w`` through casts
    (``w`` alone: ``c = 0``; Gemma's norms multiply by ``1 + w``); None when it computes anything else."""
    offset = 0.0
    while isinstance(value, torch.fx.Node):
        if value.op == "get_attr":
            return value, offset
        kind = canonical_kind(graph, value)
        tensors = [a for a in value.args if isinstance(a, torch.fx.Node)]
        if kind in TRANSPARENT and tensors and value.args[0] is tensors[0]:
            value = tensors[0]
        elif kind == "add" and len(tensors) == 1 and len(value.args) == 2 and value.kwargs.get("alpha", 1) == 1:
            constant = next(a for a in value.args if a is not tensors[0])
            if not isinstance(constant, (int, float)) or isinstance(constant, bool):
                return None
            offset += float(constant)
            value = tensors[0]
        else:
            return None
    return None


@dataclasses.dataclass
class Attention:
    """An attention computation: ``scaled_dot_product_attention``, or the same written out as
    ``softmax(f(q @ k^T)) @ v`` (eager attention: scaling, masks, soft-capping in ``f``)."""

    node: torch.fx.Node  # the sdpa node, or the softmax of the written-out form
    query: torch.fx.Node  # [..., heads, tokens, head dim]
    keys: torch.fx.Node  # [..., heads, tokens, head dim] (sdpa) or its transpose [..., head dim, tokens]
    value: torch.fx.Node
    key_dim: int
    implicit_scale: bool  # no scale given: sdpa divides by sqrt(head dim) itself


# Ops that may stand between q @ k^T and the softmax of a written-out attention (scale, mask, soft-cap).
_SCORE_OPS = {"mul", "div", "add", "sub", "tanh", "masked_fill", "where"} | TRANSPARENT


def attention(graph, node: torch.fx.Node) -> Attention | None:
    """``node`` as an attention (see ``Attention``), or None. The written-out form is recognised at its
    softmax over the last axis of 4-d scores: back through score ops to ``matmul(q, k^T)``, forward
    through casts and dropout to ``matmul(probabilities, v)``."""
    kind = canonical_kind(graph, node)
    if kind == "sdpa":
        q, k, v = node.args[:3]
        implicit = node.kwargs.get("scale") is None and (len(node.args) < 7 or node.args[6] is None)
        return Attention(node, q, k, v, graph.shape(k)[-1], implicit)
    if kind != "softmax" or node.op == "call_module" or graph.op_kind(node).rpartition(".")[2] == "log_softmax":
        return None
    shape = graph.shape(node)
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", -1)
    if len(shape) != 4 or not isinstance(dim, int) or dim % 4 != 3:
        return None
    scores = node.args[0]
    for _ in range(8):  # back to q @ k^T through the ops that scale, mask and cap the scores
        if not isinstance(scores, torch.fx.Node) or scores.op != "call_function":
            return None
        if canonical_kind(graph, scores) == "matmul":
            break
        if canonical_kind(graph, scores) not in _SCORE_OPS:
            return None
        scores = next((a for a in scores.args
                       if isinstance(a, torch.fx.Node) and tuple(graph.shape(a)) == tuple(shape)), None)
    else:
        return None
    probabilities = node
    for _ in range(4):  # forward to probabilities @ v through casts and dropout
        users = real_users(probabilities)
        if len(users) != 1:
            return None
        previous, (probabilities,) = probabilities, users
        if canonical_kind(graph, probabilities) == "matmul" and probabilities.args[0] is previous:
            q, keys = scores.args[:2]
            return Attention(node, q, keys, probabilities.args[1], graph.shape(keys)[-2], False)
        if canonical_kind(graph, probabilities) not in TRANSPARENT:
            return None
    return None


def operand(graph, node: torch.fx.Node, role: str):
    """The ``input`` node, or the name of the ``weight``/``bias`` tensor, of a weighted op in either front-end
    form (``call_module nn.Linear`` or ``aten.linear`` + ``get_attr``); None where it has none."""
    kind = canonical_kind(graph, node)
    if node.op == "call_module":
        if role == "input":
            return node.args[0] if node.args else None
        module = graph.module.get_submodule(node.target)
        return f"{node.target}.{role}" if getattr(module, role, None) is not None else None
    positions = WEIGHTED.get(kind)
    if positions is None or role not in positions:
        return None
    index = positions[role]
    if kind == "embedding" and not isinstance(node.target, torch._ops.OpOverload):
        index = 1 - index  # F.embedding(input, weight)
    value = node.args[index] if index < len(node.args) else node.kwargs.get(role)
    if role == "input":
        return value
    return str(value.target) if isinstance(value, torch.fx.Node) and value.op == "get_attr" else None
