"""The savings benchmark's pipeline (``benchmarks/savings.py --quick``): arms, branches, CSV schema, report.

It checks the pipeline, not the savings figure (that is the full benchmark's, in the README)."""

import csv
import json
import math
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))  # the worker processes import it by name too
import savings  # noqa: E402


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
                    ("grown", "init=sparkling")}
    for r in runs:  # each branch ends at its budget (within one step's FLOPs)
        assert float(r["budget"]) <= float(r["flops"]) < 1.1 * float(r["budget"])
    for r in (r for r in runs if r["arm"] == "grown" and float(r["budget"]) == budgets[-1]):
        assert float(r["grown_at_flops"]) == pytest.approx(0.2 * budgets[-1], rel=0.05)  # the fixed growth point
        after, before = float(r["loss_after_growth"]), float(r["loss_before_growth"])
        if r["variant"] == "init=sparkling":  # keeps activation RMS, not the function
            assert after != before
        else:
            assert after == pytest.approx(before, rel=1e-5)  # exact


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


def test_runs_go_to_worker_processes_and_a_rerun_continues_where_it_stopped(quick):
    invocation = json.loads((quick / "invocation.json").read_text())
    assert invocation["runs"] == 5 and invocation["workers"] == min(2, os.cpu_count())
    assert sorted(p.name for p in (quick / "runs").iterdir()) == sorted(
        f"{arm}-{variant}-0.{kind}.csv" for arm, variant in (("small", ""), ("big", ""), ("grown", "default"),
                                                              ("grown", "init=clone"), ("grown", "init=sparkling"))
        for kind in ("curves", "runs"))
    merged = (quick / "runs.csv").read_text()
    (quick / "runs" / "big--0.runs.csv").unlink()  # as if interrupted during that run
    assert savings.main(["--quick", "--out", str(quick), "--workers", "1"]) == 0
    assert json.loads((quick / "invocation.json").read_text())["runs"] == 1  # only the missing run again
    assert len((quick / "runs.csv").read_text()) == len(merged)


def test_rewarm_restarts_the_learning_rate_from_zero_after_growth():
    run = object.__new__(savings.Run)
    run.setup, run.variant, run.grown_at, run.grown_step = savings.Setup(), savings.Variant("r", rewarm=200), 1.0, 500
    lrs = []
    for run.step in (500, 599, 699, 900):  # grown at step 500
        lrs.append(run.stable_lr())
    run.variant = savings.Variant("default")
    lrs.append(run.stable_lr())
    assert lrs == pytest.approx([3e-3 * f for f in (1 / 200, 100 / 200, 1.0, 1.0, 1.0)])


def test_flops_to_reach_interpolates_in_log_flops():
    curve = [(1e9, 3.0), (4e9, 2.0), (1.6e10, 1.5)]
    assert savings.flops_to_reach(curve, 2.5) == pytest.approx(2e9)  # halfway in loss, geometric mean in FLOPs
    assert savings.flops_to_reach(curve, 3.5) == 1e9
    assert savings.flops_to_reach(curve, 1.0) is None
    assert math.isclose(savings.flops_to_reach(curve, 2.0), 4e9)
