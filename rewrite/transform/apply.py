"""``apply(model, passes, args)``: the pass manager. Trace, plan and run growth passes and rules, verify, report.

Passes (width passes, rules, rule sets flattened into their rules) run in order, each on the result of the
one before, planned on shapes first: every pass runs on a copy of the graph whose tensors are on ``meta``, and
then each grown tensor is built once from the original's (``rewrite.transform.materialise``), so no
intermediate model is allocated and a tensor several passes grow is not built once per pass. Every pass states
its plan (sites, growth, exact or not and why, refused matches) before it runs; with ``verify=True`` the grown graph is compared with the original on the example inputs after each
pass, intermediate values included through the growth mapping, and a pass claimed exact that fails raises
``VerificationError`` naming the first diverging node (after an approximate pass, an exact one is checked
against its own input). The report records, per pass, where it matched, which parameters it added,
removed, resized or renamed, and the measured error. The original model is never modified.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time

import torch

from rewrite.errors import GrowfxError, GrowthError, VerificationError
from rewrite.ir.graph import Graph, Lineage
from rewrite.ir.lazy_compile import compile_now
from rewrite.transform.growth_map import KEPT, GrowthMap
from rewrite.transform.growth_ops import rounded_by
from rewrite.transform.materialise import NeedsWeights, all_on_meta, check_shapes_only, materialise, on_meta
from rewrite.transform.static_sizes import fixed_sizes, static_sizes
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
    how: str = ""  # how the grown tensors were made (``rewrite.transform.materialise``)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # wall time by phase

    @property
    def exact(self) -> bool:
        return all(record.exact is not False for record in self.passes)

    def __str__(self) -> str:
        how = f" ({self.how})" if self.how else ""
        return "\n".join([f"growth report{how}:"] + [f"  {record}" for record in self.passes])


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
          verify: bool = True, strict: bool = False, plan_first: bool = True) -> Grown:
    """Grow ``model`` with ``passes`` in order; see the module docstring. ``plan_first=False`` builds each pass's
    tensors in turn instead of planning every pass on shapes first (the same bits, more time and memory; what
    ``apply`` falls back to by itself when a rule reads the weights' values)."""
    args = args if isinstance(args, tuple) else (args,)
    kwargs = dict(kwargs or {})
    original = model if isinstance(model, Graph) else trace(model, args, kwargs)
    if isinstance(model, Graph) and (original.lineage.growth_map is not None or original.lineage.node_map):
        # a graph grown before: this growth is relative to it (the map from its tensors, the node map onto its
        # nodes); where modules came from keeps pointing at the traced model
        original = original.with_module(original.module, Lineage(origins=original.lineage.origins))
    with _collector_paused():
        original, steps, final, how, seconds = _grow(original, _flatten(passes), strict, plan_first, verify)
    records = [step.record for step in steps]
    if verify:
        start = time.perf_counter()
        _verify_passes(original, steps, final, args, kwargs)
        seconds["verify"] = time.perf_counter() - start
    if final.lineage.growth_map is None:  # nothing grew: the map of the model onto itself
        final = final.with_module(final.module, Lineage(growth_map=GrowthMap.identity(final.module)))
    if not all_on_meta(final):  # a plan without weights runs nothing and stays pending
        _compile(final, original)
    return Grown(GrownModule(final), final, GrowthReport(records, how, seconds), original)


def _grow(original: Graph, flat: list, strict: bool, plan_first: bool, verify: bool):
    """(the original, the steps, the grown graph, how its tensors were made, seconds by phase). The passes run on
    the graph with the fx shape reads of weight-fixed axes as literals (``static_sizes``); each edits the graph
    the one before made unless ``verify`` reads it (the intermediates)."""
    seconds = {}
    start = time.perf_counter()
    if all_on_meta(original) or not plan_first:  # without weights, the plan on shapes is the result
        how = ("planned on shapes (the model has no weights)" if plan_first
               else "built pass by pass (plan_first=False)")
        original = static_sizes(original)
        steps, final = _pass_by_pass(original, flat, strict, verify)
    else:
        try:  # one copy of the graph, on meta, that the first pass edits
            planned = static_sizes(on_meta(original, in_place=True), fixed_sizes(original))
            steps = _run_passes(planned, flat, strict, planning=True, keep=verify)
            seconds["plan"] = time.perf_counter() - start
            start = time.perf_counter()
            grown = [step for step in steps if step.plan is not None]
            final = materialise(grown[-1].graph, original, meanwhile=lambda: _compile(grown[-1].graph, original)) \
                if grown else original
            how = "planned on shapes, each tensor built once"
        except NeedsWeights as why:
            seconds.clear()
            start = time.perf_counter()
            how = f"built pass by pass: {why}"
            original = static_sizes(original)
            steps, final = _pass_by_pass(original, flat, strict, verify)
    seconds["build" if "plan" in seconds else "plan and build"] = time.perf_counter() - start
    return original, steps, final, how, seconds


def _compile(*graphs: Graph) -> None:
    """The code of graphs handed to the user generated now: they may give them to dynamo, which cannot trace
    the first-use stand-in (``rewrite.ir.lazy_compile``). Nothing for a graph whose code is current."""
    for graph in graphs:
        compile_now(graph.module)


@contextlib.contextmanager
def _collector_paused():
    """Python's cyclic garbage collector paused while the passes plan and build: copying and analysing fx graphs
    makes hundreds of thousands of objects, which set off full collections over the whole heap (up to 0.45 s of
    a 0.7 s plan on a 124M-parameter model). What planning leaves behind is collected once it is on again."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _pass_by_pass(original: Graph, flat: list, strict: bool, keep: bool) -> tuple[list["_Step"], Graph]:
    """Every pass run on the tensors the one before made: the steps and the last graph."""
    steps = _run_passes(original, flat, strict, planning=False, keep=keep)
    return steps, steps[-1].graph if steps else original


@dataclasses.dataclass
class _Step:
    """One pass as it ran: its record, its plan (None: it matched nothing), the graph after it, its map."""

    record: PassRecord
    plan: Plan | None
    graph: Graph
    map: GrowthMap | None


def _run_passes(start: Graph, flat: list, strict: bool, planning: bool, keep: bool) -> list[_Step]:
    """Plan and run every pass in order on ``start`` (its tensors on meta when ``planning``: ``NeedsWeights``
    when a pass needs the weights' values). ``keep``: every step's graph stays as the pass left it (verification
    reads them); else each pass edits the graph the one before made (``Graph.in_place``)."""
    current = start
    shapes = _parameter_shapes(current)
    steps = []
    for growth in flat:
        before = _count(shapes)
        plan = _shapes_only(lambda: growth.plan(current), growth.name, planning)
        if plan.empty:
            if strict:
                why = "".join(f"; at {site}: {reason}" for site, reason in plan.refusals)
                raise GrowthError(f"{growth.name} matched nothing{why}")
            steps.append(_Step(PassRecord(growth.name, None, before, before, refusals=plan.refusals), None,
                               current, None))
            continue
        # an intermediate this loop made is replaced by the pass's result: its tensors may move on
        handed = current.handed_over(in_place=not keep) if current is not start else current
        current = _shapes_only(lambda: growth.run(handed, plan), growth.name, planning)
        step_map = current.lineage.step_map
        if planning:
            check_shapes_only(step_map, growth.name)
        moves = _moves(step_map)
        renamed = [name for name in shapes if moves.get(name, name) != name]
        old_shapes = {moves.get(name, name): shape for name, shape in shapes.items()}
        shapes = _parameter_shapes(current)
        record = PassRecord(
            growth.name, plan, before, _count(shapes), refusals=plan.refusals,
            added=[n for n in shapes if n not in old_shapes],
            removed=[n for n in old_shapes if n not in shapes],
            resized=[n for n in shapes if n in old_shapes and shapes[n] != old_shapes[n]],
            renamed=renamed, notes=_rounding(step_map) if plan.exact else [],
        )
        steps.append(_Step(record, plan, current, step_map))
    return steps


def _shapes_only(call, name: str, planning: bool):
    """``call()``; when ``planning`` on meta, a failure that is not a rule's own (``.item()`` of a meta tensor, a
    graph that runs on weights but not on meta) means the pass needs the weights: ``NeedsWeights``."""
    if not planning:
        return call()
    try:
        return call()
    except GrowfxError as e:
        if e.__cause__ is None or isinstance(e.__cause__, GrowfxError):
            raise
        raise NeedsWeights(f"{name} does not run on shapes alone ({first_line(e)})") from e
    except Exception as e:  # noqa: BLE001 - see the docstring
        raise NeedsWeights(f"{name} reads the weights' values ({first_line(e)})") from e


def _verify_passes(original: Graph, steps: list[_Step], final: Graph, args: tuple, kwargs: dict) -> None:
    """Every pass checked against the original; the reports go on the pass records. When every pass is exact,
    the final model is compared with the original once (through the composed node map), and that report is
    every pass's; otherwise, or when it diverges, pass by pass (an exact pass after an approximate one also
    against its own input), to name the pass and the first node that diverges. A pass's intermediate model
    planned on shapes is built for that from the original's tensors (the passes so far)."""
    grown = [step for step in steps if step.plan is not None]
    if len(grown) > 1 and all(step.plan.exact for step in grown):
        try:
            report = verify(original, final, args, kwargs, title=f"after {', '.join(s.record.name for s in grown)}")
        except Exception:  # noqa: BLE001 - the pass-by-pass check below names the pass whose graph does not run
            report = None
        if report is not None and report.ok:
            for step in grown:
                step.record.verification = report
            return
    previous = original
    for i, step in enumerate(grown):
        if step is grown[-1]:
            current = final
        elif all_on_meta(step.graph) and not all_on_meta(original):
            current = materialise(_planned_copy(step.graph), original)
        else:
            current = step.graph
        exact_so_far = all(s.record.exact is not False for s in grown[:i])
        step.record.verification = _check(original, current, args, kwargs, step.record.name, step.plan,
                                          exact_so_far)
        if not exact_so_far and step.plan.exact:
            _check(previous, current, args, kwargs, step.record.name, step.plan, True)
        previous = current


def _planned_copy(graph: Graph) -> Graph:
    """A copy of an intermediate planned graph to build: the steps keep the planned graph, and the built one is
    freed after its check."""
    return graph.with_module(graph.module_copy())


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
    """Every learnable parameter (tied ones once, by its first name) with its shape: the names and shapes of
    ``graph.parameters()``, without the nodes that read them."""
    shapes, seen = {}, set()
    for name, parameter in graph.module.named_parameters(remove_duplicate=False):
        if id(parameter) not in seen:
            seen.add(id(parameter))
            shapes[name] = parameter.shape
    return shapes


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
