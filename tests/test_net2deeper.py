"""passes.net2deeper: an identity layer after an idempotent activation (linear and convolution)."""

import pytest
import torch
from conftest import traced
from torch import nn

import passes
import rewrite


@pytest.mark.parametrize("name, after, added", [
    ("mlp", "layers.0", 32 * 32 + 32),  # identity matrix and zero bias of the layer's width
    ("mlp", "layers.1", 32 * 32 + 32),
    ("cnn", "conv1", 8 * 8 * 9 + 8),  # a 3x3 identity kernel for a 3x3 conv, after BatchNorm and ReLU
    ("cnn", "conv2", 16 * 16 * 9 + 16),
])
def test_net2deeper_is_exact_after_relu(name, after, added):
    built, graph = traced(name)
    grown = rewrite.apply(graph, [passes.net2deeper(after)], built.args, built.kwargs)
    (record,) = grown.report.passes
    assert record.exact and record.plan.sites == [after]
    assert record.added == [f"{after}_deeper.weight", f"{after}_deeper.bias"]
    assert record.parameters_after - record.parameters_before == added
    with torch.no_grad():
        torch.testing.assert_close(grown.module(*built.args), built.model(*built.args), rtol=1e-6, atol=1e-6)
    kinds = grown.graph.op_counts()
    assert kinds[graph.op_kind(graph.node(next(n.name for n in graph.compute_nodes()
                                                if graph.owner(n) == after)))] >= 1


def test_identity_kernel_and_matrix_values():
    built, graph = traced("cnn")
    grown = rewrite.apply(graph, [passes.net2deeper("conv1")], built.args, built.kwargs)
    weight = dict(grown.module.named_parameters())["conv1_deeper.weight"]
    expected = torch.zeros(8, 8, 3, 3)
    expected[range(8), range(8), 1, 1] = 1
    assert torch.equal(weight, expected)


@pytest.mark.parametrize("act, kind", [(nn.GELU(), "gelu"), (nn.SiLU(), "silu"), (nn.Tanh(), "tanh")])
def test_non_idempotent_activations_are_refused_and_measured_on_request(act, kind):
    model = nn.Sequential(nn.Linear(4, 8), act, nn.Linear(8, 2)).eval()
    x = torch.randn(3, 4)
    with pytest.raises(rewrite.NotExactError, match=f"{kind} after 0 is not idempotent"):
        rewrite.apply(model, [passes.net2deeper("0")], (x,))
    grown = rewrite.apply(model, [passes.net2deeper("0", exact=False)], (x,))
    (record,) = grown.report.passes
    assert record.exact is False and record.verification.max_abs_error > 0
    with torch.no_grad():
        measured = (grown.module(x) - model(x)).abs().max().item()
    assert record.verification.max_abs_error == pytest.approx(measured, rel=1e-6)


def test_a_layer_without_activation_or_a_wrong_name_says_so():
    built, graph = traced("mlp")
    for after in ("layers.2", "nope"):  # the last layer feeds the output; "nope" does not exist
        with pytest.raises(rewrite.GrowthError, match=f"no linear or convolution named '{after}' followed by"):
            rewrite.apply(graph, [passes.net2deeper(after)], built.args, built.kwargs)


def test_net2deeper_then_widen_still_exact():
    built, graph = traced("mlp")
    grown = rewrite.apply(graph, [passes.net2deeper("layers.0"), passes.widen("layers.0_deeper", factor=2)],
                          built.args, built.kwargs)
    assert all(r.exact for r in grown.report.passes)
    with torch.no_grad():
        torch.testing.assert_close(grown.module(*built.args), built.model(*built.args), rtol=1e-5, atol=1e-6)
