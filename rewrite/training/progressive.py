"""``ProgressiveTrainer``: train -> detect -> grow -> continue, in plain PyTorch.

At each evaluation the trainer asks the stage's trigger (``rewrite.training.triggers``). When it says grow,
the trainer:

1. traces the current model (or grows the graph it grew before);
2. applies the stage's passes, every one verified;
3. continues a Hugging Face model in its own class (``to_native``) when the grown sizes fit its config, so
   generation, ``save_pretrained`` and Trainer code keep working; otherwise (an upcycled router, a kept RoPE
   table) in the graph form, with the reason logged;
4. carries the optimizer and the scheduler onto the grown module (``rewrite.carry``), with ``train="all"`` or
   ``"added"`` (only what growth added trains; the original entries stay bit-identical);
5. checks the loss on a fixed validation batch: an exact plan must leave it unchanged (to the tolerance of
   the dtype the model computes in: ``rewrite.training.precision``), else ``GrowthError``; for an approximate
   plan the change is logged.

Mixed precision: ``autocast=torch.bfloat16`` (or ``float16``) runs every forward pass under ``torch.autocast``
on the model's device; ``scaler=torch.amp.GradScaler(...)`` scales the loss for float16 training. The scaler
is the same object across growths (its scale and growth tracker carry over; its per-optimizer state lives one
step) and its state is in every checkpoint.

Compute is ``6 * N * tokens`` per step (``N``: every parameter) plus attention's activation products, measured
once per model size (``rewrite.training.flops``); ``tokens`` are the elements of the batch's first integer
tensor (its batch size otherwise). One JSON line is written per evaluation and per growth (step, tokens,
FLOPs, losses, learning rates, parameters, wall time; each growth with its report and the trigger's evidence).

Checkpoints (``checkpoints=folder``): before and after each growth, and every ``checkpoint_every`` steps at an
evaluation. Each is a folder written atomically: ``model.safetensors`` (the weights) and the rest without
pickle (``rewrite.io.state_files``: optimizer, scheduler, gradient scaler, trigger and step-hook state,
counters, the RNG state of the CPU and of every device the model is on, the history).
``fit(..., resume=True)`` continues from the latest: it rebuilds the grown structure by replaying
the growths on the original model, loads every state, skips the batches already consumed (so ``train`` must
give the same batches in the same order when iterated afresh, without drawing from torch's global random
state: a DataLoader with a seeded ``generator=``) and, from a checkpoint taken before a growth,
does that growth. The run then ends bit-identical to one that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from rewrite.errors import GrowfxError, NotRepresentableError
from rewrite.io.native import to_native
from rewrite.io.sources import atomic_path
from rewrite.io.state_files import load_state, write_state
from rewrite.ir.frontends import first_line, is_huggingface
from rewrite.ir.trace import trace
from rewrite.training.carry import carried_class, carry
from rewrite.training.flops import parameters, per_token
from rewrite.training.precision import autocast, check_kept, compute_dtype, rng_state, set_rng_state
from rewrite.training.triggers import Trigger
from rewrite.transform.apply import apply

KINDS = ("periodic", "before", "after")  # the order of a step's checkpoints


def _first_inputs(batch) -> tuple[tuple, dict]:
    return (batch[0] if isinstance(batch, (tuple, list)) else batch,), {}


@dataclasses.dataclass
class ProgressiveTrainer:
    """``loss(model, batch) -> scalar tensor``; ``optimizer(parameters) -> Optimizer``; ``scheduler(optimizer)``
    (optional); ``stages``: one list of passes per growth; ``trigger``: one per stage, or one shared (reset
    after each growth); ``inputs(batch) -> (args, kwargs)``: what the model is called with (default: the
    batch's first tensor). ``policy``, ``rewarm`` and ``train`` go to ``rewrite.carry``. ``autocast``: a dtype
    to run forward passes in under ``torch.autocast``; ``scaler``: a ``torch.amp.GradScaler`` (float16)."""

    model: torch.nn.Module
    loss: Callable
    optimizer: Callable
    stages: Sequence[Sequence]
    trigger: Trigger | Sequence[Trigger]
    scheduler: Callable | None = None
    inputs: Callable = _first_inputs
    policy: str = "sparkling"
    rewarm: tuple[float, int] | None = None
    train: str = "all"
    native: bool = True
    evaluate_every: int = 50
    log: str | Path | None = None
    checkpoints: str | Path | None = None
    checkpoint_every: int | None = None
    progress: bool = False
    autocast: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    history: list[dict] = dataclasses.field(default_factory=list, init=False)

    def fit(self, train: Iterable | Sequence[Iterable], validation: Sequence, steps: int, *,
            per_stage: bool = False, resume: bool | str | Path = False) -> "ProgressiveTrainer":
        """Train for ``steps`` steps; ``train`` is one iterable of batches, or, with ``per_stage=True``, one per
        stage (stage ``i`` trains on ``train[i]``: model_t on dataset_t). ``validation`` is a list of batches;
        its first is the fixed batch growth is checked on. ``resume``: ``True`` (the latest checkpoint in
        ``checkpoints``) or a checkpoint folder."""
        self._original = self.model
        self._setup(validation[0])
        sources = [iter(t) for t in train] if per_stage else [iter(train)]
        self._consumed = [0] * len(sources)
        pending, first = None, 1
        if resume:
            pending, first, rng = self._restore(self._checkpoint_to_resume(resume), validation[0])
            for index, count in enumerate(self._consumed):
                for _ in range(count):
                    next(sources[index])
            set_rng_state(rng)  # after the skipped batches: they are drawn as in the run that made them
        if pending is not None:
            self._grow(first - 1, validation[0], pending)
        for step in range(first, steps + 1):
            index = min(self._stage, len(sources) - 1)
            self._consumed[index] += 1
            self._train_step(next(sources[index]))
            if step % self.evaluate_every == 0 or step == steps:
                self._evaluate(step, validation, steps)
                decision = self._trigger()(step=step, tokens=self.tokens, flops=self.flops,
                                           loss=self.history[-1]["val_loss"]) if self._stage < len(self.stages) else None
                if decision is not None and decision.grow:
                    self._save(step, "before", pending=decision.evidence)
                    self._grow(step, validation[0], decision.evidence)
                elif self.checkpoint_every and step % self.checkpoint_every == 0:
                    self._save(step, "periodic")
        return self

    # -- the loop ------------------------------------------------------------------------------------------
    def _setup(self, fixed) -> None:
        self.model = self._original
        self._stage, self._graph, self.tokens, self.flops, self._elapsed = 0, None, 0, 0.0, 0.0
        self._optimizer = self.optimizer(self.model.parameters())
        self._scheduler = self.scheduler(self._optimizer) if self.scheduler else None
        self._hooks, self._train_loss, self._started = None, float("nan"), time.perf_counter()
        self._per_token = self._measure_cost(fixed)
        self.history = []
        if self.log is not None:
            Path(self.log).parent.mkdir(parents=True, exist_ok=True)
            Path(self.log).write_text("")
        for trigger in self._triggers():
            trigger.reset()

    def _triggers(self) -> list[Trigger]:
        return list(self.trigger) if isinstance(self.trigger, Sequence) else [self.trigger]

    def _trigger(self) -> Trigger:
        triggers = self._triggers()
        return triggers[min(self._stage, len(triggers) - 1)]

    def _seconds(self) -> float:
        return self._elapsed + time.perf_counter() - self._started

    def _measure_cost(self, fixed) -> float:
        args, kwargs = self.inputs(fixed)
        return per_token(self.model, args, kwargs, _tokens(fixed))

    def _loss(self, batch) -> torch.Tensor:
        with autocast(self.model, self.autocast):
            return self.loss(self.model, batch)

    def _fixed_loss(self, fixed) -> float:
        self.model.eval()
        with torch.no_grad():
            return float(self._loss(fixed))

    def _train_step(self, batch) -> None:
        self.model.train()
        loss = self._loss(batch)
        self._optimizer.zero_grad()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self._optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self._optimizer.step()
        if self._scheduler is not None:
            self._scheduler.step()
        tokens = _tokens(batch)
        self.tokens += tokens
        self.flops += self._per_token * tokens
        self._train_loss = float(loss.detach())

    def _evaluate(self, step: int, validation: Sequence, steps: int) -> dict:
        self.model.eval()
        with torch.no_grad():
            val = sum(float(self._loss(b)) for b in validation) / len(validation)
        record = self._write({"event": "eval", "step": step, "tokens": self.tokens, "flops": self.flops,
                              "train_loss": self._train_loss, "val_loss": val, "stage": self._stage,
                              "lr": [g["lr"] for g in self._optimizer.param_groups],
                              "parameters": parameters(self.model), "trainable": _trainable(self.model),
                              "seconds": self._seconds()})
        if self.progress:
            print(f"step {step}/{steps}  stage {self._stage}  train {self._train_loss:.4f}  val {val:.4f}  "
                  f"{parameters(self.model):,} parameters  {self.flops:.3g} FLOPs  {record['seconds']:.1f} s",
                  file=sys.stderr, flush=True)
        return record

    def _grow(self, step: int, fixed, evidence: dict) -> None:
        before, size = self._fixed_loss(fixed), parameters(self.model)
        with autocast(self.model, self.autocast):
            dtype = compute_dtype(self.model)
        grown, native_note = self._grow_structure(fixed)
        after = self._fixed_loss(fixed)
        check_kept(self._stage, grown.report.exact, before, after, dtype)
        self._write({"event": "growth", "step": step, "tokens": self.tokens, "flops": self.flops,
                     "stage": self._stage, "loss_before": before, "loss_after": after, "exact": grown.report.exact,
                     "parameters_before": size, "parameters_after": parameters(self.model),
                     "trainable": _trainable(self.model), "module": type(self.model).__name__, "native": native_note,
                     "optimizer_reset": [list(r) for r in self._carried_reset], "report": str(grown.report),
                     "evidence": evidence, "seconds": self._seconds()})
        del grown  # it holds the old model's graph, whose reference cycles keep the old tensors until collected:
        gc.collect()  # free them before training on
        self._save(step, "after")

    def _grow_structure(self, fixed):
        """Grow the current model by the next stage and carry the optimizer and scheduler onto it (what a
        growth and its replay on resume share). Returns the ``Grown`` and why it is (not) native."""
        args, kwargs = self.inputs(fixed)
        self._optimizer.zero_grad(set_to_none=True)  # the next step computes its own: not held while growing
        self.model.eval()  # dropout off while the growth is verified
        source = self._graph if self._graph is not None else trace(self.model, args, kwargs)
        grown = apply(source, list(self.stages[self._stage]), args, kwargs)
        module, graph, note = grown.module, grown.graph, None
        if self.native and is_huggingface(self.model):
            try:
                module, graph, note = carried_class(to_native(grown, self.model), self.model), None, \
                    "continues in its own class"
            except NotRepresentableError as e:
                note = f"continues as a graph: {first_line(e)}"
        carried = carry(self._optimizer, grown, module, self._scheduler, policy=self.policy, rewarm=self.rewarm,
                        train=self.train, release=True)  # the old optimizer is not used again
        self.model, self._graph, self._hooks = module, graph, carried.hooks
        self._optimizer, self._scheduler, self._carried_reset = carried.optimizer, carried.scheduler, carried.reset
        self._trigger().reset()
        self._stage += 1
        self._per_token = self._measure_cost(fixed)
        return grown, note

    def _write(self, record: dict) -> dict:
        self.history.append(record)
        if self.log is not None:
            with open(self.log, "a") as f:
                f.write(json.dumps(record, default=str) + "\n")
        return record

    # -- checkpoints ---------------------------------------------------------------------------------------
    def _save(self, step: int, kind: str, pending: dict | None = None) -> None:
        if self.checkpoints is None:
            return
        state = {"format": 1, "step": step, "kind": kind, "pending": pending, "stage": self._stage,
                 "tokens": self.tokens, "flops": self.flops, "train_loss": self._train_loss,
                 "seconds": self._seconds(), "consumed": self._consumed, "rng": rng_state(self.model),
                 "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                 "triggers": [t.state_dict() for t in self._triggers()],
                 "hooks": self._hooks.state_dict() if self._hooks is not None else None,
                 "optimizer": self._optimizer.state_dict(),
                 "scheduler": self._scheduler.state_dict() if self._scheduler is not None else None,
                 "history": json.loads(json.dumps(self.history, default=str))}
        folder = Path(self.checkpoints) / f"step-{step:08d}-{KINDS.index(kind)}-{kind}"
        with atomic_path(folder, replace=True) as target:
            target.mkdir()
            save_model(self.model, str(target / "model.safetensors"))  # tied tensors once
            write_state(state, target)

    def _checkpoint_to_resume(self, resume: bool | str | Path) -> Path:
        if resume is not True:
            return Path(resume)
        if self.checkpoints is None:
            raise GrowfxError("resume=True needs checkpoints= (the folder the run saved its checkpoints in)")
        found = sorted(p for p in Path(self.checkpoints).glob("step-*") if (p / "model.safetensors").is_file())
        if not found:
            raise GrowfxError(f"no checkpoint to resume from in {self.checkpoints}")
        return found[-1]

    def _restore(self, folder: Path, fixed) -> tuple[dict | None, int, dict]:
        """Load the checkpoint in ``folder`` into the freshly set-up trainer; the pending growth's evidence (a
        checkpoint taken before a growth), the first step still to train, and the RNG state to continue from."""
        state = load_state(folder)
        if state.get("format") != 1:
            raise GrowfxError(f"{folder} is not a checkpoint of this trainer")
        if state["stage"] > len(self.stages):
            raise GrowfxError(f"{folder} is at stage {state['stage']}, but this trainer has {len(self.stages)} stages")
        while self._stage < state["stage"]:  # the grown structure, by replaying the growths
            self._grow_structure(fixed)
        try:
            load_model(self.model, str(folder / "model.safetensors"), strict=True)
        except RuntimeError as e:
            raise GrowfxError(f"the weights in {folder} do not fit the model replayed to stage {state['stage']}: "
                              f"{first_line(e)}") from e
        self._optimizer.load_state_dict(state["optimizer"])
        if self._scheduler is not None:
            self._scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self._hooks is not None and state["hooks"] is not None:
            self._hooks.load_state_dict(state["hooks"], self._optimizer)
        for trigger, trigger_state in zip(self._triggers(), state["triggers"]):
            trigger.load_state_dict(trigger_state)
        self.tokens, self.flops, self._train_loss = state["tokens"], state["flops"], state["train_loss"]
        if len(state["consumed"]) != len(self._consumed):
            raise GrowfxError(f"{folder} was trained from {len(state['consumed'])} data sources, this run has "
                              f"{len(self._consumed)}")
        self._consumed, self._elapsed, self.history = list(state["consumed"]), state["seconds"], []
        self._started = time.perf_counter()
        for record in state["history"]:
            self._write(record)
        return state["pending"], state["step"] + 1, state["rng"]


def _tokens(batch) -> int:
    for value in batch if isinstance(batch, (tuple, list)) else [batch]:
        if isinstance(value, torch.Tensor) and not value.is_floating_point():
            return value.numel()
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(first.shape[0])


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
