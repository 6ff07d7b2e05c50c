"""Measure tracing, self-verification and ONNX export on every built-in example; print a Markdown table.

    python examples/bench_foundation.py [names...]     # default: every built-in example, then gpt2-124M

``gpt2-124M`` is Hugging Face GPT-2 at its default (124M-parameter) size, random weights, to show scale.

Columns: front-end chosen by trace(frontend="auto"), parameters, trace time (s), max abs error of the
graph against the model, ONNX export time (s, includes the onnxruntime checks), max relative error of
onnxruntime against torch over both checked shapes. Times are wall-clock on whatever machine runs it.
"""

import sys
import tempfile
import time
from pathlib import Path

import rewrite
from rewrite.app import zoo


def gpt2_124m() -> zoo.ZooModel:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval()
    return zoo.ZooModel("gpt2-124M", model, (torch.randint(0, 50257, (2, 16)),), {}, "GPT-2 124M")


def measure(name: str, folder: Path) -> str:
    example = gpt2_124m() if name == "gpt2-124M" else zoo.build(name)
    start = time.perf_counter()
    graph = rewrite.trace(example.model, example.args, example.kwargs)
    trace_s = time.perf_counter() - start
    self_error = rewrite.verify(example.model, graph, example.args, example.kwargs).max_abs_error
    start = time.perf_counter()
    onnx = rewrite.export_onnx(graph, example.args, folder / f"{name}.onnx", example.kwargs)
    export_s = time.perf_counter() - start
    shapes = " / ".join(dict.fromkeys("x".join(map(str, r.shape)) for r in onnx.rows))
    return (
        f"| {name} | {graph.frontend} | {graph.num_parameters:,} | {trace_s:.2f} | {self_error:.1g} | "
        f"{export_s:.1f} | {onnx.max_rel_error:.1e} | {'yes' if onnx.ok else 'NO'} | {shapes} |"
    )


def main(names: list[str]) -> None:
    print("| model | front-end | parameters | trace (s) | graph vs model (max abs) | ONNX export + check (s) "
          "| ORT vs torch (max rel) | ok | output shapes checked |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            print(measure(name, Path(folder)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or [*zoo.NAMES, "gpt2-124M"])
