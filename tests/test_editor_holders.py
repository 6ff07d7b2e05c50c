"""The Editor replaces a tensor in every slot of the module tree that holds it (tied names stay tied).

It finds those slots once and keeps them up to date, finding them again after it adds or removes slots
(copies, new parameters, erasing): the same module, bit for bit and tie for tie, as searching the whole tree
at every replacement.
"""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rewrite
from passes.depth import insert_copies
from rewrite.analysis.blocks import block_at
from rewrite.app.zoo.handwritten import GPT
from rewrite.transform.edit import Editor
from rewrite.transform.growth_ops import Scale


def _edits():
    """A sequence of edits: scale a tensor (by its position among the names), copy a block, add a parameter."""
    scale = st.tuples(st.just("scale"), st.integers(0, 40), st.sampled_from([0.5, 2.0, 3.0]))
    copy = st.tuples(st.just("copy"), st.integers(0, 1), st.booleans())
    add = st.tuples(st.just("add"), st.integers(0, 10**6), st.just(0.0))
    return st.lists(st.one_of(scale, copy, add), min_size=1, max_size=8)


def _run(graph, edits) -> torch.nn.Module:
    edit = Editor(graph)
    for k, (what, a, b) in enumerate(edits):
        names = [name for name, _ in edit.module.named_parameters(remove_duplicate=False)]
        if what == "scale":
            edit.transform(names[a % len(names)], Scale(b))
        elif what == "copy":
            insert_copies(edit, block_at(edit.graph, "blocks", a), 1, zero_branches=b)
        else:
            edit.draw(f"extra_{k}", (4,), 0.1, seed=a)
    return edit.finish().module


def _ties(module: torch.nn.Module) -> list[list[str]]:
    """Names grouped by the tensor they hold."""
    groups: dict[int, list[str]] = {}
    for name, tensor in (*module.named_parameters(remove_duplicate=False),
                         *module.named_buffers(remove_duplicate=False)):
        groups.setdefault(id(tensor), []).append(name)
    return sorted(sorted(names) for names in groups.values())


@settings(max_examples=40, deadline=None)
@given(_edits())
def test_property_replacing_through_the_kept_slots_gives_what_searching_the_whole_tree_gives(edits):
    torch.manual_seed(0)
    model = GPT(vocab=32, dim=16, heads=4, hidden=24, layers=2).eval()
    ids = torch.randint(0, 32, (2, 6))
    graph = rewrite.trace(model, (ids,))

    def searching(self, tensor):  # the whole tree, at every replacement
        self._holders = {}
        return [(store, key) for module in self.module.modules() for store in (module._parameters, module._buffers)
                for key, held in store.items() if held is tensor]

    kept = _run(graph, edits)
    kept_by = Editor._holders_of
    Editor._holders_of = searching
    try:
        searched = _run(graph, edits)
    finally:
        Editor._holders_of = kept_by
    assert _ties(kept) == _ties(searched)
    assert ["head.weight", "tok.weight"] in _ties(kept)  # the output head stays tied to the embedding
    made, expected = kept.state_dict(), searched.state_dict()
    assert list(made) == list(expected)
    for name in expected:
        assert torch.equal(made[name], expected[name]), name
    torch.testing.assert_close(kept(ids), searched(ids), rtol=0, atol=0)
