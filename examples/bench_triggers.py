"""When do the triggers fire? Synthetic loss curves, many noise seeds.

    python examples/bench_triggers.py [--seeds 50]

Each curve is ``10 C^-0.3`` evaluated at evenly spaced compute (every 1000), with multiplicative noise; the
flattening curves switch to slope 0.01 at evaluation 60. Reported per trigger and noise level: on how many
falling curves (100 evaluations, never flattening) it fired early, and how many evaluations after the knee it
fired on the flattening ones (min-max).
"""

import argparse
import math
import random

from rewrite.training.triggers import Plateau, Slope


def curve(flatten_at, noise, seed, length=160, alpha=0.3):
    rng = random.Random(seed)
    for i in range(1, length + 1):
        compute = 1000 * i
        knee = 1000 * flatten_at if flatten_at else None
        loss = 10 * compute ** -alpha if not knee or compute <= knee else 10 * knee ** -alpha * (compute / knee) ** -0.01
        yield i, compute, loss * math.exp(rng.gauss(0, noise))


def fired(trigger, points):
    return next((i for i, compute, loss in points if trigger(step=i, flops=compute, loss=loss).grow), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=50)
    options = parser.parse_args()
    print("| trigger | noise | fired early (of %d falling curves) | delay after the knee (evaluations) |" % options.seeds)
    print("|---|---|---|---|")
    triggers = {"Plateau() (window 10, patience 3)": Plateau, "Slope() (window 10, patience 3)": Slope,
                "Plateau(window=5, patience=2)": lambda: Plateau(window=5, patience=2),
                "Slope(window=5, patience=2)": lambda: Slope(window=5, patience=2)}
    for name, make in triggers.items():
        for noise in (0.002, 0.005, 0.01):
            early = sum(fired(make(), curve(None, noise, s, length=100)) is not None for s in range(options.seeds))
            delays = [(fired(make(), curve(60, noise, s)) or 10**6) - 60 for s in range(options.seeds)]
            print(f"| `{name}` | {noise:.1%} | {early} | {min(delays)}-{max(delays)} |")


if __name__ == "__main__":
    main()
