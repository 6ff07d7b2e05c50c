"""Growth in memory against the floor: time and peak memory of ``rewrite.apply`` on 124M-parameter models.

    python benchmarks/grow_matrix.py               # the five cases, medians of 7
    python benchmarks/grow_matrix.py --cases a,c --runs 5

The cases (two hand-written models of GPT-2 small's size: a Llama-style decoder, 12 layers, dim 768, GQA 12/4,
MLP 2048, vocabulary 32000, and a GPT-style one, 12 layers, dim 768, MLP 3072, vocabulary 50257, tied):

* (a) Llama: ``widen_hidden(factor=2, init="clone")`` + ``widen_mlp(factor=2)``;
* (b) GPT: ``widen("blocks.*.fc", factor=2)``;
* (c) GPT: ``add_layers(1, at=[0..11])``, a new layer after every layer;
* (d) GPT: ``upcycle_moe(8, 2, layers=[0..3])``;
* (e) Llama: four passes mixing width and depth: ``widen_mlp(factor=2)``, ``add_layers(2, init="copy")``,
  ``widen_hidden(factor=2)``, ``add_layers(1, at=0)``.

Each case runs in its own fresh process, ``torch.set_num_threads`` fixed (``--threads``, default 2):

* **time**: the model traced once, then ``--runs`` rounds alternating the growth
  (``rewrite.apply(graph, plan, verify=False)``) and the floor, the previous result freed before each; medians.
  Every run starts from a trimmed heap (``measure.fresh_heap``), so its tensors take new pages as in a
  process that grows once. The floor writes every tensor of the grown model once (zeros) and copies the old
  values into its leading slice: what any growth must do, since the grown model owns its tensors. Then ``apply(verify=True)`` a few
  times: the extra is verification's cost, reported separately. The growth's own phases (planning on shapes,
  materialising) come from ``GrowthReport.seconds``. A third kind in each round, ``plan_first=False``, is the
  growth built pass by pass (every intermediate model materialised: how ``apply`` grew before).
* **draws**: the normal draws the plan makes (noise on new units, redrawn copies, seeded fills), counted
  from its growth map. The floor draws as many at torch's best parallel rate (one generator per thread, each
  drawing its share at once: ``parallel_draws``), and they are timed alone too. growfx draws them by its
  chunked scheme (``rewrite.transform.draws``), also spread over the threads.
* **memory**: three more fresh processes per case, growing once, building pass by pass once
  (``plan_first=False``) and running the floor once; each
  resets its peak resident memory (``/proc/self/clear_refs``) after building and tracing the model, so the
  peaks compare the growth with the floor over the same starting point (the model and the interpreter).

Writes ``benchmarks/results/grow_matrix/results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from measure import fresh_heap, in_fresh_process, resident, save

RESULTS = Path(__file__).resolve().parent / "results" / "grow_matrix"

CASES = {
    "a": ("llama", 'widen_hidden(factor=2, init="clone") + widen_mlp(factor=2)'),
    "b": ("gpt", 'widen("blocks.*.fc", factor=2)'),
    "c": ("gpt", "add_layers(1, at=[0..11])"),
    "d": ("gpt", "upcycle_moe(8, 2, layers=[0..3])"),
    "e": ("llama", 'widen_mlp(2) + add_layers(2, init="copy") + widen_hidden(2) + add_layers(1, at=0)'),
}


def plan(case: str) -> list:
    import passes

    return {
        "a": lambda: [passes.widen_hidden(factor=2, init="clone"), passes.widen_mlp(factor=2)],
        "b": lambda: [passes.widen("blocks.*.fc", factor=2)],
        "c": lambda: [passes.add_layers(1, at=list(range(12)))],
        "d": lambda: [passes.upcycle_moe(8, 2, layers=[0, 1, 2, 3])],
        "e": lambda: [passes.widen_mlp(factor=2), passes.add_layers(2, init="copy"),
                      passes.widen_hidden(factor=2), passes.add_layers(1, at=0)],
    }[case]()


def traced(case: str, threads: int):
    import torch

    import rewrite
    from rewrite.app.zoo.handwritten import GPT, Llama

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if CASES[case][0] == "llama":
        model = Llama(vocab=32000, dim=768, heads=12, kv_heads=4, hidden=2048, layers=12, max_len=64).eval()
    else:
        model = GPT(vocab=50257, dim=768, heads=12, hidden=3072, layers=12, max_len=1024).eval()
    ids = torch.randint(0, 32000, (1, 16))
    return model, rewrite.trace(model, (ids,)), (ids,)


def shapes(graph, steps, args) -> tuple[dict, int]:
    """name -> (shape, dtype) of every tensor of the grown model (what the floor writes), and its parameter
    count, from the growth planned on shapes (nothing allocated, nothing left behind in the heap)."""
    import rewrite
    from rewrite.transform.materialise import on_meta

    planned = on_meta(graph)
    grown = rewrite.apply(planned, steps, planned.example_args, verify=False).graph
    return {name: (info.shape, info.dtype) for name, info in grown.tensors().items()}, grown.num_parameters


def floor(original, grown: dict, drawn: int = 0) -> list:
    """Every tensor of the grown model written once (zeros), the old values copied into its leading slice, and
    the ``drawn`` seeded normal values the plan must draw, at torch's best parallel rate (:func:`parallel_draws`)."""
    import torch

    tensors = parallel_draws(drawn)
    old = {**dict(original.module.named_buffers()), **dict(original.module.named_parameters())}
    for name, (shape, dtype) in grown.items():
        new = torch.zeros(shape, dtype=dtype)
        source = old.get(name)
        if source is not None:
            view = new
            for axis, size in enumerate(source.shape):
                view = view.narrow(axis, 0, size)
            view.copy_(source.detach())
        tensors.append(new)
    return tensors


def draws(growth_map) -> list[int]:
    """How many normal draws each seeded op of the plan makes (noise on new units, redrawn copies, seeded
    fills): the one part of a growth the floor does not do, timed alone for reference."""
    return [count for name in growth_map.recipes for count in growth_map.draw_counts(name)]


def parallel_draws(count: int) -> list:
    """``count`` normal values drawn as fast as torch can on this machine: one CPU generator per torch thread,
    each drawing its share at once on its own thread (torch's Mersenne Twister is serial, so no single draw
    uses more than one core)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    if not count:
        return []
    threads = torch.get_num_threads()
    shares = [count // threads + (i < count % threads) for i in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda i: torch.randn(shares[i], generator=torch.Generator().manual_seed(i)),
                             range(threads)))


def draw_time(count: int) -> float:
    start = time.perf_counter()
    parallel_draws(count)
    return time.perf_counter() - start


def timing(case: str, runs: int, threads: int, queue) -> None:
    """The alternating rounds of one case in this process (see the module docstring)."""
    import rewrite

    model, graph, args = traced(case, threads)
    steps = plan(case)
    grown, count = shapes(graph, steps, args)
    sizes = (graph.num_parameters, count)
    reference = rewrite.apply(graph, steps, args, verify=False)
    how, counts = reference.report.how, draws(reference.map)
    del reference
    grow_s, floor_s, by_pass_s, phases = [], [], [], []
    for _ in range(runs):
        fresh_heap()
        start = time.perf_counter()
        result = rewrite.apply(graph, steps, args, verify=False)
        grow_s.append(time.perf_counter() - start)
        phases.append(result.report.seconds)
        del result
        fresh_heap()
        start = time.perf_counter()
        result = floor(graph, grown, sum(counts))
        floor_s.append(time.perf_counter() - start)
        del result
        fresh_heap()
        start = time.perf_counter()
        result = rewrite.apply(graph, steps, args, verify=False, plan_first=False)
        by_pass_s.append(time.perf_counter() - start)
        del result
    draws_s = statistics.median(draw_time(sum(counts)) for _ in range(runs))
    verified_s, errors = [], []
    for _ in range(3):
        fresh_heap()
        start = time.perf_counter()
        result = rewrite.apply(graph, steps, args, verify=True)
        verified_s.append(time.perf_counter() - start)
        errors.append(max(r.verification.max_rel_error for r in result.report.passes if r.verification))
        del result
    queue.put({"case": case, "parameters": sizes, "how": how, "grow_s": grow_s, "floor_s": floor_s,
               "by_pass_s": by_pass_s, "draws": sum(counts), "draws_s": draws_s,
               "phases": {k: statistics.median(p[k] for p in phases) for k in phases[0]},
               "verified_s": verified_s, "max_rel_error": max(errors)})


def peak(case: str, kind: str, threads: int, queue) -> None:
    """One growth or one floor, the peak resident memory counted from after the trace."""
    import rewrite

    model, graph, args = traced(case, threads)
    steps = plan(case)
    grown = shapes(graph, steps, args)[0] if kind == "floor" else None
    fresh_heap()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = resident()[0]
    if kind == "floor":
        result = floor(graph, grown)
    else:
        result = rewrite.apply(graph, steps, args, verify=False, plan_first=kind == "grow")
    queue.put({"case": case, "kind": kind, "before": before, "peak": resident()[1]})
    del result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    options = parser.parse_args()
    rows = []
    for case in options.cases.split(","):
        timed = in_fresh_process(timing, case, options.runs, options.threads)
        grow_peak = in_fresh_process(peak, case, "grow", options.threads)
        floor_peak = in_fresh_process(peak, case, "floor", options.threads)
        by_pass_peak = in_fresh_process(peak, case, "by pass", options.threads)
        grow, floor_ = statistics.median(timed["grow_s"]), statistics.median(timed["floor_s"])
        by_pass = statistics.median(timed["by_pass_s"])
        verified = statistics.median(timed["verified_s"])
        row = {**timed, "grow_median_s": grow, "floor_median_s": floor_, "ratio": grow / floor_,
               "by_pass_median_s": by_pass, "by_pass_ratio": by_pass / floor_,
               "verify_extra_s": verified - grow, "grow_peak_gb": grow_peak["peak"] / 1e9,
               "floor_peak_gb": floor_peak["peak"] / 1e9, "start_gb": grow_peak["before"] / 1e9,
               "by_pass_peak_gb": by_pass_peak["peak"] / 1e9,
               "peak_over_floor": grow_peak["peak"] / floor_peak["peak"]}
        print(row, flush=True)
        rows.append(row)
    table = ["| case | model | plan | parameters | growth (s) | floor (s) | ratio | plan / build (s) "
             "| normal draws alone (s) | pass by pass (s, ratio) | verify adds (s) | peak / floor peak (GB) "
             "| peak over floor | pass by pass peak (GB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        model, text = CASES[row["case"]]
        phases = row["phases"]
        split = " / ".join(f"{phases[k]:.2f}" for k in ("plan", "build") if k in phases) or \
            ", ".join(f"{k} {v:.2f}" for k, v in phases.items())
        table.append(
            f"| ({row['case']}) | {model}-124M | `{text}` | {row['parameters'][0] / 1e6:.1f}M -> "
            f"{row['parameters'][1] / 1e6:.1f}M | {row['grow_median_s']:.3f} | {row['floor_median_s']:.3f} | "
            f"**{row['ratio']:.2f}x** | {split} | {row['draws_s']:.2f} ({row['draws'] / 1e6:.0f}M) | "
            f"{row['by_pass_median_s']:.3f}, {row['by_pass_ratio']:.2f}x | {row['verify_extra_s']:.2f} | "
            f"{row['grow_peak_gb']:.2f} / {row['floor_peak_gb']:.2f} | **{100 * (row['peak_over_floor'] - 1):+.1f}%** | "
            f"{row['by_pass_peak_gb']:.2f} |")
    table.append("")
    table.append(f"Medians of {options.runs} alternating runs, {options.threads} threads; peaks from fresh processes, "
                 f"counted from after the trace. How the tensors were made: {rows[0]['how'] if rows else ''}.")
    save(options.out, {"runs": options.runs, "threads": options.threads, "cases": rows}, "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
