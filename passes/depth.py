"""``add_layers`` and ``split_layers``: more blocks in a residual stack (Gesmundo & Maile 6; LLaMA Pro; seed 000).

Algebra. A block updates the residual stream by residual units ``x <- x + F_u(x)``.

* ``add_layers(n, at=i)``: ``n`` new blocks after block ``i`` (default: the last). Each is a copy of block
  ``i`` whose residual branches are scaled by 0 (the weights and biases of the layers that end each branch,
  ``W_O`` and the MLP output, are zero), so every new unit is ``x <- x + 0``: the identity, and the stack
  computes the same function. ``init="zero"`` draws the new blocks' other matrices at random with the
  source's per-tensor standard deviation (norm gains and biases copied); ``init="copy"`` keeps them as
  copies of block ``i`` (LLaMA Pro's block expansion). Exact on pre-norm stacks only: in a post-norm block
  (``x <- LN(x + F(x))``, BERT) a zero branch leaves ``LN(x) != x``, so it is refused unless ``exact=False``.
* ``split_layers(k, layers)``: each selected block becomes ``k`` copies of itself with every residual branch
  scaled by ``1/k`` (folded into the same output layers, no new op). This is *approximate*:
  ``y_k = x + F(x) + ((k-1)/(2k)) J_F(x) F(x) + O(|F|^3)``, second order in the branch; the report carries
  the measured output error.

Blocks are found by pattern (``rewrite.pattern.block``); for Hugging Face models they are the layer
modules of the stack. New blocks take the next indices of the stack and later blocks are renumbered, so
``model.layers.2`` is the third block of the grown model too.
"""

from __future__ import annotations

from rewrite.analysis.blocks import Block
from rewrite.transform.edit import Editor
from rewrite.errors import GrowthError
from rewrite.transform.pattern import Match, block
from rewrite.transform.growth_ops import Redraw, seed_for
from rewrite.transform.rules import Rule

POST_NORM = ("it is a post-norm block (x <- LN(x + F(x))): with a zero branch it computes LN(x), and "
             "LN(x) != x (only pre-norm stacks take identity blocks)")
SPLIT = ("residual splitting: k steps of x + F(x)/k differ from x + F(x) at second order in F "
         "(((k-1)/2k) J_F F)")


def insert_copies(edit: Editor, source: Block, count: int, zero_branches: bool, seed: int | None = None) -> list[str]:
    """Insert ``count`` copies of ``source`` right after it, chained on the stream; the stack is
    renumbered to make room. ``zero_branches``: the copies' residual branches output zero; ``seed``: the
    copies' matrices that are not zeroed are drawn afresh at their source's per-tensor standard deviation
    (``Redraw``, one seed per tensor). Returns the new blocks' names."""
    edit.renumber(source.stack, source.index + 1, count)
    stream, cursor, copies, names = source.stream_out, source.nodes[-1], set(), []
    for j in range(1, count + 1):
        name = f"{source.stack}.{source.index + j}"
        already = set(edit.copied)
        mapping = edit.at(cursor).copy(source.nodes, {source.stream_in: stream}, rename=(source.name, name))
        zeroed = []
        if zero_branches:
            for unit in source.units:
                zeroed += edit.scale(mapping[unit.branch], 0.0)
        if seed is not None:
            for new in edit.copied:
                tensor = edit.tensor(new)
                if new in already or new in zeroed or tensor.dim() < 2 or not tensor.is_floating_point():
                    continue
                edit.transform(new, Redraw(seed_for(seed, new)))
        copies |= set(mapping.values())
        stream, cursor = mapping[source.stream_out], mapping[source.nodes[-1]]
        names.append(name)
    edit.replace_uses(source.stream_out, stream, keep=set(source.nodes) | copies)
    return names


def _not_exact_if_post_norm(match: Match) -> str | None:
    return POST_NORM if match["block"].post_norm else None


def _last(matches: list[Match]) -> list[Match]:
    """The last block of the stack: where ``add_layers`` appends by default."""
    return matches[-1:]


def add_layers(n: int = 1, at: int | list[int] | None = None, init: str = "zero", *, exact: bool = True,
               stack: str | None = None, seed: int = 0) -> Rule:
    """``n`` new identity blocks after block ``at`` (each index of a list; default: after the last)."""
    if not isinstance(n, int) or n < 1:
        raise GrowthError(f"add_layers: n must be a positive integer, got {n!r}")
    if init not in ("zero", "copy"):
        raise GrowthError(f"add_layers: init must be 'zero' or 'copy', got {init!r}")
    where = None if at is None else [at] if isinstance(at, int) else list(at)

    def rewrite(match: Match, edit: Editor) -> None:
        insert_copies(edit, match["block"], n, zero_branches=True, seed=seed if init == "zero" else None)

    where_text = "" if where is None else f", at={where if len(where) > 1 else where[0]}"
    return Rule(block(layers=where, stack=stack), rewrite, exactness=_not_exact_if_post_norm,
                name=f"add_layers(n={n}{where_text}, init={init!r})", exact=exact,
                select=_last if where is None else None)


def split_layers(k: int = 2, layers: list[int] | None = None, *, stack: str | None = None) -> Rule:
    """Each selected block (default: all) becomes ``k`` blocks with residual branches scaled by ``1/k``."""
    if not isinstance(k, int) or k < 2:
        raise GrowthError(f"split_layers: k must be an integer >= 2, got {k!r}")

    def rewrite(match: Match, edit: Editor) -> None:
        source = match["block"]
        for unit in source.units:
            edit.scale(unit.branch, 1.0 / k)
        insert_copies(edit, source, k - 1, zero_branches=False)

    where = "" if layers is None else f", layers={list(layers)}"
    return Rule(block(layers=layers, stack=stack), rewrite, name=f"split_layers(k={k}{where})", exact=False,
                approximate=SPLIT)
