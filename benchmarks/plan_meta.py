"""Planning a growth of a 70B Llama without its weights: time and memory against a bare torch.export.

    python benchmarks/plan_meta.py                # Llama-2-70B's shapes (80 layers, hidden 8192, GQA 64/8)
    python benchmarks/plan_meta.py --layers 4     # the pipeline in seconds

Each measurement runs in a fresh process (its own peak resident memory, ``VmHWM``), alternating, ``--runs``
times:
* ``export``: the model built on ``meta`` from the config, then ``torch.export.export`` of it (static shapes);
* ``export, deferred``: the same export as ``rewrite.trace`` runs it on ``meta``: its graphs' code made on
  first use (``rewrite.ir.lazy_compile.recompiles_deferred``) and no stack trace recorded on its nodes
  (``rewrite.ir.frontends.stack_traces``): the plan's own cost is its time over this one;
* ``plan``: the same model, ``rewrite.trace`` (which exports it) and ``rewrite.apply`` of
  ``widen_mlp(factor=2)`` + ``add_layers(8)`` with ``verify=False``: the growth map and the grown config,
  no weight allocated.
Writes ``benchmarks/results/plan_meta/results.json`` and ``results.md`` (medians).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from measure import in_fresh_process, resident, save

RESULTS = Path(__file__).resolve().parent / "results" / "plan_meta"


def _config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=layers, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096)


def run(kind: str, layers: int, queue) -> None:
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(2)
    ids = torch.randint(0, 32000, (2, 8), device="meta")
    with torch.device("meta"):
        model = LlamaForCausalLM(_config(layers)).eval()
    start = time.perf_counter()
    if kind == "export":
        torch.export.export(model, (ids,), {"use_cache": False}, strict=False)
        result = {}
    elif kind == "export, deferred":
        from rewrite.ir.frontends import stack_traces
        from rewrite.ir.lazy_compile import recompiles_deferred

        with recompiles_deferred(), stack_traces(record=False):
            torch.export.export(model, (ids,), {"use_cache": False}, strict=False)
        result = {}
    else:
        import passes
        import rewrite
        from rewrite.io.native import native_config

        grown = rewrite.apply(model, [passes.widen_mlp(factor=2), passes.add_layers(8)], (ids,), verify=False)
        _, config, _ = native_config(grown.graph, model)
        result = {"parameters": grown.graph.num_parameters, "recipes": len(grown.map.recipes),
                  "grown_layers": config.num_hidden_layers, "grown_intermediate": config.intermediate_size,
                  "report": str(grown.report)}
    queue.put({"kind": kind, "seconds": time.perf_counter() - start, "peak": resident()[1], **result})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=80)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    options = parser.parse_args()
    results = []
    for _ in range(options.runs):
        for kind in ("export", "export, deferred", "plan"):
            results.append(in_fresh_process(run, kind, options.layers))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "report"}), flush=True)
    exports = [r for r in results if r["kind"] == "export"]
    plans = [r for r in results if r["kind"] == "plan"]
    deferred = [r for r in results if r["kind"] == "export, deferred"]
    median = lambda rows, key: statistics.median(r[key] for r in rows)  # noqa: E731
    summary = {"layers": options.layers, "runs": options.runs, "export_s": median(exports, "seconds"),
               "deferred_export_s": median(deferred, "seconds"), "plan_s": median(plans, "seconds"),
               "ratio": median(plans, "seconds") / median(exports, "seconds"),
               "ratio_to_deferred": median(plans, "seconds") / median(deferred, "seconds"),
               "export_peak_gb": median(exports, "peak") / 1e9, "plan_peak_gb": median(plans, "peak") / 1e9,
               "grown_parameters": plans[0]["parameters"], "grown_layers": plans[0]["grown_layers"],
               "grown_intermediate": plans[0]["grown_intermediate"], "report": plans[0]["report"],
               "every_run": [{k: v for k, v in r.items() if k != "report"} for r in results]}
    table = (f"| model | plan | export (s) | export, deferred (s) | plan (s) | ratio | ratio to deferred | export peak "
             f"| plan peak |\n|---|---|---|---|---|---|---|---|---|\n"
             f"| Llama {options.layers} layers, hidden 8192 (meta) | widen_mlp(2) + add_layers(8) -> "
             f"{summary['grown_parameters'] / 1e9:.1f}B parameters | {summary['export_s']:.1f} | "
             f"{summary['deferred_export_s']:.1f} | {summary['plan_s']:.1f} | {summary['ratio']:.2f}x | "
             f"{summary['ratio_to_deferred']:.2f}x | {summary['export_peak_gb']:.2f} GB | "
             f"{summary['plan_peak_gb']:.2f} GB |\n")
    save(options.out, summary, table)


if __name__ == "__main__":
    main()
