"""When to grow: small objects a training loop asks at each evaluation.

A trigger is called with the run's position and its latest validation loss, ``trigger(step=, tokens=, flops=,
loss=)``, and returns a :class:`Decision`: ``grow`` and the ``evidence`` it decided on (for the run's log).
After a growth, ``reset()`` starts it afresh on the grown model's curve.

* :class:`Fixed`: at a step, token or FLOP count (MSG, LiGO, G_stack's fitted token counts).
* :class:`Plateau`: the best loss improved by less than ``threshold`` (relative) over the last ``window``
  evaluations, ``patience`` times in a row ("convergent growth"). Published comparisons find growing *before*
  convergence better, so judge it by the compute the whole run saves, not by how surely it finds a plateau.
* :class:`Slope`: the current model's loss-vs-compute slope against the slope a model without its capacity limit
  would have at the same loss. A power law ``L = A * C^-alpha`` is fitted (least squares in log-log) to the
  curve's first ``fit_fraction`` (where the model is still far from saturated); the local slope
  ``-d log L / d log C`` is fitted over the last ``window`` evaluations; it grows once the local slope falls
  below ``ratio * alpha``, ``patience`` times in a row. (Staged training's criterion, with the power law of
  the curve so far standing in for the bigger model's scaling law.)

The defaults (window 10, patience 3) come from synthetic curves (``examples/bench_triggers.py``: ``10 C^-0.3``,
evaluated at evenly spaced compute, flattening to slope 0.01). Over 50 noise seeds at 0.5% multiplicative
noise, neither trigger fired on the falling curve, and both fired after it flattened: the slope trigger 6-9
evaluations later, the plateau trigger 10-17. At 1% noise the slope trigger fired early on 5 of 50 curves.
A window of 5 with patience 2 fired early on 23 (plateau) and 37 (slope) of 50 curves at 0.5% noise.
"""

from __future__ import annotations

import copy
import dataclasses
import math


@dataclasses.dataclass
class Decision:
    grow: bool
    evidence: dict


class Trigger:
    """The protocol: ``__call__(step=, tokens=, flops=, loss=) -> Decision`` and ``reset()``."""

    def __call__(self, *, step: int, tokens: int = 0, flops: float = 0.0, loss: float | None = None) -> Decision:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the curve seen so far (called after a growth)."""

    def __post_init__(self):  # dataclass subclasses start afresh
        self.reset()

    def state_dict(self) -> dict:
        """What the trigger has seen (its private fields), for a checkpoint."""
        return {key: copy.deepcopy(value) for key, value in vars(self).items() if key.startswith("_")}

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(copy.deepcopy(state))


@dataclasses.dataclass
class Fixed(Trigger):
    """Grow when the run reaches ``step``, ``tokens`` or ``flops`` (whichever is given; once each)."""

    step: int | None = None
    tokens: int | None = None
    flops: float | None = None

    def __post_init__(self):
        if (self.step, self.tokens, self.flops) == (None, None, None):
            raise ValueError("Fixed needs step=, tokens= or flops=")
        super().__post_init__()

    def __call__(self, *, step, tokens=0, flops=0.0, loss=None) -> Decision:
        reached = {name: (value, limit) for name, value, limit in
                   (("step", step, self.step), ("tokens", tokens, self.tokens), ("flops", flops, self.flops))
                   if limit is not None and value >= limit}
        grow = bool(reached) and not self._fired
        self._fired |= grow
        return Decision(grow, {"trigger": "fixed", **{k: v for k, (v, _) in reached.items()},
                               "limits": {"step": self.step, "tokens": self.tokens, "flops": self.flops}})

    def reset(self) -> None:
        self._fired = False


@dataclasses.dataclass
class Plateau(Trigger):
    """Grow when the best loss improved by less than ``threshold`` (relative) over ``window`` evaluations,
    ``patience`` evaluations in a row."""

    window: int = 10
    threshold: float = 0.01
    patience: int = 3

    def reset(self) -> None:
        self._best: list[float] = []
        self._strikes = 0

    def __call__(self, *, step, tokens=0, flops=0.0, loss=None) -> Decision:
        if loss is None or not math.isfinite(loss):
            return Decision(False, {"trigger": "plateau", "why": "no finite loss"})
        self._best.append(min(loss, self._best[-1]) if self._best else loss)
        if len(self._best) <= self.window:
            return Decision(False, {"trigger": "plateau", "evaluations": len(self._best), "window": self.window})
        before, now = self._best[-1 - self.window], self._best[-1]
        improvement = (before - now) / abs(before) if before else 0.0
        self._strikes = self._strikes + 1 if improvement < self.threshold else 0
        return Decision(self._strikes >= self.patience, {
            "trigger": "plateau", "step": step, "best_loss": now, "best_loss_window_ago": before,
            "relative_improvement": improvement, "threshold": self.threshold, "strikes": self._strikes,
        })


@dataclasses.dataclass
class Slope(Trigger):
    """Grow when the local loss-vs-compute slope falls below ``ratio`` times the power-law slope fitted on the
    curve's first ``fit_fraction`` (see the module docstring). Compute is ``flops`` (else ``tokens``, else
    ``step``)."""

    ratio: float = 0.5
    window: int = 10
    fit_fraction: float = 0.5
    min_points: int = 12
    patience: int = 3

    def reset(self) -> None:
        self._curve: list[tuple[float, float]] = []
        self._strikes = 0

    def __call__(self, *, step, tokens=0, flops=0.0, loss=None) -> Decision:
        compute = flops or tokens or step
        if loss is None or not math.isfinite(loss) or loss <= 0 or compute <= 0:
            return Decision(False, {"trigger": "slope", "why": "needs a positive loss and compute"})
        self._curve.append((math.log(compute), math.log(loss)))
        if len(self._curve) < self.min_points:
            return Decision(False, {"trigger": "slope", "evaluations": len(self._curve), "needs": self.min_points})
        fitted = self._curve[:max(self.window, int(len(self._curve) * self.fit_fraction))]
        alpha = -_slope(fitted)
        local = -_slope(self._curve[-self.window:])
        falling = alpha > 0
        self._strikes = self._strikes + 1 if falling and local < self.ratio * alpha else 0
        return Decision(self._strikes >= self.patience, {
            "trigger": "slope", "step": step, "compute": compute, "power_law_alpha": alpha, "local_slope": local,
            "ratio": local / alpha if falling else None, "threshold": self.ratio, "strikes": self._strikes,
        })


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y on x."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var if var else 0.0
