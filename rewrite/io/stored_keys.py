"""The keys a Hugging Face checkpoint stores its tensors under, and the model's tensors they are.

transformers does not always load a stored tensor under its key (``core_model_loading``): a family's
*renamings* change the key (GPT-NeoX's ``embed_out`` is the model's ``lm_head``), and its *converters* make one
model tensor of several stored ones (Mixtral stores each expert's ``w1``, ``w3`` apart; the model holds
``experts.gate_up_proj = cat(stack(w1_e), stack(w3_e), dim=1)``). Streaming reads the model's tensors:

* :func:`open_checkpoint` serves a folder's tensors under the model's names: renamed keys read under their new
  name, and a converted tensor made, when asked for, by transformers' own converter from its stored parts
  (:class:`ConvertedReader`), so that a per-expert Mixtral folder streams as a stacked one would.
* :class:`StoredLayout` gives the tensors ``save_pretrained`` writes for the model's (renamings reverted, converted
  tensors split again as stored) and makes them from the model's: a per-expert folder grows into a per-expert
  folder, the format every tool reading Mixtral expects.
"""

from __future__ import annotations

import copy
import functools
import os
import threading
from collections.abc import Callable

import torch

from rewrite.errors import GrowfxError
from rewrite.io.safetensors_stream import CheckpointReader, FileBytes, nbytes


def open_checkpoint(model: torch.nn.Module, folder) -> CheckpointReader | ConvertedReader:
    """The tensors of ``folder`` by the name they go by in ``model`` (a checkpoint of ``model``'s class, on
    ``meta``), each checked to have the shape ``model`` holds it in."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter, WeightRenaming, dot_natural_key, rename_source_key)
    except ImportError:  # a transformers that loads every key as it is stored
        return CheckpointReader(folder)
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    parts: dict[str, list[tuple[str, str]]] = {}  # model tensor -> its stored (pattern, key) parts

    def name(key: str) -> str:  # a converted part keeps its stored key; the reader below hides it
        renamed, pattern = rename_source_key(key, renamings, converters)
        if pattern is None:
            return renamed
        parts.setdefault(renamed, []).append((pattern, key))
        return key

    reader = CheckpointReader(folder, names=name)
    held = model.state_dict()
    for target, stored in parts.items():
        if target not in held:
            raise GrowfxError(f"{reader.folder} stores {stored[0][1]}, which transformers converts into {target}, "
                              f"a tensor {type(model).__name__} does not have")
        stored.sort(key=lambda part: dot_natural_key(part[1]))  # the order transformers stacks them in
    if parts:
        conversions = [Conversion(target, by_pattern[stored[0][0]], stored) for target, stored in parts.items()]
        reader = ConvertedReader(reader, conversions, model)
    for name, tensor in held.items():
        if name in reader and reader.shape(name) != tuple(tensor.shape):
            conversion = reader.made.get(name) if isinstance(reader, ConvertedReader) else None
            how = f"makes {name} of its {len(conversion.parts)} stored parts" if conversion else f"stores {name}"
            raise GrowfxError(f"{reader.folder} {how} as {list(reader.shape(name))}, but {type(model).__name__} "
                              f"with the folder's config holds it as {list(tensor.shape)}")
    return reader


class Conversion:
    """Model tensors transformers makes of stored ones with one converter: ``converter`` (a template: each use
    takes a copy, as loading does) over ``parts``, (source pattern, stored key) in the order loading collects
    them; ``target`` is the name loading files them under (several parts stacked into one tensor, or one
    fused part split into several: q, k and v)."""

    def __init__(self, target: str, converter, parts: list[tuple[str, str]]):
        self.target, self.converter, self.parts = target, converter, parts

    def make(self, load: Callable[[str], torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Every model tensor the conversion makes, by name, from ``load`` (a stored part by key)."""
        converter = copy.deepcopy(self.converter)
        for pattern, key in self.parts:
            converter.add_tensor(self.target, key, pattern, functools.partial(load, key))
        try:
            made = converter.convert(self.target, model=model, config=model.config)
        except Exception as error:  # parts that do not fit together: a missing or misshapen one
            raise GrowfxError(f"transformers' converter cannot make {self.target} of the {len(self.parts)} stored "
                              f"tensors {self.parts[0][1]} .. {self.parts[-1][1]}: {error}") from None
        return {name: tensor[0] if isinstance(tensor, list) else tensor for name, tensor in made.items()}


class ConvertedReader:
    """A :class:`CheckpointReader` whose converted tensors are made of their stored parts when asked for (the parts
    read one at a time, then combined: about twice the tensor's bytes at once), each under the model's name. A
    converted tensor has no bytes stored as they are (``stored_as_is``), but where the growth leaves it as it is
    its parts may be copied as stored (:meth:`parts_as_stored`)."""

    def __init__(self, reader: CheckpointReader, conversions: list[Conversion], model: torch.nn.Module):
        self.reader, self.folder, self.model = reader, reader.folder, model
        self._parts = {key for c in conversions for _, key in c.parts}
        self._meta: dict[str, torch.Tensor] = {}  # each made tensor on meta: its shape and dtype
        self.made: dict[str, Conversion] = {}  # each made tensor's conversion
        shaped = lambda key: torch.empty(reader.shape(key), dtype=reader.dtype(key), device="meta")  # noqa: E731
        self._whole: set[str] = set()  # made tensors that are all their conversion makes (none split off)
        for conversion in conversions:
            made = conversion.make(shaped, model)
            self._meta.update(made)
            self.made.update(dict.fromkeys(made, conversion))
            self._whole.update(made if len(made) == 1 else ())
        self.names = [name for name in reader if name not in self._parts] + list(self.made)

    def __contains__(self, name: str) -> bool:
        return name in self.made or (name in self.reader and name not in self._parts)

    def __iter__(self):
        return iter(self.names)

    def keys(self):
        return list(self.names)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._meta[name].shape) if name in self.made else self.reader.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name].dtype if name in self.made else self.reader.dtype(name)

    def nbytes(self, name: str) -> int:
        if name in self.made:
            return self._meta[name].numel() * self._meta[name].element_size()
        return self.reader.nbytes(name)

    def stored_as_is(self, name: str) -> bool:
        return name not in self.made and self.reader.stored_as_is(name)

    def bytes(self, name: str) -> FileBytes:
        if name in self.made:
            raise KeyError(f"{name} is made of {len(self.made[name].parts)} stored tensors: it has no bytes of its "
                           f"own in {self.folder}")
        return self.reader.bytes(name)

    def parts_as_stored(self, name: str, target: str, stored: dict[str, tuple]) -> dict[str, FileBytes] | None:
        """Where a tensor equal to the converted tensor ``name`` is stored again as ``target``, split into
        ``stored`` (key -> (shape, dtype), as :class:`StoredLayout` splits it), the bytes of each part as the
        folder stores them: ``name``'s parts, renamed as ``target``'s (the keys differ where the tensor names
        differ, a layer's index), shapes and dtypes checked. None when they do not match one to one."""
        if name not in self._whole:  # not one of several tensors split from a fused part
            return None
        end = len(os.path.commonprefix([name[::-1], target[::-1]]))
        old, new = name[:len(name) - end], target[:len(target) - end]
        moved = {new + key[len(old):]: key for _, key in self.made[name].parts if key.startswith(old)}
        if set(moved) != set(stored) or any(
                (self.reader.shape(moved[key]), self.reader.dtype(moved[key])) != stored[key] for key in stored):
            return None
        return {key: self.reader.bytes(part) for key, part in moved.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.made:
            return self.made[name].make(self.reader.__getitem__, self.model)[name].contiguous()
        if name not in self:
            raise KeyError(f"{self.folder} has no tensor {name}")
        return self.reader[name]


class StoredLayout:
    """The tensors ``save_pretrained`` writes for a model's tensors ``entries`` (name, shape, dtype), as
    ``core_model_loading.revert_weight_conversion`` makes them for a model not loaded from a folder: renamings
    reverted (GPT-NeoX's ``lm_head`` stored as ``embed_out``) and converted tensors split as stored (Mixtral's
    ``experts.gate_up_proj`` into each expert's ``w1`` and ``w3``). Tensors are grouped as the reverse converters
    group them; each group's stored keys, shapes and dtypes come from reverting it on ``meta``.

    ``entries`` lists the stored tensors in the model's order (a group's together, where its first member is);
    :meth:`make` makes one from the model's tensors: a group is made and reverted once, on the first of its
    stored tensors asked for, and the rest are kept until asked for (they are written next)."""

    def __init__(self, model: torch.nn.Module, entries: list[tuple[str, tuple[int, ...], torch.dtype]]):
        self.model = model
        rename, split = _reverse_transforms(model)
        groups: dict[str, list[str]] = {}
        for name, _, _ in entries:
            key = split(name)
            groups.setdefault(key if key is not None else name, []).append(name)
        shapes = {name: (shape, dtype) for name, shape, dtype in entries}
        self._bytes = {name: nbytes(shape, dtype) for name, shape, dtype in entries}
        self.entries: list[tuple[str, tuple[int, ...], torch.dtype]] = []
        self.group: dict[str, tuple[str, ...]] = {}  # stored key -> the model tensors it is made from
        self.keys: dict[tuple[str, ...], list[str]] = {}  # model tensors -> the stored keys made of them
        for group, members in groups.items():
            members = tuple(members)
            if split(members[0]) is None:  # renamed at most, as revert_weight_conversion renames it
                stored = [(rename(group), *shapes[group])]
            else:
                metas = {n: torch.empty(shapes[n][0], dtype=shapes[n][1], device="meta") for n in members}
                stored = [(key, tuple(t.shape), t.dtype) for key, t in self._revert(metas).items()]
            for key, shape, dtype in stored:
                if key in self.group:
                    raise GrowfxError(f"{type(model).__name__} stores {key} for both {self.group[key]} and {members}")
                self.group[key] = members
            self.entries += stored
            self.keys[members] = [key for key, _, _ in stored]
        self._made: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}  # a group's parts not yet asked for
        self._locks = {members: threading.Lock() for members, keys in self.keys.items() if len(members) + len(keys) > 2}

    def _revert(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        try:
            from transformers.core_model_loading import revert_weight_conversion
        except ImportError:
            return tensors
        return {key: tensor[0] if isinstance(tensor, list) else tensor
                for key, tensor in revert_weight_conversion(self.model, tensors).items()}

    def as_is(self, key: str) -> str | None:
        """The model tensor stored under ``key`` as it is (renamed at most), else None (a part of a group)."""
        members = self.group[key]
        return members[0] if len(members) == 1 and len(self.keys[members]) == 1 else None

    def holds(self, key: str, holds: Callable[[str], int]) -> int:
        """About the bytes making the stored tensor ``key`` holds, given what making each model tensor holds: a
        group's first stored tensor makes the group, its members one after the other (each holding what it
        holds, the ones made before it kept), then their stored parts from them (the members and the parts); the
        others are made by then."""
        members = self.group[key]
        if self.as_is(key) is not None:
            return holds(members[0])
        if key != self.keys[members][0]:
            return 0
        made = [self._bytes[name] for name in members]
        making = max(sum(made[:i]) + holds(name) for i, name in enumerate(members))
        parts = set(self.keys[members])
        return max(making, sum(made) + sum(nbytes(shape, dtype) for k, shape, dtype in self.entries if k in parts))

    def make(self, key: str, make: Callable[[str], torch.Tensor | FileBytes]) -> torch.Tensor | FileBytes:
        """The stored tensor ``key``, from ``make`` (a model tensor by name); safe to call from several threads."""
        members = self.group[key]
        if self.as_is(key) is not None:
            return make(members[0])
        with self._locks[members]:
            if members not in self._made:
                made = {}
                for name in members:
                    made[name] = make(name)
                    if isinstance(made[name], FileBytes):
                        raise GrowfxError(f"{name} is stored split ({', '.join(self.keys[members])}): its bytes "
                                          f"cannot be copied as they are")
                self._made[members] = self._revert(made)
            parts = self._made[members]
            tensor = parts.pop(key)
            if not parts:
                del self._made[members]
        return tensor.contiguous()


def _reverse_transforms(model: torch.nn.Module) -> tuple[Callable[[str], str], Callable[[str], str | None]]:
    """How ``save_pretrained`` stores a model tensor (``revert_weight_conversion``, for a model not loaded from a
    folder): the key its renamings give it, and the group key a reverse converter saves it under (None where
    no converter splits it)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            PrefixChange, WeightConverter, WeightRenaming, apply_converters, apply_renamings)
    except ImportError:  # a transformers that stores every tensor under the model's name
        return (lambda name: name), (lambda name: None)
    forward = [t for t in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(t, PrefixChange)]
    reverse = [t.reverse_transform() for t in reversed(forward)]
    renamings = [t for t in reverse if isinstance(t, WeightRenaming)]
    converters = [t for t in reverse if isinstance(t, WeightConverter)]

    def split(name: str) -> str | None:
        key, pattern = apply_converters(name, converters)
        return key if pattern is not None else None

    return (lambda name: apply_renamings(name, renamings)), split
