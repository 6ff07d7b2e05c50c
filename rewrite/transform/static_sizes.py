"""Sizes read from shapes at run time, on axes a weight fixes, become literals before growth.

A hand-written model traced by fx computes sizes inside the graph: ``B, T, C = x.shape``,
``q, k, v = qkv(x).split(C, dim=-1)``, ``q.view(B, T, n_head, C // n_head)``. ``C`` is the width of the
residual stream, which the weights fix: it never varies at run time, yet the graph reads it from ``x``, so
every size computed from it (the split, the head size) follows ``x`` whatever grows. That couples what the model
only happens to have equal: after ``add_heads`` the query is wider than the stream, and ``split(C)`` would cut it
wrongly. torch.export already writes such sizes as literals (only batch and sequence stay symbolic); this
step does the same for fx graphs, so growth patches them like any literal size (``rewrite.ops.literals``):

    read = x.shape[i]  with axis i of x in a dimension group that reaches a parameter  ->  read = size (a literal)
    integer arithmetic on literals (C // n_head)                                      ->  its value

Reads of axes no weight fixes (batch, tokens) stay symbolic, so the graph still takes other input shapes.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from rewrite.analysis.dims import dim_analysis
from rewrite.errors import GrowfxError
from rewrite.ir.graph import Graph
from rewrite.ir.lazy_compile import compile_on_first_use
from rewrite.ops.literals import shape_read, whole_shape


# Integer arithmetic on sizes, folded once its operands are literals.
ARITHMETIC = {operator.floordiv, operator.mul, operator.add, operator.sub, operator.mod, operator.neg}


def static_sizes(graph: Graph, fixed: dict[str, int] | None = None) -> Graph:
    """``graph`` with every fx shape read of a weight-fixed axis replaced by its size (``graph`` itself when it
    has none). The result shares the module's tensors; only its node list is new (an ``in_place`` graph's is
    edited, and the result is in place too). ``fixed``: :func:`fixed_sizes` of a graph with the same nodes
    (the traced graph ``graph`` is a copy of, whose analysis it holds), instead of analysing ``graph``."""
    fixed = fixed_sizes(graph) if fixed is None else fixed
    if not fixed:
        return graph
    in_place = graph.in_place
    shared = {id(t): t for t in (*graph.module.parameters(), *graph.module.buffers())}
    module = graph.module_to_edit(shared)  # its own nodes and module tree (in place: the graph's), the same tensors
    fx_graph = module.graph
    for node in list(fx_graph.nodes):
        if node.name in fixed:
            value = fixed[node.name]
        elif node.op == "call_function" and node.target in ARITHMETIC and node.args \
                and all(type(a) is int for a in node.args) and not node.kwargs:
            value = node.target(*node.args)  # C // n_head once C is a literal: the head size, a literal too
        else:
            continue
        node.replace_all_uses_with(value)
        fx_graph.erase_node(node)
    for node in reversed(list(fx_graph.nodes)):  # the shape tuples nothing reads any more
        if whole_shape(node) is not None and not node.users:
            fx_graph.erase_node(node)
    compile_on_first_use(module)
    return graph.with_module(module, disposable=graph.disposable, in_place=in_place)


def fixed_sizes(graph: Graph) -> dict[str, int]:
    """The fx shape reads of ``graph`` whose axis a weight fixes: node name -> the size it reads."""
    # fx's reads only: torch.export already wrote weight-fixed sizes as literals and reads just symbolic ones
    reads = [(node, *read) for node in graph.module.graph.nodes
             if (read := shape_read(node, exported=False)) is not None]
    if not reads:
        return {}
    try:
        analysis = dim_analysis(graph)
    except GrowfxError:  # the passes will report what the analysis cannot do
        return {}
    fixed = {}
    for node, tensor, axis in reads:
        shape = graph.shape(tensor) if isinstance(tensor, torch.fx.Node) else None
        if shape is None or not isinstance(axis, int) or not -len(shape) <= axis < len(shape):
            continue
        group = analysis.axis_group.get((f"n:{tensor.name}", axis % len(shape)))
        if group is not None and group.growable:
            fixed[node.name] = int(shape[axis])
    return fixed
