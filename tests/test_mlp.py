"""passes.widen_mlp: the MLP intermediate size of every block, found from the dimension analysis."""

import pytest
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
]


@pytest.mark.parametrize("init", ["zero", "clone", "net2net"])
@pytest.mark.parametrize("name, p, per_unit, blocks", TRANSFORMERS)
def test_widen_mlp_is_exact_on_every_block(name, p, per_unit, blocks, init):
    built, graph = traced(name)
    grown = rewrite.apply(graph, [passes.widen_mlp(factor=2, init=init)], built.args, built.kwargs)
    (record,) = grown.report.passes
    assert len(record.plan.sites) == blocks
    assert all(size == 2 * p for _, size in record.plan.groups)
    assert record.parameters_after - record.parameters_before == blocks * p * per_unit
    assert record.verification.max_rel_error <= 1e-5


def test_layers_restricts_the_blocks():
    built, graph = traced("hf-llama")
    grown = rewrite.apply(graph, [passes.widen_mlp(size=80, layers=[1])], built.args)
    assert grown.report.passes[0].plan.sites == ["model.layers.1"]
    assert grown.graph.module.get_submodule("model.layers.1.mlp.down_proj").weight.shape[1] == 80
    assert grown.graph.module.get_submodule("model.layers.0.mlp.down_proj").weight.shape[1] == 48


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
