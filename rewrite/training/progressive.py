"""``ProgressiveTrainer``: train -> detect -> grow -> continue, in plain PyTorch.

At each evaluation the trainer asks the stage's trigger (``rewrite.training.triggers``). When it says grow,
the trainer:

1. traces the current model (the first time; afterwards it grows the graph it grew before);
2. applies the stage's passes, every one verified;
3. carries the optimizer and the scheduler onto the grown module (``rewrite.carry``);
4. checks the loss on a fixed validation batch. An exact plan must leave it unchanged (to 1e-5 of its scale),
   else ``GrowthError``; for an approximate plan the change is logged.

Then training continues on the grown module, in the mode the model was in. It counts compute as ``6 * N *
tokens`` per step, where ``N`` is the trainable parameters and ``tokens`` the elements of the batch's first
integer tensor (its batch size otherwise); attention's extra FLOPs are not counted. It writes one JSON line
per evaluation and per growth (step, tokens, FLOPs, losses, learning rates, parameters, wall time; each
growth with its report and the trigger's evidence).

Not yet: checkpoints and resume across a growth, training only what growth added, continuing a Hugging Face
model in its native class, and the ``transformers.Trainer`` integration.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from rewrite.errors import GrowthError
from rewrite.ir.trace import trace
from rewrite.training.carry import carry
from rewrite.training.triggers import Trigger
from rewrite.transform.apply import apply


def _first_inputs(batch) -> tuple[tuple, dict]:
    return (batch[0] if isinstance(batch, (tuple, list)) else batch,), {}


@dataclasses.dataclass
class ProgressiveTrainer:
    """``loss(model, batch) -> scalar tensor``; ``optimizer(parameters) -> Optimizer``; ``scheduler(optimizer)``
    (optional); ``stages``: one list of passes per growth; ``trigger``: one per stage, or one shared (reset
    after each growth); ``inputs(batch) -> (args, kwargs)``: what the model is called with (default: the
    batch's first tensor)."""

    model: torch.nn.Module
    loss: Callable
    optimizer: Callable
    stages: Sequence[Sequence]
    trigger: Trigger | Sequence[Trigger]
    scheduler: Callable | None = None
    inputs: Callable = _first_inputs
    policy: str = "sparkling"
    rewarm: tuple[float, int] | None = None
    evaluate_every: int = 50
    log: str | Path | None = None
    history: list[dict] = dataclasses.field(default_factory=list)

    def fit(self, train: Iterable | Sequence[Iterable], validation: Sequence, steps: int, *,
            per_stage: bool = False) -> "ProgressiveTrainer":
        """Train for ``steps`` steps; ``train`` is one iterable of batches, or, with ``per_stage=True``, one per
        stage (stage ``i`` trains on ``train[i]``: model_t on dataset_t). ``validation`` is a list of batches;
        its first is the fixed batch growth is checked on."""
        self._setup()
        sources = [iter(t) for t in train] if per_stage else [iter(train)]
        start = time.perf_counter()
        for step in range(1, steps + 1):
            batch = next(sources[min(self._stage, len(sources) - 1)])
            self._train_step(batch)
            if step % self.evaluate_every == 0 or step == steps:
                record = self._evaluate(step, validation, time.perf_counter() - start)
                if self._stage >= len(self.stages):
                    continue
                decision = self._trigger()(step=step, tokens=self.tokens, flops=self.flops, loss=record["val_loss"])
                if decision.grow:
                    self._grow(step, validation[0], decision.evidence, time.perf_counter() - start)
        return self

    # -- the loop ------------------------------------------------------------------------------------------
    def _setup(self) -> None:
        self._stage, self._graph, self.tokens, self.flops = 0, None, 0, 0.0
        self._optimizer = self.optimizer(self.model.parameters())
        self._scheduler = self.scheduler(self._optimizer) if self.scheduler else None
        self._train_loss = float("nan")
        if self.log is not None:
            Path(self.log).write_text("")

    def _trigger(self) -> Trigger:
        triggers = self.trigger if isinstance(self.trigger, Sequence) else [self.trigger]
        return triggers[min(self._stage, len(triggers) - 1)]

    def _train_step(self, batch) -> None:
        self.model.train()
        loss = self.loss(self.model, batch)
        self._optimizer.zero_grad()
        loss.backward()
        self._optimizer.step()
        if self._scheduler is not None:
            self._scheduler.step()
        tokens = _tokens(batch)
        self.tokens += tokens
        self.flops += 6.0 * _trainable(self.model) * tokens
        self._train_loss = float(loss.detach())

    def _evaluate(self, step: int, validation: Sequence, seconds: float) -> dict:
        self.model.eval()
        with torch.no_grad():
            val = sum(float(self.loss(self.model, b)) for b in validation) / len(validation)
        return self._write({"event": "eval", "step": step, "tokens": self.tokens, "flops": self.flops,
                            "train_loss": self._train_loss, "val_loss": val, "stage": self._stage,
                            "lr": [g["lr"] for g in self._optimizer.param_groups],
                            "parameters": _trainable(self.model), "seconds": seconds})

    def _grow(self, step: int, fixed, evidence: dict, seconds: float) -> None:
        stage = self.stages[self._stage]
        self.model.eval()
        args, kwargs = self.inputs(fixed)
        with torch.no_grad():
            before = float(self.loss(self.model, fixed))
        source = self._graph if self._graph is not None else trace(self.model, args, kwargs)
        grown = apply(source, list(stage), args, kwargs)
        carried = carry(self._optimizer, grown, grown.module, self._scheduler, policy=self.policy, rewarm=self.rewarm)
        with torch.no_grad():
            after = float(self.loss(grown.module, fixed))
        if grown.report.exact and abs(after - before) > 1e-5 * max(1.0, abs(before)):
            raise GrowthError(f"stage {self._stage} was planned exact but moved the loss on the fixed batch from "
                              f"{before:.6g} to {after:.6g}")
        parameters = _trainable(self.model)
        self.model, self._graph = grown.module, grown.graph
        self._optimizer, self._scheduler = carried.optimizer, carried.scheduler
        self._trigger().reset()
        self._stage += 1
        self._write({"event": "growth", "step": step, "tokens": self.tokens, "flops": self.flops,
                     "stage": self._stage, "loss_before": before, "loss_after": after, "exact": grown.report.exact,
                     "parameters_before": parameters, "parameters_after": _trainable(self.model),
                     "optimizer_reset": [list(r) for r in carried.reset], "report": str(grown.report),
                     "evidence": evidence, "seconds": seconds})

    def _write(self, record: dict) -> dict:
        self.history.append(record)
        if self.log is not None:
            with open(self.log, "a") as f:
                f.write(json.dumps(record, default=str) + "\n")
        return record


def _tokens(batch) -> int:
    for value in batch if isinstance(batch, (tuple, list)) else [batch]:
        if isinstance(value, torch.Tensor) and not value.is_floating_point():
            return value.numel()
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(first.shape[0])


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
