"""``train="added"``: only what growth added trains (LLaMA Pro); every original entry stays bit-identical."""

import pytest
import torch
from test_carry import trained

import passes
import rewrite
from rewrite.transform.growth_map import tensor_names

PLANS = {
    "widen_mlp": [passes.widen_mlp(factor=2)],
    "add_heads": [passes.add_heads(2)],
    "widen_hidden": [passes.widen_hidden(factor=2, init="zero")],
    "add_layers(copy)": [passes.add_layers(1, init="copy")],
    "add_layers(zero)+widen_mlp": [passes.add_layers(1, at=0), passes.widen_mlp(factor=2)],
}


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("model", ["llama", "hf-llama"])
@pytest.mark.parametrize("policy", ["mapped", "sparkling"])
def test_original_entries_stay_bit_identical_while_the_added_ones_train(model, plan, policy):
    built, original, optimizer, loss = trained(model)
    grown = rewrite.apply(original, PLANS[plan], built.args, built.kwargs)
    module = grown.module
    new = rewrite.carry(optimizer, grown, module, policy=policy, train="added").optimizer
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    module.train()
    for _ in range(3):
        new.zero_grad()
        loss(module).backward()
        new.step()
    moved = 0
    for name, parameter in module.named_parameters():
        added = grown.map.new_entries(name)
        assert torch.equal(parameter.detach()[~added], before[name][~added]), name
        assert parameter.requires_grad == bool(added.any()), name  # wholly original tensors are frozen
        moved += int((parameter.detach()[added] != before[name][added]).sum())
    assert moved > 0  # and what growth added did train
    names = tensor_names(module)
    assert all(names[id(p)] for group in new.param_groups for p in group["params"])  # still in one group each


def test_train_must_be_all_or_added():
    built, original, optimizer, _ = trained("gpt")
    grown = rewrite.apply(original, [passes.widen_mlp(factor=2)], built.args, built.kwargs)
    with pytest.raises(ValueError, match="train must be one of all, added, got 'new'"):
        rewrite.carry(optimizer, grown, grown.module, train="new")
