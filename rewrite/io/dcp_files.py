"""PyTorch Distributed Checkpoint (DCP) folders read one key at a time and written one chunk at a time.

A DCP folder is a ``.metadata`` file (a pickle of ``torch.distributed.checkpoint.metadata.Metadata``: every
key, flattened from the nested state dict as ``optim.state.<fqn>.exp_avg``; its global shape, dtype and
stored chunks; where each chunk lies in which ``.distcp`` file; ``planner_data``: each key's path in the
nested dict) and the ``.distcp`` files (each chunk a ``torch.save`` of a tensor; non-tensor values, such as
``param_groups`` entries, as ``torch.save`` bytes).

No pickle is loaded as such: ``.metadata`` goes through an unpickler that builds only DCP's own metadata
classes, ``torch.Size``, dtypes and paths (anything else is refused, naming the global), and values through
``torch.load(weights_only=True)`` (DCP's default planner uses ``weights_only=False`` for non-tensor values).
:class:`SafeReader` and :class:`SafeLoadPlanner` give ``dcp.load`` the same guarantees.

Writing goes through ``dcp.save`` with :class:`_LazyPlanner`: the plan lists every key with its shape and
dtype up front (DCP's metadata is written from the plan), and each value is computed when the writer asks for
it (``resolve_data``), in plan order, one tensor held at a time. Tensors larger than ``max_chunk_bytes`` are
stored as row chunks, so a rank that loads a shard under FSDP2 reads only the chunks its rows overlap. Each
chunk goes to its own ``.distcp`` file (``single_file_per_rank=False``): torch's writer keeps a reference to
every tensor it wrote into a file until the file is closed, so one file per process would hold the whole
checkpoint in memory.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, StorageMeta, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from rewrite.errors import GrowfxError
from rewrite.io.safetensors_stream import nbytes

_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                                              "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None),
                                                                (torch.dtype, torch.layout, torch.memory_format))):
            return getattr(torch, name)
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        raise GrowfxError(f"a DCP .metadata file refers to {module}.{name}, which is not part of DCP's metadata: "
                          f"it is not loaded")


def read_metadata(folder: str | Path) -> Metadata:
    """The ``Metadata`` of the DCP folder ``folder`` (through the restricted unpickler)."""
    path = Path(folder) / ".metadata"
    if not path.is_file():
        raise GrowfxError(f"{folder} is not a distributed checkpoint (no .metadata file)")
    with path.open("rb") as file:
        metadata = _MetadataUnpickler(file).load()
    if not isinstance(metadata, Metadata):
        raise GrowfxError(f"{path} does not hold DCP metadata (it holds a {type(metadata).__name__})")
    return metadata


class SafeReader(dcp.FileSystemReader):
    """``FileSystemReader`` whose metadata goes through the restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            raise GrowfxError("per-rank DCP metadata files are not read")
        metadata = read_metadata(self.path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that loads non-tensor values with ``weights_only=True``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


class DistributedCheckpoint:
    """The keys of a DCP folder, each read when asked for: ``tensor(key)`` (the whole global tensor, assembled
    from its stored chunks) and ``value(key)`` (a non-tensor value); ``path(key)``: where the key sits in the
    nested state dict that was saved."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.metadata = read_metadata(self.folder)
        self.entries = self.metadata.state_dict_metadata
        self.paths = dict(self.metadata.planner_data or {})
        self._reader = SafeReader(self.folder)
        self._reader.set_up_storage_reader(self.metadata, True)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def is_tensor(self, key: str) -> bool:
        return isinstance(self.entries[key], TensorStorageMetadata)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.entries[key].properties.dtype

    def path(self, key: str) -> tuple:
        if key not in self.paths:
            raise GrowfxError(f"{self.folder} does not say where {key} sits in the saved state dict (it was "
                              f"saved without flattening): expected DCP's default planner")
        return tuple(self.paths[key])

    def tensor(self, key: str) -> torch.Tensor:
        if key not in self.entries:
            raise GrowfxError(f"{self.folder} has no key {key}")
        if not self.is_tensor(key):
            raise GrowfxError(f"{key} in {self.folder} is not a tensor")
        return self._read({key: torch.empty(self.shape(key), dtype=self.dtype(key))})[key]

    def value(self, key: str):
        if key not in self.entries:
            raise GrowfxError(f"{self.folder} has no key {key}")
        return self._read({key: None})[key]

    def _read(self, target: dict) -> dict:
        planner = SafeLoadPlanner(flatten_state_dict=False)
        planner.set_up_planner(target, self.metadata, True)
        plan = self._reader.prepare_local_plan(planner.finish_plan(planner.create_local_plan()))
        self._reader.read_data(plan, planner).wait()
        return planner.state_dict


@dataclasses.dataclass(frozen=True)
class Entry:
    """One key to write: its path in the nested state dict, and for a tensor its shape and dtype (``shape``
    None: a non-tensor value)."""

    key: str
    path: tuple
    shape: tuple[int, ...] | None = None
    dtype: torch.dtype | None = None


def write_checkpoint(folder: str | Path, entries: list[Entry], make: Callable[[str], Any], *,
                     max_chunk_bytes: int = 16 * 2**20) -> None:
    """Write a DCP folder with ``entries``, each value made by ``make(key)`` when it is written (a tensor of the
    entry's shape and dtype, or any value ``torch.load(weights_only=True)`` reads back); every tensor is made
    once. On one process without a process group; or, when ``torch.distributed`` is initialized, every process
    calls it with the same entries and makes and writes its share (:func:`share`), the first writes the
    metadata."""
    distributed = dist.is_available() and dist.is_initialized()
    mine = share(entries, dist.get_rank(), dist.get_world_size()) if distributed else entries
    planner = _LazyPlanner(mine, make, max_chunk_bytes)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
        try:
            dcp.save({}, storage_writer=dcp.FileSystemWriter(folder, single_file_per_rank=False, thread_count=1),
                     planner=planner, no_dist=not distributed)
        except CheckpointException:
            if planner.error is not None:  # what went wrong making a value, not DCP's wrapping of it
                raise planner.error from None
            raise


def share(entries: list[Entry], rank: int, world: int) -> list[Entry]:
    """The entries process ``rank`` of ``world`` writes: the tensors dealt largest first to the process with the
    fewest bytes so far; every non-tensor value on process 0."""
    load = [0] * world
    owner = {}
    sizes = {entry.key: nbytes(entry.shape, entry.dtype) for entry in entries if entry.shape is not None}
    for key in sorted(sizes, key=lambda k: -sizes[k]):
        owner[key] = min(range(world), key=load.__getitem__)
        load[owner[key]] += sizes[key]
    return [entry for entry in entries if owner.get(entry.key, 0) == rank]


class _LazyPlanner(DefaultSavePlanner):
    """A save plan from declared entries (tensors in row chunks of at most ``max_chunk_bytes``), whose data is
    made when the writer resolves it, in plan order: the current tensor is kept until its last chunk is out."""

    def __init__(self, entries: list[Entry], make: Callable[[str], Any], max_chunk_bytes: int):
        super().__init__(flatten_state_dict=True)
        self.entries = {entry.key: entry for entry in entries}
        self.make = make
        self.max_chunk_bytes = max_chunk_bytes
        self._current: tuple[str, Any] | None = None
        self.error: Exception | None = None

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator: bool = False) -> None:
        self.state_dict = {}
        self.mappings = {entry.key: entry.path for entry in self.entries.values()}
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> SavePlan:
        items = []
        for entry in self.entries.values():
            if entry.shape is None:
                items.append(WriteItem(index=MetadataIndex(entry.key), type=WriteItemType.BYTE_IO))
                continue
            properties = TensorProperties(dtype=entry.dtype)
            for offsets, sizes in row_chunks(entry.shape, entry.dtype, self.max_chunk_bytes):
                items.append(WriteItem(
                    index=MetadataIndex(entry.key, torch.Size(offsets)), type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)),
                                                properties=properties, size=torch.Size(entry.shape))))
        self.plan = dataclasses.replace(SavePlan(items), planner_data=self.mappings)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        key = write_item.index.fqn
        if self._current is None or self._current[0] != key:
            self._current = None  # drop the previous tensor before making the next
            try:
                self._current = (key, self._made(self.entries[key]))
            except Exception as error:
                self.error = error
                raise
        value = self._current[1]
        if write_item.type == WriteItemType.BYTE_IO:
            data = io.BytesIO()
            torch.save(value, data)
            data.seek(0)
            return data
        chunk = write_item.tensor_data.chunk
        if value.dim() == 0:
            return value
        return value.narrow(0, chunk.offsets[0], chunk.sizes[0])

    def _made(self, entry: Entry):
        value = self.make(entry.key)
        if entry.shape is None:
            return value
        if not torch.is_tensor(value) or tuple(value.shape) != tuple(entry.shape) or value.dtype != entry.dtype:
            got = (tuple(value.shape), value.dtype) if torch.is_tensor(value) else type(value).__name__
            raise GrowfxError(f"{entry.key} was declared {tuple(entry.shape)} {entry.dtype} but made as {got}")
        return value.contiguous()


def row_chunks(shape: tuple[int, ...], dtype: torch.dtype, max_bytes: int) -> list[tuple[tuple, tuple]]:
    """(offsets, sizes) of the row chunks a tensor is stored in: along axis 0, at most ``max_bytes`` each
    (one row at least), equal but for the last."""
    if not shape:
        return [((), ())]
    row = nbytes(shape[1:], dtype)
    rows = max(1, max_bytes // max(row, 1))
    rows = shape[0] if rows >= shape[0] else rows
    starts = range(0, max(shape[0], 1), max(rows, 1))
    return [((start, *[0] * (len(shape) - 1)), (min(rows, shape[0] - start), *shape[1:])) for start in starts]
