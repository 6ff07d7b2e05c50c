"""Grow a distributed checkpoint (DCP) with its optimizer state, offline, one tensor at a time.

The checkpoint is what an FSDP2 run saves with ``dcp.save({"model": model_sd, "optim": optim_sd})``, the
state dicts from ``torch.distributed.checkpoint.state_dict.get_state_dict``: weights by parameter name
(``model.<fqn>``), optimizer state by parameter name (``optim.state.<fqn>.<field>``) and the parameter groups
with names (``optim.param_groups.<i>.<key>``). The grown checkpoint has the same layout for the grown model:

* ``model.<fqn>``: ``GrowthMap.make`` from the original's tensors (planned on ``meta``), in the source's dtype;
* ``optim.state.<fqn>.<field>``: the rules of ``carry_optimizer`` (``rewrite.training.carry``: ``plan_state``
  and ``carry_field``): first moments through the map's dual, second moments through its square, ``step``
  kept, by ``policy`` (``mapped``, ``sparkling``, ``reset``) and ``copies``. A parameter that starts fresh
  gets zero moments and ``step`` 0, which is Adam's state before its first step (written, so that
  ``dcp.load`` finds every key the resumed optimizer has);
* ``optim.param_groups.<i>``: the original groups' hyperparameters, each grown parameter in its source's group
  (``carry.grown_groups``);
* every other key (a scheduler, a data loader, a step counter) as it was.

Nothing is loaded whole: each source tensor is read from its chunks when a grown tensor needs it, and the
grown tensors are written through a lazy DCP save plan, large ones as row chunks
(``rewrite.io.dcp_files``). Peak memory is the plan plus about three tensors. A Hugging Face model's grown
config is written next to the checkpoint (``config.json``), for :func:`rewrite.training.fsdp.resume`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from rewrite.errors import GrowfxError
from rewrite.io.dcp_files import DistributedCheckpoint, Entry, write_checkpoint
from rewrite.io.grow_checkpoint import NativePlan, main_dtype, meta_inputs, meta_model, plan_native
from rewrite.io.native import is_tied_head
from rewrite.io.sources import atomic_path
from rewrite.ir.trace import trace
from rewrite.training.carry import MOMENTS, carry_field, check_policy, grown_groups, plan_state

FIELD_KINDS = {field: kind for fields in MOMENTS.values() for field, kind in fields.items()}


@dataclasses.dataclass
class GrownDistributed:
    """What :func:`grow_distributed_checkpoint` wrote: the plan (its growth map and report), the grown config,
    every optimizer state field it could not carry (parameter, field, why) and the parameters that start
    fresh, and how long each phase took."""

    path: Path
    plan: NativePlan
    reset: list[tuple[str, str, str]]
    fresh: list[str]
    keys: int
    seconds: dict[str, float]


def grow_distributed_checkpoint(source: str | Path, config, passes: list, destination: str | Path, *,
                                policy: str = "mapped", copies: str = "fresh", model_key: str = "model",
                                optim_key: str = "optim", replace: bool = False,
                                max_chunk_bytes: int = 16 * 2**20) -> GrownDistributed:
    """Grow the DCP checkpoint ``source`` of a Hugging Face model with ``config`` by ``passes`` into
    ``destination`` (see the module docstring)."""
    check_policy(policy, copies)
    seconds = {}
    start = time.perf_counter()
    checkpoint = DistributedCheckpoint(source)
    layout = _Layout(checkpoint, model_key, optim_key)
    model = meta_model(config)
    args, kwargs = meta_inputs(model)
    plan = plan_native(trace(model, args, kwargs), model, passes, args, kwargs)
    plan.refuse_mixture("growing a distributed checkpoint")
    seconds["plan"] = time.perf_counter() - start
    writer = _GrownKeys(checkpoint, plan, layout, policy, copies)
    start = time.perf_counter()
    with _shared_destination(Path(destination), replace) as (folder, first):
        write_checkpoint(folder, writer.entries, writer.make, max_chunk_bytes=max_chunk_bytes)
        if first:
            plan.config.save_pretrained(folder)
    seconds["write"] = time.perf_counter() - start
    for name, field, why in writer.reset:
        warnings.warn(f"grow_distributed_checkpoint reset {field} of {name}: {why}", stacklevel=2)
    return GrownDistributed(Path(destination), plan, writer.reset, writer.fresh, len(writer.entries), seconds)


@contextlib.contextmanager
def _shared_destination(destination: Path, replace: bool):
    """(folder, first): the temporary folder to write into, renamed into place at the end (``atomic_path``).
    Under a process group, the first process makes it and tells the others, and every process returns once it
    is in place."""
    if not (dist.is_available() and dist.is_initialized()):
        with atomic_path(destination, replace=replace) as folder:
            yield folder, True
        return
    if dist.get_rank() == 0:
        if destination.exists() and not replace:
            dist.broadcast_object_list([None], src=0)
        with atomic_path(destination, replace=replace) as folder:
            dist.broadcast_object_list([str(folder)], src=0)
            yield folder, True
        dist.barrier()
        return
    told = [None]
    dist.broadcast_object_list(told, src=0)
    if told[0] is None:
        raise GrowfxError(f"{destination} exists (pass replace=True to replace it)")
    yield Path(told[0]), False
    dist.barrier()


class _Layout:
    """Where the model, the optimizer state and the parameter groups sit among a checkpoint's keys."""

    def __init__(self, checkpoint: DistributedCheckpoint, model_key: str, optim_key: str):
        self.model_key, self.optim_key = model_key, optim_key
        self.model: dict[str, str] = {}  # fqn -> key
        self.state: dict[str, dict[str, str]] = {}  # fqn -> field -> key
        self.groups: dict[int, dict[str, str]] = {}  # group -> hyperparameter -> key
        self.others: list[str] = []
        for key in checkpoint.entries:
            path = checkpoint.path(key)
            if path[0] == model_key and len(path) == 2:
                self.model[path[1]] = key
            elif path[:2] == (optim_key, "state") and len(path) == 4:
                self.state.setdefault(path[2], {})[path[3]] = key
            elif path[:2] == (optim_key, "param_groups") and len(path) == 4:
                self.groups.setdefault(int(path[2]), {})[path[3]] = key
            elif path[0] in (model_key, optim_key):
                raise GrowfxError(f"{checkpoint.folder}: {key} is not where get_state_dict puts a model or "
                                  f"optimizer entry ({model_key}.<fqn>, {optim_key}.state.<fqn>.<field>, "
                                  f"{optim_key}.param_groups.<i>.<key>)")
            else:
                self.others.append(key)
        if not self.model:
            raise GrowfxError(f"{checkpoint.folder} has no model weights under {model_key!r} (keys start with "
                              f"{sorted({checkpoint.path(k)[0] for k in checkpoint.entries})})")


class _GrownKeys:
    """Every key of the grown checkpoint (``entries``) and how each is made (``make``)."""

    def __init__(self, checkpoint: DistributedCheckpoint, plan: NativePlan, layout: _Layout, policy: str,
                 copies: str):
        self.checkpoint, self.layout, self.growth = checkpoint, layout, plan.grown.map
        self.entries: list[Entry] = []
        self.makers: dict[str, tuple] = {}
        self.reset: list[tuple[str, str, str]] = []
        self.fresh: list[str] = []
        self.weights = _Weights(checkpoint, layout)
        self._model(plan.native)
        if layout.state or layout.groups:
            self._optimizer(plan.native, policy, copies)
        for key in layout.others:
            shape = checkpoint.shape(key) if checkpoint.is_tensor(key) else None
            dtype = checkpoint.dtype(key) if shape is not None else None
            self._add(Entry(key, checkpoint.path(key), shape, dtype), ("as it was", key))

    def make(self, key: str):
        how, *what = self.makers[key]
        if how == "weight":
            name, dtype = what
            return self.growth.make(name, self.weights).to(dtype)
        if how == "state":
            name, source_key, kind, shape = what
            return carry_field(self.growth, name, self.checkpoint.tensor(source_key), kind, shape)
        if how == "zeros":
            shape, dtype = what
            return torch.zeros(shape, dtype=dtype)
        if how == "value":
            return what[0]
        key, = what
        return self.checkpoint.tensor(key) if self.checkpoint.is_tensor(key) else self.checkpoint.value(key)

    def _add(self, entry: Entry, maker: tuple) -> None:
        self.entries.append(entry)
        self.makers[entry.key] = maker

    def _model(self, native: torch.nn.Module) -> None:
        main = main_dtype(self.checkpoint.dtype(k) for k in self.layout.model.values())
        for name in native.state_dict():
            recipe = self.growth.recipes[self.growth.canonical(name)]  # one of its shape (plan_native)
            if recipe.source is not None and recipe.source not in self.layout.model:
                if is_tied_head(native, name):
                    continue
                raise GrowfxError(f"{self.checkpoint.folder} has no {self.layout.model_key}.{recipe.source}, "
                                  f"which {name} is made from")
            dtype = self.checkpoint.dtype(self.layout.model[recipe.source]) if recipe.source is not None else (
                main if recipe.dtype.is_floating_point else recipe.dtype)
            self._add(Entry(f"{self.layout.model_key}.{name}", (self.layout.model_key, name), recipe.shape, dtype),
                      ("weight", name, dtype))

    def _optimizer(self, native: torch.nn.Module, policy: str, copies: str) -> None:
        layout, checkpoint, optim = self.layout, self.checkpoint, self.layout.optim_key
        source_group = {}
        for group, keys in sorted(layout.groups.items()):
            if "params" not in keys:
                raise GrowfxError(f"{checkpoint.folder}: parameter group {group} lists no params")
            source_group.update({name: group for name in checkpoint.value(keys["params"])})
        unknown = sorted(set(layout.state) - set(source_group))
        if unknown:
            raise GrowfxError(f"{checkpoint.folder} has optimizer state for {unknown[0]}, which no parameter "
                              f"group lists")
        named = list(native.named_parameters())  # tied parameters once, as get_state_dict gives them
        template = _fresh_template(checkpoint, layout)
        for name, parameter in named:
            shape = tuple(parameter.shape)
            recipe = self.growth.recipes[self.growth.canonical(name)]
            fields = layout.state.get(recipe.source, {}) if recipe.source is not None else {}
            shapes = {f: checkpoint.shape(k) if checkpoint.is_tensor(k) else None for f, k in fields.items()}
            kinds, refused = (None, None) if policy == "reset" else plan_state(
                self.growth, name, shapes, shape, FIELD_KINDS, policy, copies)
            if refused is not None:
                self.reset.append((name, *refused))
            if kinds is None:
                self.fresh.append(name)
                for field, (dtype, form) in template.items():
                    if form == "other":
                        raise GrowfxError(f"{name} starts with fresh optimizer state, but its field {field} is "
                                          f"neither a scalar nor the parameter's shape in {checkpoint.folder} "
                                          f"(a factored statistic): its fresh value is not known")
                    size = () if form == "scalar" else shape
                    self._add(Entry(f"{optim}.state.{name}.{field}", (optim, "state", name, field), size, dtype),
                              ("zeros", size, dtype))
                continue
            source_shape = tuple(self.growth.original[recipe.source][0])
            for field, kind in kinds.items():
                key, entry = fields[field], Entry(f"{optim}.state.{name}.{field}", (optim, "state", name, field))
                if shapes[field] is None:
                    self._add(entry, ("as it was", key))
                    continue
                size = _grown_field_shape(shapes[field], source_shape, shape)
                self._add(dataclasses.replace(entry, shape=size, dtype=checkpoint.dtype(key)),
                          ("state", name, key, kind, shape))
        chosen = grown_groups(self.growth, [name for name, _ in named], source_group)
        for group, keys in sorted(layout.groups.items()):
            for hyper, key in keys.items():
                entry = Entry(f"{optim}.param_groups.{group}.{hyper}", (optim, "param_groups", group, hyper))
                if hyper == "params":
                    self._add(entry, ("value", [name for name, _ in named if chosen[name] == group]))
                else:
                    self._add(entry, ("as it was", key))


class _Weights:
    """The original's weights by parameter name, each read from the checkpoint when a recipe asks for it."""

    def __init__(self, checkpoint: DistributedCheckpoint, layout: _Layout):
        self.checkpoint, self.keys = checkpoint, layout.model

    def __contains__(self, name: str) -> bool:
        return name in self.keys

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.checkpoint.tensor(self.keys[name])


def _fresh_template(checkpoint: DistributedCheckpoint, layout: _Layout) -> dict[str, tuple[torch.dtype, str]]:
    """The tensor fields a parameter's state has in this checkpoint, from one that has state: field -> (dtype,
    form), form ``scalar`` (``step``), ``parameter`` (its shape) or ``other`` (a factored statistic). A fresh
    parameter gets them as zeros."""
    for fqn, fields in layout.state.items():
        if fqn in layout.model:
            parameter = checkpoint.shape(layout.model[fqn])
            return {field: (checkpoint.dtype(key), "scalar" if checkpoint.shape(key) == () else
                            "parameter" if checkpoint.shape(key) == parameter else "other")
                    for field, key in fields.items() if checkpoint.is_tensor(key)}
    return {}


def _grown_field_shape(field_shape: tuple, source_shape: tuple, parameter_shape: tuple) -> tuple:
    """A carried field's grown shape: a scalar stays one; a field of the parameter's shape takes the grown
    parameter's; a factored statistic keeps its averaged axes at 1."""
    if not field_shape:
        return ()
    if field_shape == source_shape:
        return parameter_shape
    return tuple(1 if size == 1 and source_shape[axis] != 1 else parameter_shape[axis]
                 for axis, size in enumerate(field_shape))
