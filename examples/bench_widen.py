"""Speed of width growth against the bare floor, on models of GPT-2 small's size (~125M parameters).

    python examples/bench_widen.py [--repeat 3]

Two cases, each timed against its floor in the same run:
* ``llama-125M``: a Llama-style decoder (RMSNorm, SwiGLU, RoPE, 12/4 grouped-query heads; 12 layers, dim 768,
  MLP 2048, vocabulary 32000) grown 2x in hidden size and 2x in MLP size:
  ``[passes.widen_hidden(factor=2), passes.widen_mlp(factor=2)]``.
* ``gpt-124M``: the GPT-style model (LayerNorm, tied embeddings; dim 768, MLP 3072) with every MLP 2x
  (its residual stream cannot grow exactly: LayerNorm + zero padding, and cloning a tied head is not done).

Growth is ``rewrite.apply(graph, passes, verify=False)`` on an already traced graph: planning (the
dimension analysis of every intermediate graph), filling, cloning untouched tensors and shape propagation.
The floor writes every tensor of the final grown model once (zeros) and copies the old values in: what
any growth must at least do, since the grown model owns its parameters. Both run ``--repeat`` times under the
same conditions (the previous result freed first); reported: best and first runs, their ratio, tracing,
verification (separately) and the peak resident memory of the process.
"""

import argparse
import gc
import resource
import time

import torch

import passes
import rewrite
from rewrite.app.zoo.handwritten import GPT, Llama


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


def floor(original: rewrite.Graph, grown: rewrite.Graph) -> list:
    """Write every tensor of the grown model once (zeros) and copy the old values into its leading slice.

    Every element is written, as any growth must write it: ``torch.empty`` alone leaves new pages untouched
    and would understate the floor.
    """
    tensors = []
    old_tensors = {**dict(original.module.named_buffers()), **dict(original.module.named_parameters())}
    for name, info in grown.tensors().items():
        new = torch.zeros(info.shape, dtype=info.dtype)
        source = old_tensors.get(name)
        if source is not None:
            view = new
            for axis, size in enumerate(source.shape):
                view = view.narrow(axis, 0, size)
            view.copy_(source.detach())
        tensors.append(new)
    return tensors


def case(name: str, model: torch.nn.Module, steps: list, repeat: int) -> None:
    ids = torch.randint(0, 32000, (1, 16))
    start = time.perf_counter()
    graph = rewrite.trace(model, (ids,))
    trace_s = time.perf_counter() - start
    grown = rewrite.apply(graph, steps, (ids,), verify=False).graph
    floor_first, floor_best = timed(lambda: floor(graph, grown), repeat)
    grow_first, grow_best = timed(lambda: rewrite.apply(graph, steps, (ids,), verify=False), repeat)
    start = time.perf_counter()
    report = rewrite.verify(graph, grown, (ids,))
    verify_s = time.perf_counter() - start
    print(f"{name}: {graph.num_parameters / 1e6:.1f}M -> {grown.num_parameters / 1e6:.1f}M parameters "
          f"with {', '.join(step.name for step in steps)}")
    print(f"  trace {trace_s:.2f} s | verify {verify_s:.2f} s (max rel error {report.max_rel_error:.1e})")
    print(f"  growth {grow_best:.3f} s best ({grow_first:.3f} s first) | floor {floor_best:.3f} s best "
          f"({floor_first:.3f} s first) | ratio {grow_best / floor_best:.2f}x best, "
          f"{grow_first / floor_first:.2f}x first")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    options = parser.parse_args()
    torch.manual_seed(0)
    llama = Llama(vocab=32000, dim=768, heads=12, kv_heads=4, hidden=2048, layers=12, max_len=64).eval()
    case("llama-125M", llama, [passes.widen_hidden(factor=2), passes.widen_mlp(factor=2)], options.repeat)
    del llama
    gpt = GPT(vocab=50257, dim=768, heads=12, hidden=3072, layers=12, max_len=1024).eval()
    case("gpt-124M", gpt, [passes.widen("blocks.*.fc", factor=2)], options.repeat)
    print(f"peak resident memory {peak_gb():.2f} GB")


if __name__ == "__main__":
    main()
