"""passes.add_heads: more attention heads, head size unchanged; grouped-query attention keeps its ratio."""

import pytest
import torch
from conftest import example, traced
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


class _WrittenOutAttention(torch.nn.Module):
    """softmax(q k^T / sqrt(d) + causal mask) v written with matmul, as eager attention implementations do."""

    def __init__(self, dim=16, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.d = heads, kv_heads, dim // heads
        self.q, self.o = torch.nn.Linear(dim, dim), torch.nn.Linear(dim, dim)
        self.k, self.v = torch.nn.Linear(dim, kv_heads * self.d), torch.nn.Linear(dim, kv_heads * self.d)
        self.register_buffer("mask", torch.full((16, 16), float("-inf")).triu(1))

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.d).transpose(1, 2)
        k, v = (f(x).view(b, t, self.kv_heads, self.d).transpose(1, 2) for f in (self.k, self.v))
        group = self.heads // self.kv_heads  # grouped-query: each KV head serves `group` query heads
        k, v = (z[:, :, None].expand(b, self.kv_heads, group, t, self.d).reshape(b, self.heads, t, self.d)
                for z in (k, v))
        scores = q @ k.transpose(-2, -1) * self.d ** -0.5 + self.mask[:t, :t]
        probabilities = torch.nn.functional.dropout(scores.softmax(-1), 0.1, self.training)
        return self.o((probabilities @ v).transpose(1, 2).reshape(b, t, -1))


class _WrittenOutModel(torch.nn.Module):
    def __init__(self, **attention):
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(32, 16), torch.nn.Linear(16, 32)
        self.attn = _WrittenOutAttention(**attention)

    def forward(self, ids):
        x = self.embed(ids)
        return self.head(x + self.attn(x))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_attention_written_out_with_matmul_and_softmax_grows_like_sdpa(frontend):
    model, ids = _WrittenOutModel().eval(), torch.randint(0, 32, (2, 6))
    graph = rewrite.trace(model, (ids,), frontend=frontend)
    plans = {"heads": passes.add_heads(2), "qk": passes.widen_heads(qk=8), "v": passes.widen_heads(v=8)}
    for what, growth in plans.items():
        grown = rewrite.apply(graph, [growth], (ids,))
        record = grown.report.passes[0]
        assert record.exact and record.verification.max_abs_error < 1e-6, what
    params = rewrite.apply(graph, [passes.add_heads(2)], (ids,)).graph.parameters()
    assert params["attn.q.weight"].shape == (24, 16) and params["attn.o.weight"].shape == (16, 24)
    assert params["attn.k.weight"].shape == (12, 16)  # one more KV head for two more query heads


fuzz = example("fuzz_families")
GROUPED = ("llama", "qwen2", "qwen3", "mistral", "gemma")  # families whose config takes fewer KV heads
HEAD_DIM = ("llama", "qwen3", "mistral", "gemma")  # configs that name a head size apart from the hidden size
LITERAL_HEAD_COUNT = ("stablelm", "opt")  # view(b, t, num_heads, head_dim): one head reads as a broadcast axis


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(family=st.sampled_from(fuzz.FAMILIES), grouped=st.booleans(), more=st.integers(1, 2), data=st.data())
def test_one_key_value_head_grows_like_many_planned_on_shapes(family, grouped, more, data):
    """One KV head (and one query head, or two sharing it): size 1 cannot tell a head axis from a broadcast
    one, so the analysis follows the head from the projection a view's ``-1`` splits it out of. add_heads then
    grows the projections, the shapes it plans are the ones the graph computes (the next pass, planned on
    them, runs), and a folder grown without loading it is the native model bit for bit. Where the view writes
    the head count as a literal 1, the head cannot be seen, and add_heads refuses rather than grow nothing."""
    ratio = 2 if grouped and family in GROUPED else 1
    hidden = 24 * ratio  # a multiple of every head count reached: configs require it
    head_dim = 8 if family in HEAD_DIM else hidden // ratio
    config = {"hidden": hidden, "heads": ratio, "kv_heads": 1, "head_dim": head_dim, "intermediate": 2 * hidden,
              "layers": 2, "tied": data.draw(st.booleans()), "parallel": False, "bias": data.draw(st.booleans()),
              "qk_norm": False}
    case = fuzz.Case(0, family, config, [("add_heads", {"n": ratio * more}), ("add_layers", {"n": 1, "init": "zero"})])
    torch.manual_seed(0)
    model, ids = fuzz.build(case).eval(), torch.randint(3, fuzz.VOCAB, (2, 5))
    if family in LITERAL_HEAD_COUNT:
        with pytest.raises(rewrite.GrowthError, match=r"no projection is split into the query's heads axis"):
            rewrite.apply(model, fuzz.plan_of(case), (ids,))
        return
    grown = rewrite.apply(model, fuzz.plan_of(case), (ids,))
    heads = grown.report.passes[0]
    assert grown.report.how == "planned on shapes, each tensor built once", grown.report.how
    assert heads.exact and heads.verification.max_abs_error < 1e-5
    added_query_heads = more * ratio  # their W_Q rows and W_O columns at least
    assert heads.parameters_after - heads.parameters_before >= 2 * added_query_heads * head_dim * hidden * 2
    if family in HEAD_DIM:
        native = rewrite.to_native(grown, like=model).eval()
        assert native.config.num_attention_heads == ratio * (1 + more)
        assert native.config.num_key_value_heads == 1 + more
        fresh = torch.randint(3, fuzz.VOCAB, (3, 8))
        torch.testing.assert_close(fuzz.logits(native, fresh), fuzz.logits(model, fresh), atol=1e-5, rtol=0)
        assert fuzz.streamed(model, fuzz.plan_of(case), native) == ("exact", "native and streamed")


def test_a_one_head_view_with_a_literal_head_count_is_refused_with_the_fix():
    """``view(b, t, 1, d)`` reads like an added broadcast axis: add_heads says so rather than patching the
    literal of a view whose projection did not grow."""
    model, ids = _WrittenOutModel(heads=1, kv_heads=1).eval(), torch.randint(0, 32, (2, 6))
    with pytest.raises(rewrite.GrowthError, match=r"add_heads at attn: no projection is split into the query's "
                                                  r"heads axis \(size 1\).*write it as -1"):
        rewrite.apply(model, [passes.add_heads(1)], (ids,))
