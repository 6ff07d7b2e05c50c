"""passes.add_layers and passes.split_layers on every transformer of the zoo."""

import pytest
import torch
from conftest import traced

import passes
import rewrite

# model, stack, parameters of one block
PRE_NORM = [
    ("gpt", "blocks", 8544),
    ("llama", "blocks", 7744),
    ("hf-gpt2", "transformer.h", 12704),
    ("hf-llama", "model.layers", 7744),
    ("hf-qwen2", "model.layers", 7808),
    ("hf-mixtral", "model.layers", 21696),
]


def _outputs(module, built):
    with torch.no_grad():
        out = module(*built.args, **built.kwargs)
    return getattr(out, "logits", getattr(out, "last_hidden_state", out))


def _parameters(grown) -> dict[str, torch.Tensor]:
    return {n: p for n, p in grown.module.named_parameters()}


@pytest.mark.parametrize("init", ["zero", "copy"])
@pytest.mark.parametrize("name, stack, per_block", PRE_NORM)
def test_add_layers_is_exact_on_pre_norm_stacks(name, stack, per_block, init):
    built, graph = traced(name)
    grown = rewrite.apply(graph, [passes.add_layers(2, at=0, init=init)], built.args, built.kwargs)
    (record,) = grown.report.passes
    assert record.exact and record.plan.sites == [f"{stack}.0"]
    assert record.parameters_after - record.parameters_before == 2 * per_block
    assert [b.name for b in rewrite.blocks(grown.graph)] == [f"{stack}.{i}" for i in range(4)]
    torch.testing.assert_close(_outputs(grown.module, built), _outputs(built.model, built), rtol=1e-5, atol=1e-6)
    params = _parameters(grown)
    new = {n: p for n, p in params.items() if n.startswith(f"{stack}.1.") or n.startswith(f"{stack}.2.")}
    zero = [n for n, p in new.items() if p.dim() >= 2 and not p.any()]  # the branches' output layers
    assert len(zero) == 4 and all(n.split(".")[-2] in ("o", "o_proj", "c_proj", "proj", "down", "down_proj")
                                  or n.endswith("experts.down_proj") for n in zero), zero
    old_last = {n.replace(f"{stack}.1.", f"{stack}.3.", 1): p for n, p in graph.module.named_parameters()
                if n.startswith(f"{stack}.1.")}
    assert all(torch.equal(params[n], p) for n, p in old_last.items())  # block 1 moved to 3, unchanged
    if init == "copy":  # LLaMA Pro: everything but the zeroed output layers is a copy of block 0
        source = dict(graph.module.named_parameters())
        for n, p in new.items():
            if n not in zero and p.dim() >= 2:
                assert torch.equal(p, source[n.replace(f"{stack}.1.", f"{stack}.0.", 1).replace(
                    f"{stack}.2.", f"{stack}.0.", 1)]), n


@pytest.mark.parametrize("name, stack, per_block", PRE_NORM[1:4])
def test_several_new_blocks_at_several_places(name, stack, per_block):
    """Each site renumbers the stack; the blocks copied at an earlier site move with it (they used to be
    looked up under their old names: AttributeError)."""
    built, graph = traced(name)
    grown = rewrite.apply(graph, [passes.add_layers(2, at=[0, 1], init="zero")], built.args, built.kwargs)
    (record,) = grown.report.passes
    assert record.exact and record.parameters_after - record.parameters_before == 4 * per_block
    assert [b.name for b in rewrite.blocks(grown.graph)] == [f"{stack}.{i}" for i in range(6)]
    params, source = _parameters(grown), dict(graph.module.named_parameters())
    for old, new in ((0, 0), (1, 3)):  # the original blocks, moved, unchanged
        for n, p in source.items():
            if n.startswith(f"{stack}.{old}."):
                assert torch.equal(params[n.replace(f"{stack}.{old}.", f"{stack}.{new}.", 1)], p), n
    torch.testing.assert_close(_outputs(grown.module, built), _outputs(built.model, built), rtol=1e-5, atol=1e-6)


def test_add_layers_appends_after_the_last_block_by_default():
    built, graph = traced("gpt")
    grown = rewrite.apply(graph, [passes.add_layers(1)], built.args, built.kwargs)
    assert grown.report.passes[0].plan.sites == ["blocks.1"]
    assert sorted({n.split(".")[1] for n in _parameters(grown) if n.startswith("blocks.")}) == ["0", "1", "2"]


def test_add_layers_refuses_post_norm_and_measures_it_when_asked():
    built, graph = traced("hf-bert")
    with pytest.raises(rewrite.NotExactError, match=r"post-norm block.*LN\(x\) != x"):
        rewrite.apply(graph, [passes.add_layers(1)], built.args, built.kwargs)
    grown = rewrite.apply(graph, [passes.add_layers(1, exact=False)], built.args, built.kwargs)
    (record,) = grown.report.passes
    assert record.exact is False and "post-norm" in record.plan.reason
    measured = (_outputs(grown.module, built) - _outputs(built.model, built)).abs().max().item()
    assert record.verification.max_abs_error == pytest.approx(measured, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("name", ["gpt", "llama", "hf-gpt2", "hf-llama", "hf-qwen2", "hf-bert", "hf-mixtral"])
def test_split_layers_reports_the_error_it_makes(name):
    built, graph = traced(name)
    grown = rewrite.apply(graph, [passes.split_layers(2, layers=[0])], built.args, built.kwargs)
    (record,) = grown.report.passes
    assert record.exact is False and "second order" in record.plan.reason
    measured = (_outputs(grown.module, built) - _outputs(built.model, built)).abs().max().item()
    assert measured > 0
    assert record.verification.max_abs_error == pytest.approx(measured, rel=1e-6)
    assert len(rewrite.blocks(grown.graph)) == 3


def test_split_layers_scales_each_copy_of_the_output_layers_by_one_over_k():
    built, graph = traced("llama")
    grown = rewrite.apply(graph, [passes.split_layers(3, layers=[1])], built.args, built.kwargs)
    params, source = _parameters(grown), dict(graph.module.named_parameters())
    for copy in (1, 2, 3):
        torch.testing.assert_close(params[f"blocks.{copy}.attn.o.weight"], source["blocks.1.attn.o.weight"] / 3)
        torch.testing.assert_close(params[f"blocks.{copy}.mlp.down.weight"], source["blocks.1.mlp.down.weight"] / 3)
        torch.testing.assert_close(params[f"blocks.{copy}.attn.q.weight"], source["blocks.1.attn.q.weight"])


def test_split_error_shrinks_with_the_branch_but_not_with_k():
    """methods.md: the error is second order in F; it does not vanish as k grows.

    The branch is scaled through both weight and bias of its output layers, so F itself
    (not just its x-dependent part) shrinks: a 10x smaller branch gives a ~100x smaller error.
    """
    from rewrite.app.zoo.handwritten import GPT

    torch.manual_seed(0)
    ids = torch.randint(0, 32, (2, 8))
    errors = {}
    for scale in (1.0, 0.1):
        torch.manual_seed(0)
        model = GPT(vocab=32, dim=32, heads=4, hidden=64, layers=1).eval()
        with torch.no_grad():
            for layer in (model.blocks[0].attn.o, model.blocks[0].proj):
                layer.weight.mul_(scale)
                layer.bias.mul_(scale)
        for k in (2, 8):
            grown = rewrite.apply(model, [passes.split_layers(k)], (ids,))
            errors[scale, k] = grown.report.passes[0].verification.max_abs_error
    assert 50 < errors[1.0, 2] / errors[0.1, 2] < 200  # ~ |F|^2 (measured 96-111 over seeds)
    # the first-order term grows as (k-1)/2k: 7/16 against 1/4 is 1.75x from k=2 to k=8
    assert 1.4 < errors[1.0, 8] / errors[1.0, 2] < 2.2
    assert 1.4 < errors[0.1, 8] / errors[0.1, 2] < 2.2


def test_depth_passes_validate_their_arguments():
    with pytest.raises(rewrite.GrowthError, match="n must be a positive integer"):
        passes.add_layers(0)
    with pytest.raises(rewrite.GrowthError, match="init must be 'zero' or 'copy'"):
        passes.add_layers(1, init="noise")
    with pytest.raises(rewrite.GrowthError, match="k must be an integer >= 2"):
        passes.split_layers(1)
    built, graph = traced("mlp")
    grown = rewrite.apply(graph, [passes.add_layers(1)], built.args, built.kwargs)
    assert "matched nothing" in str(grown.report)  # an MLP has no residual blocks


def test_done_means_chain_on_the_zoo():
    """The issue's acceptance line: add_layers(2), widen_mlp(2), split_layers(2, [0]) on every model where
    each is meaningful: exact parts exact, the approximate part measured."""
    for name in ["gpt", "llama", "hf-gpt2", "hf-llama", "hf-qwen2", "hf-mixtral"]:
        built, graph = traced(name)
        plan = [passes.add_layers(2), passes.widen_mlp(factor=2), passes.split_layers(2, layers=[0])]
        grown = rewrite.apply(graph, plan, built.args, built.kwargs)
        add, widen, split = grown.report.passes
        assert add.exact and widen.exact and split.exact is False, name
        assert add.verification.max_rel_error <= 1e-5 and widen.verification.max_rel_error <= 1e-5, name
        measured = (_outputs(grown.module, built) - _outputs(built.model, built)).abs().max().item()
        assert split.verification.max_abs_error == pytest.approx(measured, rel=1e-6), name
