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

from .errors import GrowthError, VerificationError
from .graph import Graph
from .names import moved
from .plan import Plan
from .rules import RuleSet
from .trace import trace
from .verify import Report, verify


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
        return (
            f"{self.name}: {self.plan.describe()}; parameters {self.parameters_before:,} -> "
            f"{self.parameters_after:,}" + (f" (tensors: {changed})" if changed else "") + f"{error}{refused}"
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
    """The grown graph as a module called exactly like the original (fixed inputs filled in)."""

    def __init__(self, graph: Graph):
        super().__init__()
        self.graph_module = graph.module
        self._graph = graph

    def forward(self, *args, **kwargs):
        return self._graph(*args, **kwargs)


@dataclasses.dataclass
class Grown:
    module: torch.nn.Module
    graph: Graph
    report: GrowthReport


def apply(model: torch.nn.Module | Graph, passes: list, args=(), kwargs: dict | None = None, *,
          verify: bool = True, strict: bool = False) -> Grown:
    """Grow ``model`` with ``passes`` in order; see the module docstring."""
    args = args if isinstance(args, tuple) else (args,)
    kwargs = dict(kwargs or {})
    original = model if isinstance(model, Graph) else trace(model, args, kwargs)
    current = original
    shapes = _parameter_shapes(current)
    records = []
    for growth in _flatten(passes):
        before = _count(shapes)
        plan = growth.plan(current)
        if plan.empty:
            if strict:
                raise GrowthError(f"{growth.name} matched nothing")
            records.append(PassRecord(growth.name, None, before, before, refusals=plan.refusals))
            continue
        previous, current = current, growth.run(current, plan)
        moves = getattr(current, "renamed", None) or {}
        renamed = [name for name in shapes if moved(name, moves) != name]
        old_shapes = {moved(name, moves): shape for name, shape in shapes.items()}
        current.disposable = True  # made here and replaced by the next pass: its tensors may move on
        shapes = _parameter_shapes(current)
        record = PassRecord(
            growth.name, plan, before, _count(shapes), refusals=plan.refusals,
            added=[n for n in shapes if n not in old_shapes],
            removed=[n for n in old_shapes if n not in shapes],
            resized=[n for n in shapes if n in old_shapes and shapes[n] != old_shapes[n]],
            renamed=renamed,
        )
        if verify:  # the error against the original; an exact pass after an approximate one is checked
            exact_so_far = all(r.exact is not False for r in records)  # against its own input as well
            record.verification = _check(original, current, args, kwargs, growth.name, plan, exact_so_far)
            if not exact_so_far and plan.exact:
                _check(previous, current, args, kwargs, growth.name, plan, True)
        records.append(record)
    current.disposable = False
    return Grown(GrownModule(current), current, GrowthReport(records))


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
        from .frontends import first_line

        raise GrowthError(f"the graph grown by {name} does not run: {first_line(e)}") from e
    if not report.ok and plan.exact and enforce:
        raise VerificationError(f"{name} was planned exact but changes the outputs", report)
    return report


__all__ = ["Grown", "GrownModule", "GrowthReport", "PassRecord", "apply"]
