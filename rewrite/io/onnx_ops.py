"""ONNX translations for ops torch's exporter has none for (``custom_translation_table`` of ``torch.onnx.export``).

Grouped matrix product (``aten._grouped_mm``, and ``transformers.grouped_mm_fallback``, the op a Hugging Face
mixture of experts runs by default on CPU): rows of ``a`` (M, K) are sorted by group, ``offs`` (G,) holds each
group's cumulative end, and

    out[r] = a[r] @ b[g(r)],   g(r) = the group whose rows [offs[g-1], offs[g]) hold r,   b: (G, K, N)

With G static (the number of experts, a weight's first size) it unrolls into one ``Slice`` + ``MatMul`` per
group and a ``Concat``: no (M, K, N) gather of per-row weights.
"""

from __future__ import annotations

import torch


def translations() -> dict:
    """{op overload: onnxscript function} for ``torch.onnx.export(custom_translation_table=...)``."""
    from onnxscript import opset18 as op
    from onnxscript.function_libs.torch_lib.ops.core import INT64, TReal

    def grouped_mm(a: TReal, b: TReal, offs: INT64, bias=None, out_dtype=None) -> TReal:
        groups = b.shape[0]
        if not isinstance(groups, int):
            raise ValueError("a grouped matrix product needs a static number of groups (its weight's first size)")
        if out_dtype is not None:
            raise ValueError("a grouped matrix product with out_dtype has no ONNX translation here")
        ends = op.Split(op.Cast(offs, to=7), axis=0, num_outputs=groups) if groups > 1 else [op.Cast(offs, to=7)]
        weights = op.Split(b, axis=0, num_outputs=groups) if groups > 1 else [b]
        axis = op.Constant(value_ints=[0])
        start = op.Constant(value_ints=[0])
        parts = []
        for g in range(groups):
            rows = op.Slice(a, start, ends[g], axis)
            part = op.MatMul(rows, op.Squeeze(weights[g], axis))
            if bias is not None:
                part = op.Add(part, op.Squeeze(op.Slice(bias, op.Constant(value_ints=[g]),
                                                        op.Constant(value_ints=[g + 1]), axis), axis))
            parts.append(part)
            start = ends[g]
        return op.Concat(*parts, axis=0)

    table = {torch.ops.aten._grouped_mm.default: grouped_mm}
    fallback = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    if fallback is not None:  # registered when transformers' mixture-of-experts integration is imported
        table[fallback.default] = grouped_mm
    return table
