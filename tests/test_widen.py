"""passes.widen: Net2WiderNet on any traced model, with every exact policy, on both front-ends."""

import copy

import pytest
import torch
import torch.nn as nn
from conftest import traced
from hypothesis import given, settings
from hypothesis import strategies as st

import passes
import rewrite
from rewrite.transform.policy import replicate
from passes.policies import Net2Net
from rewrite.app import zoo

# (model, module to widen, its units n, parameters added per new unit: fan-in + bias + norm/BN + fan-out)
SITES = [
    ("mlp", "layers.0", 32, 16 + 1 + 32),
    ("cnn", "conv1", 8, 3 * 9 + 1 + 4 + 16 * 9),  # conv1 rows, bias, BatchNorm (4, 2 learnable), conv2 columns
    ("gpt", "blocks.0.fc", 64, 32 + 1 + 32),
    ("llama", "blocks.1.mlp.gate", 48, 32 + 32 + 32),  # SwiGLU: gate and up rows, down columns
    ("hf-gpt2", "transformer.h.0.mlp.c_fc", 128, 32 + 1 + 32),  # Conv1D [in, out] layout
    ("hf-llama", "model.layers.0.mlp.up_proj", 48, 32 + 32 + 32),
    ("hf-qwen2", "model.layers.1.mlp.gate_proj", 48, 32 + 32 + 32),
    ("hf-bert", "encoder.layer.0.intermediate.dense", 64, 32 + 1 + 32),
]
LEARNABLE_BN = {"cnn": 2}  # BatchNorm's running statistics are buffers, not parameters


@pytest.mark.parametrize("init", ["zero", "clone", "net2net"])
@pytest.mark.parametrize("name, at, units, per_unit", SITES)
def test_widen_is_exact_with_closed_form_parameter_count(name, at, units, per_unit, init):
    built, graph = traced(name)
    before = {k: v.clone() for k, v in built.model.state_dict().items()}
    grown = rewrite.apply(graph, [passes.widen(at, factor=2, init=init)], built.args, built.kwargs)
    (record,) = grown.report.passes
    assert record.exact and record.verification.ok
    assert record.verification.max_rel_error <= 1e-5
    per_unit -= 2 if name in LEARNABLE_BN else 0  # running mean/var grow too but are buffers
    assert record.parameters_after - record.parameters_before == units * per_unit
    out = grown.module(*built.args, **built.kwargs)
    reference = built.model(*built.args, **{**graph.fixed_kwargs, **built.kwargs})
    assert rewrite.verify(lambda: reference, lambda: out).ok
    for key, value in built.model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} of the original changed"


@pytest.mark.parametrize("name, at", [("gpt", "blocks.*.fc"), ("hf-llama", "model.layers.*.mlp.gate_proj")])
def test_widen_in_fp64_is_exact_to_1e_10(name, at):
    built = zoo.build(name)
    model = built.model.double()
    grown = rewrite.apply(model, [passes.widen(at, factor=1.5, init="net2net")], built.args)
    assert grown.report.passes[0].verification.max_rel_error <= 1e-10
    assert len(grown.report.passes[0].plan.sites) == 2


@pytest.mark.parametrize("name, at", [("gpt", "blocks.0.fc"), ("hf-gpt2", "transformer.h.1.mlp.c_fc"),
                                      ("cnn", "conv2")])
def test_grown_graph_exports_to_onnx(name, at, tmp_path):
    built, graph = traced(name)
    grown = rewrite.apply(graph, [passes.widen(at, factor=2)], built.args, built.kwargs)
    report = rewrite.export_onnx(grown.graph, built.args, tmp_path / "grown.onnx", built.kwargs)
    assert report.ok and report.max_rel_error <= 1e-5 and len(report.rows) >= 2


def test_composed_widenings_stay_exact_and_chain_their_node_maps():
    built, graph = traced("llama")
    steps = [passes.widen("blocks.*.mlp.gate", factor=2, init="zero"),
             passes.widen("blocks.0.mlp.up", size=150, init="net2net")]
    grown = rewrite.apply(graph, steps, built.args)
    assert [r.plan.groups[0][1] for r in grown.report.passes] == [96, 150]
    assert all(r.verification.ok for r in grown.report.passes)
    assert grown.graph.module.get_submodule("blocks.0.mlp.down").in_features == 150


class PreNorm(nn.Module):
    """x -> inp -> (+ MLP(LayerNorm)) -> LayerNorm -> out: the residual axis passes through LayerNorms."""

    def __init__(self, hidden=16):
        super().__init__()
        self.inp, self.ln, self.fc = nn.Linear(4, hidden), nn.LayerNorm(hidden), nn.Linear(hidden, 32)
        self.proj, self.lnf, self.out = nn.Linear(32, hidden), nn.LayerNorm(hidden), nn.Linear(hidden, 2)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.proj(torch.relu(self.fc(self.ln(h))))
        return self.out(self.lnf(h))


@pytest.mark.parametrize("init", ["zero", "net2net"])
def test_layernorm_axis_refuses_zero_and_net2net_and_suggests_clone(init):
    x = torch.randn(3, 4)
    with pytest.raises(rewrite.NotExactError) as info:
        rewrite.apply(PreNorm(), [passes.widen("inp", factor=2, init=init)], x)
    assert f"LayerNorm over the grown axis (node ln) is not preserved by {init}" in str(info.value)
    assert "init='clone' would be exact" in str(info.value)


def test_layernorm_axis_grows_exactly_by_uniform_cloning():
    x = torch.randn(3, 4)
    grown = rewrite.apply(PreNorm(), [passes.widen("inp", factor=3, init="clone")], x)
    assert grown.report.passes[0].verification.max_rel_error <= 1e-5
    assert grown.graph.module.get_submodule("ln").normalized_shape == (48,)


def test_non_integer_clone_factor_is_refused():
    with pytest.raises(rewrite.GrowthError, match="clone needs an integer factor: 40 is not a multiple of 16"):
        rewrite.apply(PreNorm(), [passes.widen("inp", size=40, init="clone")], torch.randn(3, 4))


def test_sparkling_is_labelled_approximate_and_measured():
    x = torch.randn(3, 4)
    with pytest.raises(rewrite.NotExactError, match="sparkling keeps activation RMS"):
        rewrite.apply(PreNorm(), [passes.widen("fc", factor=2, init="sparkling")], x)
    grown = rewrite.apply(PreNorm(), [passes.widen("fc", factor=2, init="sparkling", exact=False)], x)
    record = grown.report.passes[0]
    assert record.exact is False and "sparkling" in record.plan.reason
    assert record.verification.max_abs_error > 0 and "approximate" in str(record)


@pytest.mark.parametrize(
    "name, at, reason",
    [
        ("gpt", "blocks.0.attn.q", "split into heads or merged at node view"),
        ("gpt", "blocks.0.attn.o", "tok.weight[1] both produces and consumes the axis (a tied weight)"),
        ("mlp", "layers.2", "axis 1 of layers_2 is an output of the model"),
        ("hf-bert", "encoder.layer.0.output.dense", "an output of the model"),
        ("cnn", "nope", "no module matching 'nope' produces an axis"),
    ],
)
def test_refusals_name_the_reason(name, at, reason):
    built, graph = traced(name)
    with pytest.raises(rewrite.GrowthError) as info:
        rewrite.apply(graph, [passes.widen(at, factor=2)], built.args)
    assert reason in str(info.value)


def test_size_and_factor_and_policy_arguments_are_checked():
    with pytest.raises(ValueError, match="unknown init policy 'random'"):
        passes.widen("fc", factor=2, init="random")
    built, graph = traced("mlp")
    with pytest.raises(rewrite.GrowthError, match="exactly one of size= and factor="):
        rewrite.apply(graph, [passes.widen("layers.0")], built.args)
    with pytest.raises(rewrite.GrowthError, match="must be larger than 32"):
        rewrite.apply(graph, [passes.widen("layers.0", size=16)], built.args)


class ForgetsToDivide(Net2Net):
    """A faulty policy: replicates consumer columns without dividing by the replica count."""

    name = "net2net"

    def consumes(self, axis, layout, seed):
        return [replicate(axis, layout, "split")]  # no Split: every replica keeps the whole column


def test_a_faulty_rule_is_caught_at_the_first_node_it_breaks():
    built, graph = traced("gpt")
    with pytest.raises(rewrite.VerificationError) as info:
        rewrite.apply(graph, [passes.widen("blocks.1.fc", factor=2, init=ForgetsToDivide())], built.args)
    assert info.value.report.first_divergence == "blocks_1_proj"  # the consumer, not the widened fc


def test_grown_module_trains_without_touching_the_original():
    built, graph = traced("mlp")
    before = [p.clone() for p in built.model.parameters()]
    grown = rewrite.apply(graph, [passes.widen("layers.1", factor=2)], built.args)
    optimizer = torch.optim.SGD(grown.module.parameters(), lr=0.1)
    grown.module(*built.args).square().mean().backward()
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, built.model.parameters()))


# -- property: random MLP stacks, random site, random policy and size --------------------------------
@st.composite
def stacks(draw):
    widths = draw(st.lists(st.integers(2, 10), min_size=3, max_size=5))
    norm = draw(st.booleans())
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers.append(nn.Linear(a, b))
        if norm:
            layers.append(nn.LayerNorm(b))
        layers.append(draw(st.sampled_from([nn.ReLU, nn.GELU, nn.Tanh]))())
    torch.manual_seed(draw(st.integers(0, 1000)))
    model = nn.Sequential(*layers[:-1]).double()
    hidden = [i for i, m in enumerate(model) if isinstance(m, nn.Linear)][:-1]  # the last one is the output
    return model, widths, hidden


@settings(max_examples=30, deadline=None)
@given(stacks(), st.data())
def test_property_exact_plans_verify_refused_plans_say_why(case, data):
    model, widths, hidden = case
    index = data.draw(st.sampled_from(hidden))
    init = data.draw(st.sampled_from(["zero", "clone", "net2net"]))
    old = model[index].out_features
    size = old * data.draw(st.integers(2, 3)) if init == "clone" else old + data.draw(st.integers(1, 7))
    x = torch.randn(3, widths[0], dtype=torch.float64)
    snapshot = copy.deepcopy(model.state_dict())
    try:
        grown = rewrite.apply(model, [passes.widen(str(index), size=size, init=init)], x)
    except rewrite.NotExactError as e:
        assert "LayerNorm over the grown axis" in str(e) and init != "clone"
    else:
        record = grown.report.passes[0]
        assert record.exact and record.verification.max_rel_error <= 1e-10
        assert grown.graph.module.get_submodule(str(index)).out_features == size
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


def test_a_rewrite_that_breaks_the_graph_is_named_not_a_torch_trace(monkeypatch):
    import rewrite.transform.resize as grow

    built, graph = traced("mlp")
    real = grow._patch_nodes

    def break_one_node(graph, module, layouts):  # drop the consumer's growth: its input no longer fits
        result = real(graph, module, layouts)
        module.get_submodule("layers.1").weight = torch.nn.Parameter(torch.zeros(32, 32))
        return result

    monkeypatch.setattr(grow, "_patch_nodes", break_one_node)
    with pytest.raises(rewrite.GrowthError, match="the graph grown by widen\\(layers.0\\) does not run: RuntimeError"):
        rewrite.apply(graph, [passes.widen("layers.0", factor=2)], built.args)


class Uniform(passes.Policy):
    """A user's policy: the base replication with a uniform map, declaring the norms it keeps."""

    name = "uniform"
    preserves = frozenset({"layer_norm", "rms_norm", "mean"})

    def mapping(self, n, n_new, generator):
        return torch.arange(n, n_new) % n


def test_a_user_policy_gets_the_exactness_analysis_from_what_it_declares():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)).eval()
    x = torch.randn(3, 4)
    grown = rewrite.apply(model, [passes.widen("0", factor=2, init=Uniform())], (x,))
    record = grown.report.passes[0]
    assert record.exact and record.verification.max_abs_error < 1e-6
    assert str(record).startswith("widen(0): 0: 8 -> 16; exact")

    class Forgetful(Uniform):
        preserves = frozenset()  # same tensors, but it does not claim to keep the LayerNorm

    with pytest.raises(rewrite.NotExactError, match="LayerNorm over the grown axis .* is not preserved by uniform"):
        rewrite.apply(model, [passes.widen("0", factor=2, init=Forgetful())], (x,))
