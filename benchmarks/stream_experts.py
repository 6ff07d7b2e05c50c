"""Streaming a checkpoint that stores each expert apart (Mixtral's layout): time and peak memory against the floor.

    python benchmarks/stream_experts.py              # a 1.6 GB bfloat16 Mixtral-style folder (8 layers, 8 experts)
    python benchmarks/stream_experts.py --layers 1   # the pipeline in seconds
    python benchmarks/stream_experts.py --plan depth # LLaMA-Pro: a copied layer after the middle and the last

transformers stacks a Mixtral folder's per-expert ``w1``/``w3``/``w2`` into ``experts.gate_up_proj`` and
``experts.down_proj`` as it loads it, and splits them again as it saves. ``grow_checkpoint`` reads the stacked
tensors through transformers' own converters (``stored_keys.ConvertedReader``) and writes them split again
(``stored_keys.StoredLayout``), so this measures what that assembling and splitting costs:

1. Generates the folder from a config (random bfloat16 weights under the keys ``save_pretrained`` writes, in
   2 GB shards with an index; never committed) unless it is already there.
2. Alternates, ``--runs`` times, each in a fresh process (its own peak resident memory, ``VmHWM``):
   * ``grow``: ``rewrite.io.grow_checkpoint`` with ``widen_mlp(factor=2)``, every expert twice as wide
     (``--plan depth``: ``add_layers(1, at=[middle, last], init="copy")``, whose copied experts are copied part
     by part from the source files);
   * ``floor``: the same files without the growth: for every tensor the grown folder holds, copy the bytes of
     the source tensor of that name in the kernel where it has the same shape (as the growth copies what it
     leaves unchanged), else read it and write that many uninitialised bytes (a new layer's name is in no
     source: written only), through the same reader and writer.
   The bound is the streaming one: fixed (imports and a plan on meta) + 3 x the largest tensor, here the
   largest the model holds (a layer's grown ``gate_up_proj``, every expert stacked), which the growth makes
   whole before splitting it.
3. Writes ``benchmarks/results/stream_experts/results.json`` and ``results.md`` (medians;
   ``stream_experts-depth/`` for ``--plan depth``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from measure import against_floor, floor_benchmark, floor_report, random_folder, resident, write_floor

RESULTS = Path(__file__).resolve().parent / "results" / "stream_experts"


def config(layers: int):
    from transformers import MixtralConfig

    return MixtralConfig(hidden_size=1024, intermediate_size=3584, num_hidden_layers=layers, num_attention_heads=16,
                         num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
                         tie_word_embeddings=False, dtype="bfloat16", architectures=["MixtralForCausalLM"])


def _model(layers: int):
    import torch
    from transformers import MixtralForCausalLM

    with torch.device("meta"):
        return MixtralForCausalLM(config(layers)).eval()


def generate(folder: Path, layers: int) -> int:
    """Write a random bfloat16 checkpoint under the keys save_pretrained stores (each expert apart)."""
    return random_folder(folder, _model(layers), config(layers))


PLANS = {"width": "widen_mlp(factor=2)", "depth": "add_layers(1, at=[middle, last], init='copy')"}


def _plan(source):
    """The plan ``--plan`` names (handed to the measured processes in the environment) for the folder ``source``."""
    import passes

    if os.environ.get("STREAM_EXPERTS_PLAN", "width") == "width":
        return [passes.widen_mlp(factor=2)]
    layers = json.loads((Path(source) / "config.json").read_text())["num_hidden_layers"]
    return [passes.add_layers(1, at=[layers // 2 - 1, layers - 1], init="copy")]


def run(kind: str, source: str, out: str, queue) -> None:
    """One measured run in a fresh process: ``grow`` or ``floor``."""
    import torch

    torch.set_num_threads(2)
    import rewrite.io.grow_checkpoint as streaming
    from rewrite.io.safetensors_stream import CheckpointReader

    shutil.rmtree(out, ignore_errors=True)
    layers = json.loads((Path(source) / "config.json").read_text())["num_hidden_layers"]
    if kind == "grow":
        import gc

        from rewrite.io.hf import example_inputs
        from rewrite.ir.trace import trace
        from rewrite.transform.apply import apply

        model = _model(layers)  # the fixed part: imports and a plan on meta, what any growth holds
        args, _ = example_inputs(model)
        args = tuple(a.to("meta") for a in args)
        planned = apply(trace(model, args), _plan(source), args, verify=False)
        largest = max(math.prod(r.shape) * 2 for r in planned.map.recipes.values())  # bf16: the stacked experts
        fixed = resident()[0]
        del model, planned
        gc.collect()
        start = time.perf_counter()
        written = streaming.grow_checkpoint(source, _plan(source), out, max_shard_bytes=2 * 2**30)
        seconds = time.perf_counter() - start
        queue.put({"kind": kind, "seconds": seconds, "phases": written.seconds, "peak": resident()[1],
                   "fixed": fixed, "largest": largest, "bytes": written.bytes, "copied": written.copied})
        return
    reader, grown = CheckpointReader(source), CheckpointReader(Path(out).with_name("grown-reference"))
    entries = [(key, grown.shape(key), grown.dtype(key)) for key in grown.keys()]
    fixed = resident()[0]
    start = time.perf_counter()

    def make(key, shape, dtype):
        if key not in reader:  # a new layer's
            return torch.empty(shape, dtype=dtype)
        if reader.shape(key) == tuple(shape):  # unchanged: copied as the growth copies it
            return reader.bytes(key)
        reader[key]  # the bytes the growth reads
        return torch.empty(shape, dtype=dtype)

    total = write_floor(Path(out), entries, make)
    seconds = time.perf_counter() - start
    queue.put({"kind": kind, "seconds": seconds, "peak": resident()[1], "fixed": fixed, "bytes": total})


def reference(source: Path, work: Path) -> None:
    """The grown folder once, whose keys and shapes the floor writes; checked to store each expert apart."""
    from rewrite.io.grow_checkpoint import grow_checkpoint
    from rewrite.io.safetensors_stream import CheckpointReader

    folder = work / "grown-reference"
    shutil.rmtree(folder, ignore_errors=True)
    grow_checkpoint(source, _plan(source), folder, max_shard_bytes=2 * 2**30)
    stacked = [key for key in CheckpointReader(folder) if "gate_up_proj" in key or "experts.down_proj" in key]
    assert not stacked, f"the grown folder stores stacked experts: {stacked[:2]}"


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--plan", choices=PLANS, default="width")
    chosen, sys.argv[1:] = parser.parse_known_args()
    os.environ["STREAM_EXPERTS_PLAN"] = chosen.plan
    if chosen.plan != "width" and "--out" not in sys.argv:
        sys.argv += ["--out", str(RESULTS.with_name(f"stream_experts-{chosen.plan}"))]
    options, source, results = floor_benchmark(__doc__, 8, Path("/tmp/growfx-stream-experts"), RESULTS, generate,
                                               reference, run, family="mixtral")
    source_bytes = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    summary = {"layers": options.layers, "source_gb": source_bytes / 1e9, **against_floor(results)}
    summary["plan"] = PLANS[chosen.plan]
    floor_report(options.out, summary, f"{summary['source_gb']:.2f} GB bf16 Mixtral, {options.layers} layers x 8 "
                                       f"experts, stored per expert; `{PLANS[chosen.plan]}`")


if __name__ == "__main__":
    main()
