"""Triggers on synthetic loss curves: a power law with noise that flattens at a known point.

No trigger fires while the curve still falls; each fires within a bounded delay after it flattens.
"""

import math
import random

import pytest

from rewrite.training.triggers import Fixed, Plateau, Slope

EVERY = 1000  # compute between evaluations (linear spacing, as a loop that evaluates every k steps)


def curve(flatten_at: int | None, length: int = 160, alpha: float = 0.3, noise: float = 0.005, seed: int = 0):
    """(compute, loss) per evaluation: ``10 * C^-alpha`` with multiplicative noise; from evaluation
    ``flatten_at`` on, the slope drops to 0.01 (the model has run out of capacity)."""
    rng = random.Random(seed)
    points = []
    for i in range(1, length + 1):
        compute = EVERY * i
        if flatten_at is None or i <= flatten_at:
            loss = 10 * compute ** -alpha
        else:
            knee = EVERY * flatten_at
            loss = 10 * knee ** -alpha * (compute / knee) ** -0.01
        points.append((compute, loss * math.exp(rng.gauss(0, noise))))
    return points


def first_trigger(trigger, points) -> int | None:
    for i, (compute, loss) in enumerate(points, start=1):
        if trigger(step=i, flops=compute, loss=loss).grow:
            return i
    return None


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("make, delay", [(Plateau, 20), (Slope, 12)])  # the defaults
def test_no_trigger_while_the_curve_falls_and_one_soon_after_it_flattens(make, delay, seed):
    assert first_trigger(make(), curve(None, length=100, seed=seed)) is None
    fired = first_trigger(make(), curve(flatten_at=60, seed=seed))
    assert fired is not None and 60 < fired <= 60 + delay, fired


def test_the_slope_trigger_logs_its_evidence_and_restarts_after_a_growth():
    trigger = Slope()
    decisions = [trigger(step=i, flops=c, loss=l) for i, (c, l) in enumerate(curve(60, seed=1), start=1)]
    fired = next(d for d in decisions if d.grow)
    assert fired.evidence["power_law_alpha"] == pytest.approx(0.3, abs=0.02)
    assert fired.evidence["local_slope"] < 0.5 * fired.evidence["power_law_alpha"]
    trigger.reset()
    assert not trigger(step=1, flops=1000.0, loss=1.0).grow
    assert trigger(step=1, flops=1000.0, loss=1.0).evidence["evaluations"] == 2


def test_fixed_fires_once_at_its_count():
    trigger = Fixed(tokens=5000)
    grows = [trigger(step=i, tokens=1000 * i).grow for i in range(1, 10)]
    assert grows == [False, False, False, False, True, False, False, False, False]
    trigger.reset()
    assert trigger(step=9, tokens=9000).grow
    with pytest.raises(ValueError, match="step=, tokens= or flops="):
        Fixed()
