"""Growth where users train, on a real accelerator: one prepared run of under 5 minutes on one GPU.

    python benchmarks/gpu_smoke.py                       # cuda, bfloat16, a ~100M-parameter Llama
    python benchmarks/gpu_smoke.py --device cpu --quick  # the same script on a small model (what CI can run)

For every pass x init policy on a Hugging Face Llama (hidden 768, 12 layers, 12/4 heads, MLP 2048, vocabulary
32000: 98M parameters) in bfloat16 on the device: train 3 AdamW steps (fused where the device has it), grow
(``rewrite.apply``, verified), continue in its own class (``to_native``), carry the optimizer
(``rewrite.carry``, the policy that fits the init), train 20 steps, and record the seconds, the peak device
memory of the growth against steady training, whether every tensor stayed on the device and in bfloat16, and
the loss before and after. Then a ``ProgressiveTrainer`` run with two growths, autocast and checkpoints,
interrupted and resumed, checked bit for bit against an uninterrupted run; and the step hooks' overhead
(``benchmarks/hooks.py``'s measure, on the device). Prints one markdown table and writes it with the JSON to
``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

import passes
import rewrite

sys.path.insert(0, str(Path(__file__).parent))

PLANS = {
    "widen_mlp": lambda init: [passes.widen_mlp(factor=2, init=init, exact=False)],
    "widen_hidden": lambda init: [passes.widen_hidden(factor=2, init=init, exact=False)],
    "add_heads": lambda init: [passes.add_heads(4, init=init, exact=False)],
    "widen_heads(v)": lambda init: [passes.widen_heads(v=128, init=init, exact=False)],
    "add_layers": lambda init: [passes.add_layers(2, init="copy" if init == "clone" else "zero")],
    "upcycle_moe": lambda init: [passes.upcycle_moe(4, 2, layers=[0, 1])],
}
INITS = {"zero": "mapped", "clone": "mapped", "net2net": "mapped", "sparkling": "sparkling"}


def llama(quick: bool, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=256, head_dim=16) if quick else
             dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                  intermediate_size=2048, vocab_size=32000))
    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=512, **sizes)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype), config


def peak_bytes(device: str) -> int:
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def optimizer_for(model, device: str):
    fused = device.startswith("cuda")
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=fused)


def train(model, optimizer, ids, steps: int) -> float:
    model.train()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
    return float(loss)


def case(pass_name: str, init: str, options) -> dict:
    device, dtype = options.device, torch.bfloat16
    model, config = llama(options.quick, device, dtype)
    ids = torch.randint(0, config.vocab_size, (4, 64 if options.quick else 256), device=device)
    optimizer = optimizer_for(model, device)
    train(model, optimizer, ids, 3)
    reset_peak(device)
    steady = peak_bytes(device)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids[:1]).logits
        before = float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:1, 1:].flatten()))
    reset_peak(device)
    start = time.perf_counter()
    grown = rewrite.apply(model, PLANS[pass_name](init), (ids[:1, :16],))
    try:
        module = rewrite.to_native(grown, model)
        module = module if type(module) is type(model) else grown.module
    except rewrite.NotRepresentableError:
        module = grown.module
    carried = rewrite.carry(optimizer, grown, module, policy=INITS[init], release=True)
    seconds = time.perf_counter() - start
    growth_peak = peak_bytes(device)
    tensors = [*module.parameters(), *module.buffers(),
               *(v for s in carried.optimizer.state.values() for k, v in s.items() if k != "step")]
    placed = all(t.device.type == torch.device(device).type for t in tensors)
    kept_dtype = all(p.dtype == dtype for p in module.parameters())
    module.eval()

    def lm_loss(x):  # the native class and the graph form alike: next-token cross-entropy from the logits
        logits = module(x).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten())

    with torch.no_grad():
        after = float(lm_loss(ids[:1]))
    reset_peak(device)
    module.train()
    for _ in range(20):
        carried.optimizer.zero_grad(set_to_none=True)
        loss = lm_loss(ids)
        loss.backward()
        carried.optimizer.step()
    final, train_peak = float(loss), peak_bytes(device)
    return {"pass": pass_name, "init": init, "policy": INITS[init], "exact": grown.report.exact,
            "seconds": seconds, "placed": placed, "dtype_kept": kept_dtype, "loss_before": before,
            "loss_after": after, "loss_20_steps": final, "growth_peak_gb": growth_peak / 1e9,
            "steady_peak_gb": max(steady, train_peak) / 1e9,
            "parameters": sum(p.numel() for p in module.parameters())}


def resume(options) -> dict:
    """ProgressiveTrainer with two growths under autocast, interrupted after the first and resumed."""
    from rewrite.training.triggers import Fixed

    device = options.device
    model, config = llama(True, device, torch.float32)
    ids = torch.randint(0, config.vocab_size, (64, 33), generator=torch.Generator().manual_seed(1))
    batches = [(ids[i:i + 4, :-1].to(device), ids[i:i + 4, 1:].to(device)) for i in range(0, 64, 4)]

    def loss(m, batch):
        out = m(input_ids=batch[0]) if hasattr(m, "config") else m(batch[0])
        logits = out.logits if hasattr(out, "logits") else out
        return F.cross_entropy(logits.flatten(0, 1).float(), batch[1].flatten())

    def trainer(folder):
        return rewrite.ProgressiveTrainer(
            copy.deepcopy(model), loss=loss, optimizer=lambda p: optimizer_for_params(p, device),
            stages=[[passes.widen_mlp(factor=2)], [passes.add_layers(1, init="copy")]],
            trigger=[Fixed(step=6), Fixed(step=12)], evaluate_every=3, checkpoint_every=3, checkpoints=folder,
            autocast=torch.bfloat16, inputs=lambda b: ((b[0],), {}))

    with tempfile.TemporaryDirectory() as folder:
        whole = trainer(Path(folder) / "whole").fit(batches * 2, batches[:1], steps=18)
        resumed = trainer(Path(folder) / "whole").fit(batches * 2, batches[:1], steps=18,
                                                     resume=Path(folder) / "whole" / "step-00000009-0-periodic")
        same = all(torch.equal(a, b) for a, b in zip(whole.model.state_dict().values(),
                                                     resumed.model.state_dict().values()))
    return {"growths": [r["step"] for r in whole.history if r["event"] == "growth"], "bit_identical": same}


def optimizer_for_params(params, device: str):
    return torch.optim.AdamW(params, lr=1e-3, fused=device.startswith("cuda"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_smoke"))
    options = parser.parse_args()
    rows, failures = [], []
    for pass_name in PLANS:
        inits = {"add_layers": ("zero", "clone"), "upcycle_moe": ("zero",)}.get(pass_name, tuple(INITS))
        for init in inits:
            try:
                rows.append(case(pass_name, init, options))
            except Exception as error:  # a failing case is a result: recorded, the run goes on
                failures.append({"pass": pass_name, "init": init, "error": traceback.format_exc(limit=3)})
                print(f"{pass_name}/{init}: {type(error).__name__}: {error}")
    try:
        resumed = resume(options)
    except Exception:
        resumed = {"error": traceback.format_exc(limit=3)}
    import hooks

    overhead = hooks.measure("matrix", 7, options.quick, options.device)
    card = torch.cuda.get_device_name() if options.device.startswith("cuda") else platform.processor() or "CPU"
    table = ["| pass | init | policy | exact | s | on device | bf16 kept | loss before -> after -> +20 steps "
             "| growth peak / steady peak (GB) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['pass']} | {r['init']} | {r['policy']} | {r['exact']} | {r['seconds']:.2f} | "
                     f"{r['placed']} | {r['dtype_kept']} | {r['loss_before']:.4f} -> {r['loss_after']:.4f} -> "
                     f"{r['loss_20_steps']:.4f} | {r['growth_peak_gb']:.2f} / {r['steady_peak_gb']:.2f} |")
    text = "\n".join(table) + (f"\n\nProgressiveTrainer, two growths under bfloat16 autocast, resumed: {resumed}\n"
                               f"step hooks on a 4096 x 4096 matrix, overhead of an AdamW step: "
                               f"{ {k: round(v, 3) for k, v in overhead.items() if k.endswith('overhead')} }\n"
                               f"{len(failures)} failures; {time.strftime('%Y-%m-%d')}, {card}, torch "
                               f"{torch.__version__}\n")
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "results.md").write_text(text)
    (options.out / "results.json").write_text(json.dumps({"rows": rows, "failures": failures, "resume": resumed,
                                                          "hooks": overhead, "card": card}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
