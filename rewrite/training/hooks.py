"""Optimizer step hooks on what growth added: protect new entries from Adam's bias correction, re-warm their
learning rate, or train only them.

Growth leaves three kinds of parameter: kept (every entry is the original's), widened (some entries new: the
map's ``new_entries``) and added (a copy into a new role, or a tensor with no source: every entry new).

* ``protect`` (Adam, AdamW): a widened tensor keeps one ``step`` for all its entries, so new entries starting
  from zero moments would skip the bias correction their age calls for (first updates about
  ``(1 - beta1) / sqrt(1 - beta2)`` = 3.2x the learning rate). The post-step hook recomputes their update with
  their own age ``a`` (Adam's formula, ``1 - beta^a``) until both corrections are within 0.1% of one.
* ``rewarm=(peak, steps)``: every new entry's update (weight decay included, as a learning rate would) is
  multiplied by ``1 + (peak - 1) * a / steps`` for ``a`` up to ``steps``, then back down to 1 over as many
  steps: their learning rate re-warmed to ``peak`` times the schedule's (SPARKLING).
* ``train="added"``: only what growth added trains (LLaMA Pro's recipe). Kept tensors stop requiring
  gradients; the old entries of widened tensors are restored after every step, so gradient and weight decay
  alike leave them bit-identical.

The hooks hold a little state (the age of each tensor's new entries); ``state_dict``/``load_state_dict`` keep it
across a checkpoint. Protection and re-warmup remove themselves once they have nothing left to do; the
restoring of old entries stays.
"""

from __future__ import annotations

import math

import torch

from rewrite.transform.growth_map import KEPT, GrowthMap

TRAIN = ("all", "added")


class GrowthHooks:
    """The step hooks ``carry`` puts on the grown optimizer (see the module docstring)."""

    def __init__(self, optimizer: torch.optim.Optimizer, growth: GrowthMap, module: torch.nn.Module, *,
                 protect: bool, rewarm: tuple[float, int] | None, train: str = "all"):
        if train not in TRAIN:
            raise ValueError(f"train must be one of {', '.join(TRAIN)}, got {train!r}")
        adam = type(optimizer).__name__ in ("Adam", "AdamW")
        self.names, self.masks, widened = {}, {}, set()
        for name, parameter in module.named_parameters():
            mask = growth.new_entries(name)
            if not mask.any():
                if train == "added":
                    parameter.requires_grad_(False)
                continue
            self.names[parameter], self.masks[parameter] = name, mask
            kept = growth.recipes[growth.canonical(name)].role == KEPT
            if kept and parameter in optimizer.state and not mask.all():
                widened.add(parameter)
        self.protected = widened if protect and adam else set()
        self.peak, self.steps = rewarm if rewarm is not None else (1.0, 0)
        self.restore = {p for p, mask in self.masks.items() if train == "added" and not mask.all()}
        self.ages = {p: 0 for p in self.masks}
        self.active = bool(self.protected) or self.steps > 0
        self._start: dict = {}  # new entries before the step
        self._old: dict = {}  # old entries before the step (train='added')
        self._handles = []
        self._register(optimizer)

    def _register(self, optimizer) -> None:
        self.remove()
        if self.active or self.restore:
            self._handles = [optimizer.register_step_pre_hook(self._pre), optimizer.register_step_post_hook(self._post)]

    def state_dict(self) -> dict:
        return {"ages": {self.names[p]: age for p, age in self.ages.items()}, "active": self.active,
                "protected": sorted(self.names[p] for p in self.protected)}

    def load_state_dict(self, state: dict, optimizer: torch.optim.Optimizer) -> None:
        """Continue from ``state`` on ``optimizer`` (which protection applies depends on the optimizer state
        the growth found, so it is restored too)."""
        by_name = {name: p for p, name in self.names.items()}
        self.ages = {by_name[name]: age for name, age in state["ages"].items()}
        self.protected = {by_name[name] for name in state["protected"]}
        self.active = state["active"]
        self._register(optimizer)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _pre(self, opt, args, kwargs) -> None:
        for p, mask in self.masks.items():
            if self.active:
                self._start[p] = p.detach()[mask].clone()
            if p in self.restore:
                self._old[p] = p.detach()[~mask].clone()

    def _post(self, opt, args, kwargs) -> None:
        done, adjusted = True, False
        for group in opt.param_groups:
            for p in group["params"]:
                if p not in self.masks or p.grad is None:
                    continue
                if p in self.restore:
                    with torch.no_grad():
                        p[~self.masks[p]] = self._old[p]
                if self.active:
                    done &= self._adjust(opt, group, p)
                    adjusted = True
        self._start.clear()
        self._old.clear()
        if self.active and adjusted and done:
            self.active = False
            if not self.restore:
                self.remove()

    def _adjust(self, opt, group, p) -> bool:
        """Protection and re-warmup of ``p``'s new entries after one step; whether both are finished."""
        self.ages[p] += 1
        age, mask, start = self.ages[p], self.masks[p], self._start[p]
        after, settled = p.detach()[mask], True
        if p in self.protected:
            after, settled = _adam_update(opt, group, p, mask, start, age)
        steps = self.steps
        scale = 1 + (self.peak - 1) * (age / steps if age <= steps else max(0.0, 2 - age / steps)) if steps else 1.0
        with torch.no_grad():
            p[mask] = start + scale * (after - start)
        return settled and age >= 2 * steps


def _adam_update(opt, group, p, mask, start: torch.Tensor, age: int) -> tuple[torch.Tensor, bool]:
    """The new entries of ``p`` after an Adam step taken with their own age (fresh bias corrections), and
    whether both corrections are now within 0.1% of one."""
    beta1, beta2 = (float(b) for b in group["betas"])
    state = opt.state[p]
    second = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
    correction1, correction2 = 1 - beta1 ** age, 1 - beta2 ** age
    lr = float(group["lr"])
    denom = second[mask].sqrt() / math.sqrt(correction2) + group["eps"]
    update = (lr / correction1) * state["exp_avg"][mask] / denom
    if type(opt).__name__ == "AdamW":
        start = start * (1 - lr * group["weight_decay"])
    return (start + update if group.get("maximize") else start - update), min(correction1, correction2) > 0.999
