"""The growth map: for every tensor of a grown model, how it is computed from the original model's tensors.

A :class:`Recipe` makes one grown tensor: start from a source tensor of the original (or, for a tensor the
original did not have, from a ``Fill``), then apply its growth ops in order (``rewrite.transform.growth_ops``:
``Take``, ``Split``, ``Scale``, ``Noise``, ``Redraw``).

The ops are the implementation, not a description of it: ``rewrite.transform.resize`` and ``Editor`` build
every grown tensor by running its recipe (``run_ops``), so ``map.apply(original_state_dict)`` is
bit-identical to the grown module's state dict by construction. Maps compose (``a.then(b)``: the recipe of
a tensor of ``b`` continues the recipe of its source in ``a``), so the map of a plan of many passes relates
the final tensors directly to the original's, renames included. ``to_dict``/``from_dict`` round-trip
through JSON (noise as seeds, indices as runs).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from rewrite.transform.dual import run_dual
from rewrite.transform import draws
from rewrite.transform.growth_ops import Fill, Noise, Op, Redraw, Take, composed, op_from_dict
from rewrite.transform.run_ops import run_ops
from rewrite.transform.work import DRAW_COST, draw_counts, work

# -- recipes and maps ----------------------------------------------------------------------------------------
KEPT, COPY, NEW = "kept", "copy", "new"
FORMAT = "growfx.growth_map/2"  # /2: seeded values drawn by ``draws.SCHEME`` (/1: one serial CPU generator a draw)
OLD_DRAWS = "one CPU mt19937 per draw (growfx before 2026-12-08)"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How one grown tensor is made. ``role``: ``kept`` (the original tensor ``source``, maybe grown, scaled or
    renamed), ``copy`` (a copy of ``source`` in a new role: a copied block, an expert) or ``new`` (no source;
    starts from ``start``). ``persistent``: the tensor is in the module's state dict; ``parameter``: it is a
    parameter (not a buffer)."""

    source: str | None
    ops: tuple[Op, ...] = ()
    role: str = KEPT
    start: Fill | None = None
    shape: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32
    persistent: bool = True
    note: str = ""
    parameter: bool = True

    def then(self, *ops: Op, **changes) -> "Recipe":
        return dataclasses.replace(self, ops=(*self.ops, *ops), **changes)

    def to_dict(self) -> dict:
        return {"source": self.source, "ops": [op.to_dict() for op in self.ops], "role": self.role,
                "start": None if self.start is None else self.start.to_dict(), "shape": list(self.shape),
                "dtype": str(self.dtype).removeprefix("torch."), "persistent": self.persistent, "note": self.note,
                "parameter": self.parameter}

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        return cls(d["source"], tuple(op_from_dict(o) for o in d["ops"]), d["role"],
                   None if d["start"] is None else Fill.from_dict(d["start"]), tuple(d["shape"]),
                   getattr(torch, d["dtype"]), d["persistent"], d["note"], d["parameter"])


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
    def between(cls, original: dict[str, tuple], result: torch.nn.Module, made: dict[int, Recipe],
                names: dict[int, str]) -> "GrowthMap":
        """The map of one rewrite: every tensor of ``result`` is in ``made`` (by identity), or is the tensor of
        the source that ``names`` maps its identity to (kept as it was), or is unknown (recorded opaque).
        ``original``: the source's tensors as :func:`shapes_of` gives them, read before the rewrite (which may
        have edited the source in place)."""
        state = set(result.state_dict(keep_vars=True))
        parameters = {id(p) for p in result.parameters()}
        recipes, aliases, seen = {}, {}, {}
        for name, tensor in named_tensors(result):
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
                                                persistent=name in state, parameter=id(tensor) in parameters)
        used = {r.source for r in recipes.values() if r.role == KEPT}
        removed = tuple(n for n in original if n not in used)
        return cls(recipes, aliases, removed, original)

    @classmethod
    def identity(cls, module: torch.nn.Module) -> "GrowthMap":
        """The map of a traced model onto itself."""
        return cls.between(shapes_of(module), module, {}, tensor_names(module))

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
            recipes[name] = dataclasses.replace(recipe, source=earlier.source,
                                                ops=composed(recipe.dtype, earlier.ops, recipe.ops),
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

    def draw_counts(self, name: str) -> list[int]:
        """How many normal values each seeded step making the grown tensor ``name`` draws (a fill, noise, a
        redraw)."""
        recipe = self.recipes[self.canonical(name)]
        shape, filled = self._start(recipe)
        return ([filled] if filled else []) + draw_counts(recipe.ops, shape)

    def work(self, name: str) -> int:
        """About what making the grown tensor ``name`` costs, in values written (``work.work``; a fill's
        normal draw included): what a build orders its tensors by, longest first."""
        recipe = self.recipes[self.canonical(name)]
        shape, filled = self._start(recipe)
        return work(recipe.ops, shape) + DRAW_COST * filled

    def _start(self, recipe: Recipe) -> tuple[tuple[int, ...], int]:
        """The shape a recipe's ops start from, and how many normal values its fill draws."""
        if recipe.source is None:
            start = recipe.start
            return start.shape, math.prod(start.shape) if start.kind == "normal" else 0
        return self.original.get(recipe.source, (recipe.shape,))[0], 0

    def make(self, name: str, tensors: dict[str, torch.Tensor], kind: str = "weight") -> torch.Tensor:
        """The grown tensor ``name`` from the original's ``tensors`` (a state dict, or gradients, or one optimizer
        state field by parameter name). ``kind``: ``weight``; ``gradient`` for what transforms like a gradient
        (first moments, momentum buffers); ``second_moment`` for its squares; ``preserve`` keeps old entries and
        zeroes new ones. Under the last three, a copy into a new role (a copied block, an expert) and a tensor
        with no source are zero: they have no gradient identity with anything of the original. The result lives
        on the device of its source, or, for a tensor with none, of the given tensors (the CPU when there are
        none)."""
        recipe = self.recipes[self.canonical(name)]
        if recipe.source is None or kind != "weight" and recipe.role != KEPT:
            device = _device_of(tensors)
            if kind != "weight":
                return torch.zeros(recipe.shape, dtype=recipe.dtype, device=device)
            return run_ops(recipe.start.make(device), recipe.ops)
        if recipe.source not in tensors:
            raise KeyError(f"the growth map makes {name} from the original's {recipe.source}, which the given "
                           f"tensors do not include (non-persistent buffers are not in a state dict: pass "
                           f"them too)")
        source = tensors[recipe.source]
        return run_ops(source, recipe.ops) if kind == "weight" else run_dual(source, recipe.ops, kind)

    def apply(self, state_dict: dict[str, torch.Tensor], kind: str = "weight") -> dict[str, torch.Tensor]:
        """The grown model's tensors from the original's, tensor by tensor, without the graph. With
        ``kind="weight"`` (a state dict in, the grown state dict out) equal bit for bit to
        ``grown.module.state_dict()`` (tied names share one tensor). With ``gradient`` or ``second_moment``
        (gradients or optimizer state by parameter name in, tied parameters once, as ``named_parameters`` gives
        them), every grown parameter that has a source there or none at all, through the dual of the map (see
        ``rewrite.transform.dual``)."""
        made = {}
        out = {}
        names = self.names(persistent_only=True) if kind == "weight" else list(self.recipes)  # tied: once
        for name in names:
            key = self.canonical(name)
            recipe = self.recipes[key]
            if kind != "weight" and (not recipe.parameter or (recipe.role == KEPT and recipe.source not in state_dict)):
                continue
            if key not in made:
                made[key] = self.make(key, state_dict, kind)
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
            "format": FORMAT,
            "draws": draws.SCHEME,
            "recipes": {n: r.to_dict() for n, r in self.recipes.items()},
            "aliases": self.aliases,
            "removed": list(self.removed),
            "original": {n: [list(s), str(d).removeprefix("torch.")] for n, (s, d) in self.original.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GrowthMap":
        if d.get("format") not in (FORMAT, "growfx.growth_map/1"):
            raise ValueError(f"not a growfx growth map (format {d.get('format')!r})")
        made = cls({n: Recipe.from_dict(r) for n, r in d["recipes"].items()}, d["aliases"], tuple(d["removed"]),
                   {n: (tuple(s), getattr(torch, t)) for n, (s, t) in d["original"].items()})
        if d.get("draws", OLD_DRAWS) != draws.SCHEME and made.seeded():
            raise ValueError(f"this growth map's seeded draws were made by another scheme ({d.get('draws', OLD_DRAWS)}"
                             f"), which this version of growfx does not reproduce ({draws.SCHEME}): grow the "
                             f"model again to get a map of its own")
        return made

    def seeded(self) -> list[str]:
        """The tensors whose recipe draws seeded values (a normal fill, noise, a redraw)."""
        return [name for name, recipe in self.recipes.items()
                if (recipe.start is not None and recipe.start.kind == "normal")
                or any(isinstance(op, (Noise, Redraw)) for op in recipe.ops)]


def _device_of(tensors) -> torch.device | None:
    """Where a tensor made from none of ``tensors`` goes: where the first of them lives (None: a reader of
    files, or nothing given; the CPU)."""
    if isinstance(tensors, dict):
        return next((t.device for t in tensors.values() if torch.is_tensor(t)), None)
    return None


def shapes_of(module: torch.nn.Module) -> dict[str, tuple]:
    """Each tensor of ``module`` once (tied names under their first), with its shape and dtype."""
    seen, out = set(), {}
    for name, tensor in named_tensors(module):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out[name] = (tuple(tensor.shape), tensor.dtype)
    return out


def tensor_names(module: torch.nn.Module) -> dict[int, str]:
    """The identity of every parameter and buffer of ``module`` -> its first name."""
    names: dict[int, str] = {}
    for name, tensor in named_tensors(module):
        names.setdefault(id(tensor), name)
    return names


def named_tensors(module: torch.nn.Module):
    """Every parameter and buffer of ``module`` by every name it goes by (tied names and non-persistent
    buffers included)."""
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)
