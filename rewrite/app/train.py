"""``growfx train``: a progressive run on character-level Shakespeare, its log and its picture.

A small GPT (``rewrite.app.zoo.handwritten.GPT``) learns the plays one character at a time; at each trigger
it grows by the next stage (by default wider MLPs and twice the heads, then two more layers copied from the
top), with AdamW and a warmup-cosine schedule carried over. It writes ``log.jsonl`` (one line per evaluation
and per growth: ``rewrite.ProgressiveTrainer``), ``loss.png`` (validation loss against training FLOPs, the
growths marked) and ``sample.txt`` (text the grown model writes), and checkpoints when asked.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from rewrite.app.shakespeare import Batches, Characters, text
from rewrite.app.zoo.handwritten import GPT
from rewrite.errors import GrowfxError
from rewrite.training.progressive import ProgressiveTrainer
from rewrite.training.triggers import Fixed, Plateau, Slope

STAGES = ("widen_mlp:factor=2+add_heads:n=4", "add_layers:n=2,init=copy")
TRIGGERS = ("fixed", "plateau", "slope")


@dataclasses.dataclass
class Job:
    out: Path = Path("out/train")
    steps: int = 2400
    stages: tuple[str, ...] = STAGES
    trigger: str = "fixed"
    seed: int = 0
    batch: int = 32
    length: int = 64
    size: tuple[int, int, int, int] = (64, 4, 128, 2)  # dim, heads, MLP hidden, layers
    lr: float = 3e-3
    evaluate_every: int = 50
    characters: int | None = None  # the first this many characters of the plays (all by default)
    checkpoints: bool = False
    resume: bool = False
    progress: bool = True


def stages_of(specs) -> list[list]:
    """``NAME:KEY=VALUE,...`` passes, ``+`` between the passes of one stage."""
    from passes import catalog

    return [[catalog.build(spec) for spec in stage.split("+")] for stage in specs]


def trigger_of(job: Job):
    if job.trigger == "fixed":  # evenly spaced through the run
        return [Fixed(step=job.steps * (i + 1) // (len(job.stages) + 1)) for i in range(len(job.stages))]
    if job.trigger == "plateau":
        return Plateau()
    if job.trigger == "slope":
        return Slope()
    raise GrowfxError(f"unknown trigger {job.trigger!r}: choose one of {', '.join(TRIGGERS)}")


def char_gpt(vocab: int, size: tuple[int, int, int, int], length: int) -> GPT:
    """The zoo GPT with GPT-2's initialisation (weights N(0, 0.02), biases zero; the zoo's N(0, 1) tied
    embeddings start a language model's loss far above log(vocab))."""
    dim, heads, hidden, layers = size
    model = GPT(vocab=vocab, dim=dim, heads=heads, hidden=hidden, layers=layers, max_len=length)
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)
    return model


def loss(model, batch) -> torch.Tensor:
    inputs, targets = batch
    logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def run(job: Job) -> ProgressiveTrainer:
    torch.manual_seed(job.seed)
    chars = Characters.of(text(job.characters))
    warmup = max(1, job.steps // 20)

    def schedule(step: int) -> float:  # linear warmup, cosine to a tenth
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, job.steps - warmup))))

    job.out.mkdir(parents=True, exist_ok=True)
    validation = [b for b, _ in zip(Batches(chars.validation, job.batch, job.length, seed=job.seed + 1), range(4))]
    trainer = ProgressiveTrainer(
        char_gpt(len(chars.alphabet), job.size, job.length),
        loss=loss,
        optimizer=lambda params: torch.optim.AdamW(params, lr=job.lr, weight_decay=0.1),
        scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
        stages=stages_of(job.stages),
        trigger=trigger_of(job),
        evaluate_every=max(1, min(job.evaluate_every, job.steps // 20)),
        log=job.out / "log.jsonl",
        checkpoints=job.out / "checkpoints" if job.checkpoints or job.resume else None,
        progress=job.progress,
    )
    trainer.fit(Batches(chars.train, job.batch, job.length, seed=job.seed), validation, job.steps, resume=job.resume)
    plot(job.out / "log.jsonl", job.out / "loss.png", title=f"growfx train: character-level Shakespeare, "
         f"{job.trigger} trigger")
    (job.out / "sample.txt").write_text(sample(trainer.model, chars, job.length, seed=job.seed))
    return trainer


def sample(model, chars: Characters, length: int, *, seed: int, characters: int = 300) -> str:
    """Text the model writes after a newline (sampled at temperature 0.8)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[chars.alphabet.index("\n")]])
    model.eval()
    with torch.no_grad():
        for _ in range(characters):
            logits = model(ids[:, -length:])[0, -1] / 0.8
            ids = torch.cat([ids, torch.multinomial(logits.softmax(-1), 1, generator=generator)[None]], 1)
    return chars.decode(ids[0].tolist())


def plot(log: Path, png: Path, *, title: str) -> Path:
    """Validation loss against training FLOPs from a trainer's JSON-lines ``log``, each growth marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(log).read_text().splitlines() if line.strip()]
    evals = [r for r in records if r["event"] == "eval"]
    if not evals:
        raise GrowfxError(f"{log} has no evaluations to plot")
    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=120)
    for stage in sorted({r["stage"] for r in evals}):
        points = [r for r in evals if r["stage"] == stage]
        axes.plot([r["flops"] for r in points], [r["val_loss"] for r in points], marker=".",
                  label=f"stage {stage}: {points[0]['parameters']:,} parameters")
    for growth in (r for r in records if r["event"] == "growth"):
        axes.axvline(growth["flops"], color="grey", linestyle="--", linewidth=0.8)
        axes.annotate(f"grow at step {growth['step']}", (growth["flops"], axes.get_ylim()[1]), rotation=90,
                      va="top", ha="right", fontsize=7, color="grey")
    axes.set_xscale("log")
    axes.set_xlabel("training FLOPs (6·N·tokens + attention)")
    axes.set_ylabel("validation loss (nats per character)")
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8)
    figure.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    temporary = png.with_name(f".{png.name}.tmp.png")
    figure.savefig(temporary)
    plt.close(figure)
    temporary.replace(png)
    return png
