"""passes.add_heads: more attention heads, head size unchanged; grouped-query attention keeps its ratio."""

import pytest
import torch
from conftest import traced

import passes
import rewrite

# model, hidden size, head size, query heads per KV head, q/k/v biases, blocks
ATTENTION = [
    ("gpt", 32, 8, 1, True, 2),
    ("llama", 32, 8, 2, False, 2),
    ("hf-gpt2", 32, 8, 1, True, 2),  # fused c_attn (q|k|v concatenated), Conv1D layout
    ("hf-llama", 32, 8, 2, False, 2),
    ("hf-qwen2", 32, 8, 2, True, 2),
    ("hf-bert", 32, 8, 1, True, 2),
    ("hf-mixtral", 32, 8, 2, False, 2),
]


def added_parameters(n, hidden, head, ratio, bias, blocks):
    """Per block: n query heads (q rows, W_O columns) and n/ratio key-value heads (k and v rows), + biases."""
    kv = n // ratio
    weights = 2 * n * head * hidden + 2 * kv * head * hidden
    biases = (n * head + 2 * kv * head) if bias else 0
    return blocks * (weights + biases)


@pytest.mark.parametrize("init, n", [("zero", 2), ("clone", 4), ("net2net", 2)])
@pytest.mark.parametrize("name, hidden, head, ratio, bias, blocks", ATTENTION)
def test_add_heads_is_exact_with_closed_form_parameter_count(name, hidden, head, ratio, bias, blocks, init, n):
    built, graph = traced(name)
    grown = rewrite.apply(graph, [passes.add_heads(n, init=init)], built.args, built.kwargs)
    (record,) = grown.report.passes
    assert len(record.plan.sites) == blocks
    assert record.verification.max_rel_error <= 1e-5
    assert record.parameters_after - record.parameters_before == added_parameters(n, hidden, head, ratio, bias, blocks)


def test_grouped_query_attention_adds_whole_kv_groups():
    built, graph = traced("hf-llama")
    grown = rewrite.apply(graph, [passes.add_heads(4)], built.args)
    attention = grown.graph.module.get_submodule("model.layers.0.self_attn")
    assert attention.q_proj.weight.shape == (64, 32)  # 8 query heads of 8
    assert attention.k_proj.weight.shape == (32, 32)  # 4 key-value heads: the ratio 2 is kept
    assert attention.o_proj.weight.shape == (32, 64)
    with pytest.raises(rewrite.GrowthError, match="the number of heads added must be a multiple of 2"):
        rewrite.apply(graph, [passes.add_heads(3)], built.args)


def test_view_literals_follow_the_new_head_count():
    built, graph = traced("gpt")
    grown = rewrite.apply(graph, [passes.add_heads(2)], built.args)
    view = grown.graph.node("view")  # x.view(b, t, heads, head_dim) of blocks.0.attn.q
    assert 6 in view.args and 8 in view.args
    assert grown.graph.shape("view")[2] == 6


def test_layers_restricts_the_attention_blocks():
    built, graph = traced("hf-qwen2")
    grown = rewrite.apply(graph, [passes.add_heads(2, layers=[0])], built.args)
    assert grown.report.passes[0].plan.sites == ["model.layers.0.self_attn"]
    assert grown.graph.module.get_submodule("model.layers.1.self_attn.q_proj").weight.shape[0] == 32


def test_composed_with_mlp_widening_and_exported(tmp_path):
    built, graph = traced("hf-llama")
    steps = [passes.widen_mlp(factor=2), passes.add_heads(2), passes.widen_mlp(size=120, init="net2net")]
    grown = rewrite.apply(graph, steps, built.args)
    assert all(r.exact and r.verification.max_rel_error <= 1e-5 for r in grown.report.passes)
    report = rewrite.export_onnx(grown.graph, built.args, tmp_path / "grown.onnx")
    assert report.ok and report.max_rel_error <= 1e-5


def test_grown_attention_generalises_to_other_sequence_lengths():
    built, graph = traced("hf-mixtral")
    with pytest.raises(rewrite.GrowthError, match=r"not a multiple of 2 \(key-value heads .*: 2 -> 3\)"):
        rewrite.apply(graph, [passes.add_heads(2, init="clone")], built.args)  # 2 -> 3 KV heads is no clone
    grown = rewrite.apply(graph, [passes.add_heads(4, init="clone")], built.args)
    ids = torch.randint(0, 96, (3, 13))
    expected = built.model(ids, use_cache=False).logits
    assert rewrite.verify(lambda: expected, lambda: grown.module(ids).logits).ok


def test_bad_head_counts_are_refused():
    with pytest.raises(rewrite.GrowthError, match="positive number of heads"):
        passes.add_heads(0)
