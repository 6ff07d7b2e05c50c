"""``apply(model, passes, args)``: the pass manager. Trace, plan and run growth passes and rules, verify, report.

Passes (width passes, rules, rule sets flattened into their rules) run in order, each on the result of the
one before. Every pass states its plan (sites, growth, exact or not and why, refused matches) before it
runs; with ``verify=True`` the grown graph is compared with the original on the example inputs after each
pass, intermediate values included through the growth mapping, and a pass claimed exact that fails raises
``VerificationError`` naming the first diverging node (after an approximate pass, an exact one is checked
against its own input). The report records, per pass, where it matched, which parameters it added,
removed, resized or renamed, and the measured error. The original model is never modified.
"""

from __future__ import annotations

import dataclasses

import torch

from rewrite.errors import GrowthError, VerificationError
from rewrite.ir.graph import Graph, Lineage
from rewrite.transform.growth_map import KEPT, GrowthMap
from rewrite.transform.growth_ops import rounded_by
from rewrite.transform.static_sizes import static_sizes
from rewrite.transform.plan import Plan
from rewrite.transform.rules import RuleSet
from rewrite.ir.frontends import first_line
from rewrite.ir.trace import trace
from rewrite.verification.verify import Report, verify


@dataclasses.dataclass
class PassRecord:
    """What one pass (or rule) did: where, to which parameters, exact or not, and the measured error."""

    name: str
    plan: Plan | None
    parameters_before: int
    parameters_after: int
    verification: Report | None = None
    refusals: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (site, reason)
    added: list[str] = dataclasses.field(default_factory=list)  # parameter names new in the grown graph
    removed: list[str] = dataclasses.field(default_factory=list)
    resized: list[str] = dataclasses.field(default_factory=list)
    renamed: list[str] = dataclasses.field(default_factory=list)  # moved by renumbering a layer stack
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def exact(self) -> bool | None:
        return None if self.plan is None else self.plan.exact

    def __str__(self) -> str:
        refused = "".join(f"\n    refused at {site}: {reason}" for site, reason in self.refusals)
        if self.plan is None:
            return f"{self.name}: matched nothing{refused}"
        error = "" if self.verification is None else (
            f"; measured max abs error {self.verification.max_abs_error:.3g}"
            f" (max rel {self.verification.max_rel_error:.3g})"
        )
        changed = ", ".join(
            f"{len(names)} {what}" for what, names in
            (("added", self.added), ("removed", self.removed), ("resized", self.resized),
             ("renamed", self.renamed)) if names
        )
        notes = "".join(f"\n    note: {note}" for note in self.notes)
        return (
            f"{self.name}: {self.plan.describe()}; parameters {self.parameters_before:,} -> "
            f"{self.parameters_after:,}" + (f" (tensors: {changed})" if changed else "") + f"{error}{refused}{notes}"
        )


@dataclasses.dataclass
class GrowthReport:
    passes: list[PassRecord]

    @property
    def exact(self) -> bool:
        return all(record.exact is not False for record in self.passes)

    def __str__(self) -> str:
        return "\n".join(["growth report:"] + [f"  {record}" for record in self.passes])


class GrownModule(torch.nn.Module):
    """The grown graph as a module called exactly like the original (fixed inputs filled in). Its parameters
    and buffers go by the original model's names (``model.layers.0.mlp.up_proj.weight``): it shares the
    GraphModule's submodules and tensors rather than nesting it, so a state dict moves between the original,
    the grown module and the native class without renaming."""

    def __init__(self, graph: Graph):
        super().__init__()
        self._modules = graph.module._modules
        self._parameters = graph.module._parameters
        self._buffers = graph.module._buffers
        self._non_persistent_buffers_set = graph.module._non_persistent_buffers_set
        object.__setattr__(self, "graph", graph)  # not a submodule: its tensors are this module's own

    def forward(self, *args, **kwargs):
        return self.graph(*args, **kwargs)


@dataclasses.dataclass
class Grown:
    module: torch.nn.Module
    graph: Graph
    report: GrowthReport
    original: Graph  # the traced original: its tensors are the model's own (what an optimizer holds)

    @property
    def map(self) -> GrowthMap:
        """How every tensor of the grown model is made from the tensors of the model (or graph) ``apply`` grew
        (``rewrite.GrowthMap``)."""
        return self.graph.lineage.growth_map


def apply(model: torch.nn.Module | Graph, passes: list, args=(), kwargs: dict | None = None, *,
          verify: bool = True, strict: bool = False) -> Grown:
    """Grow ``model`` with ``passes`` in order; see the module docstring."""
    args = args if isinstance(args, tuple) else (args,)
    kwargs = dict(kwargs or {})
    original = model if isinstance(model, Graph) else trace(model, args, kwargs)
    if isinstance(model, Graph) and (original.lineage.growth_map is not None or original.lineage.node_map):
        # a graph grown before: this growth is relative to it (the map from its tensors, the node map onto its
        # nodes); where modules came from keeps pointing at the traced model
        original = original.with_module(original.module, Lineage(origins=original.lineage.origins))
    original = static_sizes(original)  # the fx graph's shape reads of weight-fixed axes as literals
    current = original
    shapes = _parameter_shapes(current)
    records = []
    for growth in _flatten(passes):
        before = _count(shapes)
        plan = growth.plan(current)
        if plan.empty:
            if strict:
                why = "".join(f"; at {site}: {reason}" for site, reason in plan.refusals)
                raise GrowthError(f"{growth.name} matched nothing{why}")
            records.append(PassRecord(growth.name, None, before, before, refusals=plan.refusals))
            continue
        # an intermediate this loop made is replaced by the pass's result: its tensors may move on
        handed = current.handed_over() if current is not original else current
        previous, current = current, growth.run(handed, plan)
        moves = _moves(current.lineage.step_map)
        renamed = [name for name in shapes if moves.get(name, name) != name]
        old_shapes = {moves.get(name, name): shape for name, shape in shapes.items()}
        shapes = _parameter_shapes(current)
        record = PassRecord(
            growth.name, plan, before, _count(shapes), refusals=plan.refusals,
            added=[n for n in shapes if n not in old_shapes],
            removed=[n for n in old_shapes if n not in shapes],
            resized=[n for n in shapes if n in old_shapes and shapes[n] != old_shapes[n]],
            renamed=renamed, notes=_rounding(current.lineage.step_map) if plan.exact else [],
        )
        if verify:  # the error against the original; an exact pass after an approximate one is checked
            exact_so_far = all(r.exact is not False for r in records)  # against its own input as well
            record.verification = _check(original, current, args, kwargs, growth.name, plan, exact_so_far)
            if not exact_so_far and plan.exact:
                _check(previous, current, args, kwargs, growth.name, plan, True)
        records.append(record)
    if current.lineage.growth_map is None:  # nothing grew: the map of the model onto itself
        current = current.with_module(current.module, Lineage(growth_map=GrowthMap.identity(current.module)))
    return Grown(GrownModule(current), current, GrowthReport(records), original)


def _moves(step: GrowthMap | None) -> dict[str, str]:
    """Tensor name in the previous graph -> its name after the pass, for tensors the pass kept."""
    if step is None:
        return {}
    return {recipe.source: name for name, recipe in step.recipes.items() if recipe.role == KEPT}


def _rounding(step: GrowthMap | None) -> list[str]:
    """A note when an exact plan's factors round in the model's dtype (``growth_ops.rounded_by``)."""
    rounded = {name: (recipe.dtype, factors) for name, recipe in (step.recipes.items() if step else ())
               if (factors := rounded_by(recipe.ops, recipe.dtype))}
    if not rounded:
        return []
    dtype = next(iter(rounded.values()))[0]
    factors = sorted({f for _, fs in rounded.values() for f in fs})
    names = list(rounded)
    return [f"exact in real arithmetic, but {len(names)} tensors ({', '.join(names[:2])}"
            f"{', ...' if len(names) > 2 else ''}) are multiplied by {', '.join(f'{f:.4g}' for f in factors[:4])}, "
            f"which {str(dtype).removeprefix('torch.')} rounds (relative error up to "
            f"{torch.finfo(dtype).eps / 2:.2g} per weight): the grown function matches to that precision"]


def _parameter_shapes(graph: Graph) -> dict[str, torch.Size]:
    """Every learnable parameter (tied ones once) with its shape."""
    return {name: info.shape for name, info in graph.parameters().items()}


def _count(shapes: dict[str, torch.Size]) -> int:
    return sum(shape.numel() for shape in shapes.values())


def _flatten(passes) -> list:
    """Rule sets run as their rules, in order, each recorded on its own."""
    flat = []
    for growth in passes:
        flat.extend(growth) if isinstance(growth, RuleSet) else flat.append(growth)
    return flat


def _check(original: Graph, grown: Graph, args: tuple, kwargs: dict, name: str, plan: Plan,
           enforce: bool) -> Report:
    try:
        report = verify(original, grown, args, kwargs, title=f"after {name}")
    except Exception as e:  # noqa: BLE001 - a grown graph that does not run is a bug in a rule: say which
        raise GrowthError(f"the graph grown by {name} does not run: {first_line(e)}") from e
    if not report.ok and plan.exact and enforce:
        raise VerificationError(f"{name} was planned exact but changes the outputs", report)
    return report


__all__ = ["Grown", "GrownModule", "GrowthReport", "PassRecord", "apply"]
