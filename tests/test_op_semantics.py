"""Op knowledge beyond the zoo: an unknown op stops only what it touches; overloads that mean different things;
stack/unbind; sizes read from shapes at run time. Every growth here either runs and computes the original
function on fresh shapes, or is refused naming the op and node: never a graph that does not run."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import passes
import rewrite
from rewrite.ops import canonical_kind
from rewrite.ops.literals import shape_read

FRONTENDS = ("fx", "export")


class Llama(nn.Module):
    """A hand-written decoder block: interleaved rotary embeddings (``stack`` + ``flatten``, as GPT-J and
    Cohere), q/k/v unbound from one fused projection (``unbind``, as ModernBERT), and optional extras on the
    residual stream or the MLP."""

    def __init__(self, extra: str = "", d: int = 16, heads: int = 2, hidden: int = 32, vocab: int = 50):
        super().__init__()
        self.heads, self.extra = heads, extra
        self.embed = nn.Embedding(vocab, d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)
        self.head = nn.Linear(d, vocab)

    @staticmethod
    def rope(x):
        x1, x2 = x[..., ::2], x[..., 1::2]
        return torch.stack((x1 * 0.8 - x2 * 0.6, x1 * 0.6 + x2 * 0.8), -1).flatten(-2)

    def forward(self, ids):
        x = self.embed(ids)
        b, t = ids.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, 8).unbind(2)
        q, k, v = (self.rope(q.transpose(1, 2)), self.rope(k.transpose(1, 2)), v.transpose(1, 2))
        x = x + self.o(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1))
        if self.extra == "cumsum":  # an op the analysis has no rule for, on the residual stream
            x = torch.cumsum(x, dim=-1)
        h = F.gelu(self.up(x))
        if self.extra == "overloads":
            h = self.overloads(h, x)
        return self.head(x + self.down(h))

    @staticmethod
    def overloads(h, x):
        """Each family in its element-wise and reducing forms; reductions over the sequence axis or the input."""
        h = torch.max(h, torch.zeros_like(h)) + torch.min(h, torch.full_like(h, 0.5))  # element-wise: .other
        h = h * h.max(dim=1, keepdim=True).values.sigmoid() + h.min(1, keepdim=True)[0] * 0.1  # .dim: a tuple
        h = h + h.sum(1, keepdim=True) * 0.01 + h.mean(dim=1, keepdim=True) * 0.1
        h = h + h.std(1, keepdim=True) * 0.1 + h.var(1, keepdim=True, unbiased=False) * 0.1
        h = h * (h > 0).any(1, keepdim=True) + h * (h > -10).all(dim=1, keepdim=True) * 0.1
        first, rest = h.split([1, h.shape[1] - 1], dim=1)
        h = torch.cat([first * 2, rest], 1) + torch.select(h, 1, 0).unsqueeze(1) * 0.1
        return h * torch.tanh(x.abs().max() + x.min())  # full reductions of another tensor


def fresh_error(model, grown) -> float:
    ids = torch.randint(0, 50, (3, 6))  # another batch size and sequence length than the example inputs
    with torch.no_grad():
        return float((grown.module(ids) - model(ids)).abs().max())


def grow(model, plan, frontend):
    ids = torch.randint(0, 50, (2, 5))
    return rewrite.apply(rewrite.trace(model, (ids,), frontend=frontend), plan, (ids,))


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_an_unknown_op_on_the_residual_stream_blocks_widen_hidden_only(frontend):
    model = Llama("cumsum").eval()
    grown = grow(model, [passes.widen("up", factor=2), passes.add_heads(1)], frontend)
    assert grown.report.exact and fresh_error(model, grown) < 1e-5
    assert grown.module.up.weight.shape == (64, 16) and grown.module.qkv.weight.shape == (72, 16)
    with pytest.raises(rewrite.UnsupportedOpError, match=r"op '(aten\.)?cumsum' \(node 'cumsum'\).*embed.weight\[1\]"):
        grow(model, [passes.widen_hidden(factor=2, init="clone")], frontend)


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_interleaved_rotary_stack_and_unbound_qkv_grow_exactly(frontend):
    model = Llama().eval()
    graph = rewrite.trace(model, (torch.randint(0, 50, (2, 5)),), frontend=frontend)
    assert not any(g.blocked for g in rewrite.dim_groups(graph))
    for plan in ([passes.widen("up", factor=2)], [passes.add_heads(2)], [passes.widen_hidden(factor=2, init="clone")]):
        grown = grow(model, plan, frontend)
        assert grown.report.exact and fresh_error(model, grown) < 1e-5, plan


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_min_max_sum_mean_std_var_any_all_split_select_in_every_form(frontend):
    model = Llama("overloads").eval()
    grown = grow(model, [passes.widen("up", factor=2)], frontend)
    assert grown.report.exact and grown.module.down.weight.shape == (16, 64)
    assert fresh_error(model, grown) < 1e-5


def test_overloads_are_told_apart_on_both_frontends():
    def kinds(frontend):
        graph = rewrite.trace(Llama("overloads").eval(), (torch.randint(0, 50, (2, 5)),), frontend=frontend)
        return [canonical_kind(graph, n) for n in graph.module.graph.nodes
                if n.op != "placeholder" and rewrite.ops.short_name(n) in ("max", "min")]

    assert kinds("fx") == ["maximum", "minimum", "mean", "mean", "mean", "mean"]
    assert sorted(kinds("export")) == sorted(["maximum", "minimum", "mean", "mean", "mean", "mean"])


@settings(max_examples=12, deadline=None)
@given(op=st.sampled_from(["cumsum", "cummax", "flip", "roll", "sort"]), where=st.sampled_from(["residual", "mlp"]))
def test_any_op_without_a_rule_blocks_exactly_the_groups_it_touches(op, where):
    """Whatever the op, a growth that does not touch its axes proceeds exactly; one that does is refused
    naming it."""
    apply_op = {"cumsum": lambda v: torch.cumsum(v, -1), "cummax": lambda v: torch.cummax(v, -1).values,
                "flip": lambda v: torch.flip(v, [-1]), "roll": lambda v: torch.roll(v, 1, -1),
                "sort": lambda v: torch.sort(v, -1).values}[op]

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 10), nn.Linear(10, 4)

        def forward(self, x):
            h = self.a(x)
            h = apply_op(h) if where == "residual" else h
            g = torch.relu(self.b(h))
            return self.c(apply_op(g) if where == "mlp" else g)

    model, x = Model().eval(), torch.randn(3, 6)
    blocked, free = ("a", "b") if where == "residual" else ("b", "a")
    grown = rewrite.apply(model, [passes.widen(free, factor=2)], (x,))
    assert grown.report.exact and torch.allclose(grown.module(x), model(x), atol=1e-6)
    with pytest.raises(rewrite.UnsupportedOpError, match=rf"op '{op}' \(node '{op}'\)"):
        rewrite.apply(model, [passes.widen(blocked, factor=2)], (x,))


class ShapeSized(nn.Module):
    """A GPT block that reads sizes from shapes at run time: ``split(x.shape[-1])`` and ``view(b, t, d)``."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads = heads
        self.embed, self.ln = nn.Embedding(50, d), nn.LayerNorm(d)
        self.qkv, self.proj, self.head = nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, 50)

    def forward(self, ids):
        x = self.embed(ids)
        b, t, d = x.size()
        q, k, v = self.qkv(self.ln(x)).split(x.shape[-1], dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(x + self.proj(a.transpose(1, 2).contiguous().view(b, t, d)))


def test_sizes_read_from_shapes_tie_the_axes_they_follow():
    """fx keeps ``x.shape[-1]`` as a run-time size: the split's parts and the final view follow the residual
    stream, as the analysis of the traced graph says."""
    model = ShapeSized().eval()
    graph = rewrite.trace(model, (torch.randint(0, 50, (2, 5)),), frontend="fx")
    residual = next(g for g in rewrite.dim_groups(graph) if any(str(m) == "embed.weight[1]" for m in g.members))
    assert ("n:split#0", 2) in residual.activations and ("n:view_3", 2) in residual.activations


@pytest.mark.parametrize("plan", [
    [passes.widen_hidden(factor=2, init="clone")], [passes.add_heads(2)], [passes.widen_heads(qk=16, v=16)],
    [passes.add_heads(1), passes.widen_hidden(factor=2, init="clone"), passes.widen_mlp(factor=2)],
], ids=["widen_hidden", "add_heads", "widen_heads", "three"])
@pytest.mark.parametrize("frontend", FRONTENDS)
def test_sizes_read_from_weight_fixed_axes_grow_like_literals(plan, frontend):
    """The stream width ``d`` never varies at run time (the weights fix it): before growth its shape reads
    become literals, and ``d // heads`` with them (``rewrite.transform.static_sizes``), so each pass patches
    them where its growth changes them, as it does in torch.export's graph. The batch and sequence sizes stay
    read from the input: the grown graph takes other shapes."""
    model = ShapeSized().eval()
    grown = grow(model, plan, frontend)
    assert grown.report.exact and fresh_error(model, grown) < 1e-5
    if frontend == "fx":
        reads = [read[1] for n in grown.graph.module.graph.nodes
                 if (read := shape_read(n, exported=False)) is not None]
        assert sorted(reads) == [0, 1]  # b and t, still read at run time; d is a literal


class Composite(nn.Module):
    """Built from ``torch.nn`` composites, which fx used to keep as opaque leaf modules."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.encoder = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.decoder = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(16, 50)

    def forward(self, ids):
        x = self.embed(ids)
        return self.head(self.decoder(x, self.encoder(x)))


def test_composite_torch_nn_layers_are_seen_into():
    model = Composite().eval()
    graph = rewrite.trace(model, (torch.randint(0, 50, (2, 5)),))
    assert graph.frontend == "export"  # fx cannot trace their fast-path checks; auto moves on
    assert not any(isinstance(graph.module.get_submodule(n.target), nn.TransformerEncoderLayer)
                   for n in graph.module.graph.nodes if n.op == "call_module")
    grown = grow(model, [passes.widen(["encoder.linear1", "decoder.linear1"], factor=2)], "export")
    assert grown.report.exact and grown.module.encoder.linear1.weight.shape == (64, 16)
    assert fresh_error(model, grown) < 1e-5


def test_a_pass_that_matches_nothing_says_why_per_candidate():
    ids = torch.randint(0, 50, (2, 5))
    mlp, layers = rewrite.apply(Llama().eval(), [passes.widen_mlp(factor=2), passes.add_layers(1)], (ids,)).report.passes
    assert mlp.plan is None and "no dimension group lives inside one numbered block" in mlp.refusals[0][1]
    assert layers.plan is None and layers.refusals[0][1].startswith("no numbered modules")
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, vocab_size=50,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    report = rewrite.apply(model, [passes.add_layers(1, at=5), passes.widen_mlp(factor=2, layers=[7])], (ids,)).report
    assert report.passes[0].refusals == [("model.layers", "no block with index 5; the stack has blocks 0..1")]
    assert [site for site, _ in report.passes[1].refusals] == ["model.layers.0", "model.layers.1"]
    assert all("mlp.down_proj.weight[1]" in r and "not in layers=[7]" in r for _, r in report.passes[1].refusals)
    with pytest.raises(rewrite.GrowthError, match=r"matched nothing; at model.layers: no block with index 5"):
        rewrite.apply(model, [passes.add_layers(1, at=5)], (ids,), strict=True)


class TiedEnding(nn.Module):
    """A tied embedding/head reached through a written-out norm ``x * rsqrt(mean(x^2) + eps) * (1 + w)`` or a
    LayerNorm as ``x_hat * w + b``, a last-token selection and a constant scale."""

    def __init__(self, norm: str):
        super().__init__()
        self.norm = norm
        self.embed = nn.Embedding(50, 16)
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))
        self.gain, self.bias = nn.Parameter(torch.randn(16) * 0.1), nn.Parameter(torch.randn(16) * 0.1)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = x + layer(x)
        if self.norm == "rms":
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.gain)
        else:
            mean = x.mean(-1, keepdim=True)
            x_hat = (x - mean) / torch.sqrt((x - mean).pow(2).mean(-1, keepdim=True) + 1e-5)
            x = x_hat * self.gain + self.bias
        return F.linear(x[:, [-1], :] / 2.0, self.embed.weight)


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_a_tied_head_behind_a_written_out_norm_keeps_its_tie_under_clone(norm, frontend):
    model = TiedEnding(norm).eval()
    grown = grow(model, [passes.widen_hidden(factor=2, init="clone")], frontend)
    assert grown.report.exact and fresh_error(model, grown) < 1e-5
    parameters = dict(grown.graph.module.named_parameters())
    assert len([n for n in parameters if "embed" in n]) == 1  # still one tensor for embedding and head
    if norm == "rms":  # the head's factor k taken out of the gain, applied as 1 + w
        torch.testing.assert_close(1 + parameters["gain"], (1 + model.gain.detach()).repeat(2) / 2)
    else:  # and out of the gain and bias after it
        torch.testing.assert_close(parameters["gain"], model.gain.detach().repeat(2) / 2)
        torch.testing.assert_close(parameters["bias"], model.bias.detach().repeat(2) / 2)


@pytest.mark.parametrize("family", ["Llama", "Mistral", "Qwen2"])
def test_tied_hugging_face_models_widen_hidden_by_cloning(family):
    import transformers

    config = getattr(transformers, f"{family}Config")(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=50, tie_word_embeddings=True)
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    ids = torch.randint(0, 50, (2, 5))
    grown = rewrite.apply(model, [passes.widen_hidden(factor=2, init="clone")], (ids,))
    fresh = torch.randint(0, 50, (3, 6))
    with torch.no_grad():
        reference = model(fresh).logits
        torch.testing.assert_close(grown.module(fresh).logits, reference, rtol=1e-5, atol=1e-5)
        if family != "Qwen2":  # Qwen2's config has no head_dim: 4 heads of 8 cannot fill 64 in that class
            native = rewrite.to_native(grown, like=model)
            assert native.config.tie_word_embeddings and native.lm_head.weight is native.model.embed_tokens.weight
            torch.testing.assert_close(native(fresh).logits, reference, rtol=1e-5, atol=1e-5)


class ViewAfterAttention(nn.Module):
    """``.transpose(1, 2).contiguous().view(b, t, -1)`` after SDPA: torch.export keeps only the ``view``, valid
    while the output happened to be contiguous. Once the value head size differs from the key's, SDPA returns
    another layout."""

    def __init__(self):
        super().__init__()
        self.embed, self.q, self.k, self.v = nn.Embedding(50, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.o, self.head = nn.Linear(16, 16), nn.Linear(16, 50)

    def forward(self, ids):
        x = self.embed(ids)
        b, t = ids.shape
        q, k, v = (proj(x).view(b, t, 2, 8).transpose(1, 2) for proj in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(x + self.o(a.transpose(1, 2).contiguous().view(b, t, 16)))


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_a_view_whose_sizes_growth_changes_becomes_a_reshape(frontend):
    model = ViewAfterAttention().eval()
    grown = grow(model, [passes.widen_heads(v=16)], frontend)
    assert grown.report.exact and fresh_error(model, grown) < 1e-5
    kinds = {n.name: str(n.target) for n in grown.graph.module.graph.nodes}
    assert any("reshape" in target for target in kinds.values())
