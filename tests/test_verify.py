"""Verification: exact self-comparison, tolerances by dtype, and the first diverging node."""

import copy

import pytest
import torch
import torch.nn as nn
from conftest import traced
from hypothesis import given, settings
from hypothesis import strategies as st

import rewrite
from rewrite.app import zoo
from rewrite.ir.compare import compare_tensors


def perturbed(graph: rewrite.Graph, parameter: str, amount: float = 0.5) -> rewrite.Graph:
    """A copy of the graph with random noise on one parameter (a constant shift could vanish in a norm)."""
    other = copy.deepcopy(graph)
    weight = other.module.get_parameter(parameter)
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        weight.add_(amount * noise)
    return other


@pytest.mark.parametrize("name", zoo.NAMES)
def test_graph_against_itself_is_exact(name):
    built, graph = traced(name)
    report = rewrite.verify(graph, graph, built.args, built.kwargs)
    assert report.ok and report.max_abs_error == 0.0 and report.first_divergence is None


@pytest.mark.parametrize(
    "name, parameter, reader",
    [
        ("gpt", "blocks.1.fc.weight", "blocks_1_fc"),
        ("cnn", "conv2.weight", "conv2"),
        ("llama", "blocks.0.mlp.up.weight", "blocks_0_mlp_up"),
        ("hf-llama", "model.layers.1.mlp.up_proj.weight", None),
        ("hf-gpt2", "transformer.h.0.attn.c_proj.weight", None),
        ("hf-bert", "encoder.layer.1.intermediate.dense.weight", None),
    ],
)
def test_perturbed_weight_is_caught_at_the_node_that_reads_it(name, parameter, reader):
    built, graph = traced(name)
    report = rewrite.verify(graph, perturbed(graph, parameter), built.args, built.kwargs)
    assert not report.ok
    assert report.max_abs_error > 1e-3
    readers = graph.tensors()[parameter].readers
    assert report.first_divergence in readers
    if reader is not None:
        assert report.first_divergence == reader
    assert f"first diverging node: {report.first_divergence}" in str(report)


def test_module_against_its_graph_reports_named_outputs():
    built, graph = traced("hf-bert")
    report = rewrite.verify(built.model, graph, built.args)
    assert [row.name for row in report.rows] == ["last_hidden_state", "pooler_output"]
    assert report.ok


def test_nested_outputs_are_compared_leaf_by_leaf():
    def reference(x):
        return {"a": x, "b": [x * 2, (x + 1, None)], "n": 3}

    def candidate(x):
        return {"a": x, "b": [x * 2, (x + 1.5, None)], "n": 3}

    x = torch.ones(2)
    report = rewrite.verify(reference, candidate, (x,))
    assert [r.name for r in report.rows] == ["a", "b.0", "b.1.0", "b.1.1", "n"]
    assert [r.ok for r in report.rows] == [True, True, False, True, True]
    assert report.max_abs_error == pytest.approx(0.5)
    assert report.max_rel_error == pytest.approx(0.25)


def test_shape_and_structure_differences_fail_with_the_reason():
    report = rewrite.verify(lambda x: x, lambda x: x[:1], (torch.ones(2, 3),))
    assert not report.ok and "shape [2, 3] != [1, 3]" in report.rows[0].note
    report = rewrite.verify(lambda x: (x, x), lambda x: x, (torch.ones(2),))
    assert not report.ok and "structure differs" in report.rows[0].note


@pytest.mark.parametrize(
    "dtype, within, beyond",
    [(torch.float64, 1e-11, 1e-9), (torch.float32, 1e-6, 1e-4), (torch.float16, 1e-3, 5e-2)],
)
def test_default_tolerance_depends_on_dtype_relative_to_output_scale(dtype, within, beyond):
    reference = torch.full((4,), 10.0, dtype=dtype)
    assert compare_tensors("x", reference, reference * (1 + within)).ok
    assert not compare_tensors("x", reference, reference * (1 + beyond)).ok


def test_integer_outputs_must_be_equal_and_nan_is_a_mismatch():
    assert not compare_tensors("ids", torch.tensor([1, 2]), torch.tensor([1, 3])).ok
    assert compare_tensors("ids", torch.tensor([1, 2]), torch.tensor([1, 2])).ok
    row = compare_tensors("x", torch.tensor([1.0, 2.0]), torch.tensor([1.0, float("nan")]))
    assert not row.ok and "NaN" in row.note


def test_explicit_tolerances_override_defaults():
    x = torch.ones(3)
    assert rewrite.verify(lambda x: x, lambda x: x + 0.01, (x,), atol=0.02, rtol=0).ok
    assert not rewrite.verify(lambda x: x, lambda x: x + 0.01, (x,), atol=0.001, rtol=0).ok


def test_fp64_model_verifies_at_fp64_tolerance():
    built = zoo.build("gpt")
    model = built.model.double()
    graph = rewrite.trace(model, built.args)
    report = rewrite.verify(model, graph, built.args)
    assert report.ok and report.rows[0].tolerance < 1e-8


def test_report_prints_a_table():
    built, graph = traced("mlp")
    text = str(rewrite.verify(built.model, graph, built.args))
    assert text.splitlines()[0].startswith("verify: OK")
    assert "output" in text and "4x4" in text


# -- property: random MLPs and CNN stacks ---------------------------------------------------------
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


@st.composite
def mlps(draw):
    widths = draw(st.lists(st.integers(1, 12), min_size=2, max_size=5))
    activation = draw(st.sampled_from(sorted(ACTIVATIONS)))
    norm = draw(st.booleans())
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers.append(nn.Linear(a, b, bias=draw(st.booleans())))
        if norm:
            layers.append(nn.LayerNorm(b))
        layers.append(ACTIVATIONS[activation]())
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    model = nn.Sequential(*layers[:-1])
    x = torch.randn(draw(st.integers(1, 4)), widths[0])
    return model, x, [i for i, m in enumerate(model) if isinstance(m, nn.Linear)]


@settings(max_examples=25, deadline=None)
@given(mlps(), st.data())
def test_property_any_mlp_traces_exactly_and_a_broken_layer_is_located(case, data):
    model, x, linear_indices = case
    before = [p.clone() for p in model.parameters()]
    graph = rewrite.trace(model, (x,))
    assert rewrite.verify(model, graph, (x,)).max_abs_error == 0.0
    index = data.draw(st.sampled_from(linear_indices))
    parameter = f"{index}.weight"
    (reader,) = graph.parameters()[parameter].readers
    report = rewrite.verify(graph, perturbed(graph, parameter, amount=1.0), (x,))
    if not report.ok:  # a ReLU can hide the change from the output; when it shows, it is located
        assert report.first_divergence == reader
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def widened_by_hand(small: nn.Sequential, extra: int) -> nn.Sequential:
    """Linear(4, h) -> ReLU -> Linear(h, 2) grown to h + extra hidden units with zero fan-in (exact)."""
    first, last = small[0], small[2]
    hidden = first.out_features
    big = nn.Sequential(nn.Linear(4, hidden + extra), nn.ReLU(), nn.Linear(hidden + extra, 2))
    with torch.no_grad():
        big[0].weight[:hidden] = first.weight
        big[0].bias[:hidden] = first.bias
        big[2].weight.zero_()
        big[2].weight[:, :hidden] = last.weight
        big[2].bias.copy_(last.bias)
    return big


def test_node_map_projects_grown_values_back_to_find_the_broken_node():
    torch.manual_seed(0)
    small = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    big = widened_by_hand(small, extra=3)
    x = torch.randn(5, 4)
    reference = rewrite.trace(small, (x,))
    traced = rewrite.trace(big, (x,))
    projection = {name: (name, lambda v: v[..., :8]) for name in ("_0", "_1")}
    grown = traced.with_module(traced.module, rewrite.Lineage(node_map=projection))
    assert rewrite.verify(reference, grown, (x,)).ok
    with torch.no_grad():
        big[2].bias.add_(1.0)  # break the last layer of the grown model only
    report = rewrite.verify(reference, grown, (x,))
    assert not report.ok and report.first_divergence == "_2"
    # without the projection the widened first layer is (wrongly) blamed
    assert rewrite.verify(reference, traced, (x,)).first_divergence == "_0"


def test_node_map_locates_a_break_inside_a_widened_layer():
    torch.manual_seed(1)
    small = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    big = widened_by_hand(small, extra=3)
    with torch.no_grad():
        big[0].bias[:8] += 1.0  # the old units of the widened layer now compute something else
    x = torch.randn(5, 4)
    traced = rewrite.trace(big, (x,))
    projection = {name: (name, lambda v: v[..., :8]) for name in ("_0", "_1")}
    grown = traced.with_module(traced.module, rewrite.Lineage(node_map=projection))
    report = rewrite.verify(rewrite.trace(small, (x,)), grown, (x,))
    assert not report.ok and report.first_divergence == "_0"
