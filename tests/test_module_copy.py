"""``rewrite.ir.module_copy.copied``: what ``copy.deepcopy`` makes of a module tree, built directly."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.utils._pytree as pytree

from rewrite.app import zoo
from rewrite.ir.module_copy import copied


def _tree(module: torch.nn.Module) -> list:
    """Every module by path: its class and its attributes that are not tensors, containers or hooks."""
    rows = []
    for path, sub in module.named_modules(remove_duplicate=False):
        plain = {k: v for k, v in vars(sub).items() if not k.startswith("_") and not isinstance(v, torch.Tensor)}
        rows.append((path, type(sub), plain, sorted(sub._non_persistent_buffers_set)))
    return rows


@pytest.mark.parametrize("name", zoo.NAMES)
def test_a_copy_is_what_deepcopy_makes_and_shares_nothing_with_the_original(name):
    built = zoo.build(name)
    model = built.model
    made, reference = copied(model, {}), copy.deepcopy(model)
    assert _tree(made) == _tree(reference)
    theirs = reference.state_dict(keep_vars=True)
    ours = made.state_dict(keep_vars=True)
    assert list(ours) == list(theirs)
    for key, tensor in ours.items():
        assert type(tensor) is type(theirs[key]) and tensor.requires_grad == theirs[key].requires_grad
        assert torch.equal(tensor, theirs[key]), key
    originals = {id(t) for t in (*model.parameters(), *model.buffers())}
    assert not originals & {id(t) for t in (*made.parameters(), *made.buffers())}
    ties = lambda m: [[n for n, t in m.named_parameters(remove_duplicate=False) if t is p] for p in m.parameters()]
    assert ties(made) == ties(model)  # tied weights stay tied, within the copy
    for sub, original in zip(made.modules(), model.modules()):
        assert sub is not original and sub._forward_hooks is not original._forward_hooks
    with torch.no_grad():
        outputs = [made(*built.args, **built.kwargs), model(*built.args, **built.kwargs)]
    ours, theirs = ([t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)] for out in outputs)
    assert len(ours) == len(theirs) > 0
    for mine, expected in zip(ours, theirs):
        torch.testing.assert_close(mine, expected, rtol=0, atol=0)


def test_tensors_the_memo_maps_are_taken_and_a_class_that_copies_itself_is_deep_copied():
    class Own(torch.nn.Linear):
        def __deepcopy__(self, memo):
            made = torch.nn.Linear(self.in_features, self.out_features)
            made.copied_by_itself = True
            return made

    outer = torch.nn.Sequential(torch.nn.Linear(3, 4), Own(4, 2))
    stand_in = torch.nn.Parameter(torch.zeros(4, 3, device="meta"))
    made = copied(outer, {id(outer[0].weight): stand_in})
    assert made[0].weight is stand_in and made[0].bias is not outer[0].bias
    assert made[1].copied_by_itself
