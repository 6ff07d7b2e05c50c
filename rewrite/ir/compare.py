"""Numerical comparison of values: one output leaf against another, with tolerances by dtype.

Tolerance for a tensor with reference ``r`` and candidate ``c``:
    ``max|c - r| <= atol + rtol * scale``, ``scale = max|r|`` (the output's own scale),
so one ``rtol`` fits logits of size 30 and hidden states of size 1. Defaults follow the reference dtype:

    dtype                              rtol    atol
    float64                            1e-10   1e-12
    float32                            1e-5    1e-7
    float32, TF32 matmuls ("high")     5e-3    1e-5
    float32, bfloat16 matmuls ("medium") as bfloat16
    bfloat16                           2e-2    1e-3
    float16                            1e-2    1e-4

(the float32 rows follow ``torch.get_float32_matmul_precision()``: on a GPU, ``high`` lets matrix products
round their inputs to TF32's 10-bit mantissa, ``medium`` to bfloat16's).

Integer and boolean tensors must be equal; other leaves (None, ints, strings) must compare equal. The IR uses
it to check that a trace reproduces its model; ``rewrite.verification`` builds reports and first divergences on it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.utils._pytree as pytree

TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-7),
    torch.bfloat16: (2e-2, 1e-3),
    torch.float16: (1e-2, 1e-4),
}


TF32 = (5e-3, 1e-5)  # float32 tensors whose matrix products ran in TF32


def default_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) for a reference of this dtype, under the current float32 matmul precision."""
    if dtype == torch.float32:
        precision = torch.get_float32_matmul_precision()
        if precision == "high":
            return TF32
        if precision == "medium":
            return TOLERANCES[torch.bfloat16]
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
    session returns) is compared position by position, and that two output classes with the same leaf names
    (``CausalLMOutputWithPast`` and a mixture's ``MoeCausalLMOutputWithPast``) are compared by name.
    """
    ref_leaves, ref_spec = pytree.tree_flatten_with_path(reference)
    cand_leaves, cand_spec = pytree.tree_flatten_with_path(candidate)
    flat_candidate = cand_spec.type in (list, tuple) or cand_spec.is_leaf()
    same_names = [leaf_name(p) for p, _ in ref_leaves] == [leaf_name(p) for p, _ in cand_leaves]
    if len(ref_leaves) != len(cand_leaves) or (ref_spec != cand_spec and not flat_candidate and not same_names):
        note = f"output structure differs: {_structure(ref_spec)} vs {_structure(cand_spec)}"
        return [Row("output", None, float("inf"), float("inf"), 0.0, False, note)]
    return [
        compare_tensors(leaf_name(path), ref, cand, atol, rtol)
        for (path, ref), (_, cand) in zip(ref_leaves, cand_leaves)
    ]


def _structure(spec) -> str:
    name = getattr(spec.type, "__name__", str(spec.type)) if spec.type is not None else "tensor"
    return f"{name} of {spec.num_leaves} leaves"
