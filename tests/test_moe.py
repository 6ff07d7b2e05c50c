"""passes.upcycle_moe: dense MLPs become experts behind a renormalised top-k router."""

import pytest
import torch
from conftest import traced

import passes
import rewrite

# model, MLP parameters per block, hidden size
DENSE = [
    ("gpt", 32 * 64 * 2 + 64 + 32, 32),
    ("llama", 32 * 48 * 3, 32),
    ("hf-gpt2", 32 * 128 * 2 + 128 + 32, 32),
    ("hf-llama", 32 * 48 * 3, 32),
    ("hf-qwen2", 32 * 48 * 3, 32),
    ("hf-bert", 32 * 64 * 2 + 64 + 32, 32),
]


def _outputs(module, built):
    with torch.no_grad():
        out = module(*built.args, **built.kwargs)
    return getattr(out, "logits", getattr(out, "last_hidden_state", out))


@pytest.mark.parametrize("experts, top_k", [(4, 2), (3, 1), (2, 2)])
@pytest.mark.parametrize("name, mlp_params, hidden", DENSE)
def test_upcycle_is_exact_and_adds_experts_and_a_router(name, mlp_params, hidden, experts, top_k):
    built, graph = traced(name)
    grown = rewrite.apply(graph, [passes.upcycle_moe(experts, top_k)], built.args, built.kwargs)
    (record,) = grown.report.passes
    assert record.exact and len(record.plan.sites) == 2
    per_block = (experts - 1) * mlp_params + experts * hidden  # new copies + router
    assert record.parameters_after - record.parameters_before == 2 * per_block
    assert any(n.endswith(".router.weight") for n in record.added)
    assert any(".experts.0." in n for n in record.added) and record.removed
    torch.testing.assert_close(_outputs(grown.module, built), _outputs(built.model, built), rtol=1e-5, atol=1e-5)


def test_upcycle_some_layers_and_skip_mixtral():
    built, graph = traced("hf-llama")
    grown = rewrite.apply(graph, [passes.upcycle_moe(2, 1, layers=[1])], built.args, built.kwargs)
    assert grown.report.passes[0].plan.sites == ["model.layers.1.mlp"]
    built, graph = traced("hf-mixtral")  # already a mixture: its experts are not a dense MLP
    grown = rewrite.apply(graph, [passes.upcycle_moe(2, 1)], built.args, built.kwargs)
    assert grown.report.passes[0].plan is None


def test_renormalisation_is_what_makes_it_exact():
    """Without dividing by the kept mass, y = (sum of kept probabilities) E(x): not the dense output."""
    built, graph = traced("gpt")
    grown = rewrite.apply(graph, [passes.upcycle_moe(4, 2)], built.args, built.kwargs)
    gm = grown.graph.module
    divisions = [n for n in gm.graph.nodes if n.target is torch.ops.aten.div.Tensor]
    assert len(divisions) == 2
    for node in divisions:  # undo the renormalisation: w / sum(w) -> w
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
    gm.recompile()
    broken = (grown.graph(*built.args) - built.model(*built.args)).abs().max().item()
    assert broken > 1e-3


def test_upcycle_validates_arguments():
    with pytest.raises(rewrite.GrowthError, match="experts must be an integer >= 2"):
        passes.upcycle_moe(1, 1)
    with pytest.raises(rewrite.GrowthError, match=r"top_k must be an integer in \[1, experts=4\]"):
        passes.upcycle_moe(4, 5)


def test_upcycled_experts_grow_further():
    built, graph = traced("llama")
    grown = rewrite.apply(graph, [passes.upcycle_moe(2, 1), passes.widen_mlp(factor=2), passes.add_layers(1)],
                          built.args, built.kwargs)
    assert all(r.exact and r.verification.max_rel_error <= 1e-5 for r in grown.report.passes)
    assert len(grown.report.passes[1].plan.groups) == 2 * 2  # every expert of both blocks
