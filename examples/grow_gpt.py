"""Grow a hand-written GPT (pre-norm, LayerNorm, tied embeddings) wider and deeper, and keep training it.

    python examples/grow_gpt.py          # about 10 s on two cores

The grown model computes the same function (checked), then trains with the small model's AdamW state carried
over (``rewrite.carry_optimizer``, SPARKLING's policy: old entries keep their moments, new ones start fresh): its
loss starts where the small model's ended instead of from scratch.
"""

import torch

import passes
import rewrite
from rewrite.app.zoo.handwritten import GPT


def batches(vocab: int, steps: int, generator: torch.Generator):
    """A toy language: each token is the previous one plus one, modulo the vocabulary."""
    for _ in range(steps):
        start = torch.randint(0, vocab, (16, 1), generator=generator)
        sequence = (start + torch.arange(17)) % vocab
        yield sequence[:, :-1], sequence[:, 1:]


def train(model: torch.nn.Module, steps: int, generator: torch.Generator, optimizer=None):
    """(last loss, the optimizer) after ``steps`` steps."""
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=3e-3)
    for inputs, targets in batches(64, steps, generator):
        loss = torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item(), optimizer


def main() -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    small = GPT(vocab=64, dim=32, heads=4, hidden=64, layers=2)
    loss, optimizer = train(small, 150, generator)
    print(f"small model: loss {loss:.3f} after 150 steps")
    small.eval()
    ids = torch.randint(0, 64, (2, 16))
    grown = rewrite.apply(small, [
        passes.widen_mlp(factor=2),                        # MLP 64 -> 128
        passes.add_heads(2),                               # 4 -> 6 heads
        passes.widen_hidden(factor=2, init="clone"),       # residual stream 32 -> 64 (exact under LayerNorm)
        passes.add_layers(2, init="copy"),                 # 2 -> 4 blocks (LLaMA Pro style)
    ], (ids,))
    print(grown.report)
    with torch.no_grad():
        print(f"grown vs small: max abs difference {(grown.module(ids) - small(ids)).abs().max().item():.2g}")
    model = grown.module.train()
    carried = rewrite.carry_optimizer(optimizer, grown, model, policy="sparkling")
    loss, _ = train(model, 50, generator, carried)
    print(f"grown model ({sum(p.numel() for p in model.parameters()):,} parameters): loss {loss:.3f} after 50 more "
          f"steps, its optimizer carried over")


if __name__ == "__main__":
    main()
