"""Optimizer and scheduler state through growth: ``carry`` (both at once), ``carry_optimizer``, ``carry_scheduler``.

The new optimizer is of the same class, with the same hyperparameters and parameter groups: a grown tensor stays
in its original's group, a copy (a block copied elsewhere, an expert) joins its source's group, a tensor with no
source joins the group of its module's other tensors (else the first). Its state goes through the growth map by
the kind of each field (``rewrite.transform.growth_ops``: gradients follow the dual of the weight map):

    optimizer     field                             kind
    Adam, AdamW   exp_avg                           gradient (a split unit's parts share g: g/n; its consumer
                  exp_avg_sq, max_exp_avg_sq        second_moment  columns keep g; v/n^2 likewise)
                  step                              kept
    SGD, Muon     momentum_buffer                   gradient
    Adafactor     variance (1-d)                    second_moment
                  row_var, col_var (factored)       second_moment along the axis they keep, when growth did not
                                                    touch the axis they average over; otherwise reset (reported)

Policies: ``mapped`` (every field through the map; new entries zero), ``sparkling`` (old entries keep their state
as it was, new entries start from zero: SPARKLING's asymmetric reset) and ``reset`` (fresh state). A copy into a
new role or a tensor with no source starts fresh (no state: its own step count), or with ``copies="source"``
takes its source's state as it was.

Step hooks on what growth added (``rewrite.training.hooks``, returned as ``Carried.hooks``): ``protect=True``
(the default for ``sparkling``) gives new entries of widened tensors Adam's bias correction for their own age;
``rewarm=(1.3, 250)`` re-warms their learning rate to 1.3 times the schedule's over 250 steps (SPARKLING);
``train="added"`` trains only what growth added, leaving every original entry bit-identical (LLaMA Pro).

Memory: ``release=True`` frees the old optimizer's gradients first and each source's state as soon as the last
grown tensor made from it has its own, so the old moments are not held beside the whole of the new ones (the
old optimizer cannot step afterwards). Every field is made
on the device and in the dtype of the state it comes from.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import warnings
import weakref

import torch

from rewrite.errors import GrowthError, NotRepresentableError
from rewrite.transform.growth_map import KEPT, GrowthMap, tensor_names
from rewrite.transform.dual import run_dual
from rewrite.training.hooks import GrowthHooks

MOMENTS = {
    "Adam": {"exp_avg": "gradient", "exp_avg_sq": "second_moment", "max_exp_avg_sq": "second_moment"},
    "AdamW": {"exp_avg": "gradient", "exp_avg_sq": "second_moment", "max_exp_avg_sq": "second_moment"},
    "SGD": {"momentum_buffer": "gradient"},
    "Muon": {"momentum_buffer": "gradient"},
    "Adafactor": {"variance": "second_moment", "row_var": "second_moment", "col_var": "second_moment"},
}
KEPT_FIELDS = {"step"}
POLICIES = ("mapped", "sparkling", "reset")


@dataclasses.dataclass
class Carried:
    """What ``carry`` made: the optimizer (and scheduler) for the grown module, and every state field it could
    not carry, with the reason."""

    optimizer: torch.optim.Optimizer
    scheduler: object | None = None
    reset: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (parameter, field, why)
    fresh: list[str] = dataclasses.field(default_factory=list)  # parameters that start with no state
    hooks: GrowthHooks | None = None  # protection, re-warmup, train="added" (their state_dict goes in checkpoints)


def carry_optimizer(optimizer: torch.optim.Optimizer, grown, module: torch.nn.Module, *, policy: str = "mapped",
                    copies: str = "fresh", protect: bool | None = None,
                    rewarm: tuple[float, int] | None = None, train: str = "all") -> torch.optim.Optimizer:
    """An optimizer of ``optimizer``'s class for the grown ``module`` with its groups and state carried (see the
    module docstring); a state field that could not be carried is reported in a warning."""
    carried = carry(optimizer, grown, module, policy=policy, copies=copies, protect=protect, rewarm=rewarm,
                    train=train)
    for name, field, why in carried.reset:
        warnings.warn(f"carry_optimizer reset {field} of {name}: {why}", stacklevel=2)
    return carried.optimizer


def carry(optimizer: torch.optim.Optimizer, grown, module: torch.nn.Module, scheduler=None, *,
          policy: str = "mapped", copies: str = "fresh", protect: bool | None = None,
          rewarm: tuple[float, int] | None = None, train: str = "all", release: bool = False) -> Carried:
    """The optimizer and (optionally) the learning-rate scheduler for the grown ``module``, in one call;
    ``release``: free the old optimizer's state as it is carried (see the module docstring)."""
    check_optimizer(optimizer)
    check_policy(policy, copies)
    growth: GrowthMap = grown.map
    old_names = tensor_names(grown.original.module)
    by_name = {old_names[id(p)]: p for group in optimizer.param_groups for p in group["params"] if id(p) in old_names}
    missing = [p for group in optimizer.param_groups for p in group["params"] if id(p) not in old_names]
    if missing:
        raise GrowthError(f"{len(missing)} tensors of the optimizer are not parameters of the grown model's "
                          f"original (shape {tuple(missing[0].shape)}): pass the optimizer of that model")
    groups = grown_param_groups(optimizer, growth, module, old_names)
    new = type(optimizer)(groups, **constructor_defaults(optimizer))
    carried = Carried(new)
    named = _named_parameters(module)
    if release:
        optimizer.zero_grad(set_to_none=True)
        readers = _readers(growth, [name for name, _ in named])
    for name, parameter in named if policy != "reset" else ():
        _carry_state(optimizer, new, growth, name, parameter, by_name, policy, copies, carried)
        if release:
            _release(optimizer, growth.recipes[growth.canonical(name)].source, by_name, readers)
    if release:
        optimizer.state.clear()  # the state of what no grown tensor is made from
    carried.hooks = GrowthHooks(new, growth, module, protect=protect if protect is not None else policy == "sparkling",
                                rewarm=rewarm, train=train)
    check_groups(new, module)
    if scheduler is not None:
        carried.scheduler = carry_scheduler(scheduler, new)
    return carried


def _readers(growth: GrowthMap, names: list[str]) -> dict[str, int]:
    """How many of the grown parameters ``names`` are made from each original tensor."""
    counts: dict[str, int] = {}
    for name in names:
        source = growth.recipes[growth.canonical(name)].source
        counts[source] = counts.get(source, 0) + 1
    return counts


def _release(optimizer, source: str | None, by_name: dict, readers: dict[str, int]) -> None:
    """One more grown tensor made from ``source`` has its state: free the source's once none is left to make."""
    readers[source] -= 1
    if readers[source] == 0 and source in by_name:
        optimizer.state.pop(by_name[source], None)


def check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """``GrowthError`` when the optimizer's state is not one this module knows how to carry."""
    kind = type(optimizer).__name__
    if kind not in MOMENTS:
        raise GrowthError(f"carry_optimizer does not know the state of {kind} (it carries "
                          f"{', '.join(MOMENTS)}); its state would be dropped, so it refuses")


def check_policy(policy: str, copies: str) -> None:
    """``GrowthError`` naming the choices when ``policy`` or ``copies`` is not one."""
    if policy not in POLICIES:
        raise GrowthError(f"unknown optimizer policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if copies not in ("fresh", "source"):
        raise GrowthError(f"copies must be 'fresh' or 'source', got {copies!r}")


def _named_parameters(module: torch.nn.Module):
    return list(module.named_parameters())  # tied parameters once, under their first name


def grown_param_groups(optimizer, growth: GrowthMap, module, old_names: dict[int, str]) -> list[dict]:
    """The original's groups with the grown parameters of ``module`` (see :func:`grown_groups`); ``old_names``:
    the original's parameter names by ``id``."""
    source_group = {old_names[id(p)]: i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    named = _named_parameters(module)
    chosen = grown_groups(growth, [name for name, _ in named], source_group)
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": []} for g in optimizer.param_groups]
    for name, parameter in named:
        groups[chosen[name]]["params"].append(parameter)
    return groups  # one to one with the original's (a scheduler's per-group rates stay aligned)


def grown_groups(growth: GrowthMap, names: list[str], source_group: dict[str, int]) -> dict[str, int]:
    """The parameter group of each grown parameter ``names``: its source's (``source_group``: original name ->
    group), else the group of its module's other parameters, else the first."""
    chosen: dict[str, int] = {}
    for name in names:
        if growth.canonical(name) not in growth.recipes:
            raise GrowthError(f"{name} is not a tensor of the grown model this map describes: pass the grown module")
        source = growth.recipes[growth.canonical(name)].source
        if source in source_group:
            chosen[name] = source_group[source]
    for name in names:
        if name not in chosen:
            owner = name.rpartition(".")[0]
            siblings = [chosen[n] for n in chosen if n.rpartition(".")[0] == owner]
            chosen[name] = siblings[0] if siblings else 0
    return chosen


def constructor_defaults(optimizer) -> dict:
    """The constructor keywords of the optimizer's defaults (its groups carry their own values too)."""
    accepted = inspect.signature(type(optimizer).__init__).parameters
    return {k: v for k, v in optimizer.defaults.items() if k in accepted and k != "params"}


def _carry_state(old_opt, new_opt, growth: GrowthMap, name: str, parameter, by_name: dict, policy: str,
                 copies: str, carried: Carried) -> None:
    state, kinds, refused = source_state(old_opt, growth, name, tuple(parameter.shape), by_name, policy, copies)
    if kinds is None:
        if refused is not None:
            carried.reset.append((name, *refused))
        carried.fresh.append(name)
        return
    new_opt.state[parameter] = {field: carry_field(growth, name, state[field], kind, tuple(parameter.shape))
                                for field, kind in kinds.items()}


def source_state(optimizer: torch.optim.Optimizer, growth: GrowthMap, name: str, parameter_shape: tuple,
                 by_name: dict, policy: str, copies: str):
    """(state, kinds, refused): the state ``optimizer`` holds for the source of the grown parameter ``name``
    (``by_name``: the original's parameters by name; empty when it has none) and :func:`plan_state` of it."""
    recipe = growth.recipes[growth.canonical(name)]
    source = by_name.get(recipe.source) if recipe.source is not None else None
    state = optimizer.state.get(source, {}) if source is not None else {}
    shapes = {field: tuple(value.shape) if torch.is_tensor(value) else None for field, value in state.items()}
    return (state, *plan_state(growth, name, shapes, parameter_shape, MOMENTS[type(optimizer).__name__], policy,
                               copies))


def plan_state(growth: GrowthMap, name: str, shapes: dict[str, tuple | None], parameter_shape: tuple,
               fields: dict[str, str], policy: str, copies: str):
    """How the grown parameter ``name``'s state is made from its source's, decided from shapes alone
    (``shapes``: the source's state fields, None for a value that is not a tensor): ``({field: kind}, None)``,
    kind ``kept`` (as it was: ``step``) or a kind of ``GrowthMap.make``; or ``(None, None)`` when it starts
    fresh (no source, no state, a copy into a new role without ``copies="source"``); or
    ``(None, (field, why))`` when one field cannot be carried, so none is."""
    recipe = growth.recipes[growth.canonical(name)]
    if recipe.source is None or not shapes or (recipe.role != KEPT and copies == "fresh"):
        return None, None  # no gradient identity with a source: its own state, its own step count
    kinds = {}
    for field, shape in shapes.items():
        if field in KEPT_FIELDS or shape is None:
            kinds[field] = KEPT
            continue
        kind = "preserve" if policy == "sparkling" or recipe.role != KEPT else fields.get(field)
        if kind is None:
            return None, (field, "a state field this optimizer is not known to keep")
        if shape != _source_shape(growth, recipe) and _averaged(growth, recipe, shape, parameter_shape) is None:
            return None, (field, "it averages over an axis that growth changed: not derivable")
        kinds[field] = kind
    return kinds, None


def carry_field(growth: GrowthMap, name: str, value, kind: str, parameter_shape: tuple):
    """One state field of the grown parameter ``name`` made from its source's ``value`` by ``kind``
    (from :func:`plan_state`)."""
    if kind == KEPT:
        return value.clone() if torch.is_tensor(value) else copy.deepcopy(value)
    recipe = growth.recipes[growth.canonical(name)]
    if value.shape == _source_shape(growth, recipe):
        return _through(growth, name, recipe, value, kind).to(value.dtype)
    # a factored statistic (Adafactor's row_var [.., rows, 1], col_var [.., 1, cols]): it keeps one axis and
    # averages over the other; derivable when growth did not touch the averaged axis
    averaged = _averaged(growth, recipe, tuple(value.shape), parameter_shape)
    expanded = value.expand(_source_shape(growth, recipe)).contiguous()
    made = _through(growth, name, recipe, expanded, kind)
    index = [slice(0, 1) if axis in averaged else slice(None) for axis in range(value.dim())]
    return made[tuple(index)].contiguous().to(value.dtype)


def _averaged(growth: GrowthMap, recipe, shape: tuple, parameter_shape: tuple) -> set[int] | None:
    """The axes a factored statistic of ``shape`` averages over, when growth did not touch them; else None."""
    rank = len(shape)
    if rank != len(parameter_shape):
        return None
    averaged = {axis for axis in range(rank) if shape[axis] == 1 and parameter_shape[axis] != 1}
    touched = {op.axis % rank for op in recipe.ops if getattr(op, "axis", None) is not None}
    if not averaged or averaged & touched or any(getattr(op, "axis", 0) is None for op in recipe.ops):
        return None
    return averaged


def _through(growth: GrowthMap, name: str, recipe, value: torch.Tensor, kind: str) -> torch.Tensor:
    """A state field of the grown parameter ``name`` made from its source's: through the map's dual, or, for a
    copy into a new role taking its source's state (``copies="source"``), that state as it was where the copy
    keeps the source's entries."""
    if recipe.role == KEPT:
        return growth.make(name, {recipe.source: value}, kind)
    return run_dual(value, recipe.ops, "preserve")


def _source_shape(growth: GrowthMap, recipe) -> tuple[int, ...]:
    """The original shape of a recipe's source tensor."""
    return tuple(growth.original[recipe.source][0])


def check_groups(optimizer: torch.optim.Optimizer, module: torch.nn.Module) -> None:
    """Every parameter of ``module`` is in exactly one group of ``optimizer``, and nothing else is."""
    seen: dict[int, int] = {}
    for i, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if id(p) in seen:
                raise GrowthError(f"a parameter of shape {tuple(p.shape)} is in groups {seen[id(p)]} and {i}")
            seen[id(p)] = i
    names = {id(p): n for n, p in module.named_parameters()}
    missing = [n for i, n in names.items() if i not in seen]
    extra = [p for group in optimizer.param_groups for p in group["params"] if id(p) not in names]
    if missing:
        raise GrowthError(f"the optimizer does not train {', '.join(missing[:3])}"
                          + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    if extra:
        raise GrowthError(f"the optimizer holds {len(extra)} tensors the module does not have "
                          f"(shape {tuple(extra[0].shape)})")


def carry_scheduler(scheduler, optimizer: torch.optim.Optimizer):
    """The learning-rate scheduler ``scheduler`` driving ``optimizer`` (same class, same position): it keeps its
    epoch and base rates and drives every group (the groups correspond one to one)."""
    if len(getattr(scheduler, "base_lrs", optimizer.param_groups)) != len(optimizer.param_groups):
        raise GrowthError("the scheduler drives a different number of parameter groups than the optimizer")
    new = copy.copy(scheduler)
    new.optimizer = optimizer
    if hasattr(new, "_schedulers"):  # SequentialLR, ChainedScheduler
        new._schedulers = [carry_scheduler(s, optimizer) for s in scheduler._schedulers]
    _track_steps(optimizer)
    return new


def _track_steps(optimizer: torch.optim.Optimizer) -> None:
    """What a scheduler's constructor does to its optimizer (marks its steps), so the scheduler does not warn
    that it stepped first: training continues, the optimizer has stepped before."""
    if hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        return
    reference = weakref.ref(optimizer)
    step = type(optimizer).step

    @functools.wraps(step)
    def wrapper(*args, **kwargs):
        opt = reference()
        opt._opt_called = True
        return step(opt, *args, **kwargs)

    wrapper._wrapped_by_lr_sched = True
    optimizer.step = wrapper
    optimizer._opt_called = True


def carried_class(native: torch.nn.Module, model: torch.nn.Module) -> torch.nn.Module:
    """``native`` (``to_native`` of a growth of ``model``) when optimizer state can be carried onto it: when it
    is of ``model``'s class. An upcycled model comes back as a mixture class that stacks its experts under other
    names than the grown graph's, which the state is carried by: ``NotRepresentableError`` says so, and training
    goes on in the graph form (``to_native`` writes the mixture class at the end)."""
    if type(native) is not type(model):
        raise NotRepresentableError(
            f"{type(native).__name__} stacks the experts under other names than the grown graph's, and the "
            f"optimizer state is carried by the graph's names")
    return native
