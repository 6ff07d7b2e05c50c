"""Speed of width growth against the bare floor, on a GPT-style model of GPT-2 small's size (~124M).

    python examples/bench_widen.py [--layers 12] [--dim 768] [--repeat 3]

Grows the MLP of every block 2x (3072 -> 6144 units) with ``passes.widen("blocks.*.fc", factor=2)``.
The floor, measured in the same run: allocate every tensor of the grown model once (``torch.empty``)
and copy the old weights in by slices: what any growth must at least do, since the grown model owns
its parameters. The growth step is the rebuild (fill, clone of the untouched tensors, shape propagation
on the example inputs). Both are run ``--repeat`` times under the same conditions (the previous result
freed first); reported are the first run and the best, their ratios, the dimension analysis on its own,
tracing and verification, and the peak resident memory of the process. (Residual-stream growth is not implemented yet, so hidden width is not
part of this benchmark.)
"""

import argparse
import gc
import resource
import time

import torch

import passes
import rewrite
from rewrite.zoo.handwritten import GPT


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def timed(fn, repeat: int) -> tuple[float, float]:
    """(first run, best run) of ``fn``; each run's result is freed before the next, for both sides alike."""
    times = []
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        del result
    return times[0], min(times)


def floor(graph: rewrite.Graph, plan) -> list:
    """Allocate every tensor of the grown model once and copy the old values in; all are kept."""
    grown_axes = {}
    for group, size in plan.groups:
        for member in group.members:
            grown_axes.setdefault(member.tensor, []).append((member.axis, size))
    tensors = []
    for name, info in graph.tensors().items():
        old = graph.module.get_parameter(name) if info.kind == "parameter" else graph.module.get_buffer(name)
        shape = list(old.shape)
        for axis, size in grown_axes.get(name, []):
            shape[axis] = size
        new = torch.empty(shape, dtype=old.dtype)
        view = new
        for axis, _ in grown_axes.get(name, []):
            view = view.narrow(axis, 0, old.shape[axis])
        view.copy_(old.detach())
        tensors.append(new)
    return tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--repeat", type=int, default=3)
    options = parser.parse_args()
    torch.manual_seed(0)
    dim = options.dim
    model = GPT(vocab=50257, dim=dim, heads=dim // 64, hidden=4 * dim, layers=options.layers, max_len=1024).eval()
    ids = torch.randint(0, 50257, (1, 16))
    start = time.perf_counter()
    graph = rewrite.trace(model, (ids,))
    trace_s = time.perf_counter() - start
    analysis_s, _ = timed(lambda: rewrite.dims.analyse(graph), 1)
    graph.dim_groups()  # cached for the growth runs below
    growth = passes.widen("blocks.*.fc", factor=2)
    plan = growth.plan(graph)
    floor_cold, floor_s = timed(lambda: floor(graph, plan), options.repeat)
    grow_cold, grow_s = timed(lambda: growth.run(graph, plan), options.repeat)
    grown = growth.run(graph, plan)
    start = time.perf_counter()
    report = rewrite.verify(graph, grown, (ids,))
    verify_s = time.perf_counter() - start
    print(f"model: GPT-style, {options.layers} layers, dim {dim}: {graph.num_parameters / 1e6:.1f}M -> "
          f"{grown.num_parameters / 1e6:.1f}M parameters ({len(plan.groups)} MLP groups grown 2x)")
    print(f"trace {trace_s:.2f} s | dimension analysis {analysis_s:.2f} s | verify {verify_s:.2f} s "
          f"(max rel error {report.max_rel_error:.1e})")
    print(f"growth step {grow_s:.3f} s warm ({grow_cold:.3f} s first) | floor {floor_s:.3f} s warm "
          f"({floor_cold:.3f} s first) | ratio {grow_s / floor_s:.2f}x warm, {grow_cold / floor_cold:.2f}x first")
    print(f"peak resident memory {peak_gb():.2f} GB (model, grown model, floor copies and interpreter values)")


if __name__ == "__main__":
    main()
