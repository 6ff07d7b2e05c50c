"""What the benchmarks share: a measurement in a fresh process (its own peak resident memory), a whole command
timed with its process's peak, and results written as JSON and a markdown table."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path


def resident() -> tuple[int, int]:
    """(current, peak) resident bytes of this process (``VmRSS``, ``VmHWM``)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def fresh_heap() -> None:
    """Collect garbage and give freed heap pages back to the system (glibc's ``malloc_trim``), so that each timed
    run starts from the same state: its tensors take new pages, as in a process that grows once, instead of
    reusing the pages the run before freed (which made some floors four times faster than others)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def in_fresh_process(target, *args) -> dict:
    """``target(*args, queue)`` in a spawned process; what it puts on the queue."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def floor_benchmark(doc: str, layers: int, work: Path, out: Path, generate, reference, run, family: str = "llama"):
    """The command line and the runs the growth-against-floor benchmarks share: ``--layers --runs --work
    --out``; the checkpoint generated once (``generate``), the grown reference for the floor (``reference``),
    ``--runs`` alternating rounds of ``run`` and the work folders removed. (options, source, results)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=work)
    parser.add_argument("--out", type=Path, default=out)
    options = parser.parse_args()
    source = options.work / f"{family}-{options.layers}-layers"
    generated(source, generate, options.layers)
    reference(source, options.work)
    results = alternate(run, source, options.work, options.runs)
    for kind in ("grow", "floor", "grown-reference"):
        shutil.rmtree(options.work / kind, ignore_errors=True)
    return options, source, results


def generated(source: Path, generate, layers: int) -> None:
    """``generate(source, layers)`` (a random checkpoint; returns its bytes) unless ``source`` exists."""
    if not source.exists():
        start = time.perf_counter()
        size = generate(source, layers)
        print(f"generated {source}: {size / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s", flush=True)


def alternate(target, source: Path, work: Path, runs: int, kinds=("grow", "floor")) -> list[dict]:
    """``runs`` rounds of ``target(kind, source, work/kind, queue)`` for each kind in turn, each in a fresh
    process; every result printed as it comes. Each run's output is removed and the file systems synced
    before the next starts: a run writes gigabytes, and the kernel writing them back to disk during the next
    run slows that one instead (the same streamed growth took 13-18 s by where it fell)."""
    results = []
    for _ in range(runs):
        for kind in kinds:
            result = in_fresh_process(target, kind, str(source), str(work / kind))
            results.append(result)
            print(json.dumps(result), flush=True)
            shutil.rmtree(work / kind, ignore_errors=True)
            os.sync()
    return results


def against_floor(results: list[dict]) -> dict:
    """Medians of ``alternate``'s growth and floor runs: times and their ratio, peaks, and the bound the growth
    must stay within (its fixed part plus three times the largest tensor)."""
    grows = [r for r in results if r["kind"] == "grow"]
    floors = [r for r in results if r["kind"] == "floor"]

    def median(rows, key):
        return statistics.median(r[key] for r in rows)

    bound = median(grows, "fixed") + 3 * grows[0]["largest"]
    return {
        "grown_gb": grows[0]["bytes"] / 1e9, "runs": len(grows), "grow_s": median(grows, "seconds"),
        "floor_s": median(floors, "seconds"), "ratio": median(grows, "seconds") / median(floors, "seconds"),
        "grow_peak_gb": median(grows, "peak") / 1e9, "floor_peak_gb": median(floors, "peak") / 1e9,
        "fixed_gb": median(grows, "fixed") / 1e9, "largest_tensor_gb": grows[0]["largest"] / 1e9,
        "bound_gb": bound / 1e9, "within_bound": median(grows, "peak") <= bound,
        "phases_s": {k: statistics.median(r["phases"][k] for r in grows) for k in grows[0]["phases"]},
        "every_run": results,
    }


def measured(command: list[str]) -> dict:
    """Run ``command`` to completion: wall seconds and the peak resident memory of its process. The peak
    (``ru_maxrss``) counts the memory of this process at the fork too: call it from a process that holds
    little."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env=dict(os.environ, OMP_NUM_THREADS="2"))
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{stderr.decode()[-3000:]}")
    return {"seconds": seconds, "peak": usage.ru_maxrss * 1024}


def measured_rounds(commands: dict[str, list[str]], runs: int) -> tuple[dict, dict]:
    """``runs`` rounds of every command in turn (:func:`measured`), each result printed as it comes: every run
    by command, and by command its median seconds and peak (GB) with every run."""
    results = {name: [] for name in commands}
    for _ in range(runs):
        for name, command in commands.items():
            results[name].append(measured(command))
            print(name, json.dumps(results[name][-1]), flush=True)
    summary = {name: {"seconds": statistics.median(r["seconds"] for r in rows),
                      "peak_gb": statistics.median(r["peak"] for r in rows) / 1e9, "every_run": rows}
               for name, rows in results.items()}
    return results, summary


def save(out: Path, summary: dict, table: str) -> None:
    """``results.json`` (the summary) and ``results.md`` (the table) in ``out``; the table is printed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    (out / "results.md").write_text(table)
    print(table)


def floor_report(out: Path, summary: dict, checkpoint: str, *, what: str = "checkpoint",
                 ratio: str | None = None, ratio_column: str = "ratio") -> None:
    """The row of a growth-against-floor benchmark (``against_floor``'s summary of ``checkpoint``) under its
    header, saved (``save``) and the summary printed without its runs."""
    ratio = ratio or f"{summary['ratio']:.2f}x"
    table = (f"| {what} | grown | growth (s) | floor (s) | {ratio_column} | peak RSS | fixed + 3 x largest | within |\n"
             f"|---|---|---|---|---|---|---|---|\n"
             f"| {checkpoint} | {summary['grown_gb']:.2f} GB | {summary['grow_s']:.1f} | {summary['floor_s']:.1f} | "
             f"{ratio} | {summary['grow_peak_gb']:.2f} GB | {summary['fixed_gb']:.2f} + 3 x "
             f"{summary['largest_tensor_gb']:.3f} = {summary['bound_gb']:.2f} GB | "
             f"{'yes' if summary['within_bound'] else 'no'} |\n")
    save(out, summary, table)
    print(json.dumps({k: v for k, v in summary.items() if k != "every_run"}, indent=1))


def random_folder(folder: Path, model, config) -> int:
    """Write a random bfloat16 Hugging Face folder of ``model``'s shapes (built from ``config`` on ``meta``) under
    the keys ``save_pretrained`` stores (``stored_keys.StoredLayout``: per expert for a mixture), tensor by
    tensor in 2 GB shards with an index; norm gains are ones. Returns its bytes."""
    import math

    import torch

    from rewrite.io.safetensors_stream import INDEX, shard, write_safetensors
    from rewrite.io.stored_keys import StoredLayout

    entries = StoredLayout(model, [(n, tuple(t.shape), torch.bfloat16) for n, t in model.state_dict().items()]).entries
    shards = shard(entries, 2 * 2**30)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    shapes = {key: shape for key, shape, _ in entries}

    def make(key):
        if key.endswith("norm.weight"):
            return torch.ones(shapes[key], dtype=torch.bfloat16)
        return (torch.randn(shapes[key], generator=generator) * 0.02).to(torch.bfloat16)

    for file, part in zip(names, shards):
        write_safetensors(folder / file, part, make, metadata={"format": "pt"})
    total = sum(math.prod(s) * 2 for _, s, _ in entries)
    index = {"metadata": {"total_size": total},
             "weight_map": {n: f for f, part in zip(names, shards) for n, _, _ in part}}
    (folder / INDEX).write_text(json.dumps(index))
    config.save_pretrained(folder)
    return total


def write_floor(out: Path, entries: list, make) -> int:
    """A floor's files: ``entries`` (name, shape, dtype) in 2 GB shards, each tensor as ``make(name, shape,
    dtype)`` gives it, written as ``grow_checkpoint`` writes (made ahead on its threads, within the largest
    tensor's bytes). Returns the bytes written."""
    from rewrite.io.safetensors_stream import nbytes, shard, write_safetensors
    from rewrite.transform.materialise import workers

    largest = max(nbytes(shape, dtype) for _, shape, dtype in entries)
    out.mkdir(parents=True)
    total = 0
    for i, part in enumerate(shard(entries, 2 * 2**30)):
        layout = {name: (shape, dtype) for name, shape, dtype in part}
        path = out / f"model-{i + 1:05d}.safetensors"
        write_safetensors(path, part, lambda name: make(name, *layout[name]), workers=workers(), budget=largest)
        total += path.stat().st_size
    return total
