"""passes.widen_mlp: the MLP intermediate size of every block, found from the dimension analysis."""

import pytest
import torch
from conftest import traced

import passes
import rewrite

# model, intermediate size p, parameters per new unit (input rows + biases + output columns), blocks
TRANSFORMERS = [
    ("gpt", 64, 32 + 1 + 32, 2),
    ("llama", 48, 32 * 3, 2),  # SwiGLU: gate and up rows, down columns, no biases
    ("hf-gpt2", 128, 32 + 1 + 32, 2),
    ("hf-llama", 48, 32 * 3, 2),
    ("hf-qwen2", 48, 32 * 3, 2),
    ("hf-bert", 64, 32 + 1 + 32, 2),
    ("hf-mixtral", 48, 4 * 32 * 3, 2),  # 4 batched experts, fused gate|up rows split by chunk, down columns
]


@pytest.mark.parametrize("init", ["zero", "clone", "net2net"])
@pytest.mark.parametrize("name, p, per_unit, blocks", TRANSFORMERS)
def test_widen_mlp_is_exact_on_every_block(name, p, per_unit, blocks, init):
    built, graph = traced(name)
    grown = rewrite.apply(graph, [passes.widen_mlp(factor=2, init=init)], built.args, built.kwargs)
    (record,) = grown.report.passes
    assert len(record.plan.sites) == blocks
    assert all(size == 2 * group.size for group, size in record.plan.groups)  # fused gate|up wholes too
    assert p in {group.size for group, _ in record.plan.groups}
    assert record.parameters_after - record.parameters_before == blocks * p * per_unit
    assert record.verification.max_rel_error <= 1e-5


def test_layers_restricts_the_blocks():
    built, graph = traced("hf-llama")
    grown = rewrite.apply(graph, [passes.widen_mlp(size=80, layers=[1])], built.args)
    assert grown.report.passes[0].plan.sites == ["model.layers.1"]
    assert grown.graph.module.get_submodule("model.layers.1.mlp.down_proj").weight.shape[1] == 80
    assert grown.graph.module.get_submodule("model.layers.0.mlp.down_proj").weight.shape[1] == 48


def test_fused_gate_up_grows_each_part_with_one_layout():
    built, graph = traced("hf-mixtral")
    grown = rewrite.apply(graph, [passes.widen_mlp(size=56, init="net2net")], built.args)
    fused = grown.graph.module.get_parameter("model.layers.0.mlp.experts.gate_up_proj")
    old = graph.module.get_parameter("model.layers.0.mlp.experts.gate_up_proj")
    assert fused.shape == (4, 112, 32)
    torch.testing.assert_close(fused[:, :48], old[:, :48])  # gate rows keep their places
    torch.testing.assert_close(fused[:, 56:104], old[:, 48:])  # up rows moved behind the grown gate part
    for j in range(8):  # new unit j: its gate row and its up row copy one and the same old unit
        (source,) = [s for s in range(48) if torch.equal(fused[:, 48 + j], old[:, s])]
        assert torch.equal(fused[:, 104 + j], old[:, 48 + source])
    assert grown.report.passes[0].verification.max_rel_error <= 1e-5


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_models_without_transformer_blocks_match_nothing(name):
    built, graph = traced(name)
    grown = rewrite.apply(graph, [passes.widen_mlp(factor=2)], built.args)
    assert "matched nothing" in str(grown.report.passes[0])
    with pytest.raises(rewrite.GrowthError, match="matched nothing"):
        rewrite.apply(graph, [passes.widen_mlp(factor=2)], built.args, strict=True)


def test_widen_mlp_then_widen_composes_and_exports(tmp_path):
    built, graph = traced("hf-gpt2")
    steps = [passes.widen_mlp(factor=2), passes.widen("transformer.h.1.mlp.c_fc", size=300, init="net2net")]
    grown = rewrite.apply(graph, steps, built.args)
    assert all(r.verification.ok for r in grown.report.passes)
    report = rewrite.export_onnx(grown.graph, built.args, tmp_path / "g.onnx")
    assert report.ok and report.max_rel_error <= 1e-5
