"""Growing a distributed checkpoint with its AdamW state, offline: time and peak memory against the floor.

    python benchmarks/grow_dcp.py                # 245M parameters: 2.9 GB of float32 weights + AdamW moments
    python benchmarks/grow_dcp.py --layers 2     # the pipeline in seconds

1. Generates a DCP checkpoint laid out as an FSDP2 run saves it with ``get_state_dict`` (``model.<fqn>``,
   ``optim.state.<fqn>.{step,exp_avg,exp_avg_sq}``, ``optim.param_groups.0.*`` of a real AdamW), random
   values, tensor by tensor (never committed), unless it is already there.
2. Alternates, ``--runs`` times, each in a fresh process (its own peak resident memory, ``VmHWM``):
   * ``grow``: ``grow_distributed_checkpoint`` with ``widen_mlp(factor=2)`` + ``add_layers(2)``, optimizer
     state ``mapped``;
   * ``floor``: the same keys without the growth: for every key of the grown checkpoint, read the source key
     it is made from (if any) and write that many uninitialised bytes, through the same reader and writer.
   Each process first records its resident memory after imports and planning (``fixed``); the bound is
   fixed + 3x the largest tensor.
3. Writes ``benchmarks/results/grow_dcp/results.json`` and ``results.md`` (medians).
"""

from __future__ import annotations

import gc
import json
import math
import shutil
import time
from pathlib import Path

from measure import against_floor, floor_benchmark, floor_report, resident

RESULTS = Path(__file__).resolve().parent / "results" / "grow_dcp"
SOURCE_CHUNK = 64 * 2**20  # the source's row chunks: what FSDP2 on 2 processes writes for the 131 MB embedding


def config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers, num_attention_heads=16,
                       num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False,
                       architectures=["LlamaForCausalLM"])


def _plan():
    import passes

    return [passes.widen_mlp(factor=2), passes.add_layers(2)]


def generate(folder: Path, layers: int) -> int:
    """Write a random DCP checkpoint of the model and its AdamW state, key by key; return its bytes."""
    import torch
    from transformers import LlamaForCausalLM

    from rewrite.io.dcp_files import Entry, write_checkpoint

    with torch.device("meta"):
        model = LlamaForCausalLM(config(layers))
    group = torch.optim.AdamW([torch.zeros(1)], lr=3e-4, weight_decay=0.1).state_dict()["param_groups"][0]
    entries, shapes = [], {}
    for name, parameter in model.named_parameters():
        shapes[name] = tuple(parameter.shape)
        entries.append(Entry(f"model.{name}", ("model", name), shapes[name], torch.float32))
    for name in shapes:
        entries.append(Entry(f"optim.state.{name}.step", ("optim", "state", name, "step"), (), torch.float32))
        for field in ("exp_avg", "exp_avg_sq"):
            entries.append(Entry(f"optim.state.{name}.{field}", ("optim", "state", name, field), shapes[name],
                                 torch.float32))
    for key, value in group.items():
        entries.append(Entry(f"optim.param_groups.0.{key}", ("optim", "param_groups", 0, key)))
    generator = torch.Generator().manual_seed(0)

    def make(key: str):
        path = next(e.path for e in entries if e.key == key)
        if path[:2] == ("optim", "param_groups"):
            return list(shapes) if path[3] == "params" else group[path[3]]
        if path[-1] == "step":
            return torch.tensor(1000.0)
        shape = shapes[path[1] if path[0] == "model" else path[2]]
        if path[-1] == "exp_avg_sq":
            return torch.rand(shape, generator=generator) * 1e-6
        scale = 1e-3 if path[-1] == "exp_avg" else 0.02
        return torch.ones(shape) if key.endswith("norm.weight") else torch.randn(shape, generator=generator) * scale

    write_checkpoint(folder, entries, make, max_chunk_bytes=SOURCE_CHUNK)
    config(layers).save_pretrained(folder)
    return sum(math.prod(e.shape) * 4 for e in entries if e.shape is not None)


def run(kind: str, source: str, out: str, queue) -> None:
    """One measured run in a fresh process: ``grow`` or ``floor``."""
    import torch

    torch.set_num_threads(2)
    from transformers import AutoConfig

    from rewrite.io.dcp_files import DistributedCheckpoint, Entry, write_checkpoint
    from rewrite.training.grow_dcp import grow_distributed_checkpoint

    shutil.rmtree(out, ignore_errors=True)
    if kind == "grow":
        from rewrite.io.grow_checkpoint import meta_inputs, meta_model, plan_native
        from rewrite.ir.trace import trace

        model = meta_model(AutoConfig.from_pretrained(source))  # the fixed part: imports and a plan on meta
        args, kwargs = meta_inputs(model)
        planned = plan_native(trace(model, args, kwargs), model, _plan(), args, kwargs)
        fixed = resident()[0]
        del model, planned
        gc.collect()
        start = time.perf_counter()
        written = grow_distributed_checkpoint(source, AutoConfig.from_pretrained(source), _plan(), out)
        seconds = time.perf_counter() - start
        grown = DistributedCheckpoint(out)
        largest = max(math.prod(grown.shape(k)) * 4 for k in grown.entries if grown.is_tensor(k))
        queue.put({"kind": kind, "seconds": seconds, "phases": written.seconds, "peak": resident()[1],
                   "fixed": fixed, "largest": largest, "bytes": _bytes(out), "keys": written.keys})
        return
    # floor: the grown checkpoint's keys (shapes, dtypes, paths from its metadata) and the source key each reads
    reference_folder = Path(out).with_name("grown-reference")
    reference, checkpoint = DistributedCheckpoint(reference_folder), DistributedCheckpoint(source)
    sources = json.loads((reference_folder / "sources.json").read_text())
    entries = [Entry(k, reference.path(k), reference.shape(k), reference.dtype(k)) if reference.is_tensor(k)
               else Entry(k, reference.path(k)) for k in reference.entries]
    values = {k: reference.value(k) for k in reference.entries if not reference.is_tensor(k)}
    fixed = resident()[0]
    start = time.perf_counter()

    def make(key):
        if sources.get(key) in checkpoint:
            checkpoint.tensor(sources[key])  # the bytes the growth reads
        if key in values:
            return values[key]
        return torch.empty(reference.shape(key), dtype=reference.dtype(key))

    write_checkpoint(out, entries, make)
    seconds = time.perf_counter() - start
    queue.put({"kind": kind, "seconds": seconds, "peak": resident()[1], "fixed": fixed, "bytes": _bytes(out)})


def _bytes(folder) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.distcp"))


def reference(source: Path, work: Path) -> None:
    """The grown checkpoint once, with the source key of each of its keys, for the floor runs."""
    from transformers import AutoConfig

    from rewrite.training.grow_dcp import grow_distributed_checkpoint

    folder = work / "grown-reference"
    shutil.rmtree(folder, ignore_errors=True)
    written = grow_distributed_checkpoint(source, AutoConfig.from_pretrained(source), _plan(), folder)
    growth = written.plan.grown.map
    sources = {}
    for name, recipe in growth.recipes.items():
        if recipe.source is None:
            continue
        sources[f"model.{name}"] = f"model.{recipe.source}"
        for field in ("exp_avg", "exp_avg_sq"):
            sources[f"optim.state.{name}.{field}"] = f"optim.state.{recipe.source}.{field}"
    (folder / "sources.json").write_text(json.dumps(sources))


def main() -> None:
    options, source, results = floor_benchmark(__doc__, 16, Path("/tmp/growfx-dcp"), RESULTS, generate,
                                               reference, run)
    summary = {"layers": options.layers, "source_gb": _bytes(source) / 1e9, "keys": results[0]["keys"],
               **against_floor(results)}
    summary["write_ratio"] = summary["phases_s"]["write"] / summary["floor_s"]
    floor_report(options.out, summary, f"{summary['source_gb']:.2f} GB fp32, {options.layers} layers",
                 what="checkpoint (weights + AdamW)", ratio_column="ratio (write phase)",
                 ratio=f"{summary['ratio']:.2f}x ({summary['write_ratio']:.2f}x)")


if __name__ == "__main__":
    main()
