"""Training in the precisions users train in: bfloat16 weights, float16 autocast with a gradient scaler, CPU
bfloat16 autocast, and a model on another device (``pretend_device``). Each grows exact plans (the fixed-batch
loss check takes the tolerance of the dtype the model computes in) and resumes bit-identical (the scaler's
state and every device's RNG state are in the checkpoints)."""

from __future__ import annotations

import pytest
import torch

import passes
import rewrite
from pretend_device import Pretend, to_pretend
from rewrite.training.precision import check_kept, compute_dtype, rng_state, same_loss, set_rng_state
from rewrite.training.triggers import Fixed
from test_resume import VALIDATION, DropoutGPT, Language, loss

VOCAB = 32
SETTINGS = {
    "bfloat16 weights": dict(dtype=torch.bfloat16),
    "float16 autocast + scaler": dict(autocast=torch.float16, scaler=True),
    "bfloat16 autocast": dict(autocast=torch.bfloat16),
    "pretend device": dict(device=True),
}


class OnDevice:
    """Batches of ``Language`` moved onto the pretend device."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        for inputs, targets in self.batches:
            yield to_pretend(inputs), to_pretend(targets)


def trainer(folder, *, dtype=torch.float32, autocast=None, scaler=False, device=False):
    torch.manual_seed(0)
    model = DropoutGPT(vocab=VOCAB, dim=8, heads=2, hidden=16, layers=1).to(dtype)
    model = to_pretend(model) if device else model
    return rewrite.ProgressiveTrainer(
        model, loss=loss,
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3, weight_decay=0.1),
        stages=[[passes.widen_mlp(factor=2)],
                [passes.add_layers(1, init="copy"), passes.widen_hidden(factor=2, init="clone")]],
        trigger=[Fixed(step=10), Fixed(step=20)], evaluate_every=5, checkpoint_every=5,
        checkpoints=None if device else folder,  # safetensors reads a tensor's storage: a pretend one has none
        autocast=autocast, scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) if scaler else None)


def fit(folder, setting, steps=30, resume=False):
    made = trainer(folder, **SETTINGS[setting])
    train, validation = Language(0), VALIDATION
    if SETTINGS[setting].get("device"):
        train, validation = OnDevice(train), list(OnDevice(validation))
    return made.fit(train, validation, steps=steps, resume=resume)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_exact_growths_pass_the_loss_check_and_resume_bit_identical(setting, tmp_path):
    whole = fit(tmp_path / "whole", setting)
    growths = [r for r in whole.history if r["event"] == "growth"]
    assert [g["step"] for g in growths] == [10, 20] and all(g["exact"] for g in growths)
    if SETTINGS[setting].get("device"):
        assert all(isinstance(p, Pretend) for p in whole.model.parameters())
        assert all(isinstance(v, Pretend) for state in whole._optimizer.state.values() for k, v in state.items()
                   if k != "step")
        return
    if whole.scaler is not None:
        assert whole.scaler.get_scale() > 0 and whole.scaler._growth_tracker is not None
    resumed = fit(tmp_path / "whole", setting, resume=tmp_path / "whole" / "step-00000015-0-periodic")
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        a, b = (a.inner, b.inner) if isinstance(a, Pretend) else (a, b)
        assert torch.equal(a, b), name
    if whole.scaler is not None:
        assert resumed.scaler.state_dict() == whole.scaler.state_dict()


def test_the_loss_check_follows_the_dtype_the_model_computes_in():
    """The figures the issue measured: exact growths that a fixed 1e-5 refused in bfloat16 and under autocast."""
    model = torch.nn.Linear(4, 4)
    assert compute_dtype(model) == torch.float32
    assert compute_dtype(model.to(torch.bfloat16)) == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(torch.nn.Linear(4, 4)) == torch.bfloat16
    assert same_loss(1.01402, 1.01465, torch.bfloat16) and same_loss(0.922828, 0.922872, torch.bfloat16)
    check_kept(0, True, 1.01402, 1.01465, torch.bfloat16)
    check_kept(0, False, 1.0, 2.0, torch.float32)  # an approximate plan's change is logged, not refused
    with pytest.raises(rewrite.GrowthError, match="stage 1 was planned exact .* from 1.01402 to 1.01465 .*float32"):
        check_kept(1, True, 1.01402, 1.01465, torch.float32)
    assert not same_loss(1.01402, 1.01465, torch.float32) and not same_loss(1.0, 1.1, torch.bfloat16)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # TF32 matrix products on a GPU
        assert same_loss(1.0, 1.001, torch.float32)
    finally:
        torch.set_float32_matmul_precision(previous)


def test_the_rng_state_of_every_device_the_model_is_on_is_saved_and_restored():
    model = to_pretend(torch.nn.Linear(2, 2))
    device_module = torch.get_device_module("pretend")
    device_module.manual_seed(3)
    state = rng_state(model)
    assert set(state["devices"]) == {"pretend:0"}
    first = torch.randn(4, generator=device_module.generator)
    set_rng_state(state)
    assert torch.equal(torch.randn(4, generator=device_module.generator), first)


@pytest.mark.parametrize("precision", ["float32", "bfloat16 weights", "bfloat16 autocast"])
def test_growing_trainer_grows_exact_plans_in_bfloat16_and_resumes_bit_identical(precision, tmp_path):
    """``GrowingTrainer`` on a bfloat16 model, and under the Trainer's own bfloat16 autocast: both growths pass
    the loss check, and a run resumed from the grown checkpoint ends where the uninterrupted run did."""
    transformers = pytest.importorskip("transformers")
    from rewrite.app import zoo
    from rewrite.training.hf_trainer import GrowingTrainer
    from test_hf_trainer import Language

    def run(folder, model, stages, triggers, resume=None):
        args = transformers.TrainingArguments(
            output_dir=str(folder), max_steps=12, per_device_train_batch_size=8, learning_rate=3e-3,
            save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
            bf16=precision == "bfloat16 autocast")
        trainer = GrowingTrainer(model=model, args=args, train_dataset=Language(vocab, 256, 0),
                                 stages=stages, trigger=triggers)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    torch.manual_seed(0)
    model = zoo.build("hf-llama").model
    if precision == "bfloat16 weights":  # as users get one (rotary tables computed in float32), as on resume
        model.save_pretrained(tmp_path / "start")
        model = type(model).from_pretrained(tmp_path / "start", dtype=torch.bfloat16)
    vocab = model.config.vocab_size
    whole = run(tmp_path, model, [[passes.widen_mlp(factor=2)], [passes.add_layers(1, init="copy")]],
                [Fixed(step=4), Fixed(step=8)])
    assert [g["step"] for g in whole.growths] == [4, 8] and all(g["exact"] for g in whole.growths)
    grown = type(model).from_pretrained(tmp_path / "checkpoint-8", dtype=next(model.parameters()).dtype)
    resumed = run(tmp_path / "again", grown, [], [], resume=str(tmp_path / "checkpoint-8"))
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
