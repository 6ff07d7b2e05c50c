"""Does growing save compute? Three arms on character-level Shakespeare, measured the honest way.

    python benchmarks/savings.py                 # the CPU benchmark (two worker processes, one per core)
    python benchmarks/savings.py --quick         # the pipeline in seconds (what the test runs)
    python benchmarks/savings.py --report-only   # tables and plots again from the saved CSV

Arms (the same data order: the batch of step ``s`` is a function of the seed and ``s`` alone):
* ``small``: the small GPT only;
* ``big``: the big GPT from scratch;
* ``grown``: the small GPT, grown to exactly the big architecture at a growth point, then continued; its
  variants change one thing each (init, optimizer state, growth time, width vs depth vs both, trigger).

Runs are independent jobs, ``--workers`` processes at a time (default: one per core, each single-threaded:
small models use a core better alone than two cores together). Each finished run is written atomically to
``runs/<arm>-<variant>-<seed>.{curves,runs}.csv``, so an interrupted benchmark continues where it stopped; the
report merges them. A run already in ``runs/`` is not run again: to measure from scratch, remove that folder
(or write elsewhere with ``--out``).

Every FLOP is charged (``6 N`` per token plus attention's products, ``rewrite.training.flops``; the grown
arm's small phase included). Every arm uses AdamW with a warmup-stable-decay schedule, and every compared
budget ``C`` is fully decayed: from one stable run per arm, a branch decays the learning rate linearly to zero
over the last 20% of ``C``'s FLOPs, is evaluated, and the stable run resumes from where it branched. So each
arm's loss at ``C`` is a fully decayed run of exactly ``C`` FLOPs.

Savings at budget ``C``: the FLOPs the grown arm needs to reach the big arm's fully decayed loss at ``C``,
interpolated (log FLOPs, linear in loss) between the grown arm's own fully decayed budgets, as
``1 - FLOPs_grown / C``. When the grown arm reaches the target at a budget where it had not grown yet, the
small model alone did it: that budget is marked invalid. Writes ``curves.csv`` (every evaluation of every
run: ``arm, variant, seed, budget, step, flops, val_loss, lr, parameters, event``), ``runs.csv`` (one row per
run and budget), ``results.md`` (the tables) and two PNGs, into ``benchmarks/results/savings`` (``--out``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import csv
import dataclasses
import io
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import passes
import rewrite
from rewrite.app.shakespeare import Characters, text, windows
from rewrite.app.train import char_gpt, loss
from rewrite.training.flops import parameters, per_token
from rewrite.training.triggers import Plateau, Slope

CURVE_COLUMNS = ["arm", "variant", "seed", "budget", "step", "flops", "val_loss", "lr", "parameters", "event"]
RUN_COLUMNS = ["arm", "variant", "seed", "budget", "flops", "val_loss", "grown_at_flops", "loss_before_growth",
               "loss_after_growth", "jump_after_growth", "seconds"]


@dataclasses.dataclass(frozen=True)
class Setup:
    """Sizes (dim, heads, MLP hidden, layers), the budgets as fractions of the largest, and the optimizer."""

    big: tuple = (64, 4, 256, 4)
    small: dict = dataclasses.field(default_factory=lambda: {
        "depth": (64, 4, 256, 2), "width": (32, 2, 128, 4), "both": (32, 2, 128, 2)})
    steps: int = 5000  # the big model's steps at the largest budget (49 characters per parameter; the
    # calibration at 2400 left the small model ahead at every budget, 6000 put big 0.09 nats below small:
    # benchmarks/results/calibration; 5000 keeps big clearly ahead and the benchmark within the hour)
    fractions: tuple = (0.25, 0.5, 1.0)
    batch: int = 32
    length: int = 64
    lr: float = 3e-3
    betas: tuple = (0.9, 0.99)
    weight_decay: float = 0.1
    warmup: int = 100
    decay: float = 0.2  # the last fifth of each budget's FLOPs
    evaluate_every: int = 100
    validation_batches: int = 8
    seeds: tuple = (0, 1, 2)
    characters: int | None = None


QUICK = Setup(big=(32, 4, 64, 2), small={"depth": (32, 4, 64, 1), "width": (16, 2, 32, 2), "both": (16, 2, 32, 1)},
              steps=120, fractions=(0.5, 1.0), batch=8, length=32, warmup=10, evaluate_every=20,
              validation_batches=2, seeds=(0,), characters=200_000)


@dataclasses.dataclass(frozen=True)
class Variant:
    """How the grown arm grows: ``structure`` (depth, width or both), ``init``, the optimizer ``policy``, when
    (``at``: the fraction of the largest budget's FLOPs, for the fixed trigger) and the ``trigger``."""

    name: str
    structure: str = "width"
    init: str = "zero"
    policy: str = "sparkling"
    at: float = 0.2
    trigger: str = "fixed"
    rewarm: int = 0  # steps over which the whole model's learning rate re-warms from zero after growth

    def stage(self, setup: Setup) -> list:
        dim, heads, hidden, layers = setup.big
        small = setup.small[self.structure]
        width = self.init if self.init != "copy" else "zero"
        exact = width != "sparkling"  # it keeps activation RMS, not the function
        plan = []
        if small[0] != dim:
            plan.append(passes.widen_hidden(size=dim, init="clone"))  # the only exact init under LayerNorm
        if small[1] != heads:
            plan.append(passes.add_heads(heads - small[1], init=width, exact=exact))
        if small[2] != hidden:
            plan.append(passes.widen_mlp(size=hidden, init=width, exact=exact))
        if small[3] != layers:
            plan.append(passes.add_layers(layers - small[3], init="copy" if self.init == "copy" else "zero"))
        return plan


VARIANTS = [
    # half width: the small arm's model (the half-depth one did not lose to big: calibration); growing at 0.2 of
    # the budget was the best growth time of the first run (0.1, 0.2, 0.4, 0.6), so it is the default
    Variant("default"),
    Variant("init=clone", init="clone"),
    Variant("init=sparkling", init="sparkling"),
    Variant("optimizer=mapped", policy="mapped"),
    Variant("optimizer=reset", policy="reset"),
    Variant("at=0.4", at=0.4),
    Variant("at=0.6", at=0.6),
    Variant("depth", structure="depth", init="copy"),
    Variant("both", structure="both"),
    Variant("trigger=plateau", trigger="plateau"),
    Variant("trigger=slope", trigger="slope"),
    Variant("rewarm=200", rewarm=200),
]


class Data:
    """Training windows by step (the same for every arm) and fixed validation batches."""

    def __init__(self, setup: Setup):
        chars = Characters.of(text(setup.characters))
        self.vocab, self.setup, self.train = len(chars.alphabet), setup, chars.train
        generator = torch.Generator().manual_seed(12345)
        self.validation = [windows(chars.validation, setup.batch, setup.length, generator)
                           for _ in range(setup.validation_batches)]

    def batch(self, seed: int, step: int):
        return windows(self.train, self.setup.batch, self.setup.length,
                       torch.Generator().manual_seed(seed * 1_000_003 + step))


class Run:
    """One arm on one seed: the stable run, its decayed branches, and (grown arm) its growth."""

    def __init__(self, setup: Setup, data: Data, arm: str, variant: Variant | None, seed: int, budgets: list[float],
                 curves: csv.DictWriter):
        self.setup, self.data, self.arm, self.variant, self.seed = setup, data, arm, variant, seed
        self.budgets, self.curves = budgets, curves
        size = setup.big if arm == "big" else setup.small[variant.structure if variant else Variant("").structure]
        torch.manual_seed(seed)
        self.model = char_gpt(data.vocab, size, setup.length)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=setup.lr, betas=setup.betas,
                                           weight_decay=setup.weight_decay)
        self.hooks, self.step, self.flops = None, 0, 0.0
        self.grown_at, self.before, self.after, self.jump = None, None, None, None
        self.trigger = {"plateau": Plateau(), "slope": Slope()}.get(variant.trigger) if variant else None
        self._per_step()

    def _per_step(self) -> None:
        inputs = self.data.validation[0][0]
        self.per_step = per_token(self.model, (inputs,), {}, inputs.numel()) * inputs.numel()

    def validation_loss(self) -> float:
        self.model.eval()
        with torch.no_grad():
            return sum(float(loss(self.model, b)) for b in self.data.validation) / len(self.data.validation)

    def train_step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        value = loss(self.model, self.data.batch(self.seed, self.step))
        self.optimizer.zero_grad()
        value.backward()
        self.optimizer.step()
        self.step += 1
        self.flops += self.per_step

    def record(self, budget, loss: float, lr: float, event: str = "eval") -> None:
        self.curves.writerow({"arm": self.arm, "variant": self.variant.name if self.variant else "", "seed": self.seed,
                              "budget": budget, "step": self.step, "flops": f"{self.flops:.6g}",
                              "val_loss": f"{loss:.6f}", "lr": f"{lr:.6g}", "parameters": parameters(self.model),
                              "event": event})

    def stable_lr(self) -> float:
        warm = min(1.0, (self.step + 1) / self.setup.warmup)
        if self.grown_at is not None and self.variant.rewarm:
            warm = min(warm, (self.step - self.grown_step + 1) / self.variant.rewarm)
        return self.setup.lr * warm

    def grow(self) -> None:
        before = self.validation_loss()
        args = (self.data.validation[0][0],)
        grown = rewrite.apply(self.model, self.variant.stage(self.setup), args)
        carried = rewrite.carry(self.optimizer, grown, grown.module, policy=self.variant.policy)
        self.model, self.optimizer, self.hooks = grown.module, carried.optimizer, carried.hooks
        self.grown_at, self.grown_step, self.before, self.after = self.flops, self.step, before, self.validation_loss()
        self.jump = self.after - before
        if grown.report.exact and abs(self.after - before) > 1e-5 * before:
            raise rewrite.GrowthError(f"{self.variant.name}: an exact growth moved the loss {before} -> {self.after}")
        self._per_step()
        self.record("stable", self.after, self.stable_lr(), "growth")

    def should_grow(self, evaluated: float | None) -> bool:
        if self.arm != "grown" or self.grown_at is not None:
            return False
        if self.variant.trigger == "fixed":
            return self.flops >= self.variant.at * self.budgets[-1]
        if evaluated is None or self.flops >= (1 - self.setup.decay) * self.budgets[-1]:
            return False
        return self.trigger(step=self.step, flops=self.flops, loss=evaluated).grow

    def run(self, runs: csv.DictWriter) -> None:
        start = time.perf_counter()
        pending = list(self.budgets)
        last = self.budgets[-1]
        while self.flops < (1 - self.setup.decay) * last:
            while pending[:-1] and self.flops >= (1 - self.setup.decay) * pending[0]:
                self.branch(pending.pop(0), runs, start)
            evaluated, watching = None, self._watching()
            if self.step % self.setup.evaluate_every == 0 or watching:
                evaluated = self.validation_loss()
                self.record("stable", evaluated, self.stable_lr(), "after-growth" if watching else "eval")
                if watching:
                    self.jump = max(self.jump, evaluated - self.before)
            if self.should_grow(evaluated):
                self.grow()
            self.train_step(self.stable_lr())
        while pending[:-1]:  # budgets too close to the last to branch before its decay: decay them now
            self.branch(pending.pop(0), runs, start)
        self.decay(last, runs, start)

    def _watching(self) -> bool:
        """Every 25 steps for 100 steps after growth: the largest rise of the validation loss over the loss
        before growth (the optimizer's shock; the growth itself is exact) is the jump."""
        since = self.step - self.grown_step if self.grown_at is not None else -1
        return 0 < since <= 100 and since % 25 == 0

    def branch(self, budget: float, runs: csv.DictWriter, start: float) -> None:
        """Decay a copy of the run to ``budget``, then go back to where it branched."""
        saved = ({k: v.clone() for k, v in self.model.state_dict().items()},
                 copy.deepcopy(self.optimizer.state_dict()), self.hooks.state_dict() if self.hooks else None,
                 self.step, self.flops)
        self.decay(budget, runs, start)
        weights, optimizer, hooks, self.step, self.flops = saved
        self.model.load_state_dict(weights)
        self.optimizer.load_state_dict(optimizer)
        if self.hooks is not None:
            self.hooks.load_state_dict(hooks, self.optimizer)

    def decay(self, budget: float, runs: csv.DictWriter, start: float) -> None:
        begin = (1 - self.setup.decay) * budget
        while self.flops < budget:
            lr = self.stable_lr()
            if self.flops >= begin:
                lr = min(lr, self.setup.lr * max(0.0, (budget - self.flops) / (budget - begin)))
            self.train_step(lr)
        loss = self.validation_loss()
        self.record(f"{budget:.6g}", loss, 0.0, "decayed")
        runs.writerow({"arm": self.arm, "variant": self.variant.name if self.variant else "", "seed": self.seed,
                       "budget": f"{budget:.6g}", "flops": f"{self.flops:.6g}", "val_loss": f"{loss:.6f}",
                       "grown_at_flops": "" if self.grown_at is None else f"{self.grown_at:.6g}",
                       "loss_before_growth": "" if self.before is None else f"{self.before:.6f}",
                       "loss_after_growth": "" if self.after is None else f"{self.after:.6f}",
                       "jump_after_growth": "" if self.jump is None else f"{self.jump:.6f}",
                       "seconds": f"{time.perf_counter() - start:.1f}"})


def budgets_of(setup: Setup, data: Data) -> list[float]:
    """The budgets in FLOPs: fractions of the big model's FLOPs over ``setup.steps`` steps."""
    model = char_gpt(data.vocab, setup.big, setup.length)
    inputs = data.validation[0][0]
    per_step = per_token(model, (inputs,), {}, inputs.numel()) * inputs.numel()
    return [fraction * setup.steps * per_step for fraction in setup.fractions]


Job = tuple  # (arm, Variant | None, seed)


def jobs_of(setup: Setup, variants: list[Variant], seeds_for_variants: tuple, every_seed: tuple[str, ...]) -> list:
    """Every run, longest first (small-model steps are the slowest per FLOP), so the workers finish together."""
    main = [(arm, variants[0] if arm == "grown" else None, seed) for arm in ("small", "grown", "big") for seed in setup.seeds]
    extra = [("grown", v, seed) for v in variants[1:] for seed in seeds_for_variants]
    extra += [("grown", v, seed) for v in variants[1:] if v.name in every_seed for seed in setup.seeds
              if seed not in seeds_for_variants]
    return main[:len(setup.seeds) * 2] + extra + main[len(setup.seeds) * 2:]


def run_all(setup: Setup, variants: list[Variant], out: Path, seeds_for_variants: tuple,
            every_seed: tuple[str, ...] = (), workers: int = 1) -> None:
    """Runs what is not in ``out/runs`` yet, ``workers`` processes at a time, then merges every run's CSVs."""
    pieces = out / "runs"
    pieces.mkdir(parents=True, exist_ok=True)
    todo = [job for job in jobs_of(setup, variants, seeds_for_variants, every_seed)
            if not (pieces / f"{_name(job)}.runs.csv").exists()]
    began = time.perf_counter()
    threads = max(1, (os.cpu_count() or 1) // workers)
    if workers == 1:
        _start_worker(setup, threads)
        for job in todo:
            _report_done(job, _run(job, pieces))
    else:
        context = multiprocessing.get_context("spawn")  # fork after torch's thread pools are up can hang
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                                    initargs=(setup, threads)) as pool:
            futures = {pool.submit(_run, job, pieces): job for job in todo}
            for future in concurrent.futures.as_completed(futures):
                _report_done(futures[future], future.result())
    if todo:
        (out / "invocation.json").write_text(json.dumps({
            "runs": len(todo), "workers": workers, "threads_per_worker": threads, "cores": os.cpu_count(),
            "seconds": round(time.perf_counter() - began, 1)}, indent=1) + "\n")
    _merge(out, [_name(job) for job in jobs_of(setup, variants, seeds_for_variants, every_seed)])


_WORKER: dict = {}


def _start_worker(setup: Setup, threads: int) -> None:
    torch.set_num_threads(threads)
    data = Data(setup)
    _WORKER.update(setup=setup, data=data, budgets=budgets_of(setup, data))


def _run(job: Job, pieces: Path) -> float:
    """One run in this worker; its curves and its row per budget are written atomically when it ends."""
    arm, variant, seed = job
    began = time.perf_counter()
    curves, runs = io.StringIO(), io.StringIO()
    curve_writer, run_writer = csv.DictWriter(curves, CURVE_COLUMNS), csv.DictWriter(runs, RUN_COLUMNS)
    curve_writer.writeheader()
    run_writer.writeheader()
    Run(_WORKER["setup"], _WORKER["data"], arm, variant, seed, _WORKER["budgets"], curve_writer).run(run_writer)
    name = _name(job)
    for suffix, text_ in ((".curves.csv", curves.getvalue()), (".runs.csv", runs.getvalue())):  # runs.csv last:
        temporary = pieces / f".{name}{suffix}.tmp"  # its presence says the run is complete
        temporary.write_text(text_)
        os.replace(temporary, pieces / f"{name}{suffix}")
    return time.perf_counter() - began


def _name(job: Job) -> str:
    arm, variant, seed = job
    return f"{arm}-{variant.name if variant else ''}-{seed}"


def _report_done(job: Job, seconds: float) -> None:
    arm, variant, seed = job
    print(f"{arm:<6} {variant.name if variant else '':<18} seed {seed}: {seconds:.0f} s", file=sys.stderr, flush=True)


def _merge(out: Path, names: list[str]) -> None:
    """``curves.csv`` and ``runs.csv``: every finished run's rows, in job order."""
    for kind in ("curves", "runs"):
        parts = [out / "runs" / f"{name}.{kind}.csv" for name in names]
        lines = [p.read_text().splitlines(keepends=True) for p in parts if p.exists()]
        if lines:
            temporary = out / f".{kind}.csv.tmp"
            temporary.write_text("".join(lines[0][:1] + [row for part in lines for row in part[1:]]))
            os.replace(temporary, out / f"{kind}.csv")


# -- the report ----------------------------------------------------------------------------------------------
def flops_to_reach(points: list[tuple[float, float]], target: float) -> float | None:
    """The FLOPs at which a curve of (FLOPs, fully decayed loss) first reaches ``target``: linear in loss
    between log FLOPs of neighbouring budgets; None when it never does."""
    points = sorted(points)
    if points[0][1] <= target:
        return points[0][0]
    for (f0, l0), (f1, l1) in zip(points, points[1:]):
        if l1 <= target < l0:
            t = (l0 - target) / (l0 - l1)
            return math.exp(math.log(f0) + t * (math.log(f1) - math.log(f0)))
    return None


def report(out: Path) -> str:
    with open(out / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["budget"], row["flops"], row["val_loss"] = float(row["budget"]), float(row["flops"]), float(row["val_loss"])
    budgets = sorted({row["budget"] for row in rows})
    seeds = sorted({row["seed"] for row in rows if row["arm"] == "big"})
    loss = {(r["arm"], r["variant"], r["seed"], r["budget"]): r["val_loss"] for r in rows}
    grown_at = {(r["arm"], r["variant"], r["seed"]): r["grown_at_flops"] for r in rows}
    lines = ["# Does growing save compute? (benchmarks/savings.py)", "",
             f"Budgets (FLOPs): {', '.join(f'{b:.3g}' for b in budgets)}; seeds {', '.join(seeds)}.", "",
             "## Fully decayed validation loss (mean ± std over seeds)", "",
             "| arm | " + " | ".join(f"{b:.3g}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for arm, variant in (("small", ""), ("big", ""), ("grown", "default")):
        cells = []
        for b in budgets:
            values = [loss[(arm, variant, s, b)] for s in seeds if (arm, variant, s, b) in loss]
            cells.append(_mean_std(values, "{:.4f}"))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "## Savings against big from scratch: 1 - FLOPs_grown / FLOPs_big at the big arm's loss", "",
              "| arm / variant | seeds | " + " | ".join(f"{b:.3g}" for b in budgets)
              + f" | loss at {budgets[-1]:.3g} | loss jump after growth |", "|---|---|" + "---|" * (len(budgets) + 2)]
    variants = [("small", "")] + sorted({(r["arm"], r["variant"]) for r in rows if r["arm"] == "grown"},
                                        key=lambda v: (v[1] != "default", v[1]))
    savings_at_last, notes = {}, []
    for arm, variant in variants:
        its_seeds = sorted({r["seed"] for r in rows if r["arm"] == arm and r["variant"] == variant})
        cells = []
        for b in budgets:
            values, bound, early = [], False, []
            for s in its_seeds:
                target = loss.get(("big", "", s, b))
                curve = sorted((c, loss[(arm, variant, s, c)]) for c in budgets if (arm, variant, s, c) in loss)
                if target is None or not curve:
                    continue
                reached = flops_to_reach(curve, target)
                if reached is None:
                    values.append(float("-inf"))
                    continue
                bound |= curve[0][1] <= target  # reached by its smallest budget: the savings are at least this
                at = grown_at.get((arm, variant, s))
                if arm == "grown" and _small_reached(reached, float(at) if at else math.inf, budgets):
                    early.append(s)
                values.append(1 - reached / b)
            cells.append(("≥ " if bound else "") + _savings(values))
            if early:
                notes.append(f"{arm} {variant} at {b:.3g}: the target was reached before growing (seeds "
                             f"{', '.join(early)}): invalid")
            if b == budgets[-1]:
                savings_at_last[(arm, variant)] = values
        final = [loss[(arm, variant, s, budgets[-1])] for s in its_seeds if (arm, variant, s, budgets[-1]) in loss]
        jumps = [float(r["jump_after_growth"]) for r in rows if r["arm"] == arm and r["variant"] == variant
                 and r["budget"] == budgets[-1] and r["jump_after_growth"]]
        lines.append(f"| {arm} {variant} | {len(its_seeds)} | " + " | ".join(cells)
                     + f" | {_mean_std(final, '{:.4f}')} | {_mean_std(jumps, '{:+.4f}')} |")
    lines += [""] + [f"- {note}" for note in notes]
    seconds = {}
    for r in rows:
        if r["budget"] == budgets[-1]:
            seconds.setdefault((r["arm"], r["variant"]), []).append(float(r["seconds"]))
    lines += ["", "## Wall time of one run (all its decayed branches; median over seeds)", "",
              "| arm / variant | seconds |", "|---|---|"]
    lines += [f"| {arm} {variant} | {statistics.median(v):.0f} |" for (arm, variant), v in sorted(seconds.items())]
    if (out / "invocation.json").exists():
        last = json.loads((out / "invocation.json").read_text())
        lines += ["", f"The last invocation ran {last['runs']} runs in {last['seconds'] / 60:.1f} minutes: {last['workers']} "
                  f"worker process(es) of {last['threads_per_worker']} thread(s) on {last['cores']} cores."]
    lines += ["", "'not reached': the arm never reached the big arm's loss within the largest budget. '≥': reached by its "
              "smallest budget already (the FLOPs it needed are at most that budget).", "",
              f"Big from scratch at the largest budget: {_mean_std([loss[('big', '', s, budgets[-1])] for s in seeds], '{:.4f}')}."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    gaps = {(arm, variant): [loss[(arm, variant, s, budgets[-1])] - loss[('big', '', s, budgets[-1])] for s in seeds
                              if (arm, variant, s, budgets[-1]) in loss] for arm, variant in variants}
    _plots(out, savings_at_last, gaps, budgets)
    return "\n".join(lines)


def _small_reached(reached: float, grown_at: float, budgets: list[float]) -> bool:
    """Did the grown arm reach the target with the small model alone? The fully decayed point at budget ``b``
    branched from the stable run at ``(1 - decay) b``; before the growth it is the small model's. The target
    counts as reached by the small model when a budget at or beyond ``reached`` branched before the growth
    (the CSV keeps six digits: a growth within 1e-4 of a branch point came after it, as the run orders them)."""
    decay = Setup().decay
    return any(b >= reached and grown_at >= (1 - decay) * b * (1 - 1e-4) for b in budgets)


def _mean_std(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {statistics.stdev(values):.4f}"


def _savings(values: list[float]) -> str:
    if not values:
        return "-"
    if any(math.isinf(v) for v in values):
        return f"not reached ({sum(math.isinf(v) for v in values)}/{len(values)})"
    if len(values) == 1:
        return f"{100 * values[0]:.0f}%"
    return f"{100 * statistics.mean(values):.0f}% ± {100 * statistics.stdev(values):.0f}"


def _plots(out: Path, savings: dict, gaps: dict, budgets: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(out / "curves.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["seed"] == "0"]
    figure, axes = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for (arm, variant), color, size in ((("small", ""), "tab:blue", 10), (("big", ""), "tab:red", 7),
                                        (("grown", "default"), "tab:green", 5)):
        mine = [r for r in rows if r["arm"] == arm and r["variant"] == variant]
        stable = [r for r in mine if r["budget"] == "stable"]
        decayed = [r for r in mine if r["event"] == "decayed"]
        label = f"{arm} {variant}".strip()
        axes.plot([float(r["flops"]) for r in stable], [float(r["val_loss"]) for r in stable], color=color, alpha=0.5,
                  linewidth=1, label=f"{label} (stable)")
        axes.plot([float(r["flops"]) for r in decayed], [float(r["val_loss"]) for r in decayed], color=color,
                  marker="o", markersize=size, linestyle="none", label=f"{label} (fully decayed)")
        for r in mine:
            if r["event"] == "growth":
                axes.axvline(float(r["flops"]), color=color, linestyle="--", linewidth=0.8)
    axes.set_xscale("log")
    axes.set_ylim(top=max(float(r["val_loss"]) for r in rows if r["event"] == "decayed") + 0.5)
    axes.set_xlabel("training FLOPs (all charged)")
    axes.set_ylabel("validation loss (nats per character)")
    axes.set_title("Shakespeare characters, seed 0: growth point dashed", fontsize=10)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "loss_vs_flops.png")
    plt.close(figure)

    names = [f"{arm} {variant}".strip() for arm, variant in gaps]
    means = [statistics.mean(v) for v in gaps.values()]
    errors = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in gaps.values()]
    figure, axes = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    axes.barh(names, means, xerr=errors, color=["tab:blue" if n == "small" else "tab:green" for n in names])
    for i, key in enumerate(gaps):
        values = savings.get(key, [])
        finite = [v for v in values if not math.isinf(v)]
        text = (f"saves {100 * statistics.mean(finite):.0f}%" if finite and len(finite) == len(values)
                else "does not reach big")
        axes.annotate(f"{text} ({len(gaps[key])} seed{'s' if len(gaps[key]) > 1 else ''})", (0, i), xytext=(4, 0),
                      textcoords="offset points", fontsize=7, va="center")
    axes.axvline(0, color="black", linewidth=0.8)
    axes.set_xlabel(f"validation loss - big from scratch (same seed), {budgets[-1]:.3g} FLOPs, ± std")
    axes.set_title("each arm at the largest budget, fully decayed (left of 0: better than big)", fontsize=9)
    axes.invert_yaxis()
    figure.tight_layout()
    figure.savefig(out / "savings.png")
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one seed, three variants (seconds)")
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/savings[-quick]")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--variant-seeds", type=int, default=1,
                        help="seeds for the variants (the three arms always get three; default 1, for time)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="runs at a time, each in its own single-threaded process (default: up to 2)")
    parser.add_argument("--every-seed", action="append", default=[], metavar="VARIANT",
                        help="also run this variant on every seed (repeat)")
    options = parser.parse_args(argv)
    setup = QUICK if options.quick else Setup()
    out = options.out or Path(__file__).parent / "results" / ("savings-quick" if options.quick else "savings")
    variants = VARIANTS[:3] if options.quick else VARIANTS
    if not options.report_only:
        unknown = set(options.every_seed) - {v.name for v in variants}
        if unknown:
            parser.error(f"unknown variant {', '.join(sorted(unknown))}: {', '.join(v.name for v in variants)}")
        run_all(setup, variants, out, setup.seeds[:options.variant_seeds], tuple(options.every_seed),
                max(1, options.workers))
    print(report(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
