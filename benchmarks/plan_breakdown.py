"""Where the time of a growth goes: tracing (static or dynamic shapes), planning, building, writing.

    python benchmarks/plan_breakdown.py [--runs 3] [--work /tmp/growfx-plan-breakdown]

Two models, each in a fresh process, each phase timed ``--runs`` times (medians; ``torch.set_num_threads(2)``):

* SmolLM2-135M-Instruct as a float32 Hugging Face folder (the one ``mergekit_compare.py`` writes), grown
  LLaMA-Pro style (``add_layers(1, at=[14, 29], init="copy")``) as ``growfx grow`` does: load, trace with
  static shapes (what a native checkpoint needs) and with dynamic ones (``Dim.AUTO``: what ``.pt2`` and ONNX
  need), beside a bare static ``torch.export.export`` of the same model; then ``apply`` (its plan on shapes
  and its build, from ``GrowthReport.seconds``), ``to_native`` and writing the folder.
* the 124M Llama-style model of ``grow_matrix.py`` (case (a)): trace (fx), plan, build.

Writes ``benchmarks/results/plan_breakdown/results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

from measure import in_fresh_process, save

RESULTS = Path(__file__).resolve().parent / "results" / "plan_breakdown"


def timed(function, runs: int) -> tuple[float, object]:
    """(median seconds, last result) of ``runs`` calls."""
    times, result = [], None
    for _ in range(runs):
        result = None
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def smollm2(work: str, runs: int, queue) -> None:
    import torch

    import passes
    import rewrite
    from mergekit_compare import source_folder
    from rewrite.app.models import load
    from rewrite.io.native import to_native
    from rewrite.io.sources import save_huggingface

    torch.set_num_threads(2)
    work = Path(work)
    folder = source_folder(work)
    phases = {}
    phases["load"], source = timed(lambda: load(str(folder)), runs)
    model, args, kwargs = source.model, source.args, source.kwargs
    phases["trace, static shapes"], graph = timed(lambda: rewrite.trace(model, args, kwargs, static=True), runs)
    phases["trace, dynamic shapes"], _ = timed(lambda: rewrite.trace(model, args, kwargs), runs)
    phases["bare torch.export, static"], _ = timed(
        lambda: torch.export.export(model, args, {**kwargs, "use_cache": False}, strict=False), runs)
    plan = [passes.add_layers(1, at=[14, 29], init="copy")]
    reports = []

    def grow():
        grown = rewrite.apply(graph, plan, args, kwargs, verify=False)
        reports.append(grown.report.seconds)
        return grown

    phases["apply (verify=False)"], grown = timed(grow, runs)
    for key in reports[0]:
        phases[f"  of which {key}"] = statistics.median(r[key] for r in reports)
    phases["apply (verify=True)"], _ = timed(lambda: rewrite.apply(graph, plan, args, kwargs), runs)
    phases["to_native"], native = timed(lambda: to_native(grown, like=model), runs)
    out = work / "smollm2-grown"
    phases["write the folder"], _ = timed(
        lambda: save_huggingface(native, out, source.tokenizer, replace=True, dtype=torch.float32), runs)
    shutil.rmtree(out, ignore_errors=True)
    queue.put(phases)


def llama_124m(runs: int, queue) -> None:
    import rewrite
    from grow_matrix import plan, traced

    phases = {}
    phases["build the model and trace it (fx)"], (model, graph, args) = timed(lambda: traced("a", 2), runs)
    steps = plan("a")
    reports = []

    def grow():
        grown = rewrite.apply(graph, steps, args, verify=False)
        reports.append(grown.report.seconds)
        return None

    phases["apply (verify=False)"], _ = timed(grow, runs)
    for key in reports[0]:
        phases[f"  of which {key}"] = statistics.median(r[key] for r in reports)
    queue.put(phases)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/growfx-plan-breakdown"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    options = parser.parse_args()
    results = {  # each in a fresh process
        "SmolLM2-135M, LLaMA-Pro add_layers(1, at=[14, 29], init=copy)":
            in_fresh_process(smollm2, str(options.work), options.runs),
        "Llama-style 124M, widen_hidden(2, clone) + widen_mlp(2)": in_fresh_process(llama_124m, options.runs)}
    lines = [f"Medians of {options.runs} runs, 2 threads.", ""]
    for name, phases in results.items():
        lines += [f"**{name}**", "", "| phase | seconds |", "|---|---|"]
        lines += [f"| {phase} | {seconds:.2f} |" for phase, seconds in phases.items()]
        lines.append("")
    save(options.out, {"runs": options.runs, "results": results}, "\n".join(lines))


if __name__ == "__main__":
    main()
