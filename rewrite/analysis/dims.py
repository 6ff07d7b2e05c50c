"""Dimension groups: the (tensor, axis) pairs that must grow together, from op semantics.

The analysis turns every node into a canonical call (``rewrite.ops``), lets its rule state couplings, and
joins the ``(ref, axis)`` pairs whose sizes must stay equal: the connected components are the groups. A size-1
axis is coupled only where it is shown to be real (one head), never where it may be a broadcast one
(``_settle_size_one``). A group that contains a parameter axis is *growable*; its parameter members carry
roles (``produces``, ``consumes``, ``along``, ``indexed``), and the group records the ops that mix values
along it (norms, softmax, attention temperature), the nodes whose literal sizes encode it (a view into heads x
head_dim), and how it composes with other groups (``factor``, ``concat``, ``slice``, ``repeat``, ``select``).

This is structural pruning's dependency graph run in reverse: pruning removes a slice of every member,
growth adds one.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode, statically_known_true
from torch.fx.passes.shape_prop import TensorMetadata

from rewrite.errors import UnsupportedOpError
from rewrite.ops import RULES, Axis, Call, Facts, all_axes, canonical_kind, reshape_run

from rewrite.ir.graph import Graph


@dataclasses.dataclass
class Member:
    """One parameter axis of a group and what each op that reads it does with it."""

    tensor: str  # qualified parameter or buffer name
    axis: int
    roles: list[tuple[str, str]]  # (role, node name)

    @property
    def role_names(self) -> list[str]:
        return sorted({role for role, _ in self.roles})

    def __str__(self) -> str:
        return f"{self.tensor}[{self.axis}]"


@dataclasses.dataclass(eq=False)
class Composition:
    """An axis made of others at a node: ``factor`` (view into heads x head_dim, outer part first),
    ``concat`` (cat/split, parts in order), ``slice``, ``repeat`` or ``select``."""

    how: str
    node: str
    whole: "DimGroup"
    parts: list["DimGroup"]

    def side(self, group: "DimGroup") -> str:
        return "whole" if group is self.whole else "part"


@dataclasses.dataclass(eq=False)
class DimGroup:
    """A set of coupled axes of one size."""

    id: int
    size: int
    members: list[Member]  # parameter and buffer axes
    activations: list[Axis]  # node axes
    reductions: list[tuple[str, str]]  # (kind, node) of ops that mix values along the axis
    encoded_by: list[str]  # nodes whose literal sizes encode the axis (views into heads, repeats)
    compositions: list[Composition]  # how this axis is made of, or makes, other groups
    blocked: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (op, node, why): an op
    # without axis semantics touches the group, so it cannot grow (the rest of the graph still can)

    @property
    def growable(self) -> bool:
        return bool(self.members)

    def role(self, role: str) -> list[Member]:
        return [m for m in self.members if role in m.role_names]

    def describe(self) -> str:
        lines = [f"group {self.id}: size {self.size}, {len(self.activations)} activation axes"]
        for role in ("produces", "consumes", "along", "indexed", "kernel"):
            members = self.role(role)
            if members:
                lines.append(f"  {role + ':':<10}{', '.join(map(str, members))}")
        if self.reductions:
            kinds = sorted({f"{kind} ({node})" for kind, node in self.reductions})
            lines.append(f"  {'mixed by:':<10}{', '.join(kinds[:6])}{' ...' if len(kinds) > 6 else ''}")
        if self.encoded_by:
            lines.append(f"  {'encoded:':<10}{', '.join(self.encoded_by)}")
        if self.compositions:
            shown = sorted({f"{c.how} {c.side(self)} at {c.node}" for c in self.compositions})
            lines.append(f"  {'composes:':<10}{', '.join(shown[:6])}{' ...' if len(shown) > 6 else ''}")
        if self.blocked:
            shown = sorted({f"{op} ({node})" for op, node, _ in self.blocked})
            lines.append(f"  {'blocked:':<10}{', '.join(shown[:6])}{' ...' if len(shown) > 6 else ''}")
        return "\n".join(lines)

    def unsupported(self) -> UnsupportedOpError | None:
        """The error that stops growing this group: the first op without axis semantics it reaches."""
        if not self.blocked:
            return None
        op, node, why = self.blocked[0]
        return UnsupportedOpError(op, node, why)


@dataclasses.dataclass
class DimAnalysis:
    """The groups of a graph and, for every ``(ref, axis)``, the group it belongs to."""

    groups: list[DimGroup]
    axis_group: dict[Axis, DimGroup]

    def group_of(self, ref: str, axis: int) -> DimGroup:
        return self.axis_group[(ref, axis)]


def dim_groups(graph: Graph, *, all_groups: bool = False) -> list[DimGroup]:
    """Groups of coupled ``(tensor, axis)`` pairs that must grow together.

    By default only the growable ones (those that reach a parameter); ``all_groups=True`` adds the
    batch, sequence and other activation-only axes. An op whose semantics are unknown blocks exactly the groups
    its axes are in (``DimGroup.blocked``; growing one raises ``UnsupportedOpError`` naming the op and node);
    every other group stays growable.
    """
    groups = dim_analysis(graph).groups
    return groups if all_groups else [g for g in groups if g.growable]


def dim_analysis(graph: Graph) -> DimAnalysis:
    """The full dimension analysis of ``graph`` (groups and the group of every axis), computed once."""
    return graph.derived("dim_analysis", lambda: analyse(graph))


def analyse(graph: "Graph") -> DimAnalysis:
    """All dimension groups of the graph, growable (parameter-touching) ones first.

    Tensors the graph never reads (a stale buffer) are left out.
    """
    facts, shapes = collect(graph)
    axes = [(ref, axis) for ref, shape in shapes.items() for axis in range(len(shape))]
    joined = _Components(axes)
    for a, b, node in facts.edges:
        _join(graph, joined, shapes, a, b, node)
    _settle_size_one(graph, facts, joined, shapes)
    component = joined.numbered(axes)
    groups = _groups(component, facts, shapes)
    groups = {i: g for i, g in groups.items() if g.activations or any(m.roles for m in g.members)}
    _block(facts, component, groups)
    order = {node.name: i for i, node in enumerate(graph.module.graph.nodes)}
    ordered = sorted(groups.values(), key=lambda g: (not g.growable, _first_position(g, order)))
    for new_id, group in enumerate(ordered):
        group.id = new_id
    return DimAnalysis(ordered, {axis: groups[index] for axis, index in component.items() if index in groups})


class _Components:
    """Union-find over axes: ``join`` two, then ``numbered`` gives each axis its component's number, components
    numbered in the order of their first axis in ``axes`` (and axes listed in that order)."""

    def __init__(self, axes: list[Axis]):
        self.parent = {axis: axis for axis in axes}

    def root(self, axis: Axis) -> Axis:
        parent = self.parent
        while parent[axis] != axis:
            parent[axis] = parent[parent[axis]]  # path halving
            axis = parent[axis]
        return axis

    def join(self, a: Axis, b: Axis) -> None:
        self.parent[self.root(a)] = self.root(b)

    def numbered(self, axes: list[Axis]) -> dict[Axis, int]:
        numbers: dict[Axis, int] = {}
        members: dict[int, list[Axis]] = {}
        for axis in axes:
            members.setdefault(numbers.setdefault(self.root(axis), len(numbers)), []).append(axis)
        return {axis: number for number, group in members.items() for axis in group}


def _join(graph: Graph, joined: "_Components", shapes: dict, a: Axis, b: Axis, node: str) -> None:
    """Join two coupled axes; a size-1 one coupled to a larger one is broadcast, and stays apart. Sizes the data
    decides (symbols, planned on meta) are joined only when they are known to be equal."""
    sa, sb = _size(shapes, a), _size(shapes, b)
    if statically_known_true(sa == sb):
        joined.join(a, b)
    elif statically_known_true(sa != 1) and statically_known_true(sb != 1) and statically_known_true(sa != sb):
        raise UnsupportedOpError(graph.op_kind(node), node, f"its rule couples axes of different sizes, {a} "
                                                             f"({sa}) and {b} ({sb})")


def _settle_size_one(graph: Graph, facts: Facts, joined: "_Components", shapes: dict) -> None:
    """Decide the size-1 axes the rules left open: a head axis of one head and a broadcast axis both have
    size 1. An axis is *real* when it is in a composition (a view's inferred ``-1`` splits one head out of a
    projection), or joined to one. A broadcasting op's size-1 output axis follows a real input axis
    (``Facts.follows``: the query's head axis through a rotary ``q * cos``), never a broadcast one; a reshape
    keeps a real size-1 axis in its run (one head merged back into the output projection), and drops a
    broadcast one (``Facts.runs``). Repeated until nothing changes: each join can make more axes real."""
    real = {joined.root(axis) for whole, parts, _, _ in facts.compositions for axis in (whole, *parts)}
    kept: set[Axis] = set()
    settled = False
    while not settled:
        settled = True
        for source, out, _ in facts.follows:
            if joined.root(source) in real and joined.root(out) != joined.root(source):
                joined.join(out, source)
                real = {joined.root(root) for root in real}
                settled = False
        for _, _, possible, _ in facts.runs:
            for axis in possible:
                if axis not in kept and joined.root(axis) in real:
                    kept.add(axis)
                    settled = False
    resolved = Facts()
    for a, b, possible, node in facts.runs:
        src, dst = a[0][0], b[0][0]
        reshape_run(resolved, node, sorted(a + [x for x in possible if x in kept and x[0] == src]),
                    sorted(b + [x for x in possible if x in kept and x[0] == dst]))
    for a, b, node in resolved.edges:
        _join(graph, joined, shapes, a, b, node)
    facts.compositions += resolved.compositions


def _size(shapes: dict, axis: Axis) -> int:
    ref, index = axis
    return shapes[ref][index]


def _groups(component: dict, facts: Facts, shapes: dict) -> dict[int, DimGroup]:
    groups: dict[int, DimGroup] = {}
    for axis, index in component.items():
        group = groups.setdefault(index, DimGroup(index, _size(shapes, axis), [], [], [], [], []))
        ref, number = axis
        if ref.startswith("p:"):
            group.members.append(Member(ref[2:], number, []))
        else:
            group.activations.append(axis)
    members = {(f"p:{m.tensor}", m.axis): m for g in groups.values() for m in g.members}
    for axis, role, node in facts.roles:
        if axis in members:
            members[axis].roles.append((role, node))
    for axis, kind, node in facts.reductions:
        groups[component[axis]].reductions.append((kind, node))
    for whole, parts, how, node in facts.compositions:
        composition = Composition(how, node, groups[component[whole]], [groups[component[p]] for p in parts])
        for group in dict.fromkeys([composition.whole, *composition.parts]):
            group.compositions.append(composition)
        for part in composition.parts:
            if how in ("factor", "repeat") and node not in part.encoded_by:
                part.encoded_by.append(node)
    for group in groups.values():
        group.members.sort(key=lambda m: (m.tensor, m.axis))
        group.reductions = sorted(set(group.reductions))
    return groups


def _block(facts: Facts, component: dict, groups: dict[int, DimGroup]) -> None:
    """An op without a rule couples nothing, so the analysis cannot tell what growing its axes would do to
    it: every group one of its axes is in is blocked, naming the op; the other groups are not. That includes
    groups without parameters, which grow as parts of others (the heads of ``heads x head_dim``: T5 builds its
    cross-attention bias with ``zeros(1, heads, q, k)``)."""
    for node_name, kind, axes, why in facts.opaque:
        for axis in axes:
            group = groups.get(component.get(axis, -1))
            if group is not None and (group.growable or group.compositions) \
                    and all(node != node_name for _, node, _ in group.blocked):
                members = group.role("produces") or group.members
                made = group.compositions[0] if group.compositions else None
                anchor = (f"parameter axis {members[0]}" if members
                          else f"an axis made of others ({made.how} at {made.node})")
                detail = f"{why}; " if why else ""
                group.blocked.append((kind, node_name, f"{detail}its axis {axis[1]} of {axis[0][2:]} is coupled "
                                                       f"to {anchor}"))


def _first_position(group: DimGroup, order: dict[str, int]) -> int:
    """Where in the graph (``order``: node name -> position) the group is first used."""
    positions = [order.get(node, 0) for m in group.members for _, node in m.roles] or [
        order.get(ref[2:].split("#")[0], 0) for ref, _ in group.activations
    ]
    return min(positions, default=0)


# -- turning nodes into calls ---------------------------------------------------------------------
def collect(graph: "Graph") -> tuple[Facts, dict[str, tuple]]:
    """Run every node's rule. Returns the facts and the shape of every ref."""
    facts = Facts()
    shapes: dict[str, tuple] = {}
    canonical = _canonical_names(graph)
    modules = dict(graph.module.named_modules(remove_duplicate=False))
    refs: dict[str, str] = {}
    prefix = {}
    for name, tensor in _named_tensors(graph.module):
        name = canonical.get(name, name)
        prefix[name] = "p:" if tensor.is_floating_point() or tensor.is_complex() else "c:"
        shapes[f"{prefix[name]}{name}"] = tuple(tensor.shape)
    for node in graph.module.graph.nodes:
        if node.op == "get_attr":
            name = canonical.get(str(node.target), str(node.target))
            refs[node.name] = f"{prefix.get(name, 'p:')}{name}"
            continue
        meta = node.meta.get("tensor_meta")
        if isinstance(meta, TensorMetadata):
            shapes[f"n:{node.name}"] = tuple(meta.shape)
            refs[node.name] = f"n:{node.name}"
        elif isinstance(meta, (tuple, list)):
            for i, part in enumerate(meta):
                if isinstance(part, TensorMetadata):
                    shapes[f"n:{node.name}#{i}"] = tuple(part.shape)
            refs[node.name] = f"n:{node.name}"
    for node in graph.module.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method") or graph.is_bookkeeping(node):
            continue
        call = _call(graph, node, refs, shapes, canonical, modules)
        rule = RULES.get(call.kind)
        if rule is None:
            facts.blind(node.name, graph.op_kind(node), all_axes(call), "no axis rule")
            continue
        try:
            rule(facts, call)
        except UnsupportedOpError as error:  # a form of a known op the rule cannot describe (grouped conv)
            facts.blind(node.name, graph.op_kind(node), all_axes(call), error.detail)
        except GuardOnDataDependentSymNode:  # planned on meta: a size the data decides (tokens per expert)
            facts.blind(node.name, graph.op_kind(node), all_axes(call), "its sizes depend on the data")
    return facts, shapes


def _named_tensors(module: torch.nn.Module):
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)
    for name, value in vars(module).items():  # constants torch.export lifted onto the root
        if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
            yield name, value


def _canonical_names(graph: "Graph") -> dict[str, str]:
    """Every name of a parameter or buffer mapped to the first name of its tensor (tied names share one)."""
    first: dict[int, str] = {}
    module = graph.module
    return {name: first.setdefault(id(tensor), name) for name, tensor in
            (*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False))}


def _ref(value, refs: dict[str, str]):
    if isinstance(value, torch.fx.Node):
        return refs.get(value.name, f"n:{value.name}")
    if isinstance(value, (list, tuple)):
        return type(value)(_ref(v, refs) for v in value)
    return value


MODULE_OPERANDS = {
    "linear": ("weight", "bias"),
    "conv": ("weight", "bias"),
    "batch_norm": ("weight", "bias", "running_mean", "running_var"),
}


def _call(graph: "Graph", node: torch.fx.Node, refs: dict, shapes: dict, canonical: dict, modules: dict) -> Call:
    module = None
    if node.op == "call_module":  # every module by path, looked up once per analysis
        module = modules[node.target] if node.target in modules else graph.module.get_submodule(node.target)
    kind = canonical_kind(graph, node, module)
    raw = (type(module).__name__ if module is not None else graph.op_kind(node)).rpartition(".")[2]
    out = f"n:{node.name}"
    operands = [_ref(a, refs) for a in node.args] + [
        _ref(v, refs) for k, v in node.kwargs.items() if k in ("attn_mask", "weight", "bias")
    ]
    if node.op == "call_module":

        def param(attr: str):
            return f"p:{canonical.get(f'{node.target}.{attr}', f'{node.target}.{attr}')}" if getattr(
                module, attr, None
            ) is not None else None

        if kind in MODULE_OPERANDS:
            operands = [operands[0], *(param(a) for a in MODULE_OPERANDS[kind])]
        elif kind == "embedding":
            operands = [param("weight"), operands[0]]
        elif kind == "layer_norm":
            operands = [operands[0], module.normalized_shape, param("weight"), param("bias")]
        elif kind == "rms_norm":
            operands = [operands[0], module.normalized_shape, param("weight")]
        elif kind == "flatten":
            kind = "view"
    elif kind == "embedding" and not isinstance(node.target, torch._ops.OpOverload):
        operands = [operands[1], operands[0]]  # F.embedding(input, weight) -> embedding(weight, input)
    elif kind == "batch_norm" and not isinstance(node.target, torch._ops.OpOverload):
        x, mean, var, weight, bias = (operands + [None] * 5)[:5]  # F.batch_norm's order
        operands = [x, weight, bias, mean, var]
    if f"{out}#0" in shapes and out not in shapes and kind in ("layer_norm", "batch_norm"):
        out = f"{out}#0"  # native_layer_norm / _native_batch_norm_legit return (output, stats...)
    return Call(node, kind, operands, out, shapes, raw=raw, module=module)
