"""What the benchmarks share: a measurement in a fresh process (its own peak resident memory), and results
written as JSON and a markdown table."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path


def resident() -> tuple[int, int]:
    """(current, peak) resident bytes of this process (``VmRSS``, ``VmHWM``)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def in_fresh_process(target, *args) -> dict:
    """``target(*args, queue)`` in a spawned process; what it puts on the queue."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def save(out: Path, summary: dict, table: str) -> None:
    """``results.json`` (the summary) and ``results.md`` (the table) in ``out``; the table is printed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    (out / "results.md").write_text(table)
    print(table)
