"""Whole ``growfx grow`` commands on a checkpoint folder, streamed and in memory: wall time and peak memory.

    python benchmarks/stream.py --layers 10          # generates /tmp/growfx-stream/llama-10-layers once
    python benchmarks/commands.py                    # the issue's 10-layer job, both ways, medians of 3

Alternates, ``--runs`` times, ``growfx grow FOLDER --pass ... --out OUT`` with and without ``--stream``, each a
fresh process timed by wall clock with its peak resident memory (``os.wait4``, as ``mergekit_compare.py``).
Writes ``benchmarks/results/commands-<folder>/results.json`` and ``results.md`` (medians).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from measure import measured_rounds, save

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/growfx-stream/llama-10-layers"))
    parser.add_argument("--pass", dest="passes", action="append", default=None,
                        help="a growfx --pass (repeat it); default: widen_mlp:factor=2 and add_layers:n=2")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    options = parser.parse_args()
    if not (options.folder / "config.json").is_file():
        sys.exit(f"{options.folder} is not a Hugging Face folder: run benchmarks/stream.py --layers 10 first")
    plan = options.passes or ["widen_mlp:factor=2", "add_layers:n=2"]
    work = options.folder.parent / f"{options.folder.name}-commands"
    growfx = [str(Path(sys.executable).with_name("growfx")), "grow", str(options.folder), "--force",
              *(argument for spec in plan for argument in ("--pass", spec))]
    commands = {"growfx grow --stream": [*growfx, "--stream", "--out", str(work / "stream")],
                "growfx grow (in memory)": [*growfx, "--out", str(work / "memory")]}
    _, summary = measured_rounds(commands, options.runs)
    shutil.rmtree(work, ignore_errors=True)
    source_gb = sum(p.stat().st_size for p in options.folder.glob("*.safetensors")) / 1e9
    summary.update({"folder": str(options.folder), "source_gb": source_gb, "plan": plan, "runs": options.runs})
    table = (f"| command ({source_gb:.2f} GB folder, {' + '.join(plan)}) | wall time (s) | peak RSS |\n"
             f"|---|---|---|\n")
    for name in commands:
        table += f"| {name} | {summary[name]['seconds']:.1f} | {summary[name]['peak_gb']:.2f} GB |\n"
    save(options.out or RESULTS / f"commands-{options.folder.name}", summary, table)


if __name__ == "__main__":
    main()
