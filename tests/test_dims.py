"""Dimension analysis: coupled (tensor, axis) groups with roles, from op semantics, on both front-ends."""

import pytest
import torch
import torch.nn as nn
from conftest import traced
from hypothesis import given, settings
from hypothesis import strategies as st

import passes
import rewrite
from rewrite.app import zoo


def group_of(graph, tensor, axis):
    for group in rewrite.dim_groups(graph):
        if any(m.tensor == tensor and m.axis == axis for m in group.members):
            return group
    raise AssertionError(f"{tensor}[{axis}] is in no group")


def roles(group):
    return {str(m): m.role_names for m in group.members}


@pytest.mark.parametrize("name", zoo.NAMES)
def test_every_zoo_model_is_analysed(name):
    _, graph = traced(name)
    groups = rewrite.dim_groups(graph)
    assert groups and all(g.growable for g in groups)
    for group in groups:  # members of one group share one size
        for m in group.members:
            assert graph.tensors()[m.tensor].shape[m.axis] == group.size


def test_mlp_hidden_units():
    _, graph = traced("mlp")
    group = group_of(graph, "layers.0.weight", 0)
    assert group.size == 32
    assert roles(group) == {
        "layers.0.weight[0]": ["produces"],
        "layers.0.bias[0]": ["along"],
        "layers.1.weight[1]": ["consumes"],
    }
    assert not group.reductions


def test_cnn_channels_couple_conv_batchnorm_and_next_conv():
    _, graph = traced("cnn")
    group = group_of(graph, "conv1.weight", 0)
    assert group.size == 8
    assert roles(group) == {
        "conv1.weight[0]": ["produces"],
        "conv1.bias[0]": ["along"],
        "bn1.weight[0]": ["along"],
        "bn1.bias[0]": ["along"],
        "bn1.running_mean[0]": ["along"],
        "bn1.running_var[0]": ["along"],
        "conv2.weight[1]": ["consumes"],
    }
    last = group_of(graph, "conv2.weight", 0)  # through pooling and flatten into the head
    assert "head.weight[1]" in roles(last) and roles(last)["head.weight[1]"] == ["consumes"]


def test_gpt_residual_stream_with_tied_embedding():
    _, graph = traced("gpt")
    group = group_of(graph, "tok.weight", 1)
    r = roles(group)
    assert group.size == 32
    assert r["tok.weight[1]"] == ["consumes", "produces"]  # embedding columns and the tied head
    assert r["pos.weight[1]"] == ["produces"]
    for i in range(2):
        assert r[f"blocks.{i}.attn.o.weight[0]"] == ["produces"]
        assert r[f"blocks.{i}.proj.weight[0]"] == ["produces"]
        for consumer in ("attn.q", "attn.k", "attn.v", "fc"):
            assert r[f"blocks.{i}.{consumer}.weight[1]"] == ["consumes"]
        assert r[f"blocks.{i}.ln1.weight[0]"] == ["along"]
    assert {kind for kind, _ in group.reductions} == {"layer_norm"}
    vocab = group_of(graph, "tok.weight", 0)
    assert roles(vocab)["tok.weight[0]"] == ["indexed", "produces"]


def test_gpt2_conv1d_layout_is_read_as_in_out():
    _, graph = traced("hf-gpt2")
    residual = roles(group_of(graph, "transformer.wte.weight", 1))
    assert residual["transformer.h.0.attn.c_attn.weight[0]"] == ["consumes"]
    assert residual["transformer.h.0.attn.c_proj.weight[1]"] == ["produces"]
    mlp = group_of(graph, "transformer.h.0.mlp.c_fc.weight", 1)
    assert mlp.size == 128
    assert roles(mlp)["transformer.h.0.mlp.c_proj.weight[0]"] == ["consumes"]


class _Weights(nn.Module):
    def __init__(self, out_features, in_features, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.randn(out_features)) if bias else None


class TransposedLinears(nn.Module):
    """Linears written ``x @ W.T + b`` (Falcon), ``x @ W.t()`` and ``x @ W.permute(1, 0)``."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = _Weights(12, 6, True), _Weights(10, 12, False), _Weights(4, 10, False)

    def forward(self, x):
        h = torch.relu(x @ self.fc1.weight.T + self.fc1.bias)
        h = torch.relu(h @ self.fc2.weight.t())
        return h @ self.fc3.weight.permute(1, 0)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_transposed_weights_applied_by_matmul_are_linears(frontend):
    import passes

    model, x = TransposedLinears().eval(), torch.randn(3, 6)
    graph = rewrite.trace(model, (x,), frontend=frontend)
    hidden = group_of(graph, "fc1.weight", 0)
    assert hidden.size == 12
    assert roles(hidden) == {"fc1.weight[0]": ["produces"], "fc1.bias[0]": ["along"], "fc2.weight[1]": ["consumes"]}
    assert roles(group_of(graph, "fc2.weight", 0))["fc3.weight[1]"] == ["consumes"]
    grown = rewrite.apply(graph, [passes.widen(["fc1", "fc2"], factor=2)], (x,))
    assert grown.graph.parameters()["fc2.weight"].shape == (20, 24)
    assert grown.report.passes[0].verification.max_abs_error < 1e-5


@pytest.mark.parametrize("name, prefix", [("llama", "blocks.0"), ("hf-llama", "model.layers.0")])
def test_llama_residual_rmsnorm_swiglu_and_attention(name, prefix):
    _, graph = traced(name)
    hand = name == "llama"
    q = f"{prefix}.attn.q.weight" if hand else f"{prefix}.self_attn.q_proj.weight"
    k = f"{prefix}.attn.k.weight" if hand else f"{prefix}.self_attn.k_proj.weight"
    gate = f"{prefix}.mlp.gate.weight" if hand else f"{prefix}.mlp.gate_proj.weight"
    up = f"{prefix}.mlp.up.weight" if hand else f"{prefix}.mlp.up_proj.weight"
    down = f"{prefix}.mlp.down.weight" if hand else f"{prefix}.mlp.down_proj.weight"
    norm = f"{prefix}.norm1.weight" if hand else f"{prefix}.input_layernorm.weight"
    residual = group_of(graph, q, 1)
    assert roles(residual)[f"{norm}[0]"] == ["along"]
    assert residual.reductions  # RMSNorm mixes the residual stream
    mlp = group_of(graph, gate, 0)  # SwiGLU: gate and up produce one axis, down consumes it
    assert {str(m) for m in mlp.members} == {f"{gate}[0]", f"{up}[0]", f"{down}[1]"}
    assert group_of(graph, q, 0).size == 32 and group_of(graph, k, 0).size == 16  # 4 heads, 2 KV heads
    assert any(c.how == "factor" for c in group_of(graph, q, 0).compositions)  # view into heads
    head_dim = [
        g for g in rewrite.dim_groups(graph, all_groups=True) if any(k == "attention_scale" for k, _ in g.reductions)
    ]
    assert head_dim and all(g.size == 8 for g in head_dim)  # q and k share head_dim under the softmax scale


def test_mixtral_router_and_experts():
    _, graph = traced("hf-mixtral")
    router = group_of(graph, "model.layers.0.mlp.gate.weight", 0)
    assert router.size == 4
    assert ("softmax", "softmax") in router.reductions
    experts = group_of(graph, "model.layers.0.mlp.experts.gate_up_proj", 0)
    assert roles(experts)["model.layers.0.mlp.experts.gate_up_proj[0]"] == ["indexed"]
    # batched experts apply W[expert] @ x: the selected weight's roles reach the stacked parameter
    residual = roles(group_of(graph, "model.embed_tokens.weight", 1))
    assert residual["model.layers.0.mlp.experts.gate_up_proj[2]"] == ["consumes"]
    assert residual["model.layers.0.mlp.experts.down_proj[1]"] == ["produces"]


def test_integer_index_buffers_are_not_growable():
    _, graph = traced("hf-bert")
    members = {m.tensor for g in rewrite.dim_groups(graph) for m in g.members}
    assert "embeddings.token_type_ids" not in members and "embeddings.position_ids" not in members


class Cumulative(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)

    def forward(self, x):
        return torch.cumsum(self.lin(x), dim=-1)


class Kron(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        return torch.kron(self.lin(x), x)


def test_an_op_without_rule_blocks_the_groups_it_touches_and_growing_one_names_it():
    x = torch.randn(3, 4)
    graph = rewrite.trace(Cumulative(), (x,))
    hidden = group_of(graph, "lin.weight", 0)
    assert [(op, node) for op, node, _ in hidden.blocked] == [("cumsum", "cumsum")]
    assert "blocked:  cumsum (cumsum)" in hidden.describe()
    assert not group_of(graph, "lin.weight", 1).blocked  # the input axis does not reach it
    with pytest.raises(rewrite.UnsupportedOpError, match=r"op 'cumsum' \(node 'cumsum'\).*lin.weight\[0\]"):
        rewrite.apply(Cumulative(), [passes.widen("lin", factor=2)], (x,))
    graph = rewrite.trace(Kron(), (x,))
    assert [op for op, _, why in group_of(graph, "lin.weight", 0).blocked] == ["kron"]
    with pytest.raises(rewrite.UnsupportedOpError, match=r"op 'kron' \(node 'kron'\): no axis rule"):
        rewrite.apply(Kron(), [passes.widen("lin", factor=2)], (x,))


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.lin(x) * self.scale


def test_size_one_axes_are_not_coupled():
    graph = rewrite.trace(Scaled(), (torch.randn(3, 4),))
    hidden = group_of(graph, "lin.weight", 0)
    assert "scale[0]" not in roles(hidden)


class OneHead(nn.Module):
    """One head of 8, rotated by a table broadcast over heads, as Hugging Face attention splits heads."""

    def __init__(self, heads_written: int = -1):
        super().__init__()
        self.q, self.o, self.heads_written = nn.Linear(8, 8), nn.Linear(8, 8), heads_written
        self.register_buffer("cos", torch.randn(6, 8))

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads_written, 8).transpose(1, 2)  # [b, 1, t, 8]
        q = q * self.cos[:t].unsqueeze(0).unsqueeze(0)  # the table's head axis is a broadcast one
        y = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_one_head_is_followed_from_the_view_that_infers_it_and_a_broadcast_axis_is_not(frontend):
    graph = rewrite.trace(OneHead(), (torch.randn(2, 5, 8),), frontend=frontend)
    analysis = rewrite.dim_analysis(graph)
    attention = next(n for n in graph.module.graph.nodes if "scaled_dot_product_attention" in str(n.target))
    heads = analysis.axis_group[(f"n:{attention.args[0].name}", 1)]
    assert heads.size == 1 and analysis.axis_group[(f"n:{attention.name}", 1)] is heads
    wholes = sorted((c.how, sorted(str(m) for m in c.whole.members)) for c in heads.compositions)
    assert wholes == [("factor", ["o.weight[1]"]), ("factor", ["q.bias[0]", "q.weight[0]"])]  # split out of q,
    # merged into o
    table = next(n for n in graph.module.graph.nodes if graph.shape(n.name) == (1, 1, 5, 8))
    assert analysis.axis_group[(f"n:{table.name}", 1)] is not heads
    grown = rewrite.apply(graph, [passes.add_heads(1)], (torch.randn(2, 5, 8),))
    assert grown.graph.parameters()["q.weight"].shape == (16, 8) and grown.report.passes[0].exact
    literal = rewrite.trace(OneHead(heads_written=1), (torch.randn(2, 5, 8),), frontend=frontend)
    heads = rewrite.dim_analysis(literal).axis_group[(f"n:{attention.args[0].name}", 1)]
    assert not heads.compositions  # view(b, t, 1, 8) adds an axis, as far as the shapes say


def test_inspect_groups_prints_them(capsys):
    from rewrite.app.cli import main

    assert main(["inspect", "mlp", "--groups"]) == 0
    out = capsys.readouterr().out
    assert "dimension groups (4 growable):" in out
    assert "produces: layers.0.weight[0]" in out


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(2, 9), min_size=2, max_size=5), st.booleans())
def test_property_mlp_groups_are_exactly_the_layer_boundaries(widths, bias):
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b, bias=bias), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    graph = rewrite.trace(model, (torch.randn(2, widths[0]),))
    groups = rewrite.dim_groups(graph)
    assert len(groups) == len(widths)  # the input, each hidden width, the output
    for i in range(len(widths) - 2):  # hidden boundary i: layer 2i produces, layer 2i+2 consumes
        group = group_of(graph, f"{2 * i}.weight", 0)
        expected = {f"{2 * i}.weight[0]": ["produces"], f"{2 * i + 2}.weight[1]": ["consumes"]}
        if bias:
            expected[f"{2 * i}.bias[0]"] = ["along"]
        assert group.size == widths[i + 1] and roles(group) == expected


def test_fused_qkv_split_parts_are_coupled_to_their_users():
    _, graph = traced("hf-gpt2")
    fused = group_of(graph, "transformer.h.0.attn.c_attn.weight", 1)
    (split,) = [c for c in fused.compositions if c.how == "concat"]
    assert split.whole is fused and [p.size for p in split.parts] == [32, 32, 32]
    assert all(any(c.how == "factor" for c in part.compositions) for part in split.parts)  # each into heads


def test_growing_axes_that_hold_no_parameter_is_refused_by_the_engine():
    """A width pass that picked a group without parameters (one head written as a literal 1) would patch the
    view's literal and grow nothing: ``resize`` itself refuses, whatever pass asked."""
    from passes.policies import policy
    from rewrite.transform.resize import grow

    graph = rewrite.trace(OneHead(heads_written=1), (torch.randn(2, 5, 8),))
    attention = next(n for n in graph.module.graph.nodes if "scaled_dot_product_attention" in str(n.target))
    heads = rewrite.dim_analysis(graph).axis_group[(f"n:{attention.args[0].name}", 1)]
    with pytest.raises(rewrite.GrowthError, match=r"the axes to grow \(1 -> 2 \(.+\)\) hold no parameter"):
        grow(graph, {heads: 2}, policy("zero"))


class TypeAs(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(4, 6), nn.Linear(6, 4)
        self.register_buffer("reference", torch.zeros(3))

    def forward(self, x):
        return self.out(self.lin(x).type_as(self.reference))  # the reference gives a dtype, not a shape


def test_a_dtype_reference_couples_no_axis():
    x = torch.randn(2, 4)
    grown = rewrite.apply(TypeAs(), [passes.widen("lin", factor=2)], (x,))
    assert grown.graph.parameters()["lin.weight"].shape == (12, 4) and grown.report.passes[0].exact


def test_sizes_the_data_decides_on_meta_block_their_ops_instead_of_failing_the_analysis():
    """JetMoE on ``meta``: its routing counts tokens per expert, sizes torch.export leaves as symbols. The ops
    that compare them are blind to the analysis (growing through them is refused, naming them); the rest of
    the model is analysed as usual."""
    import transformers

    from rewrite.io.grow_checkpoint import meta_inputs, meta_model

    config = transformers.JetMoeConfig(hidden_size=32, num_hidden_layers=1, num_key_value_heads=2, kv_channels=8,
                                       intermediate_size=64, vocab_size=64, architectures=["JetMoeForCausalLM"])
    model = meta_model(config)
    args, kwargs = meta_inputs(model)
    graph = rewrite.trace(model, args, kwargs)
    blocked = {why for group in rewrite.dim_groups(graph, all_groups=True) for _, _, why in group.blocked}
    assert any(why.startswith("its sizes depend on the data") for why in blocked)
    with pytest.raises(rewrite.GrowthError, match="add_heads at model.layers.0.self_attention"):
        rewrite.apply(graph, [passes.add_heads(2)], args, kwargs, verify=False)


class EmptyCache(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(4, 6), nn.Linear(6, 4)
        self.register_buffer("cache", torch.zeros(0))

    def forward(self, x):
        return self.out(torch.cat([self.cache, self.lin(x)], dim=0))  # cat skips a 1-D empty tensor


def test_cat_skips_an_empty_cache_as_torch_does():
    x = torch.randn(2, 4)
    grown = rewrite.apply(EmptyCache(), [passes.widen("lin", factor=2)], (x,))
    assert grown.graph.parameters()["lin.weight"].shape == (12, 4) and grown.report.passes[0].exact
