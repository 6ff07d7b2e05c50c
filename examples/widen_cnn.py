"""Widen a CNN with Net2Net and deepen it with Net2DeeperNet; keep training.

    python examples/widen_cnn.py        # a few seconds

The built-in CNN (conv -> BatchNorm -> ReLU, twice, pooling, a linear head) gets 2x the channels in its first
convolution (``net2net``: random replication, fan-out divided, BatchNorm statistics copied) and an identity
convolution after its first ReLU. Both are exact; the grown model then trains on the same toy data.
"""

import torch

import passes
import rewrite
from rewrite.app import zoo


def main() -> None:
    built = zoo.build("cnn")
    model, (images,) = built.model, built.args
    grown = rewrite.apply(model, [passes.widen("conv1", factor=2, init="net2net"), passes.net2deeper("conv1")],
                          (images,))
    print(grown.report)
    with torch.no_grad():
        print(f"grown vs original: max abs difference {(grown.module(images) - model(images)).abs().max().item():.2g}")
    labels = torch.randint(0, 10, (images.shape[0],))
    optimizer = torch.optim.SGD(grown.module.parameters(), lr=0.05)
    for step in range(20):
        loss = torch.nn.functional.cross_entropy(grown.module(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"after 20 steps on a toy batch: loss {loss.item():.3f}")


if __name__ == "__main__":
    main()
