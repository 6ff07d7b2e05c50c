"""The growth map: for every tensor of a grown model, how it is computed from the original model's tensors.

A :class:`Recipe` makes one grown tensor: start from a source tensor of the original (or, for a tensor the
original did not have, from a :class:`Fill`), then apply its ops in order:

* :class:`Take` (``axis``, ``index``): new position ``j`` along ``axis`` takes old position ``index[j]``, or
  zero where ``index[j] = -1``; ``old_positions[i]`` is where old unit ``i`` now sits. Every width growth is
  one Take per grown axis: old units kept, new ones copied from ``index`` (Net2Net, clone) or zero.
* :class:`Split` (``axis``, ``divisors``): ``x[.., j, ..] /= divisors[j]``: a consumer column of a unit that
  was split into ``n`` parts (Net2WiderNet, uniform cloning) keeps ``1/n`` of its weight.
* :class:`Scale` (``axis``, ``positions``, ``factor``, ``offset``): ``x <- (x + c) * s - c`` on some positions
  (or all): the temperature correction of keys, RMSNorm gains over a zero-padded axis (``c + w`` gains
  included), residual branches folded into their output layers.
* :class:`Noise` (``axis``, ``positions``, ``seed``, ``relative``): ``x += N(0, 1) * relative * std(r)`` on some
  positions, with ``r`` the tensor before the last Take (its own scale) and the normal draws from
  ``torch.Generator().manual_seed(seed)``: symmetry breaking, reproducible from the map alone.
* :class:`Redraw` (``seed``): ``x <- N(0, 1) * std(x)``: a copied matrix drawn afresh at its source's scale.

The ops are the implementation, not a description of it: ``rewrite.transform.resize`` and ``Editor`` build
every grown tensor by running its recipe (``run_ops``), so ``map.apply(original_state_dict)`` is
bit-identical to the grown module's state dict by construction. Maps compose (``a.then(b)``: the recipe of
a tensor of ``b`` continues the recipe of its source in ``a``), so the map of a plan of many passes relates
the final tensors directly to the original's, renames included. ``to_dict``/``from_dict`` round-trip
through JSON (noise as seeds, indices as runs).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import math
import zlib
from typing import Any, Union

import torch

NOISE = 1e-2  # relative scale of the symmetry-breaking noise the built-in policies draw


# -- index vectors as runs ---------------------------------------------------------------------------------
def runs(index: torch.Tensor) -> list[list[int]]:
    """``[0, 1, 2, 7, 8, -1, -1]`` -> ``[[0, 3], [7, 2], [-1, 2]]``: (first value, length) of each run that
    counts up by one (``-1`` runs repeat)."""
    if len(index) == 0:
        return []
    index = index.long()
    missing = index < 0
    continues = ((index[1:] - index[:-1] == 1) & ~missing[1:] & ~missing[:-1]) | (missing[1:] & missing[:-1])
    starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.nonzero(~continues).flatten() + 1]).tolist()
    ends = starts[1:] + [len(index)]
    firsts = index[starts].tolist()
    return [[first, end - start] for first, start, end in zip(firsts, starts, ends)]


def from_runs(items: list[list[int]]) -> torch.Tensor:
    parts = [torch.full((n,), -1) if first == -1 else torch.arange(first, first + n) for first, n in items]
    return torch.cat(parts).long() if parts else torch.zeros(0, dtype=torch.long)


def value_runs(values: torch.Tensor) -> list[list[int]]:
    """``[1, 1, 2, 2, 2]`` -> ``[[1, 2], [2, 3]]``: (value, how many times)."""
    out: list[list[int]] = []
    for value in values.tolist():
        if out and out[-1][0] == value:
            out[-1][1] += 1
        else:
            out.append([value, 1])
    return out


def from_value_runs(items: list[list[int]]) -> torch.Tensor:
    return torch.cat([torch.full((n,), v) for v, n in items]).long() if items else torch.zeros(0, dtype=torch.long)


def _describe_runs(items: list[list[int]]) -> str:
    """Runs of positions as text: ``[[0, 24], [30, 1]]`` -> ``0-23, 30``."""
    return ", ".join(f"{first}" if n == 1 else f"{first}-{first + n - 1}" for first, n in items)


def _offsets(items):
    at = 0
    for first, n in items:
        yield at, n
        at += n


def seed_for(base: int, *parts: object) -> int:
    """A seed for one tensor (and axis) of a growth, independent of the order tensors are grown in."""
    return zlib.crc32("/".join(map(str, (base, *parts))).encode()) & 0x7FFFFFFF


# -- ops -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Take:
    """New position ``j`` along ``axis`` takes old position ``index[j]`` (zero where -1); ``fill`` says how the
    new positions came to be: ``split`` (one of the parts of a split unit), ``copy``, ``zero``, ``noise``."""

    axis: int
    index: torch.Tensor
    old_positions: torch.Tensor
    fill: str

    def new_positions(self) -> torch.Tensor:
        keep = torch.ones(len(self.index), dtype=torch.bool)
        keep[self.old_positions] = False
        return torch.nonzero(keep).flatten()

    def to_dict(self) -> dict:
        return {"op": "take", "axis": self.axis, "index": runs(self.index),
                "old_positions": runs(self.old_positions), "fill": self.fill}

    def describe(self, shape) -> str:
        axis_name = _axis_name(self.axis, len(shape))
        kept = _describe_runs([[0, len(self.old_positions)]]) if _prefix(self.old_positions) else "moved"
        new = self.new_positions()
        if not len(new):
            return f"{axis_name} reordered"
        return (f"{axis_name} {kept} kept, {_describe_runs(runs(new))} {self.fill}" if kept != "moved"
                else f"{axis_name}: old units moved, {len(new)} new ({self.fill})")


@dataclasses.dataclass(frozen=True)
class Split:
    """``x[.., j, ..] /= divisors[j]`` along ``axis``: each part of a unit split ``n`` ways carries ``1/n``."""

    axis: int
    divisors: torch.Tensor

    def to_dict(self) -> dict:
        return {"op": "split", "axis": self.axis, "divisors": value_runs(self.divisors)}

    def describe(self, shape) -> str:
        counts = sorted(set(self.divisors.tolist()) - {1})
        return f"{_axis_name(self.axis, len(shape))} divided by their replica counts ({', '.join(map(str, counts))})"


@dataclasses.dataclass(frozen=True)
class Scale:
    """``x <- (x + offset) * factor - offset`` at ``positions`` along ``axis`` (everywhere when None)."""

    factor: float
    offset: float = 0.0
    axis: int | None = None
    positions: torch.Tensor | None = None

    def to_dict(self) -> dict:
        return {"op": "scale", "factor": self.factor, "offset": self.offset, "axis": self.axis,
                "positions": None if self.positions is None else runs(self.positions)}

    def describe(self, shape) -> str:
        where = "" if self.positions is None else f" at {_axis_name(self.axis, len(shape))} {_describe_runs(runs(self.positions))}"
        what = f"({self.offset:g} + w) * {self.factor:.6g} - {self.offset:g}" if self.offset else f"* {self.factor:.6g}"
        return f"scaled {what}{where}"


@dataclasses.dataclass(frozen=True)
class Noise:
    """``x += N(0, 1) * relative * std(r)`` at ``positions`` along ``axis``; ``r``: the tensor before the last Take."""

    axis: int
    positions: torch.Tensor
    seed: int
    relative: float = NOISE

    def to_dict(self) -> dict:
        return {"op": "noise", "axis": self.axis, "positions": runs(self.positions), "seed": self.seed,
                "relative": self.relative}

    def describe(self, shape) -> str:
        return (f"+ noise {self.relative:g} x std at {_axis_name(self.axis, len(shape))} "
                f"{_describe_runs(runs(self.positions))} (seed {self.seed})")


@dataclasses.dataclass(frozen=True)
class Redraw:
    """``x <- N(0, 1) * std(x)`` with normal draws from ``seed``: a fresh matrix at its source's scale."""

    seed: int

    def to_dict(self) -> dict:
        return {"op": "redraw", "seed": self.seed}

    def describe(self, shape) -> str:
        return f"drawn afresh at the source's std (seed {self.seed})"


Op = Union[Take, Split, Scale, Noise, Redraw]


@dataclasses.dataclass(frozen=True)
class Fill:
    """How a tensor with no source starts: ``zeros``, ``normal`` (``N(0, std^2)`` from ``seed``) or ``value``
    (an opaque value a rule computed, stored in the map)."""

    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    seed: int | None = None
    std: float | None = None
    value: torch.Tensor | None = None

    def make(self) -> torch.Tensor:
        if self.kind == "zeros":
            return torch.zeros(self.shape, dtype=self.dtype)
        if self.kind == "normal":
            generator = torch.Generator().manual_seed(self.seed)
            return (torch.randn(self.shape, generator=generator) * self.std).to(self.dtype)
        return self.value.clone()

    def to_dict(self) -> dict:
        out = {"kind": self.kind, "shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch.")}
        if self.kind == "normal":
            out.update(seed=self.seed, std=self.std)
        if self.kind == "value":
            raw = self.value.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            out["value"] = base64.b64encode(raw).decode("ascii")
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Fill":
        dtype = getattr(torch, d["dtype"])
        value = None
        if d["kind"] == "value":
            raw = bytearray(base64.b64decode(d["value"]))
            value = torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(d["shape"]).clone()
        return cls(d["kind"], tuple(d["shape"]), dtype, d.get("seed"), d.get("std"), value)

    def describe(self) -> str:
        if self.kind == "normal":
            return f"normal, std {self.std:g} (seed {self.seed})"
        return "zeros" if self.kind == "zeros" else "a value the rule computed (opaque: stored in the map)"


# -- running ops ---------------------------------------------------------------------------------------------
def run_ops(tensor: torch.Tensor, ops: tuple[Op, ...] | list[Op]) -> torch.Tensor:
    """The tensor ``ops`` make of ``tensor`` (never written to; a new tensor when any op runs)."""
    x = tensor.detach()
    reference = x
    fresh = False
    with torch.no_grad():
        for op in ops:
            if isinstance(op, Take):
                reference, x = x, _take(x, op.axis, op.index)
                fresh = True
                continue
            if not fresh:
                x, fresh = x.clone(), True
            if isinstance(op, Split):
                x.mul_(_along(op.divisors.to(x.dtype).reciprocal(), op.axis, x.dim()))
            elif isinstance(op, Scale):
                with _region(x, op.axis, op.positions) as target:
                    target.add_(op.offset).mul_(op.factor).sub_(op.offset)
            elif isinstance(op, Noise):
                with _region(x, op.axis, op.positions) as target:
                    target.add_(_normal(target.shape, op.seed, x.dtype), alpha=op.relative * _std(reference))
            elif isinstance(op, Redraw):
                x = _normal(x.shape, op.seed, torch.float32).to(x.dtype) * float(x.float().std())
            else:
                raise TypeError(f"unknown growth op {op!r}")
    return x


@contextlib.contextmanager
def _region(x: torch.Tensor, axis: int | None, positions: torch.Tensor | None):
    """The entries at ``positions`` along ``axis`` (all when None) to edit in place: a view where the positions
    are one run, else a gathered copy written back afterwards."""
    if positions is None:
        yield x
        return
    items = runs(positions)
    if len(items) == 1 and items[0][0] >= 0:
        yield x.narrow(axis, items[0][0], items[0][1])
        return
    region = x.index_select(axis, positions)
    yield region
    x.index_copy_(axis, positions, region)


def _take(x: torch.Tensor, axis: int, index: torch.Tensor, max_runs: int = 16) -> torch.Tensor:
    """``x.index_select(axis, index)`` with zeros where ``index`` is -1, allocated once and filled by slices
    where the index runs consecutively (kept units are one run, uniform clones whole blocks)."""
    shape = list(x.shape)
    shape[axis] = len(index)
    out = torch.empty(shape, dtype=x.dtype, device=x.device)
    items = runs(index) if len(index) else []
    if len(items) > max_runs:
        gathered = x.index_select(axis, index.clamp(min=0))
        missing = torch.nonzero(index < 0).flatten()
        if len(missing):
            gathered.index_fill_(axis, missing, 0)
        out.copy_(gathered)
        return out
    for start, (first, n) in zip((at for at, _ in _offsets(items)), items):
        target = out.narrow(axis, start, n)
        if first < 0:
            target.zero_()
        else:
            target.copy_(x.narrow(axis, first, n))
    return out


def _normal(shape, seed: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _std(like: torch.Tensor) -> float:
    """The scale noise is drawn at: the std of (a sample of) ``like``; 1 where that is not a positive number."""
    sample = like.detach().reshape(-1)[:65536].float()
    scale = float(sample.std()) if sample.numel() > 1 else float(sample.abs().mean()) if sample.numel() else 1.0
    return scale if math.isfinite(scale) and scale > 0 else 1.0


def _along(values: torch.Tensor, axis: int, rank: int) -> torch.Tensor:
    shape = [1] * rank
    shape[axis] = -1
    return values.view(shape)


def _prefix(positions: torch.Tensor) -> bool:
    return bool(torch.equal(positions, torch.arange(len(positions))))


def _axis_name(axis: int | None, rank: int) -> str:
    if axis is None:
        return "all"
    if rank == 2:
        return ("rows", "columns")[axis]
    return f"axis {axis}"


_OPS = {"take": Take, "split": Split, "scale": Scale, "noise": Noise, "redraw": Redraw}


def op_from_dict(d: dict) -> Op:
    kind = d["op"]
    if kind == "take":
        return Take(d["axis"], from_runs(d["index"]), from_runs(d["old_positions"]), d["fill"])
    if kind == "split":
        return Split(d["axis"], from_value_runs(d["divisors"]))
    if kind == "scale":
        positions = None if d["positions"] is None else from_runs(d["positions"])
        return Scale(d["factor"], d["offset"], d["axis"], positions)
    if kind == "noise":
        return Noise(d["axis"], from_runs(d["positions"]), d["seed"], d["relative"])
    if kind == "redraw":
        return Redraw(d["seed"])
    raise ValueError(f"unknown growth op {kind!r} in a growth map")


# -- recipes and maps ----------------------------------------------------------------------------------------
KEPT, COPY, NEW = "kept", "copy", "new"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How one grown tensor is made. ``role``: ``kept`` (the original tensor ``source``, maybe grown, scaled or
    renamed), ``copy`` (a copy of ``source`` in a new role: a copied block, an expert) or ``new`` (no source;
    starts from ``start``). ``persistent``: the tensor is in the module's state dict."""

    source: str | None
    ops: tuple[Op, ...] = ()
    role: str = KEPT
    start: Fill | None = None
    shape: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32
    persistent: bool = True
    note: str = ""

    def then(self, *ops: Op, **changes) -> "Recipe":
        return dataclasses.replace(self, ops=(*self.ops, *ops), **changes)

    def to_dict(self) -> dict:
        return {"source": self.source, "ops": [op.to_dict() for op in self.ops], "role": self.role,
                "start": None if self.start is None else self.start.to_dict(), "shape": list(self.shape),
                "dtype": str(self.dtype).removeprefix("torch."), "persistent": self.persistent, "note": self.note}

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        return cls(d["source"], tuple(op_from_dict(o) for o in d["ops"]), d["role"],
                   None if d["start"] is None else Fill.from_dict(d["start"]), tuple(d["shape"]),
                   getattr(torch, d["dtype"]), d["persistent"], d["note"])


class GrowthMap:
    """Every tensor of a grown model (parameters and buffers, tied names as ``aliases``) as a :class:`Recipe`
    over the original model's tensors; ``removed`` lists the original tensors nothing is made from."""

    def __init__(self, recipes: dict[str, Recipe], aliases: dict[str, str] | None = None,
                 removed: tuple[str, ...] = (), original: dict[str, tuple] | None = None):
        self.recipes = dict(recipes)
        self.aliases = dict(aliases or {})  # tied name -> the name its recipe is under
        self.removed = tuple(removed)
        self.original = dict(original or {})  # original tensor name -> (shape, dtype)

    # -- building ------------------------------------------------------------------------------------------
    @classmethod
    def between(cls, source: torch.nn.Module, result: torch.nn.Module, made: dict[int, Recipe],
                names: dict[int, str]) -> "GrowthMap":
        """The map of one rewrite: every tensor of ``result`` is in ``made`` (by identity), or is the tensor of
        ``source`` that ``names`` maps its identity to (kept as it was), or is unknown (recorded opaque)."""
        state = set(result.state_dict(keep_vars=True))
        recipes, aliases, seen = {}, {}, {}
        for name, tensor in _named_tensors(result):
            if id(tensor) in seen:
                aliases[name] = seen[id(tensor)]
                continue
            seen[id(tensor)] = name
            if id(tensor) in made:
                recipe = made[id(tensor)]
            elif id(tensor) in names:
                recipe = Recipe(names[id(tensor)])
            else:
                recipe = Recipe(None, role=NEW, start=Fill("value", tuple(tensor.shape), tensor.dtype,
                                                           value=tensor.detach().clone()),
                                note="opaque: a tensor the rewrite registered without the Editor")
            recipes[name] = dataclasses.replace(recipe, shape=tuple(tensor.shape), dtype=tensor.dtype,
                                                persistent=name in state)
        original = _originals(source)
        used = {r.source for r in recipes.values() if r.role == KEPT}
        removed = tuple(n for n in original if n not in used)
        return cls(recipes, aliases, removed, original)

    @classmethod
    def identity(cls, module: torch.nn.Module) -> "GrowthMap":
        """The map of a traced model onto itself."""
        return cls.between(module, module, {}, tensor_names(module))

    # -- composing -----------------------------------------------------------------------------------------
    def canonical(self, name: str) -> str:
        return self.aliases.get(name, name)

    def then(self, later: "GrowthMap") -> "GrowthMap":
        """The map of this growth followed by ``later`` (whose sources are this map's results)."""
        recipes = {}
        for name, recipe in later.recipes.items():
            if recipe.source is None:
                recipes[name] = recipe
                continue
            earlier = self.recipes[self.canonical(recipe.source)]
            role = recipe.role if earlier.role == KEPT else earlier.role
            note = recipe.note or earlier.note
            recipes[name] = dataclasses.replace(recipe, source=earlier.source, ops=(*earlier.ops, *recipe.ops),
                                                role=role, start=earlier.start, note=note)
        used = {r.source for r in recipes.values() if r.role == KEPT}
        removed = tuple(n for n in self.original if n not in used)
        return GrowthMap(recipes, later.aliases, removed, self.original)

    # -- using ---------------------------------------------------------------------------------------------
    def names(self, *, persistent_only: bool = False) -> list[str]:
        """Every tensor name of the grown model (aliases included), in module order."""
        out = []
        for name, recipe in self.recipes.items():
            if not persistent_only or recipe.persistent:
                out.append(name)
        for alias, name in self.aliases.items():
            if not persistent_only or self.recipes[name].persistent:
                out.append(alias)
        return out

    def make(self, name: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The grown tensor ``name`` from the original's ``tensors`` (a state dict)."""
        recipe = self.recipes[self.canonical(name)]
        if recipe.source is None:
            return run_ops(recipe.start.make(), recipe.ops)
        if recipe.source not in tensors:
            raise KeyError(f"the growth map makes {name} from the original's {recipe.source}, which the given "
                           f"state dict does not have (non-persistent buffers are not in a state dict: pass "
                           f"them too)")
        return run_ops(tensors[recipe.source], recipe.ops)

    def apply(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The grown model's state dict from the original's, tensor by tensor, without the graph: equal bit
        for bit to ``grown.module.state_dict()`` (tied names share one tensor)."""
        made = {}
        out = {}
        for name in self.names(persistent_only=True):
            key = self.canonical(name)
            if key not in made:
                made[key] = self.make(key, state_dict)
            out[name] = made[key]
        return out

    def new_entries(self, name: str) -> torch.Tensor:
        """A boolean tensor of the grown tensor's shape: True where growth added the entry (a position beyond
        the original's extent on any axis, or any entry of a tensor the original did not have)."""
        recipe = self.recipes[self.canonical(name)]
        if recipe.role != KEPT:
            return torch.ones(recipe.shape, dtype=torch.bool)
        mask = torch.zeros(self.original[recipe.source][0], dtype=torch.bool)
        for op in recipe.ops:
            if isinstance(op, Take):
                mask = mask.index_select(op.axis, op.index.clamp(min=0))
                mask.index_fill_(op.axis, op.new_positions(), True)
        return mask

    def how(self, name: str) -> str:
        """One line: old shape -> new shape and how (``columns 0-1535 kept, 1536-3071 zero``)."""
        recipe = self.recipes[self.canonical(name)]
        new = "x".join(map(str, recipe.shape)) or "scalar"
        if recipe.role == NEW:
            steps = [recipe.start.describe()] + [op.describe(recipe.shape) for op in recipe.ops]
            return f"{name} [{new}]: new, {'; '.join(steps)}" + (f" ({recipe.note})" if recipe.note else "")
        old_shape = self.original.get(recipe.source, (recipe.shape, None))[0]
        old = "x".join(map(str, old_shape)) or "scalar"
        steps = [op.describe(recipe.shape) for op in recipe.ops]
        if recipe.role == COPY:
            steps.insert(0, f"copy of {recipe.source}")
        elif recipe.source != name:
            steps.insert(0, f"was {recipe.source}")
        return f"{name} [{old}] -> [{new}]: {'; '.join(steps) or 'unchanged'}"

    def __str__(self) -> str:
        changed = [n for n, r in self.recipes.items() if r.ops or r.role != KEPT or r.source != n]
        lines = [f"growth map: {len(self.recipes)} tensors, {len(changed)} made by growth, "
                 f"{len(self.removed)} removed"]
        lines += [f"  {self.how(n)}" for n in changed]
        lines += [f"  {n}: removed" for n in self.removed]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<GrowthMap of {len(self.recipes)} tensors>"

    # -- serialising ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``json.dumps`` it); ``GrowthMap.from_dict`` restores the map."""
        return {
            "format": "growfx.growth_map/1",
            "recipes": {n: r.to_dict() for n, r in self.recipes.items()},
            "aliases": self.aliases,
            "removed": list(self.removed),
            "original": {n: [list(s), str(d).removeprefix("torch.")] for n, (s, d) in self.original.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GrowthMap":
        if d.get("format") != "growfx.growth_map/1":
            raise ValueError(f"not a growfx growth map (format {d.get('format')!r})")
        return cls({n: Recipe.from_dict(r) for n, r in d["recipes"].items()}, d["aliases"], tuple(d["removed"]),
                   {n: (tuple(s), getattr(torch, t)) for n, (s, t) in d["original"].items()})


def _originals(module: torch.nn.Module) -> dict[str, tuple]:
    """Each tensor of ``module`` once (tied names under their first), with its shape and dtype."""
    seen, out = set(), {}
    for name, tensor in _named_tensors(module):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out[name] = (tuple(tensor.shape), tensor.dtype)
    return out


def tensor_names(module: torch.nn.Module) -> dict[int, str]:
    """The identity of every parameter and buffer of ``module`` -> its first name."""
    names: dict[int, str] = {}
    for name, tensor in _named_tensors(module):
        names.setdefault(id(tensor), name)
    return names


def _named_tensors(module: torch.nn.Module):
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)
