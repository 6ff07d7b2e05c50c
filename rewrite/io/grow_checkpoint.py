"""Grow a Hugging Face checkpoint folder without loading it: plan on ``meta``, stream tensor by tensor.

1. **Plan without weights.** The folder's class is built from its config on the ``meta`` device and traced
   there (torch.export of fake tensors); the passes run on the shapes (``verify=False``: nothing to run) and
   give the growth map, every grown tensor as a recipe over the checkpoint's tensors, and the grown config
   (``rewrite.io.native.native_config``).
2. **Stream.** Each tensor of the native class's state dict is made from the checkpoint tensors its recipe
   reads (``GrowthMap.make`` over the folder's tensors under the model's names, ``stored_keys.open_checkpoint``,
   each read when asked: a tensor transformers assembles from several stored ones, such as Mixtral's per-expert
   matrices, by transformers' own converter; an upcycled model's stacked experts are made expert by expert,
   ``native_moe.Piece``) and written
   into shards at once (``write_safetensors``: header first, then data), in the source's dtype. The next
   tensors are made on a few threads while one is written, as long as what they hold together stays within
   what making the largest one holds alone (``rewrite.io.made_ahead``, ``work.working_bytes``).
   Resident memory is the interpreter, the traced shapes, and about three tensors' worth: a source, its
   float32 working copy where one is needed, and the result. A tensor whose recipe is a checkpoint tensor as
   it is (same shape and dtype: the layers a growth keeps or copies unchanged) is not read at all: its bytes
   are copied from the source file into the shard (``safetensors_stream.FileBytes``, in the kernel).
3. **Atomic.** Shards, index, config and the other files (tokenizer, generation config) are written into a
   temporary sibling folder, renamed into place at the end.

The values are those of the in-memory path (``growfx grow`` without ``--stream``: load in float32, grow,
write in the stored dtype): corrections run in float32 and are rounded once. What the in-memory path checks
by running the model (verification, the native class on the example inputs) cannot run here; the tests
check both paths give the same files on small models.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch

from rewrite.errors import GrowfxError, NotRepresentableError
from rewrite.io.hf import example_inputs
from rewrite.io.native import build_native, is_tied_head, native_config, parameters_on_meta
from rewrite.io.native_moe import MOE_CLASSES, Piece, moe_pieces
from rewrite.io.safetensors_stream import INDEX, CheckpointReader, FileBytes, nbytes, shard, write_safetensors
from rewrite.io.sources import atomic_path
from rewrite.io.stored_keys import ConvertedReader, StoredLayout, open_checkpoint
from rewrite.ir.trace import trace
from rewrite.transform.apply import Grown, apply
from rewrite.transform.work import working_bytes
from rewrite.transform.materialise import return_freed_memory, to_meta, workers

Reader = CheckpointReader | ConvertedReader  # a folder's tensors under the model's names
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", INDEX, "pytorch_model.bin.index.json",
                "config.json")


@dataclasses.dataclass
class GrownCheckpoint:
    """What :func:`grow_checkpoint` wrote and how long each phase took."""

    path: Path
    grown: Grown  # the plan on meta: its report and growth map
    config: object  # the grown config written with the shards
    class_name: str
    shards: int
    tensors: int
    bytes: int
    seconds: dict[str, float]
    copied: int = 0  # tensors copied from the source files as they are (never read into memory)


def grow_checkpoint(source: str | Path, passes: list, destination: str | Path, *, replace: bool = False,
                    max_shard_bytes: int = 5 * 2**30) -> GrownCheckpoint:
    """Grow the Hugging Face folder ``source`` by ``passes`` into ``destination`` (see the module docstring)."""
    import transformers

    source, destination = Path(source), Path(destination)
    seconds = {}
    start = time.perf_counter()
    config = transformers.AutoConfig.from_pretrained(source, local_files_only=True)
    model = meta_model(config, f"{source}/config.json")
    reader = open_checkpoint(model, source)
    args, kwargs = meta_inputs(model)
    graph = trace(model, args, kwargs)
    seconds["trace"] = time.perf_counter() - start
    start = time.perf_counter()
    plan = plan_native(graph, model, passes, args, kwargs)
    grown, native_class, native_config_, native = plan.grown, plan.native_class, plan.config, plan.native
    entries = _entries(native, plan.pieces, grown, reader)
    seconds["plan"] = time.perf_counter() - start
    start = time.perf_counter()
    written = 0
    stored = StoredLayout(native, entries)  # as save_pretrained stores them: renamed, converted tensors split
    with atomic_path(destination, replace=replace) as folder:
        folder.mkdir()
        shards = shard(stored.entries, max_shard_bytes)
        names = ["model.safetensors"] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        layout = {name: (shape, dtype) for name, shape, dtype in entries}
        as_is = {stored.as_is(key) for key, _, _ in stored.entries} - {None}

        verbatim = {name: verbatim_source(grown.map, plan.pieces[name], reader, shape, dtype)
                    for name, shape, dtype in entries if name in as_is}
        verbatim = {name: origin for name, origin in verbatim.items() if origin is not None}
        copied = verbatim_parts(grown.map, plan.pieces, reader, stored)  # converted, unchanged: its stored parts

        def make(name: str) -> torch.Tensor | FileBytes:
            if name in verbatim:
                return reader.bytes(verbatim[name])
            shape, dtype = layout[name]
            tensor = plan.pieces[name].make(lambda part: grown.map.make(part, reader), shape, dtype).to(dtype)
            return_freed_memory()  # its scratch, freed into this thread's heap, back to the system
            return tensor

        holds = {name: 0 if name in verbatim else _holds(grown.map, plan.pieces[name], reader, shape, dtype)
                 for name, shape, dtype in entries}
        holds = {key: 0 if key in copied else stored.holds(key, holds.__getitem__) for key, _, _ in stored.entries}
        for file, part in zip(names, shards):
            write_safetensors(folder / file, part, lambda key: copied.get(key) or stored.make(key, make),
                              metadata={"format": "pt"}, workers=workers(), holds=holds.__getitem__,
                              budget=max(holds.values(), default=0))
            written += (folder / file).stat().st_size
        if len(shards) > 1:
            total = sum(nbytes(shape, dtype) for _, shape, dtype in stored.entries)
            index = {"metadata": {"total_size": total},
                     "weight_map": {key: file for file, part in zip(names, shards) for key, _, _ in part}}
            (folder / INDEX).write_text(json.dumps(index, indent=2))
        native_config_.dtype = main_dtype(dtype for _, _, dtype in entries)
        native_config_.save_pretrained(folder)
        for path in source.iterdir():  # tokenizer, generation config, chat template, ...
            if path.is_file() and not any(path.match(pattern) for pattern in WEIGHT_FILES):
                shutil.copy2(path, folder / path.name)
    seconds["write"] = time.perf_counter() - start
    return GrownCheckpoint(destination, grown, native_config_, native_class.__name__, len(shards),
                           len(stored.entries), written, seconds, len(verbatim) + len(copied))


@dataclasses.dataclass
class NativePlan:
    """A growth planned on shapes: the grown plan, and the native class, config and module (on ``meta``)."""

    grown: Grown
    native_class: type
    config: object
    native: torch.nn.Module
    pieces: dict[str, Piece]  # how each tensor the native class saves is made from the grown graph's

    def refuse_mixture(self, what: str) -> None:
        """``NotRepresentableError`` when the plan writes a mixture class (stacked experts), which ``what``
        does not build."""
        if any(piece.kind != "rename" for piece in self.pieces.values()):
            raise NotRepresentableError(
                f"an upcycled model becomes {self.native_class.__name__}, whose experts are stacked: {what} into "
                f"it is not built (its optimizer state would be stacked too). Grow the Hugging Face folder instead "
                f"(growfx grow, with or without --stream)")


def meta_model(config, where: str = "the config", device: str | None = "meta") -> torch.nn.Module:
    """The class a Hugging Face ``config`` names (``architectures``), built on ``device`` (``meta``: no weight
    allocated; None: the default device)."""
    import transformers

    architectures = getattr(config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        raise GrowfxError(f"{where} names no model class transformers has (architectures: {architectures}); set "
                          f"config.architectures to the class, e.g. ['LlamaForCausalLM']")
    with torch.device(device) if device else contextlib.nullcontext():
        return cls(config).eval()


def meta_inputs(model: torch.nn.Module) -> tuple[tuple, dict]:
    """The example inputs of a Hugging Face model, on ``meta``."""
    args, kwargs = example_inputs(model)
    return to_meta(args), to_meta(kwargs)


def plan_native(graph, model: torch.nn.Module, passes: list, args: tuple, kwargs: dict) -> NativePlan:
    """``passes`` planned on the traced ``graph`` of ``model`` (on ``meta``: shapes only, ``verify=False``), and
    the native class the grown model is written as (its parameters on ``meta``, its buffers computed): the
    model's own class, or for an upcycled model its family's mixture class, whose stacked experts are made of
    several of the grown graph's tensors (``native_moe.Piece``). A grown config whose computed buffers are not
    the grown model's is refused (:func:`check_computed_buffers`)."""
    grown = apply(graph, passes, args, kwargs, verify=False)
    native_class, config, mixture = native_config(grown.graph, model)
    config.architectures = [native_class.__name__]  # what the written config.json names
    with parameters_on_meta():
        native = build_native(native_class, config, None if mixture else set(grown.map.names()))
        original = type(model)(model.config)
    state = native.state_dict()
    pieces = moe_pieces(grown.map.names(), mixture, MOE_CLASSES[model.config.model_type], state) if mixture else {}
    for name, target in state.items():
        piece = pieces.setdefault(name, Piece("rename", (name,)))
        shape = piece.shape(lambda part: _recipe_shape(grown.map, part), target.shape)
        if shape != tuple(target.shape):
            made = "no tensor" if shape is None else f"{shape}"
            raise NotRepresentableError(f"{native_class.__name__} with the grown config has {name} "
                                        f"{tuple(target.shape)}, but the grown plan has {made} there")
    check_computed_buffers(grown, original, native)
    return NativePlan(grown, native_class, config, native, pieces)


def _recipe_shape(growth_map, name: str) -> tuple | None:
    """The shape the growth map makes ``name`` (None when it makes no such tensor)."""
    recipe = growth_map.recipes.get(growth_map.canonical(name))
    return None if recipe is None else tuple(recipe.shape)


def check_computed_buffers(grown: Grown, original: torch.nn.Module, native: torch.nn.Module) -> None:
    """A buffer the class computes when it is built (a rotary table, Gemma's embedding scale) is in no
    checkpoint: the native class computes it again from the grown config on loading. Where that value is not
    what the grown model holds (the original's buffer through the growth map), a written checkpoint would not
    compute the grown function, and nothing runs here to notice: ``NotRepresentableError`` naming the buffer.
    Both modules have their parameters on ``meta`` and their buffers computed."""
    made = dict(original.named_buffers())
    for prefix, module in native.named_modules():
        for name in sorted(module._non_persistent_buffers_set):
            full = f"{prefix}.{name}" if prefix else name
            value = module._buffers.get(name)
            if value is None or value.is_meta or grown.map.canonical(full) not in grown.map.recipes:
                continue
            held = grown.map.make(full, made)
            if held.shape != value.shape or not torch.equal(held.to(value.dtype), value):
                got = value.flatten()[:1].tolist() if value.numel() else []
                want = held.flatten()[:1].tolist() if held.numel() else []
                raise NotRepresentableError(
                    f"{type(native).__name__} computes its buffer {full} from the grown config "
                    f"({tuple(value.shape)}, first value {got}), but the grown model holds {tuple(held.shape)}, "
                    f"first value {want}: the written model would not compute the grown function. Grow it in "
                    f"memory, where the native class is checked by running it")


def _entries(native: torch.nn.Module, pieces: dict, grown: Grown, reader: Reader) -> list:
    """(name, shape, dtype) of every tensor the native class saves (tied heads left out, as ``save_pretrained``
    does), each in the dtype of the checkpoint tensor it is made from; a new tensor (or a part the mixture
    zeroes) in the checkpoint's main floating-point dtype."""
    recipes = grown.map
    main = main_dtype(reader.dtype(n) for n in reader.keys())
    entries = []
    for name, target in native.state_dict().items():
        if is_tied_head(native, name):
            continue
        read = [recipes.recipes[recipes.canonical(part)] for part in pieces[name].sources()]  # plan_native checked
        for recipe in read:
            if recipe.source is not None and recipe.source not in reader:
                raise GrowfxError(f"{reader.folder} has no tensor {recipe.source}, which {name} is made from")
        sourced = next((recipe for recipe in read if recipe.source is not None), None)
        if sourced is not None:
            dtype = reader.dtype(sourced.source)
        else:
            dtype = main if not read or read[0].dtype.is_floating_point else read[0].dtype
        entries.append((name, tuple(target.shape), dtype))
    return entries


def unchanged_source(growth_map, piece: Piece) -> str | None:
    """The checkpoint tensor the tensor ``piece`` makes is, as it is: a renamed grown tensor whose recipe is a
    source tensor with no op; else None."""
    if piece.kind != "rename":
        return None
    recipe = growth_map.recipes[growth_map.canonical(piece.names[0])]
    return None if recipe.ops else recipe.source


def verbatim_source(growth_map, piece: Piece, reader: Reader, shape: tuple,
                    dtype: torch.dtype) -> str | None:
    """The checkpoint tensor whose bytes are those of the tensor ``piece`` makes (``shape``, ``dtype``): its
    ``unchanged_source``, stored as it is in that shape and dtype; else None."""
    source = unchanged_source(growth_map, piece)
    if source is None or source not in reader or not reader.stored_as_is(source):
        return None
    return source if reader.shape(source) == tuple(shape) and reader.dtype(source) == dtype else None


def verbatim_parts(growth_map, pieces: dict[str, Piece], reader: Reader, stored: StoredLayout) -> dict:
    """Stored key -> the source bytes it is, for the parts of a tensor transformers assembles from several stored
    ones (``ConvertedReader``) that the growth leaves as it is (a layer kept, or copied unchanged): each part is
    copied from the source file, where making the tensor would assemble it and split it again."""
    if not isinstance(reader, ConvertedReader):
        return {}
    copied, entry = {}, {key: (shape, dtype) for key, shape, dtype in stored.entries}
    for members, keys in stored.keys.items():
        source = unchanged_source(growth_map, pieces[members[0]]) if len(members) == 1 and len(keys) > 1 else None
        if source is not None:
            copied.update(reader.parts_as_stored(source, members[0], {key: entry[key] for key in keys}) or {})
    return copied


def _holds(growth_map, piece: Piece, reader: Reader, shape: tuple, dtype: torch.dtype) -> int:
    """About the memory making a tensor holds (``work.working_bytes``): what several tensors made at once
    may hold together is what the largest one holds alone. A stack holds itself and one part in the making; a
    source transformers assembles from stored parts (``stored_keys.ConvertedReader``) holds itself once more
    while it is assembled."""
    parts = []
    for name in piece.sources():
        recipe = growth_map.recipes[growth_map.canonical(name)]
        read = recipe.source
        start = reader.shape(read) if read is not None else recipe.start.shape
        assembled = 0 if read is None or reader.stored_as_is(read) else reader.nbytes(read)  # its parts stacked
        parts.append(working_bytes(recipe.ops, start, dtype) + assembled)
    if piece.kind == "rename":
        return parts[0]
    return nbytes(shape, dtype) + max(parts, default=0)


def main_dtype(dtypes) -> torch.dtype:
    """The most common floating-point dtype among ``dtypes`` (float32 when there is none)."""
    floating = [dtype for dtype in dtypes if dtype.is_floating_point]
    return max(set(floating), key=floating.count) if floating else torch.float32
