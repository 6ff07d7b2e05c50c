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

**Cost.** Which entries are new is worked out once per growth (:class:`Entries`): where a tensor's old entries
are a leading block (old units first along every grown axis: every built-in pass but GQA head insertion), its
new entries are a few slabs (views) and its old ones one block, read and written as slices; elsewhere as flat
indices on the tensor's device, gathered and scattered. No step builds an index or a mask, and none waits for
the device (``tests/test_devices.py`` counts).
"""

from __future__ import annotations

import math

import torch

from rewrite.transform.growth_map import KEPT, GrowthMap

TRAIN = ("all", "added")


class Entries:
    """Some entries of a tensor, found once: ``parts(t)`` gives them as tensors (views of ``t`` when they are
    slabs; gathered copies of flat indices elsewhere), ``put_(t, values)`` writes ``values`` back."""

    def __init__(self, slabs: list[list[tuple[int, int, int]]] | None = None, index: torch.Tensor | None = None):
        self.slabs, self.index = slabs, index  # slabs: each a list of (axis, start, length)

    @classmethod
    def of(cls, mask: torch.Tensor, device: torch.device) -> tuple["Entries", "Entries"]:
        """(new, old): the entries where ``mask`` is True and those where it is False."""
        old = ~mask
        counts = [int(_along(old, axis).sum()) for axis in range(old.dim())]  # positions holding an old entry
        block = [(axis, 0, n) for axis, n in enumerate(counts)]
        leading = (math.prod(counts) == int(old.sum())
                   and bool(old[tuple(slice(0, n) for n in counts)].all()) if old.numel() else True)
        if leading:
            slabs = [block[:axis] + [(axis, n, old.shape[axis] - n)] for axis, n in enumerate(counts)
                     if n < old.shape[axis] and all(counts[:axis])]  # slab k: old on the axes before k, new on k
            return cls(slabs=slabs), cls(slabs=[block] if math.prod(counts) else [])
        flat = mask.reshape(-1)
        return (cls(index=torch.nonzero(flat).flatten().to(device)),
                cls(index=torch.nonzero(~flat).flatten().to(device)))

    def parts(self, t: torch.Tensor) -> list[torch.Tensor]:
        if self.index is not None:
            return [t.detach().reshape(-1).index_select(0, self.index)]
        out = []
        for slab in self.slabs:
            view = t.detach()
            for axis, start, length in slab:
                view = view.narrow(axis, start, length)
            out.append(view)
        return out

    def copies(self, t: torch.Tensor, into: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """``parts`` that later writes to ``t`` do not change: written into ``into`` (the copies of the step
        before, reused: no fresh pages every step) when given."""
        if into is None:
            return [part.clone() for part in self.parts(t)] if self.index is None else self.parts(t)
        if self.index is not None:
            torch.index_select(t.detach().reshape(-1), 0, self.index, out=into[0])
            return into
        for target, part in zip(into, self.parts(t)):
            target.copy_(part)
        return into

    def put_(self, t: torch.Tensor, values: list[torch.Tensor]) -> None:
        with torch.no_grad():
            if self.index is not None:
                t.detach().view(-1).index_copy_(0, self.index, values[0])
                return
            for view, value in zip(self.parts(t), values):
                view.copy_(value)


def _along(mask: torch.Tensor, axis: int) -> torch.Tensor:
    """Whether each position along ``axis`` holds a True entry."""
    others = [a for a in range(mask.dim()) if a != axis]
    return mask.any(dim=others) if others else mask


class GrowthHooks:
    """The step hooks ``carry`` puts on the grown optimizer (see the module docstring)."""

    def __init__(self, optimizer: torch.optim.Optimizer, growth: GrowthMap, module: torch.nn.Module, *,
                 protect: bool, rewarm: tuple[float, int] | None, train: str = "all"):
        if train not in TRAIN:
            raise ValueError(f"train must be one of {', '.join(TRAIN)}, got {train!r}")
        adam = type(optimizer).__name__ in ("Adam", "AdamW")
        self.names, self.new, self.old, widened, complete = {}, {}, {}, set(), set()
        for name, parameter in module.named_parameters():
            mask = growth.new_entries(name)
            if not mask.any():
                if train == "added":
                    parameter.requires_grad_(False)
                continue
            self.names[parameter] = name
            self.new[parameter], self.old[parameter] = Entries.of(mask, parameter.device)
            kept = growth.recipes[growth.canonical(name)].role == KEPT
            if mask.all():
                complete.add(parameter)
            elif kept and parameter in optimizer.state:
                widened.add(parameter)
        self.protected = widened if protect and adam else set()
        self.peak, self.steps = rewarm if rewarm is not None else (1.0, 0)
        self.restore = {p for p in self.new if train == "added" and p not in complete}
        self.ages = {p: 0 for p in self.new}
        self.active = bool(self.protected) or self.steps > 0
        self._start: dict = {}  # new entries before the step (kept from step to step: written in place)
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
        for p, new in self.new.items():
            if self.active:
                self._start[p] = new.copies(p, self._start.get(p))
            if p in self.restore:
                self._old[p] = self.old[p].copies(p, self._old.get(p))

    def _post(self, opt, args, kwargs) -> None:
        done, adjusted = True, False
        for group in opt.param_groups:
            for p in group["params"]:
                if p not in self.new or p.grad is None:
                    continue
                if p in self.restore:
                    self.old[p].put_(p, self._old[p])
                if self.active:
                    done &= self._adjust(opt, group, p)
                    adjusted = True
        if self.active and adjusted and done:
            self.active = False
            self._start.clear()
            if not self.restore:
                self.remove()

    def _adjust(self, opt, group, p) -> bool:
        """Protection and re-warmup of ``p``'s new entries after one step, written in place (slabs) or gathered
        and scattered back (flat indices); whether both are finished."""
        self.ages[p] += 1
        age, new, start = self.ages[p], self.new[p], self._start[p]
        parts, settled = new.parts(p), True
        if p in self.protected:
            settled = _adam_update_(opt, group, p, new, start, age, parts)
        steps = self.steps
        scale = 1 + (self.peak - 1) * (age / steps if age <= steps else max(0.0, 2 - age / steps)) if steps else 1.0
        if scale != 1.0:
            for begin, part in zip(start, parts):
                torch.lerp(begin, part, scale, out=part)  # begin + scale * (part - begin), in one pass
        if new.index is not None and (scale != 1.0 or p in self.protected):
            new.put_(p, parts)
        return settled and age >= 2 * steps


def _adam_update_(opt, group, p, new: Entries, start: list[torch.Tensor], age: int, parts: list[torch.Tensor]):
    """``parts`` (``new.parts(p)``) become the new entries after an Adam step taken with their own age (fresh
    bias corrections) from ``start``; returns whether both corrections are now within 0.1% of one."""
    beta1, beta2 = (float(b) for b in group["betas"])
    state = opt.state[p]
    second = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
    correction1, correction2 = 1 - beta1 ** age, 1 - beta2 ** age
    lr = group["lr"]  # a tensor learning rate stays one: no wait for the device
    decay = 1 - lr * group["weight_decay"] if type(opt).__name__ == "AdamW" else 1.0
    step = (lr if group.get("maximize") else -lr) / correction1
    with torch.no_grad():
        for begin, part, moment, square in zip(start, parts, new.parts(state["exp_avg"]), new.parts(second)):
            denom = square.sqrt().div_(math.sqrt(correction2)).add_(group["eps"])
            torch.mul(begin, decay, out=part)
            if torch.is_tensor(step):
                part.add_(moment / denom * step)
            else:
                part.addcdiv_(moment, denom, value=step)
    return min(correction1, correction2) > 0.999
