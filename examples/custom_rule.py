"""Write your own growth rule: a zero-initialised low-rank adapter after every attention output projection.

    python examples/custom_rule.py [MODEL]        # MODEL: a built-in example (default: gpt; try hf-llama)

The rule (the README shows the same code) matches every linear layer owned by a module named like
``*attn.o*`` (``attn.o``, ``self_attn.o_proj``), on graphs from either front-end, and adds
``y <- y + B (A x)`` with ``B = 0``: the adapter is a no-op at first, so the rule claims exactness and
``rewrite.apply`` verifies it on the example inputs.
"""

import sys

import torch

import rewrite
from rewrite.app import zoo

RANK = 4


@rewrite.rule(rewrite.op("linear", "proj", module="*attn.o*"))
def attention_adapter(match, edit):
    """y = W x + b  ->  y = W x + b + B (A x), with B = 0."""
    proj, x = match["proj"], match.input("proj")
    width_in, width_out = match.graph.shape(x)[-1], match.graph.shape(proj)[-1]
    name = f"{match.site}_adapter"
    a = edit.add_parameter(f"{name}.A", torch.randn(RANK, width_in) / width_in**0.5)
    b = edit.add_parameter(f"{name}.B", torch.zeros(width_out, RANK))
    low = edit.at(proj).linear(x, a, owner=name)
    total = edit.call(torch.ops.aten.add.Tensor, proj, edit.linear(low, b, owner=name), owner=name)
    edit.replace_uses(proj, total, keep={total})


def main(name: str = "gpt") -> None:
    built = zoo.build(name)
    grown = rewrite.apply(built.model, [attention_adapter], built.args, built.kwargs)
    print(grown.report)
    with torch.no_grad():
        before, after = built.model(*built.args, **built.kwargs), grown.module(*built.args, **built.kwargs)
    before, after = (getattr(v, "logits", v) for v in (before, after))
    print(f"max |original - grown| = {(before - after).abs().max().item():.3g}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
