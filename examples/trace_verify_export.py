"""Trace a model, look at its graph, verify it, export it to ONNX and check the file in onnxruntime.

    python examples/trace_verify_export.py            # the hand-written GPT
    python examples/trace_verify_export.py hf-llama   # any built-in example (growfx inspect --list)
"""

import sys
import tempfile
from pathlib import Path

import rewrite
from rewrite.app import zoo

name = sys.argv[1] if len(sys.argv) > 1 else "gpt"
example = zoo.build(name)

graph = rewrite.trace(example.model, example.args, example.kwargs)  # fx or torch.export, as it works
print(graph)  # ops by kind, parameters (tied ones once), module tree

report = rewrite.verify(example.model, graph, example.args, example.kwargs)
print(report)  # max abs error 0: the graph is the model

with tempfile.TemporaryDirectory() as folder:
    onnx_report = rewrite.export_onnx(graph, example.args, Path(folder) / f"{name}.onnx", example.kwargs)
    print(onnx_report)  # onnxruntime vs torch, on the example shape and on a larger one
sys.exit(0 if report.ok and onnx_report.ok else 1)
