"""Passes on Hugging Face families that are not in the zoo, each with a structure the zoo does not have.

Gemma multiplies by ``1 + w`` in its norms; Gemma-2 adds sandwich norms (the branch ends in a norm),
alternates sliding and full attention per layer, and writes attention out (matmul, soft-capping, softmax); OPT flattens batch and tokens between residual units and
calls its MLP size ``ffn_dim``; Phi-3 fuses gate and up into one ``gate_up_proj``; Falcon runs attention and
MLP in parallel, adds in place, writes linears as ``x @ W.T`` and derives ``head_dim`` in its config.
"""

import math

import pytest
import torch

import passes
import rewrite
from rewrite.app import zoo

# (family, plan): every one exact, and representable in the family's own class
EXACT = [
    ("hf-gemma", lambda: [passes.add_layers(1), passes.widen_mlp(factor=2), passes.add_heads(2)]),
    ("hf-gemma2", lambda: [passes.add_layers(1, at=0), passes.widen_mlp(factor=2), passes.add_heads(4)]),
    ("hf-opt", lambda: [passes.add_layers(2, init="copy"), passes.widen_mlp(factor=2)]),
    ("hf-phi3", lambda: [passes.add_layers(1), passes.widen_mlp(factor=2)]),
    ("hf-falcon", lambda: [passes.add_layers(1, init="copy"), passes.widen_mlp(factor=2)]),
]


def _build(family):
    built = zoo.build(family)
    return built.model, built.args, built.kwargs


def _logits(module, args, kwargs):
    with torch.no_grad():
        return module(*args, **kwargs).logits


@pytest.mark.parametrize("family,plan", EXACT, ids=[family for family, _ in EXACT])
def test_exact_growth_reaches_the_native_class_on_other_families(family, plan, tmp_path):
    model, args, kwargs = _build(family)
    grown = rewrite.apply(model, plan(), args, kwargs)
    assert all(record.exact for record in grown.report.passes)
    reference = _logits(model, args, kwargs)
    torch.testing.assert_close(_logits(grown.module, args, kwargs), reference, rtol=1e-5, atol=1e-5)
    native = rewrite.to_native(grown, like=model)
    assert native.config.num_hidden_layers > model.config.num_hidden_layers
    native.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(loaded, args, kwargs), reference, rtol=1e-5, atol=1e-5)


def test_mlp_size_is_written_under_the_config_s_own_name():
    cases = (("hf-opt", "ffn_dim", 96), ("hf-phi3", "intermediate_size", 96),  # fused gate_up_proj
             ("hf-mixtral", "intermediate_size", 96), ("hf-gpt2", "n_inner", 256),  # experts; Conv1D
             ("hf-falcon", "ffn_hidden_size", 256))  # x @ W.T in a parallel block
    for family, field, size in cases:
        model, args, kwargs = _build(family)
        native = rewrite.to_native(rewrite.apply(model, [passes.widen_mlp(factor=2)], args, kwargs), like=model)
        assert getattr(native.config, field) == size, family


def test_new_layers_take_the_layer_type_of_the_layer_they_copy():
    model, args, kwargs = _build("hf-gemma2")
    types = model.config.layer_types
    assert types[0] != types[1]  # sliding and full attention alternate
    grown = rewrite.apply(model, [passes.add_layers(1, at=0), passes.add_layers(1, at=2)], args, kwargs)
    assert grown.graph.origin("model.layers.1") == "model.layers.0"
    assert grown.graph.origin("model.layers.2") == "model.layers.1"  # moved by the first insertion
    assert grown.graph.origin("model.layers.3") == "model.layers.1"  # a copy of the moved layer
    native = rewrite.to_native(grown, like=model)
    assert native.config.layer_types == [types[0], types[0], types[1], types[1]]


def test_gains_applied_as_one_plus_w_are_scaled_as_a_whole():
    """Gemma's norms multiply by (1 + w): zero padding scales 1 + w by sqrt(h/h'), so w' = s (1 + w) - 1."""
    model, args, kwargs = _build("hf-gemma")
    grown = rewrite.apply(model, [passes.widen_hidden(factor=2)], args, kwargs)
    old = model.model.layers[0].input_layernorm.weight.detach()
    new = dict(grown.graph.module.named_parameters())["model.layers.0.input_layernorm.weight"]
    s = math.sqrt(1 / 2)
    torch.testing.assert_close(new[:32], s * (1 + old) - 1)


def test_a_branch_that_ends_in_a_norm_is_scaled_through_the_norm_s_gain():
    """Gemma-2's branches end in a norm: scaling its input would change nothing, so its gain is scaled."""
    model, args, kwargs = _build("hf-gemma2")
    grown = rewrite.apply(model, [passes.split_layers(2, layers=[0])], args, kwargs)
    params = dict(grown.graph.module.named_parameters())
    source = model.model.layers[0]
    for copy in (0, 1):
        torch.testing.assert_close(params[f"model.layers.{copy}.post_attention_layernorm.weight"],
                                   (1 + source.post_attention_layernorm.weight.detach()) / 2 - 1)
        torch.testing.assert_close(params[f"model.layers.{copy}.self_attn.o_proj.weight"],
                                   source.self_attn.o_proj.weight.detach())  # not scaled: a norm follows it
    independent = (_logits(grown.module, args, kwargs) - _logits(model, args, kwargs)).abs().max().item()
    assert grown.report.passes[0].verification.max_abs_error == pytest.approx(independent, rel=1e-6)


class _NormEndedBranch(torch.nn.Module):
    """x + (y * rsqrt(mean(y^2) + eps)) * g with y = W x: the gain is on the right of the product."""

    def __init__(self, dim):
        super().__init__()
        self.inner, self.gain = torch.nn.Linear(dim, dim), torch.nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        y = self.inner(x)
        return x + y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6) * self.gain


class _Stack(torch.nn.Module):
    def __init__(self, dim=16, layers=2):
        super().__init__()
        self.embed = torch.nn.Embedding(32, dim)
        self.blocks = torch.nn.ModuleList(_NormEndedBranch(dim) for _ in range(layers))
        self.head = torch.nn.Linear(dim, 32)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_a_product_operand_that_the_other_operand_depends_on_is_not_scaled():
    """In y * rsqrt(mean(y^2)) the factor depends on y: scaling W would be undone, so g is scaled instead."""
    torch.manual_seed(0)
    model, ids = _Stack().eval(), torch.randint(0, 32, (2, 6))
    grown = rewrite.apply(model, [passes.split_layers(2, layers=[0])], (ids,))
    params = dict(grown.graph.module.named_parameters())
    torch.testing.assert_close(params["blocks.0.inner.weight"], model.blocks[0].inner.weight.detach())
    torch.testing.assert_close(params["blocks.1.gain"], model.blocks[0].gain.detach() / 2)
    added = rewrite.apply(model, [passes.add_layers(1)], (ids,))
    assert added.report.passes[0].verification.max_abs_error == 0


def test_an_rms_norm_without_a_gain_cannot_absorb_zero_padding():
    from rewrite.app.zoo.handwritten import Llama

    torch.manual_seed(0)
    model = Llama(vocab=32, dim=16, heads=2, hidden=32, layers=1).eval()
    model.norm = torch.nn.RMSNorm(16, eps=1e-6, elementwise_affine=False)
    ids = torch.randint(0, 32, (2, 6))
    with pytest.raises(rewrite.NotExactError, match="RMSNorm at node .* has no gain"):
        rewrite.apply(model, [passes.widen_hidden(factor=2)], (ids,))


def test_the_command_line_grows_a_family_outside_the_zoo(tmp_path):
    import json

    from rewrite.app.cli import main

    out = tmp_path / "gemma2-grown"
    assert main(["grow", "hf-gemma2", "--pass", "add_layers:n=1,at=0", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3
    assert config["layer_types"] == ["sliding_attention", "sliding_attention", "full_attention"]
    model, args, kwargs = _build("hf-gemma2")
    loaded = type(model).from_pretrained(out).eval()
    torch.testing.assert_close(_logits(loaded, args, kwargs), _logits(model, args, kwargs), rtol=1e-5, atol=1e-5)


def _parallel(family):
    import transformers as t

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64)
    return {"cohere": lambda: t.CohereForCausalLM(t.CohereConfig(**common, num_key_value_heads=2)),
            "stablelm": lambda: t.StableLmForCausalLM(t.StableLmConfig(**common, num_key_value_heads=2,
                                                                       use_parallel_residual=True)),
            "gpt-neox": lambda: t.GPTNeoXForCausalLM(t.GPTNeoXConfig(**common, use_parallel_residual=True)),
            }[family]().eval()


@pytest.mark.parametrize("family", ["cohere", "stablelm", "gpt-neox"])
def test_blocks_whose_update_is_a_sum_of_parallel_branches(family, tmp_path):
    """``x + attn(n(x)) + mlp(n(x))``: the second branch reads the block's input, not the partial sum it is
    added to; each branch is a residual unit, so new blocks zero both."""
    torch.manual_seed(0)
    model = _parallel(family)
    ids = torch.randint(0, 64, (2, 6))
    graph = rewrite.trace(model, (ids,))
    assert len(rewrite.blocks(graph)) == 2
    grown = rewrite.apply(graph, [passes.add_layers(1, at=0), passes.widen_mlp(factor=2)], (ids,))
    assert all(record.exact for record in grown.report.passes)
    fresh = torch.randint(0, 64, (3, 9))
    reference = _logits(model, (fresh,), {})
    torch.testing.assert_close(_logits(grown.module, (fresh,), {}), reference, rtol=1e-5, atol=1e-5)
    native = rewrite.to_native(grown, like=model)
    assert native.config.num_hidden_layers == 3 and native.config.intermediate_size == 128
    native.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(loaded, (fresh,), {}), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("plan, expert_factor", [
    ([passes.add_heads(2)], 1), ([passes.widen_hidden(factor=2, init="clone")], 1), ([passes.widen_mlp(factor=2)], 2),
    ([passes.add_layers(1, init="copy"), passes.widen_mlp(factor=3)], 3),
], ids=["add_heads", "widen_hidden", "widen_mlp", "add_layers+widen_mlp"])
@pytest.mark.parametrize("name", ["hf-mixtral-default", "hf-qwen3-moe"])
def test_the_default_grouped_experts_grow_and_go_back_to_their_class(name, plan, expert_factor):
    """Mixtral and Qwen3-MoE as users build them: transformers' default experts kernel on CPU is a custom op
    (``grouped_mm_fallback``: each expert's sorted rows times its matrix). Its axis rule lets every pass reach
    the experts, exactly on fresh inputs, and the native class holds the result (``moe_intermediate_size``)."""
    model, args, kwargs = _build(name)
    grown = rewrite.apply(model, plan, args, kwargs)
    assert grown.report.exact
    fresh = (torch.randint(0, 96, (3, 11)),)
    native = rewrite.to_native(grown, like=model)
    torch.testing.assert_close(_logits(grown.module, fresh, {}), _logits(model, fresh, {}), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(native, fresh, {}), _logits(model, fresh, {}), rtol=1e-5, atol=1e-5)
    experts = dict(native.named_parameters())["model.layers.0.mlp.experts.down_proj"]
    old = dict(model.named_parameters())["model.layers.0.mlp.experts.down_proj"]
    assert experts.shape[-1] == old.shape[-1] * expert_factor


@pytest.mark.parametrize("heads", [1, 2])
def test_gpt_neox_s_per_head_q_k_v_chunk_and_one_head_mlps(heads):
    """GPT-NeoX cuts each head's q|k|v with ``chunk(3)``: growing only the value part turns the chunk into a
    split with sizes (it used to stay a chunk, and the grown graph did not run). With one head, nothing but the
    attention tells the value head size from an MLP axis: ``widen_mlp`` must grow the MLP."""
    import transformers as t

    torch.manual_seed(0)
    model = t.GPTNeoXForCausalLM(t.GPTNeoXConfig(hidden_size=8 * heads, intermediate_size=24, num_hidden_layers=1,
                                                 num_attention_heads=heads, vocab_size=64)).eval()
    ids, fresh = torch.randint(0, 64, (2, 5)), torch.randint(0, 64, (3, 7))
    grown = rewrite.apply(model, [passes.widen_heads(v=16)], (ids,))
    assert grown.report.exact
    torch.testing.assert_close(_logits(grown.module, (fresh,), {}), _logits(model, (fresh,), {}), rtol=1e-5, atol=1e-5)
    grown = rewrite.apply(model, [passes.widen_mlp(factor=2)], (ids,))
    assert dict(grown.module.named_parameters())["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"].shape[0] == 48
    assert rewrite.to_native(grown, like=model).config.intermediate_size == 48
