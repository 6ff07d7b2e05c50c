"""Growing a sharded bfloat16 checkpoint one tensor at a time: time and peak memory against the floor.

    python benchmarks/stream.py                  # a 3.2 GB Llama-style checkpoint (32 layers, hidden 2048)
    python benchmarks/stream.py --layers 2       # the pipeline in seconds

1. Generates the checkpoint from a config (random bfloat16 weights, written tensor by tensor in 2 GB shards
   with an index, the way ``save_pretrained`` lays them out; never committed) unless it is already there.
2. Alternates, ``--runs`` times, each in a fresh process (its own peak resident memory, ``VmHWM``):
   * ``grow``: ``rewrite.io.grow_checkpoint`` with ``widen_mlp(factor=2)`` + ``add_layers(2)``;
   * ``floor``: the same files without the growth's arithmetic: for every tensor the grown checkpoint holds,
     read the checkpoint tensor its recipe reads (if any) and write that many uninitialised bytes, through
     the same reader and writer (reads made ahead on the same threads, within the same budget, while a tensor
     is written); a tensor the growth copies unchanged is copied the same way (its bytes, in the kernel). Same
     bytes in, same bytes out.
   Each process first records its resident memory after imports and planning (``fixed``), so the bound the
   issue sets, fixed + 3x the largest tensor, is computed per run.
3. Writes ``benchmarks/results/stream/results.json`` and ``results.md`` (medians).

Both runs read the checkpoint through the page cache once it is warm (the first run of each is not
discarded: the alternation spreads it).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from measure import against_floor, floor_benchmark, floor_report, random_folder, resident, write_floor

RESULTS = Path(__file__).resolve().parent / "results" / "stream"


def config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=16,
                       num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False, dtype="bfloat16",
                       architectures=["LlamaForCausalLM"])


def generate(folder: Path, layers: int) -> int:
    """Write a random bfloat16 checkpoint of the config's shapes, tensor by tensor; return its bytes."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config(layers))
    return random_folder(folder, model, config(layers))


def _plan():
    import passes

    return [passes.widen_mlp(factor=2), passes.add_layers(2)]


def run(kind: str, source: str, out: str, queue) -> None:
    """One measured run in a fresh process: ``grow`` or ``floor``."""
    import torch

    torch.set_num_threads(2)
    import rewrite.io.grow_checkpoint as streaming
    from rewrite.io.safetensors_stream import CheckpointReader

    shutil.rmtree(out, ignore_errors=True)
    if kind == "grow":
        import gc

        from transformers import AutoConfig, LlamaForCausalLM

        from rewrite.io.hf import example_inputs
        from rewrite.ir.trace import trace
        from rewrite.transform.apply import apply

        with torch.device("meta"):  # the fixed part: imports and a plan on meta, what any growth holds
            model = LlamaForCausalLM(AutoConfig.from_pretrained(source)).eval()
        args, _ = example_inputs(model)
        args = tuple(a.to("meta") for a in args)
        planned = apply(trace(model, args), _plan(), args, verify=False)
        fixed = resident()[0]
        del model, planned
        gc.collect()
        start = time.perf_counter()
        written = streaming.grow_checkpoint(source, _plan(), out, max_shard_bytes=2 * 2**30)
        seconds = time.perf_counter() - start
        largest = max(math.prod(shape) * torch.empty((), dtype=dtype).element_size()
                      for shape, dtype in _shapes(out))
        queue.put({"kind": kind, "seconds": seconds, "phases": written.seconds, "peak": resident()[1],
                   "fixed": fixed, "largest": largest, "bytes": written.bytes})
        return
    # floor: the grown folder's tensors (names, shapes, dtypes from its headers) and the source tensor each reads
    grown_folder = Path(out).with_name("grown-reference")
    reader, reference = CheckpointReader(source), CheckpointReader(grown_folder)
    saved = json.loads((grown_folder / "recipes.json").read_text())
    recipes, verbatim = saved["recipes"], set(saved["verbatim"])
    entries = [(n, reference.shape(n), reference.dtype(n)) for n in reference.keys()]
    fixed = resident()[0]
    start = time.perf_counter()

    def make(name, shape, dtype):
        if name in verbatim:  # copied unchanged: the same in-kernel copy the growth makes
            return reader.bytes(recipes[name])
        if recipes.get(name) in reader:
            reader[recipes[name]]  # the bytes the growth reads
        return torch.empty(shape, dtype=dtype)

    total = write_floor(Path(out), entries, make)
    seconds = time.perf_counter() - start
    queue.put({"kind": kind, "seconds": seconds, "peak": resident()[1], "fixed": fixed, "bytes": total})


def _shapes(folder):
    from rewrite.io.safetensors_stream import CheckpointReader

    reader = CheckpointReader(folder)
    return [(reader.shape(n), reader.dtype(n)) for n in reader.keys()]


def reference(source: Path, work: Path) -> None:
    """The grown folder once, with each tensor's source name, for the floor runs."""
    from rewrite.io.grow_checkpoint import grow_checkpoint, verbatim_source
    from rewrite.io.native_moe import Piece
    from rewrite.io.safetensors_stream import CheckpointReader

    folder = work / "grown-reference"
    shutil.rmtree(folder, ignore_errors=True)
    written = grow_checkpoint(source, _plan(), folder, max_shard_bytes=2 * 2**30)
    recipes = {name: r.source for name, r in written.grown.map.recipes.items()}
    source_reader, reader = CheckpointReader(source), CheckpointReader(folder)
    verbatim = [name for name in reader.keys() if recipes.get(name) in source_reader
                and verbatim_source(written.grown.map, Piece("rename", (name,)), source_reader, reader.shape(name),
                                    reader.dtype(name))]
    (folder / "recipes.json").write_text(json.dumps({"recipes": recipes, "verbatim": verbatim}))


def main() -> None:
    options, source, results = floor_benchmark(__doc__, 32, Path("/tmp/growfx-stream"), RESULTS, generate,
                                               reference, run)
    source_bytes = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    summary = {"layers": options.layers, "source_gb": source_bytes / 1e9, **against_floor(results)}
    floor_report(options.out, summary, f"{summary['source_gb']:.2f} GB bf16, {options.layers} layers")


if __name__ == "__main__":
    main()
