"""The README's custom rule (examples/custom_rule.py): a zero-initialised adapter after attention outputs."""

import importlib.util
import pathlib

import pytest
from conftest import traced

import rewrite

_path = pathlib.Path(__file__).parent.parent / "examples" / "custom_rule.py"
_spec = importlib.util.spec_from_file_location("custom_rule", _path)
custom_rule = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(custom_rule)


@pytest.mark.parametrize("name, sites", [
    ("gpt", ["blocks.0.attn.o", "blocks.1.attn.o"]),
    ("llama", ["blocks.0.attn.o", "blocks.1.attn.o"]),
    ("hf-llama", ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]),
    ("hf-qwen2", ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]),
    ("hf-mixtral", ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]),
])
def test_adapter_rule_is_exact_on_both_frontends(name, sites):
    built, graph = traced(name)
    grown = rewrite.apply(graph, [custom_rule.attention_adapter], built.args, built.kwargs)
    (record,) = grown.report.passes
    assert record.plan.sites == sites and record.exact
    assert sorted(record.added) == sorted(f"{s}_adapter.{m}" for s in sites for m in "AB")
    assert record.parameters_after - record.parameters_before == len(sites) * custom_rule.RANK * (32 + 32)
    assert record.verification.max_rel_error == 0.0  # B = 0: the adapter adds exactly zero


def test_adapter_does_not_match_models_without_attention_output():
    built, graph = traced("mlp")
    grown = rewrite.apply(graph, [custom_rule.attention_adapter], built.args, built.kwargs)
    assert grown.report.passes[0].plan is None


def test_adapter_trains(capsys):
    custom_rule.main("gpt")
    assert "max |original - grown| = 0" in capsys.readouterr().out
    built, graph = traced("gpt")
    grown = rewrite.apply(graph, [custom_rule.attention_adapter], built.args, built.kwargs)
    params = dict(grown.module.named_parameters())
    b = params["blocks.0.attn.o_adapter.B"]
    loss = grown.module(*built.args).square().mean()
    loss.backward()
    assert b.grad is not None and b.grad.abs().sum() > 0  # a zero B still gets a gradient through A x
