"""growfx engine: trace models into one graph IR, grow them with passes and rules, verify, export.

Public surface::

    graph = rewrite.trace(model, args, kwargs)           # -> rewrite.Graph
    report = rewrite.verify(reference, candidate, args)  # -> rewrite.Report
    report = rewrite.export_onnx(graph, args, "m.onnx")  # -> rewrite.Report (torch vs onnxruntime)
    groups = rewrite.dim_groups(graph)                   # axes that must grow together
    grown = rewrite.apply(model, [passes.widen("fc", factor=2)], args)  # -> rewrite.Grown
    grown.map.apply(model.state_dict())                  # the grown state dict, from the growth map alone

    @rewrite.rule(rewrite.op("linear", "proj", module="*attn.o*"))  # your own structural rule
    def adapter(match, edit): ...                                     # edit: rewrite.Editor

The engine is layered (``docs/architecture.md``): ``ir`` < ``ops`` ... ``app``; this module re-exports the API.
"""

from rewrite.analysis.blocks import Block, blocks
from rewrite.analysis.dims import DimGroup, Member, dim_analysis, dim_groups
from rewrite.errors import (
    GrowfxError,
    GrowthError,
    InputError,
    NotExactError,
    NotRepresentableError,
    TraceError,
    UnsupportedOpError,
    VerificationError,
)
from rewrite.io.native import to_native
from rewrite.io.onnx_export import OnnxModel, export_onnx
from rewrite.ir.compare import Row
from rewrite.ir.graph import Graph, Lineage, TensorInfo
from rewrite.ir.trace import trace
from rewrite.training.carry import Carried, carry, carry_optimizer, carry_scheduler
from rewrite.training.progressive import ProgressiveTrainer
from rewrite.transform.apply import Grown, GrownModule, GrowthReport, PassRecord, apply
from rewrite.transform.edit import Editor
from rewrite.transform.growth_map import GrowthMap, Recipe
from rewrite.transform.growth_ops import Fill, Noise, Redraw, Scale, Split, Take
from rewrite.transform.pattern import Match, block, mlp, op, optional, residual
from rewrite.transform.policy import Policy
from rewrite.transform.rules import Rule, RuleSet, rule
from rewrite.verification.verify import Report, verify


def __getattr__(name: str):
    if name == "GrowingTrainer":  # imports transformers.Trainer (and accelerate): only when asked for
        from rewrite.training.hf_trainer import GrowingTrainer

        return GrowingTrainer
    raise AttributeError(f"module 'rewrite' has no attribute {name!r}")


__all__ = [
    "Block", "DimGroup", "Editor", "Fill", "Graph", "GrowfxError", "Grown", "GrownModule", "GrowthError",
    "GrowthMap", "GrowthReport", "InputError", "Lineage", "Match", "Member", "Noise", "NotExactError",
    "NotRepresentableError", "OnnxModel", "PassRecord", "Policy", "ProgressiveTrainer", "Recipe", "Redraw", "Report", "Row", "Rule",
    "RuleSet", "Scale", "Split", "Take", "TensorInfo", "TraceError", "UnsupportedOpError", "VerificationError",
    "Carried", "GrowingTrainer", "apply", "block", "blocks", "carry", "carry_optimizer", "carry_scheduler", "dim_analysis", "dim_groups", "export_onnx", "mlp", "op", "optional", "residual",
    "rule", "to_native", "trace", "verify",
]
