"""Dotted names: where a move of modules takes a name (``rewrite.names.moved``)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from rewrite.names import moved, prefixes, under

_NAMES = st.lists(st.sampled_from(["model", "layers", "0", "1", "10", "mlp", ""]), min_size=1, max_size=4).map(".".join)


@settings(max_examples=300, deadline=None)
@given(_NAMES, st.dictionaries(_NAMES, _NAMES, max_size=5))
def test_property_a_name_moves_with_the_first_move_that_holds_it(name, moves):
    """``moved`` looks up the name's dotted prefixes; the result is the definition's: the first move (in the
    mapping's order) whose old module is the name or holds it, its new prefix in place of the old."""
    first = next((old for old in moves if under(name, old)), None)
    assert moved(name, moves) == (name if first is None else moves[first] + name[len(first):])


def test_renumbering_moves_each_block_and_what_is_inside_it_but_not_a_longer_number():
    moves = {"model.layers.1": "model.layers.3", "model.layers.2": "model.layers.4"}
    assert moved("model.layers.1.mlp.up", moves) == "model.layers.3.mlp.up"
    assert moved("model.layers.2", moves) == "model.layers.4"
    assert moved("model.layers.10.mlp", moves) == "model.layers.10.mlp"
    assert moved("model.layers", moves) == "model.layers"


@settings(max_examples=300, deadline=None)
@given(_NAMES)
def test_property_the_prefixes_of_a_name_are_the_modules_it_is_under_outermost_first(name):
    parts = name.split(".")
    assert list(prefixes(name)) == [".".join(parts[:end]) for end in range(1, len(parts) + 1)]
    assert all(under(name, prefix) for prefix in prefixes(name))
