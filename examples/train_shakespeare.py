"""Train a character-level GPT on Shakespeare that grows twice while it trains: ``rewrite.ProgressiveTrainer``.

    python examples/train_shakespeare.py [OUT]     # about 75 s on two cores; OUT defaults to out/shakespeare

What ``growfx train`` does, written out with the Python API: a 2-layer GPT (76,544 parameters) trains with
AdamW and a warmup-cosine schedule; at steps 800 and 1600 (``Fixed`` triggers) it grows, first wider MLPs
and twice the heads, then two more layers copied from the top, every growth verified exact on a fixed batch;
the optimizer (SPARKLING's policy: old entries keep their moments, new ones start fresh and get their own
bias correction) and the schedule carry over. It writes ``log.jsonl`` and ``loss.png`` (validation loss
against training FLOPs, the growths marked) and checkpoints before and after each growth: rerun with the same
OUT after an interruption and it resumes, ending where an uninterrupted run would.
"""

import math
import sys
from pathlib import Path

import torch

import passes
import rewrite
from rewrite.app.shakespeare import Batches, Characters, text
from rewrite.app.train import char_gpt, loss, plot
from rewrite.training.triggers import Fixed

STEPS, WARMUP = 2400, 120


def warmup_cosine(step: int) -> float:
    if step < WARMUP:
        return (step + 1) / WARMUP
    return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - WARMUP) / (STEPS - WARMUP)))


def main(out: Path) -> None:
    torch.manual_seed(0)
    chars = Characters.of(text())  # 5.06M characters of the 42 plays; 10% held out
    validation = [b for b, _ in zip(Batches(chars.validation, 32, 64, seed=1), range(4))]
    checkpoints = out / "checkpoints"
    trainer = rewrite.ProgressiveTrainer(
        char_gpt(len(chars.alphabet), (64, 4, 128, 2), 64),  # the zoo GPT, GPT-2's initialisation
        loss=loss,
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3, weight_decay=0.1),
        scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine),
        stages=[[passes.widen_mlp(factor=2), passes.add_heads(4)],
                [passes.add_layers(2, init="copy")]],
        trigger=[Fixed(step=800), Fixed(step=1600)],
        policy="sparkling",
        evaluate_every=50,
        log=out / "log.jsonl",
        checkpoints=checkpoints,
        progress=True,
    )
    resume = checkpoints.is_dir() and any(checkpoints.glob("step-*"))
    trainer.fit(Batches(chars.train, 32, 64, seed=0), validation, STEPS, resume=resume)
    for growth in (r for r in trainer.history if r["event"] == "growth"):
        print(f"step {growth['step']}: {growth['parameters_before']:,} -> {growth['parameters_after']:,} "
              f"parameters, loss on the fixed batch {growth['loss_before']:.6f} -> {growth['loss_after']:.6f}")
    last = trainer.history[-1]
    print(f"validation loss {last['val_loss']:.4f} after {STEPS} steps and {last['flops']:.3g} FLOPs "
          f"({last['seconds']:.0f} s)")
    print("wrote", plot(out / "log.jsonl", out / "loss.png", title="character-level Shakespeare, grown twice"))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("out/shakespeare"))
