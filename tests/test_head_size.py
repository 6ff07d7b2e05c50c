"""passes.widen_heads: value size and key/query size of every head (Gesmundo & Maile 3 and 4)."""

import math

import pytest
import torch
from conftest import traced

import passes
import rewrite

# model, hidden, heads, kv heads, head size, q/k/v biases, blocks
ATTENTION = [
    ("gpt", 32, 4, 4, 8, True, 2),
    ("llama", 32, 4, 2, 8, False, 2),
    ("hf-gpt2", 32, 4, 4, 8, True, 2),
    ("hf-llama", 32, 4, 2, 8, False, 2),
    ("hf-qwen2", 32, 4, 2, 8, True, 2),
    ("hf-bert", 32, 4, 4, 8, True, 2),
    ("hf-mixtral", 32, 4, 2, 8, False, 2),
]


@pytest.mark.parametrize("init, v", [("zero", 12), ("clone", 16), ("net2net", 11)])
@pytest.mark.parametrize("name, hidden, heads, kv, head, bias, blocks", ATTENTION)
def test_value_size_is_exact(name, hidden, heads, kv, head, bias, blocks, init, v):
    built, graph = traced(name)
    grown = rewrite.apply(graph, [passes.widen_heads(v=v, init=init)], built.args, built.kwargs)
    (record,) = grown.report.passes
    assert record.verification.max_rel_error <= 1e-5
    extra = v - head  # per head: W_V rows (key-value heads) and W_O columns (query heads)
    per_block = extra * kv * hidden + extra * heads * hidden + (extra * kv if bias else 0)
    assert record.parameters_after - record.parameters_before == blocks * per_block


@pytest.mark.parametrize("name, attention, implicit", [("gpt", "blocks.0.attn", True),
                                                       ("hf-bert", "encoder.layer.0.attention.self", False)])
def test_key_query_size_is_exact_with_new_keys_zero_and_the_temperature_corrected(name, attention, implicit):
    built, graph = traced(name)
    grown = rewrite.apply(graph, [passes.widen_heads(qk=12)], built.args)
    record = grown.report.passes[0]
    assert record.verification.max_rel_error <= 1e-5
    assert record.parameters_after - record.parameters_before == 2 * 2 * 4 * 4 * (32 + 1)  # q, k rows + biases
    key = "k" if name == "gpt" else "key"
    old = graph.module.get_parameter(f"{attention}.{key}.weight").view(4, 8, 32)
    new = grown.graph.module.get_parameter(f"{attention}.{key}.weight").view(4, 12, 32)
    scale = math.sqrt(12 / 8) if implicit else 1.0  # default 1/sqrt(d) changes; an explicit scale= does not
    torch.testing.assert_close(new[:, :8], old * scale)
    assert torch.count_nonzero(new[:, 8:]) == 0  # new key dims are zero: q'.k' = q.k


def test_key_query_and_value_sizes_together_and_in_some_layers():
    built, graph = traced("gpt")
    grown = rewrite.apply(graph, [passes.widen_heads(qk=16, v=12, layers=[1])], built.args)
    assert grown.report.passes[0].plan.sites == ["blocks.1.attn"]
    assert grown.report.passes[0].verification.max_rel_error <= 1e-5
    assert grown.graph.module.get_submodule("blocks.0.attn.q").weight.shape[0] == 32


@pytest.mark.parametrize("name, reason", [
    ("llama", "rotary position embeddings act on the key/query head dim"),
    ("hf-llama", "rotary position embeddings act on the key/query head dim"),
])
def test_key_query_growth_refusals(name, reason):
    built, graph = traced(name)
    with pytest.raises(rewrite.GrowthError, match=reason):
        rewrite.apply(graph, [passes.widen_heads(qk=12)], built.args)


def test_fused_qkv_projection_is_filled_part_by_part():
    built, graph = traced("hf-gpt2")
    grown = rewrite.apply(graph, [passes.widen_heads(qk=12, v=10)], built.args)
    assert grown.report.passes[0].verification.max_rel_error <= 1e-5
    old = graph.module.get_parameter("transformer.h.0.attn.c_attn.weight")  # Conv1D [in, q|k|v]
    new = grown.graph.module.get_parameter("transformer.h.0.attn.c_attn.weight")
    assert new.shape == (32, 4 * 12 + 4 * 12 + 4 * 10)
    keys_old, keys_new = old[:, 32:64].reshape(32, 4, 8), new[:, 48:96].reshape(32, 4, 12)
    assert torch.equal(keys_new[..., :8], keys_old)  # explicit scale=: keys are not rescaled
    assert torch.count_nonzero(keys_new[..., 8:]) == 0  # new key dims zero
    values_old, values_new = old[:, 64:].reshape(32, 4, 8), new[:, 96:].reshape(32, 4, 10)
    assert torch.equal(values_new[..., :8], values_old)


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_one_head_key_query_growth_keeps_new_keys_zero(family):
    """With one head the head dim is the projections' own output axis (no heads x head_dim view): the key
    rows and bias are keys (zero new rows, not the query's policy), a key bias is not a rotary table, and the
    growth is exact on fresh inputs. Found by the fuzz campaign (planned exact, refuted by verification)."""
    import transformers

    from rewrite.app.zoo.huggingface import _quiet_config

    config_class, model_class, fields, key = {
        "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_layer=1, n_embd=16, n_head=1, n_positions=32),
                 "transformer.h.0.attn.c_attn.weight"),
        "opt": ("OPTConfig", "OPTForCausalLM", dict(num_hidden_layers=1, hidden_size=16, num_attention_heads=1,
                                                   ffn_dim=32, max_position_embeddings=32, word_embed_proj_dim=16),
                "model.decoder.layers.0.self_attn.k_proj.weight"),
    }[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(
        _quiet_config(getattr(transformers, config_class), vocab_size=50, **fields)).eval()
    ids, fresh = torch.randint(3, 50, (2, 5)), torch.randint(3, 50, (3, 9))
    grown = rewrite.apply(model, [passes.widen_heads(qk=24)], (ids,))
    assert grown.report.exact
    new = grown.graph.module.get_parameter(key)
    new_keys = new[:, 24 + 16:48] if family == "gpt2" else new[16:]  # Conv1D [in, q|k|v]; Linear [out, in]
    assert new_keys.numel() and torch.count_nonzero(new_keys) == 0
    with torch.no_grad():
        torch.testing.assert_close(grown.module(fresh).logits, model(fresh).logits, rtol=1e-5, atol=1e-5)


def test_replicating_key_query_dims_is_not_exact():
    built, graph = traced("hf-bert")
    with pytest.raises(rewrite.NotExactError, match="init='zero' \\(new keys zero\\) is exact"):
        rewrite.apply(graph, [passes.widen_heads(qk=16, init="clone")], built.args)


def test_all_width_transformations_compose_exactly(tmp_path):
    built, graph = traced("hf-bert")
    steps = [passes.widen_mlp(factor=2), passes.add_heads(2), passes.widen_heads(qk=12, v=10)]
    grown = rewrite.apply(graph, steps, built.args)
    assert all(r.exact and r.verification.max_rel_error <= 1e-5 for r in grown.report.passes)
    report = rewrite.export_onnx(grown.graph, built.args, tmp_path / "bert.onnx")
    assert report.ok and report.max_rel_error <= 1e-5


def test_widen_heads_needs_a_size():
    with pytest.raises(rewrite.GrowthError, match="needs qk="):
        passes.widen_heads()
