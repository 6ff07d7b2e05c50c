"""The savings benchmark's pipeline (``benchmarks/savings.py --quick``): arms, branches, CSV schema, report.

It checks the pipeline, not the savings figure (that is the full benchmark's, in the README)."""

import csv
import importlib.util
import math
import sys
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("savings", Path(__file__).parents[1] / "benchmarks" / "savings.py")
savings = importlib.util.module_from_spec(spec)
sys.modules["savings"] = savings  # dataclasses look their module up
spec.loader.exec_module(savings)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("savings")
    assert savings.main(["--quick", "--out", str(out)]) == 0
    return out


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_every_run_is_fully_decayed_at_every_budget_and_charged_every_flop(quick):
    runs = rows(quick / "runs.csv")
    assert list(runs[0]) == savings.RUN_COLUMNS
    budgets = sorted({float(r["budget"]) for r in runs})
    assert len(budgets) == len(savings.QUICK.fractions)
    arms = {(r["arm"], r["variant"]) for r in runs}
    assert arms == {("small", ""), ("big", ""), ("grown", "default"), ("grown", "init=clone"),
                    ("grown", "optimizer=mapped")}
    for r in runs:  # each branch ends at its budget (within one step's FLOPs)
        assert float(r["budget"]) <= float(r["flops"]) < 1.1 * float(r["budget"])
    for r in (r for r in runs if r["arm"] == "grown" and float(r["budget"]) == budgets[-1]):
        assert float(r["grown_at_flops"]) == pytest.approx(0.4 * budgets[-1], rel=0.05)  # the fixed growth point
        assert float(r["loss_after_growth"]) == pytest.approx(float(r["loss_before_growth"]), rel=1e-5)  # exact


def test_the_curves_have_the_schema_and_the_decays_reach_zero(quick):
    curves = rows(quick / "curves.csv")
    assert list(curves[0]) == savings.CURVE_COLUMNS
    decayed = [r for r in curves if r["event"] == "decayed"]
    assert len(decayed) == 5 * len(savings.QUICK.fractions) and all(float(r["lr"]) == 0 for r in decayed)
    growths = [r for r in curves if r["event"] == "growth"]
    assert len(growths) == 3 and all(int(r["parameters"]) > 0 for r in growths)
    for arm in ("small", "big"):  # the stable runs count FLOPs up, step by step
        stable = [float(r["flops"]) for r in curves if r["arm"] == arm and r["budget"] == "stable"]
        assert stable == sorted(stable)
    assert (quick / "loss_vs_flops.png").read_bytes()[:4] == b"\x89PNG"
    assert (quick / "savings.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Savings against big from scratch" in (quick / "results.md").read_text()


def test_flops_to_reach_interpolates_in_log_flops():
    curve = [(1e9, 3.0), (4e9, 2.0), (1.6e10, 1.5)]
    assert savings.flops_to_reach(curve, 2.5) == pytest.approx(2e9)  # halfway in loss, geometric mean in FLOPs
    assert savings.flops_to_reach(curve, 3.5) == 1e9
    assert savings.flops_to_reach(curve, 1.0) is None
    assert math.isclose(savings.flops_to_reach(curve, 2.0), 4e9)
