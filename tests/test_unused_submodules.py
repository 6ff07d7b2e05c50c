"""``Editor.erase`` drops the modules no node uses any more with its own pass over the graph
(``edit._delete_unused_submodules``): the same modules as torch's ``GraphModule.delete_all_unused_submodules``,
on module trees and graphs drawn at random."""

from __future__ import annotations

import torch
import torch.fx
from hypothesis import given, settings
from hypothesis import strategies as st

from rewrite.transform.edit import _delete_unused_submodules

NAMES = ("a", "b", "0", "1")


@st.composite
def trees(draw, depth: int = 3) -> dict:
    """A module tree as nested dicts: name -> subtree (a module with a parameter ``w`` when it is a leaf)."""
    if depth == 0:
        return {}
    names = draw(st.lists(st.sampled_from(NAMES), max_size=3, unique=True))
    return {name: draw(trees(depth - 1)) for name in names}


def _build(tree: dict, root: bool = True) -> torch.nn.Module:
    module = torch.nn.Module()
    if not tree and not root:
        module.w = torch.nn.Parameter(torch.zeros(1))
    for name, sub in tree.items():
        module.add_module(name, _build(sub, root=False))
    return module


def _graph_module(tree: dict, shared: str | None, calls: list[str], reads: list[str]) -> torch.fx.GraphModule:
    """A GraphModule holding the modules of ``tree`` (``shared`` reached by a second path too) whose graph calls
    ``calls`` and reads ``reads``, as drawn: not checked against the tree (a target may be missing)."""
    root = _build(tree)
    if shared is not None:
        root.add_module("shared", root.get_submodule(shared))
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    for target in calls:
        graph.call_module(target, (x,))
    for target in reads:
        graph.get_attr(target)
    graph.output(x)
    module = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
    for name, child in root.named_children():
        module.add_module(name, child)
    module.graph = graph
    return module


@settings(max_examples=200, deadline=None)
@given(trees(), st.data())
def test_property_the_same_modules_as_torchs_delete_all_unused_submodules(tree, data):
    modules = [name for name, _ in _build(tree).named_modules() if name]
    tensors = [name for name, _ in _build(tree).named_parameters()]
    shared = data.draw(st.sampled_from(modules)) if modules and data.draw(st.booleans()) else None
    paths = [*modules, *tensors, "missing", "a.missing", *(["shared"] if shared else [])]
    calls = data.draw(st.lists(st.sampled_from(paths), max_size=4))
    reads = data.draw(st.lists(st.sampled_from(paths), max_size=4))
    theirs, ours = (_graph_module(tree, shared, calls, reads) for _ in range(2))
    theirs.delete_all_unused_submodules()
    _delete_unused_submodules(ours)
    kept = [name for name, _ in ours.named_modules(remove_duplicate=False)]
    assert kept == [name for name, _ in theirs.named_modules(remove_duplicate=False)]
