"""Shapes of an edit's new nodes recalled from nodes of the same signature (``rewrite.ir.shape_memo``): only
where calling the same thing on inputs of the same shapes gives the same shapes, and always the shapes a run
of the whole graph gives."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import passes
import rewrite
import rewrite.ir.graph as graph_module
from conftest import traced
from rewrite.transform.materialise import on_meta


class _Flattens(torch.nn.Module):
    """A linear layer, then ``Flatten(start)``: a module whose output shape depends on a plain attribute."""

    def __init__(self, start: int):
        super().__init__()
        self.linear = torch.nn.Linear(5, 5)
        self.flatten = torch.nn.Flatten(start)

    def forward(self, x):
        return self.flatten(self.linear(x))


def _meta_runs(monkeypatch) -> list[torch.fx.Node]:
    """The nodes ``propagate_changed`` runs meta kernels for, from now on."""
    ran, run = [], graph_module.run_on_meta

    def counting(module, node, *args):
        ran.append(node)
        return run(module, node, *args)

    monkeypatch.setattr(graph_module, "run_on_meta", counting)
    return ran


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 3), st.integers(0, 3), st.integers(1, 3))
def test_property_a_new_node_gets_the_shape_a_run_gives_recalled_only_from_an_equal_module(start, new_start, rows):
    """A new ``Flatten(new_start)`` beside a recorded ``Flatten(start)`` on the same input: the same module
    state is recalled (no meta kernel runs for it), another start dimension is computed; the shapes are those
    of running the whole graph either way. A node reading a new linear layer of another width is computed.
    (A MonkeyPatch of its own: hypothesis runs the test many times within one function-scoped fixture.)"""
    monkeypatch = pytest.MonkeyPatch()
    try:
        graph = on_meta(rewrite.trace(_Flattens(start), (torch.randn(rows, 2, 3, 5),)))
        module = graph.module
        module.add_submodule("flatten_2", torch.nn.Flatten(new_start))
        module.add_submodule("linear_2", torch.nn.Linear(5, 7, device="meta"))
        linear = next(n for n in module.graph.nodes if n.target == "linear")
        with module.graph.inserting_after(linear):
            flat = module.graph.call_module("flatten_2", (linear,))
        with module.graph.inserting_after(flat):
            wider = module.graph.call_module("linear_2", (linear,))
        ran = _meta_runs(monkeypatch)
        assert graph.propagate_changed({flat, wider})
        assert (flat in ran) == (new_start != start)
        assert wider in ran
        recalled = {node.name: graph.shape(node) for node in module.graph.nodes}
        monkeypatch.undo()
        graph.propagate_shapes(torch.randn(rows, 2, 3, 5, device="meta"))
        assert recalled == {node.name: graph.shape(node) for node in module.graph.nodes}
        assert graph.shape(wider) == (rows, 2, 3, 7)
    finally:
        monkeypatch.undo()


def test_a_copied_block_has_the_shapes_of_the_block_it_copies_without_running_its_layers(monkeypatch):
    """``add_layers(1, init="copy")`` on meta (the block appended after the last of two): none of its layers (linear, layer norm, the
    attention's matrix products) runs a meta kernel; what runs is the size reads and views on their values."""
    _, traced_graph = traced("gpt")
    planned = on_meta(traced_graph)
    ran = _meta_runs(monkeypatch)
    grown = rewrite.apply(planned, [passes.add_layers(1, init="copy")], planned.example_args,
                          verify=False).graph
    layers = [node for node in grown.nodes if node.op == "call_module" and node.target.startswith("blocks.2.")]
    assert len(layers) == 9  # the new third block: two layer norms, q, k, v, o, the MLP's two layers and GELU
    assert [node for node in ran if node.op == "call_module"] == []
    assert {str(node.target) for node in ran} <= {"<built-in function getattr>", "<built-in function getitem>",
                                                 "view", "reshape"}


@pytest.mark.parametrize("experts", [2, 4])
def test_a_shape_computed_once_in_an_edit_is_recalled_for_every_later_node_of_its_signature(monkeypatch, experts):
    """``upcycle_moe`` on meta makes each block's MLP ``experts`` copies behind a router, in both blocks: only
    the first expert of the first block runs its layers' meta kernels (the others, and the second block, have
    their signatures), and the router's comparison with each expert's index runs once per index; the shapes
    are those of running the whole graph."""
    _, traced_graph = traced("gpt")
    planned = on_meta(traced_graph)
    ran = _meta_runs(monkeypatch)
    grown = rewrite.apply(planned, [passes.upcycle_moe(experts, 2)], planned.example_args, verify=False).graph
    assert sum(node.target.startswith("blocks.1.experts.") for node in grown.nodes if node.op == "call_module") == \
        3 * experts  # each expert: fc, act, proj
    assert sorted(str(node.target) for node in ran if node.op == "call_module") == \
        ["blocks.0.experts.0.act", "blocks.0.experts.0.fc", "blocks.0.experts.0.proj"]
    assert [node.args[1] for node in ran if node.target == torch.ops.aten.eq.Scalar] == list(range(experts))
    assert not [node for node in ran if node.op != "get_attr" and "blocks_1" in node.name]
    recalled = {node.name: grown.shape(node) for node in grown.nodes}
    monkeypatch.undo()
    grown.propagate_shapes(*planned.example_args)
    assert recalled == {node.name: grown.shape(node) for node in grown.nodes}
