"""ONNX export: every zoo graph exports, passes the checker and matches onnxruntime on two shapes."""

import os

import pytest
import torch
import torch.nn as nn
from conftest import traced

import rewrite
from rewrite.app import zoo


@pytest.mark.parametrize("name", zoo.NAMES)
def test_graph_exports_and_matches_onnxruntime_on_two_shapes(name, tmp_path):
    built, graph = traced(name)
    path = tmp_path / f"{name}.onnx"
    report = rewrite.export_onnx(graph, built.args, path, built.kwargs)
    assert report.ok, str(report)
    assert report.max_rel_error <= 1e-5
    assert len(report.rows) >= 2, "a second, larger shape must be checked"
    assert path.is_file() and not (tmp_path / f"{name}.onnx.data").exists()  # one self-contained file
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left behind


def test_second_shape_grows_only_symbolic_axes(tmp_path):
    built, graph = traced("cnn")
    report = rewrite.export_onnx(graph, built.args, tmp_path / "cnn.onnx")
    shapes = [row.shape for row in report.rows]
    assert shapes == [(2, 10), (3, 10)]
    assert "symbolic axes: x[0, 2, 3]" in report.notes[0]


def test_plain_module_and_onnx_model_wrapper(tmp_path):
    built = zoo.build("hf-llama")
    path = tmp_path / "m.onnx"
    report = rewrite.export_onnx(built.model, built.args, path)
    assert report.ok
    onnx_model = rewrite.OnnxModel(path, like=built.model(*built.args, use_cache=False))
    ids = torch.randint(0, 96, (1, 5))
    check = rewrite.verify(built.model, onnx_model, (ids,), {"use_cache": False})
    assert check.ok and [r.name for r in check.rows] == ["logits"]


def test_static_export_when_dynamic_is_off(tmp_path):
    built, graph = traced("mlp")
    report = rewrite.export_onnx(graph, built.args, tmp_path / "m.onnx", dynamic=False)
    assert report.ok and len(report.rows) == 1
    assert "symbolic axes: none" in report.notes[0]


@torch.library.custom_op("growfx_test::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_twice.register_fake
def _(x):
    return torch.empty_like(x)


def test_export_error_names_the_unsupported_op(tmp_path):
    class Custom(nn.Module):
        def forward(self, x):
            return torch.ops.growfx_test.twice(x) + 1

    with pytest.raises(rewrite.GrowfxError, match="ONNX export of Custom failed.*growfx_test.twice"):
        rewrite.export_onnx(Custom(), (torch.randn(2, 3),), tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []  # nothing half-written


def test_default_mixture_of_experts_exports(tmp_path):
    """Mixtral as users build it (transformers' default grouped experts, a custom op on CPU that torch's
    exporter cannot translate) exports through growfx's grouped-product translation, grown or not, and
    onnxruntime agrees on two shapes, so some tokens' experts change between them."""
    import passes
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=3, num_experts_per_tok=2, vocab_size=32, bos_token_id=0,
        eos_token_id=1,
    )
    model = MixtralForCausalLM(config).eval()
    assert model.config._experts_implementation == "grouped_mm"
    ids = torch.randint(0, 32, (2, 6))
    report = rewrite.export_onnx(model, (ids,), tmp_path / "m.onnx")
    assert report.ok and len(report.rows) == 2, str(report)
    grown = rewrite.apply(model, [passes.widen_mlp(factor=2), passes.add_layers(1)], (ids,))
    assert grown.report.exact
    report = rewrite.export_onnx(grown.graph, (ids,), tmp_path / "grown.onnx")
    assert report.ok and report.max_abs_error < 1e-5, str(report)


def test_export_leaves_the_model_untouched(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2)).train()
    before = [p.clone() for p in model.parameters()]
    report = rewrite.export_onnx(model, (torch.randn(3, 4),), tmp_path / "m.onnx")
    assert report.ok  # exported in eval mode: dropout off
    assert model.training
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


class WithoutTargets(nn.Module):
    """A hand-written GPT's habit: ``(logits, None)`` when no targets are given."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(20, 8), nn.Linear(8, 20)

    def forward(self, ids, targets=None):
        logits = self.head(self.embed(ids))
        loss = None if targets is None else nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


def test_outputs_with_none_leaves_compare_as_the_same_structure(tmp_path):
    model, ids = WithoutTargets(), torch.randint(0, 20, (2, 5))
    report = rewrite.export_onnx(model, (ids,), tmp_path / "gpt.onnx")
    assert report.ok, str(report)
    logits, loss = rewrite.OnnxModel(tmp_path / "gpt.onnx", like=model(ids))(ids)
    assert loss is None and torch.allclose(logits, model(ids)[0], atol=1e-6)
