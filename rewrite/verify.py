"""Numerical comparison of two callables with the same signature, down to the first diverging node.

Tolerance for a tensor with reference ``r`` and candidate ``c``:
    ``max|c - r| <= atol + rtol * scale``, ``scale = max|r|`` (the output's own scale),
so one ``rtol`` fits logits of size 30 and hidden states of size 1. Defaults follow the reference dtype:

    dtype      rtol    atol
    float64    1e-10   1e-12
    float32    1e-5    1e-7
    bfloat16   2e-2    1e-3
    float16    1e-2    1e-4

Integer and boolean tensors must be equal; other leaves (None, ints, strings) must compare equal.
When both sides are Graphs of this library, a failing comparison also runs both graphs node by node
and names the first compute node (in topological order of the reference) whose value differs beyond
tolerance. Nodes are matched by name; a candidate graph may carry ``node_map``, a dict from its node
names to ``(reference node name, projection)`` where ``projection`` maps its value back into the
reference's coordinates (growth passes use this to compare grown activations with original ones).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-7),
    torch.bfloat16: (2e-2, 1e-3),
    torch.float16: (1e-2, 1e-4),
}


def default_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) for a reference of this dtype."""
    return TOLERANCES.get(dtype, (0.0, 0.0))


@dataclasses.dataclass
class Row:
    """The comparison of one output leaf (or one intermediate node)."""

    name: str
    shape: tuple | None
    max_abs_error: float
    max_rel_error: float  # max abs error / scale of the reference
    tolerance: float
    ok: bool
    note: str = ""


@dataclasses.dataclass
class Report:
    """Outcome of a comparison. ``str(report)`` is a short table."""

    rows: list[Row]
    first_divergence: str | None = None
    title: str = "verify"
    notes: list[str] = dataclasses.field(default_factory=list)

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


def compare_tensors(
    name: str, reference: Any, candidate: Any, atol: float | None = None, rtol: float | None = None
) -> Row:
    """Compare one leaf of two outputs."""
    if not isinstance(reference, torch.Tensor) or not isinstance(candidate, torch.Tensor):
        same = type(reference) is type(candidate) and same_value(reference, candidate)
        note = "" if same else f"{_describe(reference)} != {_describe(candidate)}"
        return Row(name, None, 0.0 if same else float("inf"), 0.0 if same else float("inf"), 0.0, same, note)
    shape = tuple(reference.shape)
    if reference.shape != candidate.shape:
        note = f"shape {list(reference.shape)} != {list(candidate.shape)}"
        return Row(name, shape, float("inf"), float("inf"), 0.0, False, note)
    ref = reference.detach()
    cand = candidate.detach()
    if not ref.is_floating_point() and not ref.is_complex():
        equal = bool(torch.equal(ref.cpu(), cand.cpu().to(ref.dtype)))
        err = 0.0 if equal else float("inf")
        return Row(name, shape, err, err, 0.0, equal, "" if equal else "integer values differ")
    d_rtol, d_atol = default_tolerance(ref.dtype)
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    ref64 = ref.cpu().to(torch.float64)
    diff = (cand.cpu().to(torch.float64) - ref64).abs()
    if diff.numel() == 0:
        return Row(name, shape, 0.0, 0.0, atol, True)
    nan_mismatch = bool((torch.isnan(diff) & ~torch.isnan(ref64)).any())
    finite = torch.isfinite(ref64)
    scale = float(ref64[finite].abs().max()) if finite.any() else 0.0
    max_abs = float(torch.nan_to_num(diff, nan=0.0).max())
    tolerance = atol + rtol * scale
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    ok = max_abs <= tolerance and not nan_mismatch
    return Row(name, shape, max_abs, rel, tolerance, ok, "NaN where the reference is finite" if nan_mismatch else "")


def same_value(a: Any, b: Any) -> bool:
    """``a == b`` for non-tensor values; values that cannot be compared are different."""
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - an incomparable leaf is a mismatch, not a crash
        return False


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)}"
    text = repr(value)
    return text if len(text) < 40 else type(value).__name__


def leaf_name(path) -> str:
    """A pytree path as a dotted name: ``logits``, ``hidden_states.1``; ``output`` for a bare tensor."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return ".".join(parts) or "output"


def compare_outputs(
    reference: Any, candidate: Any, atol: float | None = None, rtol: float | None = None
) -> list[Row]:
    """One row per leaf of the reference's output structure (``ModelOutput`` fields by name).

    The structures must match, except that a flat tuple or list with as many leaves (what an ONNX
    session returns) is compared position by position.
    """
    ref_leaves, ref_spec = pytree.tree_flatten_with_path(reference)
    cand_leaves, cand_spec = pytree.tree_flatten_with_path(candidate)
    flat_candidate = cand_spec.type in (list, tuple) or cand_spec.is_leaf()
    if len(ref_leaves) != len(cand_leaves) or (ref_spec != cand_spec and not flat_candidate):
        note = f"output structure differs: {_structure(ref_spec)} vs {_structure(cand_spec)}"
        return [Row("output", None, float("inf"), float("inf"), 0.0, False, note)]
    return [
        compare_tensors(leaf_name(path), ref, cand, atol, rtol)
        for (path, ref), (_, cand) in zip(ref_leaves, cand_leaves)
    ]


def _structure(spec) -> str:
    name = getattr(spec.type, "__name__", str(spec.type)) if spec.type is not None else "tensor"
    return f"{name} of {spec.num_leaves} leaves"


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
    from .graph import Graph

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
    from .frontends import eval_mode

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
    node_map: dict = getattr(candidate, "node_map", None) or {}
    projected: dict[str, Any] = {}
    for cand_name, (ref_name, projection) in node_map.items():
        if cand_name in cand_values:
            projected[ref_name] = projection(cand_values[cand_name])
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
