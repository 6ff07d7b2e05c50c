"""Every pass on every Hugging Face family we can build offline: what holds, what is refused, and why.

    python examples/bench_families.py [--markdown]

Each family is built from a tiny config with random weights (``rewrite.zoo``: the zoo's five and five
more, each with a structure the others lack). Each pass runs alone through ``rewrite.apply`` with
verification, then ``rewrite.to_native``. A cell reads:

* ``exact``: verified exact (max abs error <= tolerance), checked again on fresh inputs of another batch
  size and sequence length than the example inputs the graph was traced with, and the native class holds it
  (``native``, checked on the fresh inputs too) or not (``graph``, with the reason ``to_native`` gave);
* ``approx e``: an approximate pass, its measured max abs output error ``e``;
* ``refused``: the pass said no, with its reason (a ``GrowfxError``: never a crash, never a silent change);
* ``no match``: the pass found nothing to grow.

The command ends non-zero if any cell is a crash (an exception that is not a ``GrowfxError``) or ``WRONG``
(an exact cell whose grown graph or native model differs from the original on the fresh inputs).
"""

import argparse
import sys
import time
import warnings

import torch

import passes
import rewrite
from rewrite.app import zoo
from rewrite.io.hf import TOKENS, example_inputs
from rewrite.ir.compare import compare_tensors

PASSES = {
    "add_layers(1)": lambda: [passes.add_layers(1)],
    "add_layers(1, copy)": lambda: [passes.add_layers(1, init="copy")],
    "split_layers(2, [0])": lambda: [passes.split_layers(2, layers=[0])],
    "widen_mlp(2)": lambda: [passes.widen_mlp(factor=2)],
    "add_heads(2)": lambda: [passes.add_heads(2)],
    "widen_hidden(2)": lambda: [passes.widen_hidden(factor=2)],
    "widen_hidden(2, clone)": lambda: [passes.widen_hidden(factor=2, init="clone")],
    "upcycle_moe(4, 2)": lambda: [passes.upcycle_moe(4, 2)],
}
MODELS = ["hf-gpt2", "hf-llama", "hf-qwen2", "hf-bert", "hf-mixtral", *zoo.FAMILIES]


def _short(error: BaseException, width: int = 110) -> str:
    text = str(error).splitlines()[0]
    return text if len(text) <= width else text[: width - 1] + "…"


def cell(built, make_plan) -> tuple[str, str, bool]:
    """(short result, reason or "", crashed)."""
    try:
        grown = rewrite.apply(built.model, make_plan(), built.args, built.kwargs)
    except rewrite.GrowfxError as e:
        return "refused", _short(e), False
    except Exception as e:  # noqa: BLE001 - reported as a crash, and the run fails
        return "CRASH", f"{type(e).__name__}: {_short(e)}", True
    record = grown.report.passes[0]
    if record.plan is None:
        return "no match", "", False
    head = "exact" if record.exact else f"approx {record.verification.max_abs_error:.2g}"
    fresh = example_inputs(built.model, batch=3, length=TOKENS[1] + 3)
    if record.exact and (wrong := _differs(built.model, grown.module, fresh)):
        return "WRONG", f"grown graph on fresh inputs: {wrong}", True
    try:
        native = rewrite.to_native(grown, like=built.model)
    except rewrite.GrowfxError as e:
        return f"{head}, graph", _short(e), False
    except Exception as e:  # noqa: BLE001
        return f"{head}, native CRASH", f"{type(e).__name__}: {_short(e)}", True
    if record.exact and (wrong := _differs(built.model, native, fresh)):
        return "WRONG", f"native {type(native).__name__} on fresh inputs: {wrong}", True
    moved = "" if type(native) is type(built.model) else f" {type(native).__name__}"  # an upcycled dense model
    return f"{head}, native{moved}", "", False


def _differs(original, candidate, inputs) -> str:
    """How ``candidate``'s main output (logits, else the last hidden state) differs from ``original``'s on
    ``inputs`` ("" when it does not)."""
    args, kwargs = inputs
    with torch.no_grad():
        row = compare_tensors("output", _main(original(*args, **kwargs)), _main(candidate(*args, **kwargs)))
    return "" if row.ok else f"max abs error {row.max_abs_error:.3g} {row.note}".strip()


def _main(output) -> torch.Tensor:
    for name in ("logits", "last_hidden_state"):
        if getattr(output, name, None) is not None:
            return getattr(output, name)
    return output[0] if isinstance(output, (tuple, list)) else output


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="one markdown matrix, then the reasons")
    options = parser.parse_args()
    warnings.filterwarnings("ignore")
    crashes, start, table, reasons = 0, time.perf_counter(), {}, []
    for name in MODELS:
        built = zoo.build(name)
        torch.manual_seed(0)
        for pass_name, make_plan in PASSES.items():
            result, reason, crashed = cell(built, make_plan)
            crashes += crashed
            table[name, pass_name] = result
            if reason:
                reasons.append((name, pass_name, reason))
            if not options.markdown:
                print(f"{name:11s} {pass_name:24s} {result}{f'  ({reason})' if reason else ''}", flush=True)
    if options.markdown:
        print("| model | " + " | ".join(f"`{p}`" for p in PASSES) + " |")
        print("|---" * (len(PASSES) + 1) + "|")
        for name in MODELS:
            print(f"| {name} | " + " | ".join(table[name, p] for p in PASSES) + " |")
        print()
        print("\n".join(f"- {name}, `{p}`: {reason}" for name, p, reason in reasons))
    print(f"\n{len(MODELS)} models x {len(PASSES)} passes in {time.perf_counter() - start:.0f} s; crashes or wrong: "
          f"{crashes}")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
