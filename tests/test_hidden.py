"""passes.widen_hidden: the residual stream, RMSNorm gain and epsilon corrected; LayerNorm by cloning."""

import math

import pytest
import torch
from conftest import traced

import passes
import rewrite
from rewrite.app import zoo


# Parameters per residual unit, closed form: embedding + output head (the vocabulary each), and per layer
# q 32 + k 16 + v 16 (2 KV heads of 8) + o 32 + gate 48 + up 48 + down 48 + two norm gains = 242, + final norm.
PER_UNIT = {"llama": 64 + 64 + 2 * 242 + 1, "hf-llama": 96 + 96 + 2 * 242 + 1, "hf-qwen2": 96 + 96 + 2 * 242 + 1}


@pytest.mark.parametrize("name", ["llama", "hf-llama", "hf-qwen2"])
@pytest.mark.parametrize("init, growth", [("zero", dict(factor=2)), ("zero", dict(size=40)),
                                          ("clone", dict(factor=3))])
def test_rmsnorm_models_grow_exactly(name, init, growth):
    built, graph = traced(name)
    grown = rewrite.apply(graph, [passes.widen_hidden(init=init, **growth)], built.args)
    record = grown.report.passes[0]
    assert record.verification.max_rel_error <= 1e-5
    new = record.plan.groups[0][1]
    assert record.parameters_after - record.parameters_before == (new - 32) * PER_UNIT[name]


def test_rmsnorm_gain_and_epsilon_are_corrected_for_zero_padding():
    built, graph = traced("llama")
    grown = rewrite.apply(graph, [passes.widen_hidden(factor=2)], built.args)
    old, new = graph.module.get_submodule("norm"), grown.graph.module.get_submodule("norm")
    torch.testing.assert_close(new.weight[:32], old.weight * math.sqrt(32 / 64))
    assert new.eps == pytest.approx(old.eps * 32 / 64)
    embed = grown.graph.module.get_parameter("embed.weight")
    assert torch.count_nonzero(embed[:, 32:]) == 0  # new residual dims start at zero


def test_hand_written_rmsnorm_epsilon_literal_is_corrected():
    built, graph = traced("hf-llama")
    grown = rewrite.apply(graph, [passes.widen_hidden(size=48)], built.args)
    add = grown.graph.node("add_3")  # variance + eps of the first RMSNorm
    assert add.args[1] == pytest.approx(1e-6 * 32 / 48)


def test_fp64_hand_written_llama_is_exact_to_1e_10():
    built = zoo.build("llama")
    model = built.model.double()
    grown = rewrite.apply(model, [passes.widen_hidden(factor=2)], built.args)
    assert grown.report.passes[0].verification.max_rel_error <= 1e-10


@pytest.mark.parametrize("name", ["gpt", "hf-gpt2"])
def test_layernorm_residual_refuses_zero_and_suggests_clone(name):
    built, graph = traced(name)
    with pytest.raises(rewrite.NotExactError, match="LayerNorm over a zero-padded residual stream.*init='clone'"):
        rewrite.apply(graph, [passes.widen_hidden(factor=2)], built.args)


def test_layernorm_residual_with_exact_false_grows_approximately_and_is_measured():
    built, graph = traced("hf-gpt2")
    grown = rewrite.apply(graph, [passes.widen_hidden(factor=2, exact=False)], built.args)
    record = grown.report.passes[0]
    assert record.exact is False and "LayerNorm" in record.plan.reason
    assert record.verification.max_abs_error > 0


@pytest.mark.parametrize("name, tied, norm", [("gpt", "tok.weight", "ln_f"),
                                               ("hf-gpt2", "transformer.wte.weight", "transformer.ln_f")])
def test_tied_embedding_under_clone_keeps_the_tie_and_divides_the_final_norm(name, tied, norm):
    built, graph = traced(name)
    grown = rewrite.apply(graph, [passes.widen_hidden(factor=2, init="clone")], built.args)
    assert grown.report.passes[0].verification.max_rel_error <= 1e-5
    module = grown.graph.module
    head = "head.weight" if name == "gpt" else "lm_head.weight"
    assert module.get_parameter(head) is module.get_parameter(tied)  # still one tensor
    torch.testing.assert_close(module.get_parameter(tied), graph.module.get_parameter(tied).repeat(1, 2))
    old_gain = graph.module.get_parameter(f"{norm}.weight")
    torch.testing.assert_close(module.get_parameter(f"{norm}.weight"), old_gain.repeat(2) / 2)


class TiedWithoutFinalNorm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)
        self.norm = torch.nn.RMSNorm(8)
        self.fc = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        x = self.embed(ids)
        x = x + self.fc(self.norm(x))
        return self.head(x)  # no norm in front of the tied head


def test_tied_head_without_a_norm_in_front_refuses_clone_but_grows_with_zero():
    ids = torch.randint(0, 16, (2, 5))
    with pytest.raises(rewrite.GrowthError, match="tied head embed.weight\\[1\\] is not fed by a norm alone"):
        rewrite.apply(TiedWithoutFinalNorm(), [passes.widen_hidden(factor=2, init="clone")], (ids,))
    grown = rewrite.apply(TiedWithoutFinalNorm(), [passes.widen_hidden(factor=2)], (ids,))
    assert grown.report.passes[0].verification.max_rel_error <= 1e-5


def test_residual_that_is_the_model_output_is_refused():
    built, graph = traced("hf-bert")
    with pytest.raises(rewrite.GrowthError, match="is an output of the model"):
        rewrite.apply(graph, [passes.widen_hidden(factor=2)], built.args)


def test_every_width_transformation_on_gpt2_composes_exactly():
    built, graph = traced("hf-gpt2")
    steps = [passes.widen_mlp(factor=2), passes.add_heads(2), passes.widen_heads(v=12),
             passes.widen_hidden(factor=2, init="clone")]
    grown = rewrite.apply(graph, steps, built.args)
    assert all(r.exact and r.verification.max_rel_error <= 1e-5 for r in grown.report.passes)


def test_every_width_transformation_composes_exactly_and_exports(tmp_path):
    built, graph = traced("hf-qwen2")
    steps = [passes.widen_mlp(factor=2), passes.add_heads(2), passes.widen_heads(v=12),
             passes.widen_hidden(factor=2)]
    grown = rewrite.apply(graph, steps, built.args)
    assert all(r.exact and r.verification.max_rel_error <= 1e-5 for r in grown.report.passes)
    assert grown.graph.num_parameters > 2 * graph.num_parameters
    report = rewrite.export_onnx(grown.graph, built.args, tmp_path / "qwen2.onnx")
    assert report.ok and report.max_rel_error <= 1e-5
