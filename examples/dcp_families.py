"""A distributed checkpoint grown offline, on Hugging Face families beyond the tests' Llama.

    python examples/dcp_families.py

For each family (a tiny config, random weights) and each pass: train 2 AdamW steps, save DCP as an FSDP2 run
would (``get_state_dict``), grow it with ``grow_distributed_checkpoint``, load it into the grown class, and
compare weights and optimizer state with the same growth done in memory (``apply``, ``to_native``,
``carry``). A pass the in-memory path refuses is reported as refused (the DCP path must refuse it too). Exits
non-zero on any difference or on a DCP growth that fails where the in-memory one works.
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import transformers as hf
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import passes
import rewrite
from rewrite.io.dcp_files import SafeLoadPlanner, SafeReader
from rewrite.training.grow_dcp import grow_distributed_checkpoint

SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
FAMILIES = {
    "Qwen2": hf.Qwen2Config(**SIZES, num_key_value_heads=2),
    "Mistral": hf.MistralConfig(**SIZES, num_key_value_heads=2),
    "Gemma": hf.GemmaConfig(**SIZES, num_key_value_heads=2, head_dim=8),
    "GPT2": hf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4),
    "Olmo2": hf.Olmo2Config(**SIZES, num_key_value_heads=2),
    "Phi3": hf.Phi3Config(**SIZES, num_key_value_heads=2, pad_token_id=0),
    "Qwen3": hf.Qwen3Config(**SIZES, num_key_value_heads=2, head_dim=8),
}
CLASSES = {"GPT2": "GPT2LMHeadModel"}
PLANS = {"widen_mlp(2)": lambda: [passes.widen_mlp(factor=2)],
         "add_layers(1, copy)": lambda: [passes.add_layers(1, init="copy")],
         "widen_hidden(2, clone)": lambda: [passes.widen_hidden(factor=2, init="clone")],
         "add_heads(4)": lambda: [passes.add_heads(4)]}
IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))


def one(family: str, config, plan) -> tuple[str, bool]:
    """(what happened, whether it is a failure)."""
    cls = getattr(hf, CLASSES.get(family, f"{family}ForCausalLM"))
    config.architectures = [cls.__name__]
    work = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    model = cls(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=work / "source", no_dist=True)
    try:
        grown = rewrite.apply(model, plan(), (IDS,))
        native = rewrite.to_native(grown, model)
    except rewrite.GrowfxError as e:
        try:
            grow_distributed_checkpoint(work / "source", config, plan(), work / "grown")
        except rewrite.GrowfxError:
            return f"refused in memory and as DCP ({type(e).__name__})", False
        return f"refused in memory ({e}) but grown as DCP", True
    carried = rewrite.carry(optimizer, grown, native, protect=False).optimizer
    try:
        grow_distributed_checkpoint(work / "source", config, plan(), work / "grown")
    except rewrite.GrowfxError as e:
        return f"DCP refused what memory grows: {e}", True
    resumed = cls(hf.AutoConfig.from_pretrained(work / "grown"))
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    model_state, optim_state = get_state_dict(resumed, resumed_optimizer)
    dcp.load({"model": model_state, "optim": optim_state}, storage_reader=SafeReader(work / "grown"),
             planner=SafeLoadPlanner(), no_dist=True)
    set_state_dict(resumed, resumed_optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    expected = native.state_dict()
    weights = [n for n, v in resumed.state_dict().items() if not torch.equal(v, expected[n])]
    reference = {n: carried.state.get(p, {}) for n, p in native.named_parameters()}
    state = [f"{n}.{f}" for n, p in resumed.named_parameters() for f, v in resumed_optimizer.state[p].items()
             if not torch.equal(v, reference[n].get(f, torch.zeros_like(v)))]
    if weights or state:
        return f"DIFFERENT: weights {weights[:2]}, state {state[:2]}", True
    return "bit-identical (weights and AdamW state)", False


def main() -> int:
    warnings.filterwarnings("ignore")
    failures = 0
    for family, config in FAMILIES.items():
        for name, plan in PLANS.items():
            result, failed = one(family, config, plan)
            failures += failed
            print(f"{family:8s} {name:24s} {result}", flush=True)
    print(f"\n{len(FAMILIES)} families x {len(PLANS)} passes; failures: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
