"""Peak memory of a growth in training against steady training of the grown model (issue 30, target <= 1.1x).

Each arm runs in a fresh process and reports its peak resident memory above what the process held before the
first model was built (the interpreter, torch, transformers and growfx imported):

* ``steady``: GPT-2 small (124M parameters, MLP 3072) trained a few AdamW steps (batch 4 x 128 tokens);
* ``grow`` (what ``ProgressiveTrainer`` does: the gradients dropped before growing, ``carry(release=True)``)
  and ``grow, no release`` (gradients held, ``release=False``): the same model with an MLP of 1536 (96M)
  trained as many steps, then grown by ``widen_mlp(factor=2)`` into GPT-2 small (``rewrite.apply``,
  verified), continued in its own class (``to_native``), its AdamW state carried (``rewrite.carry``) and one
  more step taken.

    python benchmarks/carry_memory.py [--quick] [--out benchmarks/results/carry_memory]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from measure import in_fresh_process, resident  # noqa: E402


def _config(quick: bool, inner: int):
    from transformers import GPT2Config

    sizes = dict(n_layer=2, n_embd=128, n_head=4, vocab_size=1000) if quick else {}
    return GPT2Config(n_inner=inner // (6 if quick else 1), **sizes)


def _train(model, optimizer, ids, steps: int, *, keep_gradients: bool = False) -> None:
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        if keep_gradients and step == steps - 1:
            return  # mid-step: the gradients are held when the growth comes
        optimizer.step()


def arm(kind: str, quick: bool, queue) -> None:
    import torch
    from transformers import GPT2LMHeadModel

    import passes
    import rewrite  # imported by both arms before the start: a growing process has growfx loaded anyway

    torch.manual_seed(0)
    start = resident()[0]
    ids = torch.randint(0, 1000, (4, 32 if quick else 128))
    if kind == "steady":
        model = GPT2LMHeadModel(_config(quick, 3072))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        _train(model, optimizer, ids, 3)
    else:
        model = GPT2LMHeadModel(_config(quick, 1536))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        _train(model, optimizer, ids, 3, keep_gradients=True)
        model.eval()
        if kind == "grow":  # as ProgressiveTrainer does: the gradients are not needed past this step
            optimizer.zero_grad(set_to_none=True)
        grown = rewrite.apply(model, [passes.widen_mlp(factor=2)], (ids[:1, :8],))
        native = rewrite.to_native(grown, model)
        carried = rewrite.carry(optimizer, grown, native, release=kind == "grow")
        del grown, model, optimizer
        gc.collect()  # a traced graph holds reference cycles: ProgressiveTrainer collects them after a growth
        native.train()
        _train(native, carried.optimizer, ids, 1)
    queue.put({"kind": kind, "peak_gb": (resident()[1] - start) / 1e9})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/carry_memory"))
    options = parser.parse_args()
    rows = {kind: in_fresh_process(arm, kind, options.quick) for kind in ("steady", "grow", "grow, no release")}
    steady = rows["steady"]["peak_gb"]
    table = "| arm | peak above start | against steady |\n|---|---|---|\n"
    for kind, row in rows.items():
        table += f"| {kind} | {row['peak_gb']:.2f} GB | {row['peak_gb'] / steady:.2f}x |\n"
    table += (f"\n{time.strftime('%Y-%m-%d')}, {platform.machine()}, peak resident memory (VmHWM) of a fresh "
              f"process per arm\n")
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "results.md").write_text(table)
    (options.out / "results.json").write_text(json.dumps(rows, indent=1))
    print(table)


if __name__ == "__main__":
    main()
