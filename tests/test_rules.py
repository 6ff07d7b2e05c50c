"""The rule language, compiler style: a small module, a pattern, a replacement, the expected function
written by hand, a numeric comparison, and the matches that must not happen. Every pattern is run on the
graphs of both front-ends (fx: ``call_module``; export: ``aten`` ops with ``get_attr`` weights)."""

import pytest
import torch
from torch import nn

import passes
import rewrite
from rewrite import op, optional, residual
from rewrite.analysis.blocks import depends_on
from rewrite.ops import ACTIVATIONS

FRONTENDS = ["fx", "export"]
aten = torch.ops.aten


class TwoLayer(nn.Module):
    def __init__(self, act=None):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(6, 8), act or nn.ReLU(), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(6), nn.Linear(6, 6)

    def forward(self, x):
        return x + self.fc(self.norm(x)) + x.sum(-1, keepdim=True)  # the second add is not residual in F(x)


def _graph(model, frontend, x):
    torch.manual_seed(0)
    return rewrite.trace(model.eval(), (x,), frontend=frontend)


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_a_chain_matches_linear_act_linear_on_both_frontends(frontend):
    graph = _graph(TwoLayer(), frontend, torch.randn(2, 6))
    (match,) = (op("linear", "up") >> op(ACTIVATIONS, "act") >> op("linear", "down")).find(graph)
    assert (match.site, match.module("down")) == ("fc1", "fc2")
    assert (match.weight("up"), match.bias("down")) == ("fc1.weight", "fc2.bias")
    assert not (op("linear") >> op("linear", "x")).find(graph)  # fc1 does not feed fc2 directly
    assert not (op("linear", "a") >> op("gelu")).find(graph)  # ReLU is not GELU


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_optional_steps_and_module_globs(frontend):
    graph = _graph(TwoLayer(), frontend, torch.randn(2, 6))
    chain = op("linear", "layer") >> optional(op("batch_norm")) >> op("relu", "act")
    assert [m.site for m in chain.find(graph)] == ["fc1"]
    assert [m.site for m in op("linear", "l", module="fc2").find(graph)] == ["fc2"]
    assert not op("linear", "l", module="fc3*").find(graph)
    assert [m.site for m in op("linear", "l", where=lambda g, n: g.shape(n)[-1] == 3).find(graph)] == ["fc2"]


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_residual_matches_x_plus_f_of_x_only(frontend):
    graph = _graph(Residual(), frontend, torch.randn(2, 6))
    (match,) = residual().find(graph)  # x + fc(norm(x)); "+ x.sum()" is also F(x): but it is the outer add
    assert match["x"].op == "placeholder"
    assert depends_on(match["branch"], match["x"])


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_a_rewrite_is_applied_verified_and_reported(frontend):
    """fc2(relu(fc1 x)) -> fc2(relu(fc1 x)) + 0 * (A x): a zero-output skip branch; exact."""
    model = TwoLayer()
    x = torch.randn(4, 6)

    @rewrite.rule(op("linear", "out", module="fc2"))
    def skip(match, edit):
        inner = match.input("out")
        a = edit.add_parameter("skip.weight", torch.zeros(3, inner.meta["tensor_meta"].shape[-1]))
        total = edit.call(aten.add.Tensor, match["out"], edit.at(match["out"]).linear(inner, a))
        edit.replace_uses(match["out"], total, keep={total})

    grown = rewrite.apply(_graph(model, frontend, x), [skip], (x,))
    (record,) = grown.report.passes
    assert record.plan.sites == ["fc2"] and record.exact and record.added == ["skip.weight"]
    assert record.parameters_after - record.parameters_before == 3 * 8
    torch.testing.assert_close(grown.module(x), model(x), rtol=0, atol=0)
    assert "skip.weight" in dict(grown.module.named_parameters(remove_duplicate=False)).keys() | {
        n for n, _ in grown.module.named_parameters()
    }


def test_a_wrong_rewrite_claimed_exact_is_caught_and_named():
    model, x = TwoLayer(), torch.randn(4, 6)

    @rewrite.rule(op("relu", "act"))
    def double(match, edit):
        twice = edit.at(match["act"]).call(aten.mul.Tensor, match["act"], 2.0)
        edit.replace_uses(match["act"], twice, keep={twice})

    with pytest.raises(rewrite.VerificationError, match="double was planned exact"):
        rewrite.apply(model, [double], (x,))


def test_conditions_refuse_with_their_reason_and_exactness_is_enforced():
    model, x = TwoLayer(nn.GELU()), torch.randn(4, 6)
    refuse = rewrite.Rule(op("linear", "l"), lambda m, e: None, condition=lambda m: f"not {m.site}", name="no")
    grown = rewrite.apply(model, [refuse], (x,))
    (record,) = grown.report.passes
    assert record.plan is None and record.refusals == [("fc1", "not fc1"), ("fc2", "not fc2")]
    assert "refused at fc1: not fc1" in str(grown.report)
    with pytest.raises(rewrite.NotExactError, match="gelu after fc1 is not idempotent"):
        rewrite.apply(model, [passes.net2deeper("fc1")], (x,))


def test_rule_sets_run_in_order_and_repeat_reaches_a_fixpoint():
    """Each round halves one fc1 weight entry > 0.5 until none is left: a fixpoint rule."""
    model, x = TwoLayer(), torch.randn(4, 6)
    with torch.no_grad():
        model.fc1.weight.fill_(4.0)

    def big(match):
        return None if match.graph.module.get_parameter(match.weight("l")).max() > 0.5 else "small"

    def halve(match, edit):
        edit.scale(match["l"], 0.5)

    shrink = rewrite.Rule(op("linear", "l", module="fc1"), halve, condition=big, exact=False, repeat=True,
                          name="shrink", approximate="changes weights")
    rules = shrink + passes.net2deeper("fc1")
    assert [r.name for r in rules] == ["shrink", "net2deeper(fc1)"]
    grown = rewrite.apply(model, rules, (x,))
    weight = dict(grown.module.named_parameters())["fc1.weight"]
    assert weight.max().item() == 0.5  # 4 -> 2 -> 1 -> 0.5: three rounds, then the condition refuses
    assert [r.name for r in grown.report.passes] == ["shrink", "net2deeper(fc1)"]

    runaway = rewrite.Rule(op("linear", "l", module="fc1"), halve, exact=False, repeat=True, max_rounds=3,
                           approximate="changes weights", name="runaway")
    with pytest.raises(rewrite.GrowthError, match="runaway still matches after 3 rounds"):
        rewrite.apply(model, [runaway], (x,))


def test_the_original_model_is_never_modified():
    model, x = TwoLayer(), torch.randn(4, 6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rewrite.apply(model, [passes.net2deeper("fc1")], (x,))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_blocks_are_found_on_every_transformer_and_nothing_else():
    from conftest import traced

    expected = {
        "gpt": ("blocks", False), "llama": ("blocks", False), "hf-gpt2": ("transformer.h", False),
        "hf-llama": ("model.layers", False), "hf-qwen2": ("model.layers", False),
        "hf-bert": ("encoder.layer", True), "hf-mixtral": ("model.layers", False),
    }
    for name in ["mlp", "cnn", *expected]:
        _, graph = traced(name)
        found = rewrite.blocks(graph)
        if name in ("mlp", "cnn"):
            assert found == [], name  # numbered modules that are not residual units are not blocks
            continue
        stack, post_norm = expected[name]
        assert [b.name for b in found] == [f"{stack}.0", f"{stack}.1"], name
        assert all(b.post_norm == post_norm and len(b.units) == 2 for b in found), name
