"""Do gradients follow the dual of the growth map? The largest disagreement over every pass and exact policy.

    python examples/bench_gradients.py

For each zoo model (GPT, Llama, Hugging Face Llama and GPT-2; fp32) and each width pass with each exact policy,
and each depth pass: 3 AdamW steps on the original, grow (verified), then compare the grown model's gradients
on a batch with ``grown.map.apply(original_gradients, kind="gradient")`` on every entry growth did not add.
Reported: the largest difference relative to the largest original gradient (``tests/test_carry.py`` asserts
1e-5), and the cases refused as not exact.
"""

import torch
import torch.nn.functional as F

import passes
import rewrite
from rewrite.app import zoo

MODELS = {"gpt": 1, "llama": 2, "hf-llama": 2, "hf-gpt2": 1}  # query heads per key-value head


def plans(ratio: int):
    for init in ("zero", "clone", "net2net"):
        yield f"widen_mlp({init})", [passes.widen_mlp(factor=2, init=init)]
        yield f"add_heads({init})", [passes.add_heads((4 if init == "clone" else 2) * ratio, init=init)]
        yield f"widen_heads(v, {init})", [passes.widen_heads(v=16 if init == "clone" else 12, init=init)]
        yield f"widen_hidden({init})", [passes.widen_hidden(factor=2, init=init)]
    yield "add_layers(zero)", [passes.add_layers(1, at=0)]
    yield "add_layers(copy)", [passes.add_layers(1, init="copy")]
    yield "upcycle_moe", [passes.upcycle_moe(2, top_k=1)]


def disagreement(name: str, plan: list) -> float | None:
    built = zoo.build(name)
    model = built.model.eval()
    logits = (lambda out: out.logits if hasattr(out, "logits") else out)
    vocab = logits(model(*built.args)).shape[-1]
    target = torch.randint(0, vocab, logits(model(*built.args)).shape[:-1])
    loss = (lambda m: F.cross_entropy(logits(m(*built.args)).reshape(-1, vocab), target.reshape(-1)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        loss(model).backward()
        optimizer.step()
    try:
        grown = rewrite.apply(model, plan, built.args, built.kwargs)
    except rewrite.NotExactError:
        return None
    model.zero_grad()
    loss(model).backward()
    original = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    loss(grown.module).backward()
    actual = {n: p.grad for n, p in grown.module.named_parameters()}
    scale = max(float(g.abs().max()) for g in original.values())
    worst = 0.0
    for param, value in grown.map.apply(original, kind="gradient").items():
        old = ~grown.map.new_entries(param)
        if old.any():
            worst = max(worst, float((actual[param][old] - value[old]).abs().max()) / scale)
    return worst


def main() -> None:
    torch.manual_seed(0)
    worst, cases, refused = 0.0, 0, []
    for name, ratio in MODELS.items():
        for label, plan in plans(ratio):
            try:
                error = disagreement(name, plan)
            except rewrite.GrowthError as e:  # a refusal other than inexactness (e.g. RoPE for qk)
                refused.append(f"{name} {label}: {str(e)[:80]}")
                continue
            if error is None:
                refused.append(f"{name} {label}: not exact")
                continue
            cases += 1
            worst = max(worst, error)
    print(f"{cases} cases: largest gradient disagreement on old entries {worst:.2g} of the gradient scale")
    print(f"refused ({len(refused)}): " + "; ".join(refused))


if __name__ == "__main__":
    main()
