"""``upcycle_moe``: a dense MLP becomes a mixture of experts (sparse upcycling, Komatsuzaki et al., 2023).

Algebra. The dense MLP ``E(x)`` (found by pattern: input -> up layer(s) -> unit-wise ops -> down layer,
SwiGLU and GPT-2's ``Conv1D`` included) is replaced by ``experts`` copies ``E_1 .. E_m`` of itself behind a
new router ``r = softmax(W_r x)`` with top-k gating renormalised to sum to one:

    w, i = topk(r, k);  w <- w / sum(w);  y = sum_j w_j E_{i_j}(x) = (sum_j w_j) E(x) = E(x)

so the model computes the same function at initialisation for any router (``W_r`` is drawn with standard
deviation 0.02). Without the renormalisation the output would be scaled by the kept probability mass;
no token is ever dropped (no capacity limit). The grown graph evaluates every expert and weights it by
its gate (zero for experts not chosen): the same function as sparse dispatch, at ``experts`` times the
MLP's compute. Parameters: ``<mlp>.router.weight`` and ``<mlp>.experts.<e>.<original names>``.
"""

from __future__ import annotations

import operator

import torch

from rewrite.transform.edit import Editor
from rewrite.errors import GrowthError
from rewrite.names import in_layers
from rewrite.transform.pattern import Match, mlp
from rewrite.transform.rules import Rule

aten = torch.ops.aten


def upcycle_moe(experts: int, top_k: int, layers: list[int] | None = None, *, seed: int = 0) -> Rule:
    """Every block's MLP (or those of ``layers``) becomes ``experts`` copies behind a top-``top_k`` router."""
    if not isinstance(experts, int) or experts < 2:
        raise GrowthError(f"upcycle_moe: experts must be an integer >= 2, got {experts!r}")
    if not isinstance(top_k, int) or not 1 <= top_k <= experts:
        raise GrowthError(f"upcycle_moe: top_k must be an integer in [1, experts={experts}], got {top_k!r}")

    def selected(matches: list[Match]) -> list[Match]:
        return [m for m in matches if in_layers(m["module"], layers)]

    def rewrite(match: Match, edit: Editor) -> None:
        module, x, down, nodes = match["module"], match["input"], match["down"], match["nodes"]
        hidden = match.graph.shape(x)[-1]
        dtype = edit.tensor(match.weight("down")).dtype
        router = edit.draw(f"{module}.router.weight", (experts, hidden), 0.02, seed, dtype)
        owner = f"{module}.router"
        logits = edit.at(down).linear(x, router, owner=owner)
        probs = edit.call(aten.softmax.int, logits, -1, owner=owner)
        top = edit.call(aten.topk.default, probs, top_k, -1, owner=owner)
        weights = edit.call(operator.getitem, top, 0, owner=owner)
        chosen = edit.call(operator.getitem, top, 1, owner=owner)
        total = edit.call(aten.sum.dim_IntList, weights, [-1], True, owner=owner)
        weights = edit.call(aten.div.Tensor, weights, total, owner=owner)
        output, made = None, set()
        for e in range(experts):
            mapping = edit.copy(nodes, {}, rename=(module, f"{module}.experts.{e}"))
            made |= set(mapping.values())
            hit = edit.call(aten.eq.Scalar, chosen, e, owner=owner)
            mask = edit.call(aten._to_copy.default, hit, dtype=dtype, owner=owner)
            gate = edit.call(aten.sum.dim_IntList, edit.call(aten.mul.Tensor, weights, mask, owner=owner), [-1], True,
                             owner=owner)
            term = edit.call(aten.mul.Tensor, mapping[down], gate, owner=f"{module}.experts")
            output = term if output is None else edit.call(aten.add.Tensor, output, term, owner=f"{module}.experts")
        edit.replace_uses(down, output, keep=made)
        edit.erase(nodes)

    where = "" if layers is None else f", layers={list(layers)}"
    return Rule(mlp(), rewrite, name=f"upcycle_moe(experts={experts}, top_k={top_k}{where})", select=selected)
