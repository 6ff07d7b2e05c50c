"""How big are the first optimizer updates of what growth added? One table per optimizer policy.

    python examples/first_updates.py

A Llama-style model (the zoo's ``llama``) trains 3000 AdamW steps (lr 1e-3, no weight decay) on random token
batches, long enough for Adam's bias corrections to be ~1 (``1 - 0.999^3000 = 0.95``). It grows with
``widen_mlp(factor=2, init="zero")``, the optimizer is carried with each policy, and 10 more steps run. The table
gives the largest update of the new entries (the new columns of every ``down`` projection: they read the new
units, so they have gradients at once) and of the old entries, in learning rates, per step.
"""

import torch
import torch.nn.functional as F

import passes
import rewrite
from rewrite.app import zoo

LR, STEPS, TRAIN = 1e-3, 10, 3000


def run(policy: str, protect: bool | None) -> tuple[list[float], list[float], float]:
    built = zoo.build("llama")
    model = built.model.eval()
    vocab = model(*built.args).shape[-1]
    generator = torch.Generator().manual_seed(0)
    fixed = torch.randint(0, vocab, (8, 17), generator=generator)  # the batch the table's steps train on

    def loss(m, ids=fixed):  # next-token prediction
        return F.cross_entropy(m(ids[:, :-1]).reshape(-1, vocab), ids[:, 1:].reshape(-1))

    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    for _ in range(TRAIN):
        optimizer.zero_grad()
        loss(model, torch.randint(0, vocab, (8, 17), generator=generator)).backward()
        optimizer.step()
    with torch.no_grad():
        before_growth = float(loss(model))
    grown = rewrite.apply(model, [passes.widen_mlp(factor=2, init="zero")], (fixed[:, :-1],))
    new = rewrite.carry_optimizer(optimizer, grown, grown.module, policy=policy, protect=protect)
    downs = [(p, grown.map.new_entries(n)) for n, p in grown.module.named_parameters() if n.endswith("down.weight")]
    new_sizes, old_sizes = [], []
    for _ in range(STEPS):
        before = [p.detach().clone() for p, _ in downs]
        new.zero_grad()
        loss(grown.module).backward()
        new.step()
        deltas = [(p.detach() - b).abs() for (p, _), b in zip(downs, before)]
        new_sizes.append(max(float(d[mask].max()) for d, (_, mask) in zip(deltas, downs)) / LR)
        old_sizes.append(max(float(d[~mask].max()) for d, (_, mask) in zip(deltas, downs)) / LR)
    with torch.no_grad():
        return new_sizes, old_sizes, float(loss(grown.module)) - before_growth


def main() -> None:
    print("| policy | new entries: step 1 | steps 2-10 (max) | old entries: step 1 | steps 2-10 (max) | loss change after 10 steps |")
    print("|---|---|---|---|---|---|")
    for policy, protect, label in (("mapped", False, "`mapped`"), ("sparkling", False, "`sparkling, protect=False`"),
                                   ("sparkling", True, "`sparkling` (protects new entries)"), ("reset", False, "`reset`")):
        new, old, change = run(policy, protect)
        print(f"| {label} | {new[0]:.2f} | {max(new[1:]):.2f} | {old[0]:.2f} | {max(old[1:]):.2f} | {change:+.4f} |")


if __name__ == "__main__":
    main()
