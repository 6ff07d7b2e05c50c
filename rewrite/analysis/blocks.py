"""Blocks: the residual units of a layer stack, found from the graph of either front-end.

A *block* is a numbered module of a stack (``model.layers.3``, ``h.0``, ``blocks.1``) whose nodes take one
residual stream ``x`` in and hand one stream out, and in between update it only by residual units:

    pre-norm   x <- x + F(norm(x))           (GPT, Llama, Mixtral: the block's output is the last add)
    post-norm  x <- LN(x + F(x))             (BERT: the add feeds a norm, and the norm is the new stream)
    parallel   x <- x + F(n1(x)) + G(n2(x))  (Cohere, StableLM, GPT-J: each added branch is a unit)

Other values may enter a block (masks, RoPE tables); they are *side inputs*, shared by copies of it.
``residual_units`` tells which add belongs to which branch; ``branch_layers`` walks a branch back from its
output through ops that are homogeneous of degree one (views, casts, sums, products with one operand
held fixed) to the weighted layers that produce it, so that scaling the branch by ``c`` is scaling those
layers' weights and biases by ``c`` (no new op). A branch that ends in a norm (Gemma-2's sandwich norms)
ends at the norm's gain; a gain applied as ``1 + w`` is scaled as ``w' = c (1 + w) - 1``. The op knowledge
used here lives in ``rewrite.ops``.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict

import torch.fx
from torch.fx.passes.shape_prop import TensorMetadata

from rewrite.errors import GrowthError
from rewrite.names import prefixes, under
from rewrite.ops import HOMOGENEOUS, HOMOGENEOUS_REDUCTIONS, TRANSPARENT, WEIGHTED, canonical_kind, offset_parameter, operand

_NUMBERED = re.compile(r"^(.*)\.(\d+)$")


@dataclasses.dataclass
class ResidualUnit:
    add: torch.fx.Node  # x + F(x)
    branch: torch.fx.Node  # F(x)
    norm: torch.fx.Node | None  # the post-norm applied to the sum, if any


@dataclasses.dataclass
class Block:
    stack: str  # "model.layers"
    index: int  # 3
    nodes: list[torch.fx.Node]  # every node the block owns, in graph order
    stream_in: torch.fx.Node
    stream_out: torch.fx.Node
    side_inputs: list[torch.fx.Node]
    units: list[ResidualUnit]

    @property
    def name(self) -> str:
        return f"{self.stack}.{self.index}"

    @property
    def post_norm(self) -> bool:
        return any(unit.norm is not None for unit in self.units)

    def __str__(self) -> str:
        return self.name


class Owners:
    """The graph's nodes in order with their owning modules, and for every module the span of node positions
    it owns (parameters aside): computed once for a graph, so finding each of many blocks' nodes reads only
    its own span."""

    def __init__(self, graph):
        self.nodes = list(graph.module.graph.nodes)
        self.names = [graph.owner(node) for node in self.nodes]
        owned: dict[str, tuple[int, int]] = {}  # each owner's first and last node, then each module's
        for i, (node, name) in enumerate(zip(self.nodes, self.names)):
            if node.op != "get_attr" and name:
                owned[name] = (owned.get(name, (i, i))[0], i)
        self.spans: dict[str, tuple[int, int]] = {}
        for name, (first, last) in owned.items():
            for module in prefixes(name):
                span = self.spans.get(module)
                self.spans[module] = (first, last) if span is None else (min(span[0], first), max(span[1], last))


def owned_by(graph, prefix: str, owners: Owners | None = None) -> list[torch.fx.Node]:
    """The nodes of module ``prefix``, in graph order: those it owns, and those a shared module computes
    inline on its values (a rotary embedding called from inside each layer), but not parameters."""
    owners = owners or Owners(graph)
    if prefix not in owners.spans:
        return []
    first, last = owners.spans[prefix]
    inside: list[torch.fx.Node] = []
    members: set[torch.fx.Node] = set()
    for node, name in zip(owners.nodes[first:last + 1], owners.names[first:last + 1]):
        if node.op == "get_attr":
            continue
        if under(name, prefix) or any(v in members for v in node.all_input_nodes):
            inside.append(node)
            members.add(node)
    return inside


def blocks(graph) -> list[Block]:
    """Every block of the model's layer stacks, stack by stack in graph order (see the module docstring)."""
    found = []
    owners = Owners(graph)
    for stack, indices in numbered_modules(graph).items():
        stack_blocks = [block_at(graph, stack, i, owners) for i in indices]
        if stack_blocks and all(isinstance(b, Block) for b in stack_blocks):
            found.extend(stack_blocks)
    return found


def numbered_modules(graph) -> dict[str, list[int]]:
    """Candidate layer stacks: for each ``stack`` with numbered modules ``stack.i`` owning nodes, the indices."""
    members: dict[str, set[int]] = defaultdict(set)
    for node in graph.module.graph.nodes:
        for module in prefixes(graph.owner(node)):
            match = _NUMBERED.match(module)
            if match:
                members[match.group(1)].add(int(match.group(2)))
                break
    return {stack: sorted(indices) for stack, indices in members.items()}


def why_no_blocks(graph) -> list[tuple[str, str]]:
    """(site, reason) for each candidate stack whose modules are not all residual blocks, or one line saying
    there is no numbered module at all: what a pass that matched no block tells its user."""
    stacks = numbered_modules(graph)
    if not stacks:
        return [("model", "no numbered modules (a layer stack is a ModuleList whose modules are `stack.0`, "
                          "`stack.1`, ...), so there are no blocks")]
    reasons = []
    owners = Owners(graph)
    for stack, indices in stacks.items():
        failed = next((b for b in (block_at(graph, stack, i, owners) for i in indices) if isinstance(b, str)), None)
        if failed is not None:
            reasons.append((stack, failed))
    return reasons


def block_at(graph, stack: str, index: int, owners: Owners | None = None) -> Block | str:
    """The block ``stack.index``, or the reason it is not a residual unit (``owners``: the graph's, when many
    blocks are looked up)."""
    name = f"{stack}.{index}"
    nodes = owned_by(graph, name, owners)
    inside = set(nodes)
    computing = [n for n in nodes if n.op in ("call_module", "call_function", "call_method")]
    if not computing:
        return f"{name} computes nothing"
    external_in, external_out = [], []
    for node in computing:
        for value in node.all_input_nodes:
            if value not in inside and value.op != "get_attr" and value not in external_in:
                external_in.append(value)
        if isinstance(node.meta.get("tensor_meta"), TensorMetadata) and any(
            user not in inside and not graph.is_bookkeeping(user) for user in node.users
        ):
            external_out.append(node)
    if len(external_out) != 1:
        return f"{name} hands {len(external_out)} values to the rest of the graph (a block hands on one stream)"
    (stream_out,) = external_out
    stream_meta = stream_out.meta.get("tensor_meta")
    candidates = [v for v in external_in if _same_shape(v, stream_meta)]
    for stream_in in candidates:
        units = residual_units(graph, stream_in, stream_out, inside)
        if isinstance(units, list):
            side = [v for v in external_in if v is not stream_in]
            return Block(stack, index, nodes, stream_in, stream_out, side, units)
    return f"{name} is not a chain of residual units x + F(x) from its input to its output"


def residual_units(graph, stream_in, stream_out, inside: set) -> list[ResidualUnit] | None:
    """The residual adds that take ``stream_in`` to ``stream_out`` inside a block, or None."""
    stream, units = stream_in, []
    while resolve(graph, stream_out) is not resolve(graph, stream):
        add = _residual_add(graph, stream, inside, stream_in)
        if add is None:
            return None
        a, b = add.args[:2]
        branch = b if resolve(graph, a) is resolve(graph, stream) else a
        norm = None
        users = [u for u in _through_transparent(graph, add) if u in inside]
        if len(users) == 1 and canonical_kind(graph, users[0]) in ("layer_norm", "rms_norm"):
            norm = users[0]
        units.append(ResidualUnit(add, branch, norm))
        stream = norm if norm is not None else add
        if len(units) > 8:
            return None
    return units


def _residual_add(graph, stream, inside: set, block_in):
    """The add that updates ``stream`` by a branch computed from it, or from the block's input: in a parallel
    block (``x + attn(x) + mlp(x)``, Cohere, StableLM) the second branch reads the block's input, not the
    partial sum it is added to."""
    base, origin = resolve(graph, stream), resolve(graph, block_in)
    for user in _through_transparent(graph, stream):
        if user not in inside or canonical_kind(graph, user) != "add" or len(user.args) < 2:
            continue
        a, b = user.args[:2]
        if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)):
            continue
        other = b if resolve(graph, a) is base else a if resolve(graph, b) is base else None
        if other is not None and (depends_on(other, base) or depends_on(other, origin)):
            return user
    return None


def resolve(graph, node):
    """The value a node passes through unchanged (following dropout, casts, clones and token reshapes back)."""
    while isinstance(node, torch.fx.Node) and node.op != "placeholder" and _passes_through(graph, node):
        node = node.args[0]
    return node


def _passes_through(graph, node: torch.fx.Node) -> bool:
    """Does ``node`` hand on its first operand's values unchanged: a transparent op, or a reshape that keeps
    the feature axis (OPT flattens batch and tokens between its residual units: ``[B, T, D] -> [B*T, D]``)?"""
    kind = canonical_kind(graph, node)
    if kind in TRANSPARENT:
        return True
    if kind not in ("view", "reshape", "_unsafe_view") or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return False
    before, after = node.args[0].meta.get("tensor_meta"), node.meta.get("tensor_meta")
    return (isinstance(before, TensorMetadata) and isinstance(after, TensorMetadata)
            and len(before.shape) > 0 and len(after.shape) > 0 and before.shape[-1] == after.shape[-1])


def _through_transparent(graph, node) -> list[torch.fx.Node]:
    """Users of ``node``, looking through ops that pass it on unchanged to the users of their results too."""
    seen, out, todo = set(), [], [node]
    while todo:
        current = todo.pop()
        for user in current.users:
            if user in seen:
                continue
            seen.add(user)
            if user.op != "output" and _passes_through(graph, user) and user.args and user.args[0] is current:
                todo.append(user)
            else:
                out.append(user)
    return out


def depends_on(node: torch.fx.Node, ancestor: torch.fx.Node) -> bool:
    seen, todo = set(), [node]
    while todo:
        current = todo.pop()
        if current is ancestor:
            return True
        for value in current.all_input_nodes:
            if value not in seen:
                seen.add(value)
                todo.append(value)
    return False


def _same_shape(node: torch.fx.Node, meta) -> bool:
    other = node.meta.get("tensor_meta")
    return meta is not None and other is not None and getattr(other, "shape", None) == getattr(meta, "shape", None)


@dataclasses.dataclass
class Layer:
    """A tensor (and bias) that scales the branch: the graph multiplies by ``offset + weight``."""

    node: torch.fx.Node
    weight: str
    bias: str | None
    offset: float = 0.0


def branch_layers(graph, output: torch.fx.Node) -> list[Layer]:
    """The weighted layers whose weights and biases, scaled by ``c >= 0``, scale ``output`` by ``c``.

    Walks back from ``output``: through homogeneous ops to their tensor operand; through ``add``/``sub``
    to both operands; through a product or quotient to the operand that leads to weighted layers (the
    other one is held fixed); it stops at a weighted layer (``linear``, ``conv``, GPT-2's ``addmm``, a
    ``matmul`` with a parameter, one indexed from a stack of experts, or a gain ``c + w``). A product's
    operand is taken only when the other operands do not depend on what it scales (``x * rsqrt(mean(x^2))``
    is not homogeneous in ``x``). Raises ``GrowthError`` naming the node it cannot pass."""
    layers = _walk(graph, output, set())
    if isinstance(layers, str):
        raise GrowthError(f"cannot fold a scalar into the branch ending at {output.name}: {layers}")
    return layers


def _walk(graph, node, seen: set) -> list[Layer] | str:
    if not isinstance(node, torch.fx.Node):
        return f"reached the constant {node!r}"
    if node in seen:
        return []
    seen.add(node)
    if node.op == "get_attr":
        return [Layer(node, str(node.target), None)]
    if node.op == "placeholder":
        return f"reached the model input {node.name}"
    kind = canonical_kind(graph, node)
    if kind in WEIGHTED or node.op == "call_module" and kind in ("linear", "conv"):
        weight = operand(graph, node, "weight")
        if weight is not None:
            return [Layer(node, weight, operand(graph, node, "bias"))]
    tensors = [a for a in node.args if isinstance(a, torch.fx.Node)]
    if kind in HOMOGENEOUS or kind == "mean" and graph.op_kind(node).rpartition(".")[2] in HOMOGENEOUS_REDUCTIONS:
        return _walk(graph, node.args[0], seen) if tensors else f"{node.name} has no tensor operand"
    if kind in ("add", "sub", "add_", "sub_"):  # in place or not, the result is the sum
        gain = offset_parameter(graph, node)
        if gain is not None:  # c + w: a gain with an offset
            return [Layer(gain[0], str(gain[0].target), None, gain[1])]
        found = []
        for value in tensors:
            layers = _walk(graph, value, seen)
            if isinstance(layers, str):
                return layers
            found += layers
        if len(tensors) < 2 and any(isinstance(a, (int, float)) and a != 0 for a in node.args):
            return f"{node.name} adds a constant"
        return found
    if kind in ("mul", "div", "matmul", "grouped_mm", "index"):
        operands = {"mul": tensors, "matmul": tensors, "grouped_mm": tensors[:2]}.get(kind, tensors[:1])
        reasons = []
        for value in operands:
            layers = _walk(graph, value, set(seen))
            if isinstance(layers, str):
                reasons.append(layers)
                continue
            held = [other for other in tensors if other is not value]
            coupled = next((layer for layer in layers for other in held if depends_on(other, layer.node)), None)
            if coupled is None:
                return layers
            reasons.append(f"{node.name} multiplies by a value that depends on {coupled.weight} as well")
        return reasons[0] if reasons else f"{node.name} has no tensor operand"
    return f"{kind} ({node.name}) is not homogeneous in its input"
