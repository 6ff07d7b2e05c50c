"""growfx engine: trace models into one graph IR, verify rewrites numerically, export to ONNX.

Public surface::

    graph = rewrite.trace(model, args, kwargs)           # -> rewrite.Graph
    report = rewrite.verify(reference, candidate, args)  # -> rewrite.Report
    report = rewrite.export_onnx(graph, args, "m.onnx")  # -> rewrite.Report (torch vs onnxruntime)
    groups = graph.dim_groups()                           # axes that must grow together
    grown = rewrite.apply(model, [passes.widen("fc", factor=2)], args)  # -> rewrite.Grown

    @rewrite.rule(rewrite.op("linear", "proj", module="*attn.o*"))  # your own structural rule
    def adapter(match, edit): ...                                     # edit: rewrite.Editor
"""

from .apply import Grown, GrowthReport, PassRecord, apply
from .blocks import Block, blocks
from .edit import Editor
from .pattern import Match, block, mlp, op, optional, residual
from .rules import Rule, RuleSet, rule
from .errors import (
    GrowfxError,
    GrowthError,
    InputError,
    NotExactError,
    NotRepresentableError,
    TraceError,
    UnsupportedOpError,
    VerificationError,
)
from .dims import DimGroup, Member
from .graph import Graph, TensorInfo
from .native import to_native
from .onnx_export import OnnxModel, export_onnx
from .trace import trace
from .verify import Report, Row, verify

__all__ = [
    "Block",
    "Editor",
    "Match",
    "PassRecord",
    "Rule",
    "RuleSet",
    "block",
    "blocks",
    "mlp",
    "op",
    "optional",
    "residual",
    "rule",
    "DimGroup",
    "Grown",
    "GrowthError",
    "GrowthReport",
    "NotExactError",
    "NotRepresentableError",
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
    "to_native",
    "trace",
    "verify",
]
