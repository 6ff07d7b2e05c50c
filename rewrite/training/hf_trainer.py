"""Growing inside ``transformers.Trainer``: ``GrowingTrainer``.

A callback alone cannot grow a Trainer's model: the training loop holds the model, the optimizer and the
scheduler it built. So ``GrowingTrainer`` (a ``Trainer`` subclass) stops and resumes the Trainer's own way:

1. its callback asks the trigger at each evaluation (at each step when the run does not evaluate); when it says
   grow, it has the Trainer save a checkpoint and stop;
2. ``train`` then grows the model by the next stage in its own class (``rewrite.to_native``: the config
   updated), checks the loss on a fixed batch (on the model's device, to the tolerance of its dtype), carries
   the optimizer and the scheduler (``rewrite.carry``),
   and writes the grown checkpoint in the Trainer's format under the same name (the checkpoint as it was
   before the growth is kept as ``checkpoint-N-before-growth``; ``growth.json`` records the report);
3. and resumes from it (``Trainer.train(resume_from_checkpoint=...)``): same step, same data position, same
   RNG state, the grown model, the carried optimizer and schedule.

A run that stops after a growth resumes with ``train(resume_from_checkpoint=True)`` like any Trainer run, from
the grown checkpoint, with the model given as the grown native model (``from_pretrained`` of the checkpoint).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from rewrite.errors import GrowthError
from rewrite.io.hf import example_inputs
from rewrite.io.native import to_native
from rewrite.ir.trace import trace
from rewrite.training.carry import carried_class, carry
from rewrite.training.flops import parameters
from rewrite.training.precision import check_kept, compute_dtype
from rewrite.transform.apply import apply


class GrowingTrainer(Trainer):
    """``Trainer(..., stages=[[passes...], ...], trigger=Trigger or [one per stage], policy=, rewarm=,
    train_only="all"|"added")``; everything else as ``transformers.Trainer``. ``growths`` lists what happened."""

    def __init__(self, *args, stages, trigger, policy: str = "sparkling", rewarm=None, train_only: str = "all",
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.stages, self.trigger, self.policy, self.rewarm, self.train_only = stages, trigger, policy, rewarm, train_only
        self.growths: list[dict] = []
        self._stage, self._pending = 0, None
        self.add_callback(_AskTheTrigger(self))

    def train(self, resume_from_checkpoint=None, **kwargs):
        result = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        while self._pending is not None:
            checkpoint = self._grow_checkpoint(self._pending)
            self._pending = None
            result = super().train(resume_from_checkpoint=str(checkpoint), **kwargs)
        return result

    def current_trigger(self):
        triggers = self.trigger if isinstance(self.trigger, (list, tuple)) else [self.trigger]
        return triggers[min(self._stage, len(triggers) - 1)] if self._stage < len(self.stages) else None

    def _grow_checkpoint(self, evidence: dict) -> Path:
        step = self.state.global_step
        folder = Path(self.args.output_dir) / f"checkpoint-{step}"
        if not folder.is_dir():
            raise GrowthError(f"the Trainer saved no checkpoint at step {step} in {self.args.output_dir} to grow")
        # the model's own forward: accelerate wraps it in autocast for mixed precision, which a trace would keep
        model = self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False).eval()
        args, kwargs = example_inputs(model)
        where = next(model.parameters()).device  # the fixed batch goes where the model is
        args, kwargs = tuple(a.to(where) for a in args), {k: v.to(where) for k, v in kwargs.items()}
        before = _loss(model, args, kwargs)
        grown = apply(trace(model, args, kwargs), list(self.stages[self._stage]), args, kwargs)
        native = carried_class(to_native(grown, model), model)  # NotRepresentableError says why, if it cannot
        after = _loss(native.eval(), args, kwargs)
        check_kept(self._stage, grown.report.exact, before, after, compute_dtype(model))
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper, unwrapped
        carried = carry(optimizer, grown, native, self.lr_scheduler, policy=self.policy, rewarm=self.rewarm,
                        train=self.train_only)
        record = {"step": step, "stage": self._stage, "loss_before": before, "loss_after": after,
                  "exact": grown.report.exact, "parameters_before": parameters(model),
                  "parameters_after": parameters(native), "report": str(grown.report),
                  "optimizer_reset": [list(r) for r in carried.reset], "evidence": evidence}
        staging = folder.with_name(f".{folder.name}.growing")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(folder, staging, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "config.json"))
        native.save_pretrained(staging, safe_serialization=True)
        torch.save(carried.optimizer.state_dict(), staging / "optimizer.pt")  # the Trainer's own format
        torch.save(carried.scheduler.state_dict(), staging / "scheduler.pt")
        (staging / "growth.json").write_text(json.dumps(record, indent=1, default=str))
        kept = folder.with_name(f"{folder.name}-before-growth")
        shutil.rmtree(kept, ignore_errors=True)
        os.replace(folder, kept)
        os.replace(staging, folder)
        self.model = self.model_wrapped = native.train()
        self.optimizer, self.lr_scheduler, self._created_lr_scheduler = carried.optimizer, carried.scheduler, False
        self.growths.append(record)
        self.current_trigger().reset()
        self._stage += 1
        return folder


def _loss(model, args, kwargs) -> float:
    """The language-model loss of ``model`` on its example inputs (labels = the inputs)."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    with torch.no_grad():
        return float(model(*args, **{**kwargs, "labels": ids}).loss)


class _AskTheTrigger(TrainerCallback):
    """Asks the growing trainer's trigger; when it says grow, has the Trainer save and stop."""

    def __init__(self, trainer: GrowingTrainer):
        self.trainer = trainer

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        return self._ask(state, control, (metrics or {}).get("eval_loss"))

    def on_step_end(self, args, state, control, **kwargs):
        if str(args.eval_strategy) in ("no", "IntervalStrategy.NO"):
            return self._ask(state, control, None)
        return control

    def _ask(self, state, control, loss):
        trigger = self.trainer.current_trigger()
        if trigger is None or self.trainer._pending is not None:
            return control
        decision = trigger(step=state.global_step, tokens=int(state.num_input_tokens_seen or 0),
                           flops=float(state.total_flos or 0.0), loss=loss)
        if decision.grow:
            self.trainer._pending = decision.evidence
            control.should_save = True
            control.should_training_stop = True
        return control
