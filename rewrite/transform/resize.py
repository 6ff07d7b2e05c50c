"""Resizing one dimension group: the engine step every width pass is built on.

``check_resize`` says, before anything runs, whether a group can grow with a policy and whether the
result is exact (and if not, why). ``resize`` builds the grown Graph from a :class:`Layout` per grown
group: the policy says, role by role, which growth-map ops make each grown tensor, and each is made once by
running them (allocated once, filled by slices); everything else is cloned so the grown model owns its
parameters (training it never touches the original) and tied tensors stay tied; standard modules' size
attributes and the literal sizes in views, norms and splits follow. The grown graph's lineage carries the
growth map and ``node_map``, projecting each grown activation back onto the original units
(``old_positions``), so ``rewrite.verify`` names the first node a faulty rule breaks.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

from rewrite.analysis.dims import DimGroup
from rewrite.errors import GrowthError
from rewrite.ir.graph import Graph, attribute
from rewrite.ir.lazy_compile import compile_on_first_use
from rewrite.analysis.layout import Layout
from rewrite.analysis.propagate import layouts
from rewrite.ops import canonical_kind, patch_literals, patch_split, resize_module_attributes
from rewrite.transform.growth_map import GrowthMap, Recipe, shapes_of, tensor_names
from rewrite.transform.growth_ops import seed_for
from rewrite.transform.run_ops import run_ops
from rewrite.transform.lineage import grown_lineage

GROWABLE_ROLES = {"produces", "consumes", "along"}


@dataclasses.dataclass
class ResizeCheck:
    refusal: str | None  # why it cannot be done at all
    not_exact: str | None  # why the result would not be exact (None: exact)


def check_resize(
    graph: Graph, group: DimGroup, new_size: int, policy, handled: tuple[str, ...] = (), tied: bool = False
) -> ResizeCheck:
    """Can ``group`` grow to ``new_size`` with ``policy``, and exactly? ``handled``: compositions the caller
    resizes consistently itself (``factor``/``concat`` for head-aware rules); ``tied``: the caller fills a
    weight that both produces and consumes the axis consistently (zero new columns serve both uses)."""
    refusal = policy.check(group.size, new_size) or _structural_refusal(graph, group, handled, tied)
    return ResizeCheck(refusal, None if refusal else policy.exact(group.reductions))


def refuse_blocked(groups) -> None:
    """Raises ``UnsupportedOpError`` (naming the op and node) when one of ``groups`` is blocked by an op
    without axis semantics: growing it could break that op."""
    for group in groups:
        error = group.unsupported()
        if error is not None:
            raise error


def _structural_refusal(graph: Graph, group: DimGroup, handled: tuple[str, ...], tied: bool) -> str | None:
    for member in group.members:
        roles = set(member.role_names)
        if not roles:
            return f"{member} is reached only through ops that carry no role (e.g. indexed experts)"
        if roles - GROWABLE_ROLES:
            return f"{member} is {'/'.join(sorted(roles - GROWABLE_ROLES))} along the axis"
        if {"produces", "consumes"} <= roles and not tied:
            return f"{member} both produces and consumes the axis (a tied weight)"
    for composition in group.compositions:
        if composition.how in handled:
            continue
        what = {"factor": "split into heads or merged", "concat": "concatenated or split"}.get(
            composition.how, f"{composition.how}d"
        )
        return (
            f"the axis is {what} at node {composition.node}; growing it needs a head-aware rule "
            f"(add_heads / widen_heads)"
        )
    boundary = _boundary_nodes(graph)
    for ref, axis in group.activations:
        name = ref[2:].split("#")[0]
        if name in boundary:
            return f"axis {axis} of {name} is an {boundary[name]} of the model"
    return None


def _boundary_nodes(graph: Graph) -> dict[str, str]:
    nodes = {n.name: "input" for n in graph.module.graph.nodes if n.op == "placeholder"}
    output = next(n for n in graph.module.graph.nodes if n.op == "output")
    for leaf in pytree.tree_leaves(output.args):
        if isinstance(leaf, torch.fx.Node):
            nodes[leaf.name] = "output"
    return nodes


def grow(graph: Graph, sizes: dict[DimGroup, int], policy, seed: int = 0, overrides=None, finish=None) -> Graph:
    """Grow every group to its new size: the policy lays out the base groups, compositions the rest
    (``rewrite.propagate.layouts``), then :func:`resize`."""
    generator = torch.Generator().manual_seed(seed)
    return resize(graph, layouts(sizes, policy, generator), policy, seed, overrides, finish)


def resize(
    graph: Graph, layouts: dict[DimGroup, Layout], policy, seed: int = 0, overrides=None, finish=None
) -> Graph:
    """A new Graph in which every group in ``layouts`` has grown to its layout, made by ``policy``.

    Each member's role asks the policy for growth-map ops (``overrides`` maps a group or a tensor name to
    another policy: the key side when the key size grows, a norm gain); each grown tensor is its recipe run
    once on the old tensor, and the grown graph's lineage carries the map. ``finish(module)`` edits the new
    GraphModule before it is compiled (an epsilon). Untouched tensors are cloned, unless ``graph.disposable``
    (an intermediate of ``apply``) lets them move; an ``in_place`` graph's module is edited itself."""
    refuse_blocked(layouts)
    overrides = overrides or {}
    steps: dict[str, list] = defaultdict(list)  # tensor -> its ops, axis after axis
    for group, layout in layouts.items():
        for member in group.members:
            chosen = overrides.get(member.tensor) or overrides.get(group, policy)
            role = "produces" if {"produces", "consumes"} <= set(member.role_names) else member.role_names[0]
            ops = getattr(chosen, role)(member.axis, layout, seed_for(seed, member.tensor, member.axis))
            steps[member.tensor].extend(ops)
    if layouts and not steps:  # one head written as a literal 1, say: only literal sizes would change
        grown = ", ".join(f"{group.size} -> {layout.new_size} ({group.activations[0][0][2:]})"
                          for group, layout in list(layouts.items())[:3] if group.activations)
        raise GrowthError(f"the axes to grow ({grown}) hold no parameter, so no tensor would grow")
    memo, made = {}, {}
    for name, ops in steps.items():
        old = attribute(graph.module, name)
        grown = run_ops(old, ops)
        grown = torch.nn.Parameter(grown, old.requires_grad) if isinstance(old, torch.nn.Parameter) else grown
        memo[id(old)] = grown
        made[id(grown)] = Recipe(name, tuple(ops))
    names, original = list(tensor_names(graph.module).values()), shapes_of(graph.module)  # before an edit in place
    module = graph.module_to_edit(memo)
    for sub in module.modules():
        resize_module_attributes(sub)
    if finish is not None:
        finish(module)
    grown_axes = _grown_axes(layouts)
    node_map = _patch_nodes(graph, module, grown_axes)
    compile_on_first_use(module)
    _grown_metadata(module, grown_axes)
    kept = {id(attribute(module, name)): name for name in names}
    step = GrowthMap.between(original, module, made, kept)
    lineage = grown_lineage(graph.lineage, step, node_map=_compose(graph.lineage.node_map, node_map))
    return graph.with_module(module, lineage)


def _grown_axes(layouts: dict[DimGroup, Layout]) -> dict[str, dict[int, Layout]]:
    """Every grown activation: node name (``name#i`` for a tuple element) -> {axis: its group's layout}."""
    grown: dict[str, dict[int, Layout]] = defaultdict(dict)
    for group, layout in layouts.items():
        for ref, axis in group.activations:
            grown[ref[2:]][axis] = layout
    return grown


def _grown_metadata(module: torch.fx.GraphModule, grown_axes: dict[str, dict[int, Layout]]) -> None:
    """Every node's shape after growth, from the analysis instead of a forward pass: each grown activation
    axis takes its group's new size, each tensor read the shape of its tensor. (``apply`` still runs and
    verifies the grown graph.)"""
    sizes = {name: {axis: layout.new_size for axis, layout in axes.items()} for name, axes in grown_axes.items()}
    for node in module.graph.nodes:
        if node.op == "get_attr":  # a tensor read: the tensor itself says
            value = attribute(module, str(node.target))
            if isinstance(value, torch.Tensor):
                node.meta["tensor_meta"] = _extract_tensor_metadata(value)
            continue
        meta = node.meta.get("tensor_meta")
        if isinstance(meta, TensorMetadata):  # a NamedTuple: test it before tuples of metadata
            node.meta["tensor_meta"] = _resized(meta, sizes.get(node.name, {}))
        elif isinstance(meta, (tuple, list)):
            node.meta["tensor_meta"] = type(meta)(
                _resized(part, sizes.get(f"{node.name}#{i}", {})) if isinstance(part, TensorMetadata) else part
                for i, part in enumerate(meta)
            )


def _resized(meta: TensorMetadata, axes: dict[int, int]) -> TensorMetadata:
    if not axes:
        return meta
    shape = torch.Size(axes.get(i, size) for i, size in enumerate(meta.shape))
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return meta._replace(shape=shape, stride=stride)


def _patch_nodes(graph: Graph, module: torch.fx.GraphModule, grown_axes: dict[str, dict[int, Layout]]) -> dict:
    """Rewrite literal sizes of grown axes; return the projection of every grown node onto old units."""
    elements: dict[str, dict[int, dict[int, Layout]]] = defaultdict(dict)  # tuple node -> element -> axes
    for name, axes in grown_axes.items():
        base, _, index = name.partition("#")
        if index:
            elements[base][int(index)] = axes
    for node in module.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        kind = canonical_kind(graph, graph.node(node.name))
        if node.name in grown_axes:
            axes = grown_axes[node.name]
            patch_literals(node, kind, {axis: (layout.old_size, layout.new_size) for axis, layout in axes.items()})
        if kind == "split" and node.name in elements:
            patch_split(node, elements[node.name])
    return {name: (name, _project(axes)) for name, axes in grown_axes.items() if "#" not in name}


def _project(axes: dict[int, Layout]):
    def project(value):
        for axis, layout in axes.items():
            value = value.narrow(axis, 0, layout.old_size) if layout.prefix else value.index_select(
                axis, layout.old_positions
            )
        return value

    return project


def _compose(previous: dict | None, current: dict) -> dict:
    """Chain node maps across passes: grown twice, projected back twice."""
    if not previous:
        return current
    combined = dict(previous)
    for name, (ref_name, projection) in current.items():
        if name in previous:
            earlier_name, earlier = previous[name]
            combined[name] = (earlier_name, lambda v, a=projection, b=earlier: b(a(v)))
        else:
            combined[name] = (ref_name, projection)
    return combined

