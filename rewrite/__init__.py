"""growfx engine: trace models into one graph IR, verify rewrites numerically, export to ONNX.

Public surface::

    graph = rewrite.trace(model, args, kwargs)           # -> rewrite.Graph
    report = rewrite.verify(reference, candidate, args)  # -> rewrite.Report
    report = rewrite.export_onnx(graph, args, "m.onnx")  # -> rewrite.Report (torch vs onnxruntime)
    groups = graph.dim_groups()                           # axes that must grow together
    grown = rewrite.apply(model, [passes.widen("fc", factor=2)], args)  # -> rewrite.Grown
"""

from .apply import Grown, GrowthReport, apply
from .errors import (
    GrowfxError,
    GrowthError,
    InputError,
    NotExactError,
    TraceError,
    UnsupportedOpError,
    VerificationError,
)
from .dims import DimGroup, Member
from .graph import Graph, TensorInfo
from .onnx_export import OnnxModel, export_onnx
from .trace import trace
from .verify import Report, Row, verify

__all__ = [
    "DimGroup",
    "Grown",
    "GrowthError",
    "GrowthReport",
    "NotExactError",
    "VerificationError",
    "apply",
    "Member",
    "Graph",
    "GrowfxError",
    "InputError",
    "OnnxModel",
    "Report",
    "Row",
    "TensorInfo",
    "TraceError",
    "UnsupportedOpError",
    "export_onnx",
    "trace",
    "verify",
]
