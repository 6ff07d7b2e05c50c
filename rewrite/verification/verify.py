"""``verify``: two callables with the same signature compared on the same inputs, down to the first diverging node.

Every output leaf is compared with ``rewrite.ir.compare`` (tolerances relative to the output's own scale, by
dtype). When both sides are Graphs of this library, a failing comparison also runs both graphs node by node
and names the first compute node (in topological order of the reference) whose value differs beyond
tolerance. Nodes are matched by name; a grown graph's lineage carries ``node_map``, a dict from its node
names to ``(reference node name, projection)`` where ``projection`` maps its value back into the
reference's coordinates (growth passes use this to compare grown activations with original ones).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from pathlib import Path
from typing import Any, Callable

import torch

from rewrite.ir.compare import Row, compare_outputs
from rewrite.ir.frontends import eval_mode
from rewrite.ir.graph import Graph


@dataclasses.dataclass
class Report:
    """Outcome of a comparison. ``str(report)`` is a short table."""

    rows: list[Row]
    first_divergence: str | None = None
    title: str = "verify"
    notes: list[str] = dataclasses.field(default_factory=list)
    path: Path | None = None  # the file the comparison checked (an ONNX export)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # wall time by phase (an ONNX export)

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self.rows)

    @property
    def max_abs_error(self) -> float:
        return max((r.max_abs_error for r in self.rows), default=0.0)

    @property
    def max_rel_error(self) -> float:
        return max((r.max_rel_error for r in self.rows), default=0.0)

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        verdict = "OK" if self.ok else "MISMATCH"
        head = (
            f"{self.title}: {verdict}  max abs error {self.max_abs_error:.3g}, "
            f"max rel error {self.max_rel_error:.3g}"
        )
        width = max([len(r.name) for r in self.rows] + [6])
        lines = [head, f"  {'output':<{width}}  {'shape':<18} {'abs err':>10} {'rel err':>10} {'tol':>10}  ok"]
        for r in self.rows:
            shape = "x".join(map(str, r.shape)) if r.shape else "-"
            mark = "yes" if r.ok else "NO"
            note = f"  {r.note}" if r.note else ""
            lines.append(
                f"  {r.name:<{width}}  {shape:<18} {r.max_abs_error:>10.3g} {r.max_rel_error:>10.3g} "
                f"{r.tolerance:>10.3g}  {mark}{note}"
            )
        if self.first_divergence:
            lines.append(f"  first diverging node: {self.first_divergence}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def verify(
    reference: Callable,
    candidate: Callable,
    args: tuple = (),
    kwargs: dict | None = None,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    title: str = "verify",
) -> Report:
    """Run both callables on ``(args, kwargs)`` and compare every tensor of their outputs.

    Works for modules, GraphModules, Graphs and ONNX models wrapped by ``rewrite.OnnxModel``.
    Modules run in eval mode (their flags are restored); inputs a Graph's front-end fixed
    (``use_cache=False``) are passed to a plain module on the other side too.
    When both are Graphs and the outputs differ, ``first_divergence`` names the first node
    whose value differs beyond tolerance.
    """
    kwargs = dict(kwargs or {})
    args = tuple(args)
    fixed = {}
    for side in (reference, candidate):
        fixed.update(getattr(side, "fixed_kwargs", {}))
    with torch.no_grad(), _eval(reference), _eval(candidate):
        ref_out = reference(*args, **_with_fixed(reference, kwargs, fixed))
        cand_out = candidate(*args, **_with_fixed(candidate, kwargs, fixed))
    report = Report(compare_outputs(ref_out, cand_out, atol, rtol), title=title)
    if not report.ok and isinstance(reference, Graph) and isinstance(candidate, Graph):
        report.first_divergence = first_divergence(reference, candidate, args, kwargs, atol=atol, rtol=rtol)
    return report


def _eval(fn: Callable):
    """Modules are compared in eval mode (dropout off); their flags are restored afterwards."""
    return eval_mode(fn) if isinstance(fn, torch.nn.Module) else contextlib.nullcontext()


def _with_fixed(fn: Callable, kwargs: dict, fixed: dict) -> dict:
    """Inputs a Graph's front-end fixed (``use_cache=False``) also go to a plain module that takes them."""
    if not fixed or hasattr(fn, "fixed_kwargs") or not isinstance(fn, torch.nn.Module):
        return kwargs
    params = inspect.signature(fn.forward).parameters
    takes = {k: v for k, v in fixed.items() if k in params and k not in kwargs}
    return {**kwargs, **takes}


def first_divergence(
    reference, candidate, args: tuple = (), kwargs: dict | None = None, *, atol=None, rtol=None
) -> str | None:
    """Name of the first reference compute node whose value the candidate does not reproduce."""
    _, ref_values = reference.run(*args, **(kwargs or {}))
    _, cand_values = candidate.run(*args, **(kwargs or {}))
    node_map = candidate.lineage.node_map
    projected: dict[str, Any] = {}
    for cand_name, (ref_name, projection) in node_map.items():
        if cand_name in cand_values:
            try:
                projected[ref_name] = projection(cand_values[cand_name])
            except (RuntimeError, IndexError):  # a node-map entry that does not fit its node (known after
                continue  # split_layers on a graph grown twice by add_heads): that node is not compared
    for node in reference.compute_nodes():
        if node.name in projected:
            value = projected[node.name]
        elif node.name in cand_values and node.name not in node_map:
            value = cand_values[node.name]
        else:
            continue
        ref_value = ref_values.get(node.name)
        rows = compare_outputs(ref_value, value, atol, rtol)
        if not all(row.ok for row in rows):
            return node.name
    return None
