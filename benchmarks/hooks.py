"""What the step hooks cost: an AdamW step with and without ``carry``'s hooks on what growth added.

Two grown models, each carried from the same optimizer once with no hooks (``policy="mapped"``,
``protect=False``) and once with the hooks of each setting (``sparkling``: protection of the new entries' bias
correction, which recomputes their Adam update, and a re-warmup; ``rewarm``: the re-warmup alone;
``train="added"``: old entries restored every step). Every round times one
``optimizer.step()`` of each, side by side in this process, on the same gradients (set once, not
recomputed: only the optimizer is timed); the figure is the median over rounds of (hooked - plain) / plain.

* ``matrix``: a linear layer of 2048 outputs from 4096 inputs widened to 4096 outputs (``passes.widen``: its
  weight grows from 2048 x 4096 to 4096 x 4096, half of it new), as in issue 30;
* ``gpt2-124m``: GPT-2 small (124M parameters) grown from an MLP of 1536 to 3072 (``widen_mlp``).

    python benchmarks/hooks.py [--rounds 7] [--quick] [--out benchmarks/results/hooks]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from pathlib import Path

import torch

import passes
import rewrite

SETTINGS = {"sparkling": dict(policy="sparkling", rewarm=(1.3, 250)),
            "rewarm": dict(policy="sparkling", protect=False, rewarm=(1.3, 250)),
            "train=added": dict(train="added")}


def matrix(quick: bool):
    width = 1024 if quick else 4096  # a width x width/2 weight grown to width x width
    model = torch.nn.Sequential(torch.nn.Linear(width, width // 2), torch.nn.ReLU(), torch.nn.Linear(width // 2, 16))
    cols = width
    args = (torch.randn(2, cols),)
    return model, args, [passes.widen("0", factor=2, init="zero", exact=True)]


def gpt2(quick: bool):
    from transformers import GPT2Config, GPT2LMHeadModel

    sizes = dict(n_layer=2, n_embd=128, n_head=4) if quick else {}
    config = GPT2Config(n_inner=(256 if quick else 1536), **sizes)
    model = GPT2LMHeadModel(config).eval()
    return model, (torch.randint(0, config.vocab_size, (1, 8)),), [passes.widen_mlp(factor=2)]


MODELS = {"matrix": matrix, "gpt2-124m": gpt2}


def step_seconds(optimizer, device: str) -> float:
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    synchronize()
    start = time.perf_counter()
    optimizer.step()
    synchronize()
    return time.perf_counter() - start


def measure(name: str, rounds: int, quick: bool, device: str = "cpu") -> dict:
    model, args, plan = MODELS[name](quick)
    model, args = model.to(device), tuple(a.to(device) for a in args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()  # state to carry
    grown = rewrite.apply(model, plan, args, verify=False)
    carried = {"plain": rewrite.carry(optimizer, grown, copy.deepcopy(grown.module), policy="mapped",
                                      protect=False)}
    for label, options in SETTINGS.items():
        module = copy.deepcopy(grown.module)
        carried[label] = rewrite.carry(optimizer, grown, module, **options)
    for label, each in carried.items():
        for group in each.optimizer.param_groups:
            for p in group["params"]:
                p.grad = (torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 1e-3).to(p.device)
        step_seconds(each.optimizer, device)  # warm
    times = {label: [] for label in carried}
    for _ in range(rounds):
        for label, each in carried.items():
            times[label].append(step_seconds(each.optimizer, device))
    plain = statistics.median(times["plain"])
    parameters = sum(p.numel() for p in grown.module.parameters())
    return {"model": name, "parameters": parameters, "plain_s": plain,
            **{f"{label}_s": statistics.median(times[label]) for label in SETTINGS},
            **{f"{label}_overhead": statistics.median((h - p) / p for h, p in zip(times[label], times["plain"]))
               for label in SETTINGS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="small sizes (the test suite's smoke run)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/hooks"))
    options = parser.parse_args()
    rows = [measure(name, options.rounds, options.quick) for name in MODELS]
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    table = ("| model | parameters | AdamW step (s) | " + " | ".join(f"+ {label} hooks" for label in SETTINGS)
             + " |\n|---|---|---|" + "---|" * len(SETTINGS) + "\n")
    for row in rows:
        table += (f"| {row['model']} | {row['parameters'] / 1e6:.1f}M | {row['plain_s']:.4f} | "
                  + " | ".join(f"{row[f'{label}_s']:.4f} ({100 * row[f'{label}_overhead']:+.1f}%)"
                               for label in SETTINGS) + " |\n")
    table += f"\n{options.rounds} rounds, {time.strftime('%Y-%m-%d')}, {machine}\n"
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "results.md").write_text(table)
    import json

    (options.out / "results.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    print(table)


if __name__ == "__main__":
    main()
