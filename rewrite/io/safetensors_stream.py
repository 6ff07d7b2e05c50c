"""Safetensors checkpoints read one tensor at a time and written one tensor at a time.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, offsets relative to the
end of the header) and the tensors' bytes. The format has no append: :func:`write_safetensors` knows every
name, shape and dtype up front, writes the header, then each tensor's bytes as ``make(name)`` returns it, so
at most one tensor is in memory. :class:`CheckpointReader` serves a folder's tensors (one file, or shards with
``model.safetensors.index.json``) by name, each read when asked for and not kept.

A tensor written unchanged (same shape and dtype as a source tensor: a layer kept or copied as it is) need not
pass through memory at all: ``make`` may return the source's :class:`FileBytes` (``CheckpointReader.bytes``),
and the writer copies that range of the source file into the new one inside the kernel
(``os.copy_file_range``: page cache to page cache, or shared extents on a file system that clones), falling
back to reading and writing through one reused buffer where the kernel or file system refuses.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch

from rewrite.errors import GrowfxError
from rewrite.io.made_ahead import made_in_order

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
INDEX = "model.safetensors.index.json"
CHUNK = 8 << 20  # bytes per copy of a range (one call for a whole 1 GB range took 2.4x as long as 8 MB ones)
COPY_REFUSED = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}  # no in-kernel copy between these


@dataclasses.dataclass(frozen=True)
class FileBytes:
    """``length`` bytes of the file ``path`` from ``offset``: a tensor's data, to be copied as it is."""

    path: Path
    offset: int
    length: int


class CheckpointReader:
    """The tensors of a Hugging Face folder's safetensors files, by name, read one at a time
    (``safe_open``: the file is mapped while one tensor is copied out of it, then closed; never loaded whole)."""

    def __init__(self, folder: str | Path, names: Callable[[str], str] | None = None):
        """``names``: the name each stored tensor goes by (a stored key to the model's), when the files store
        some under others (``stored_keys.open_checkpoint``); None: as stored."""
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.folder / file for name, file in weight_map.items()}
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise GrowfxError(f"{self.folder} has no .safetensors weights (pickled weights are never loaded)")
            self.files = {name: path for path in files for name in _header(path)[0]}
        self._headers, self._data_start = {}, {}  # per file: the header, where its data starts
        for path in set(self.files.values()):
            self._headers[path], self._data_start[path] = _header(path)
        missing = [n for n, path in self.files.items() if n not in self._headers[path]]
        if missing:
            raise GrowfxError(f"{index} lists {missing[0]} in a file whose header does not have it")
        self._stored = {}  # name -> the key it is stored under, where they differ
        if names is not None:
            files = {}
            for key, path in self.files.items():
                name = names(key)
                if name in files:
                    raise GrowfxError(f"{self.folder} stores {self._stored.get(name, name)} and {key}, which are "
                                      f"both loaded as {name}")
                files[name] = path
                if name != key:
                    self._stored[name] = key
            self.files = files

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def __iter__(self):
        return iter(self.files)

    def keys(self):
        return self.files.keys()

    def _entry(self, name: str) -> dict:
        return self._headers[self.files[name]][self._stored.get(name, name)]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self._entry(name)["dtype"]]

    def nbytes(self, name: str) -> int:
        begin, end = self._entry(name)["data_offsets"]
        return end - begin

    def stored_as_is(self, name: str) -> bool:
        """Whether ``name``'s bytes lie in one file as the tensor holds them (always, here)."""
        return name in self.files

    def bytes(self, name: str) -> FileBytes:
        """Where the tensor ``name``'s data lies in its file (C order, little-endian: a safetensors tensor)."""
        path = self.files[name]
        begin, end = self._entry(name)["data_offsets"]
        return FileBytes(path, self._data_start[path] + begin, end - begin)

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.files:
            raise KeyError(f"{self.folder} has no tensor {name}")
        # mapped, copied out, unmapped on close: measured lighter than backend="pread", which holds a second copy
        with safe_open(str(self.files[name]), framework="pt") as f:
            return f.get_tensor(self._stored.get(name, name))


def _header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (its tensors' entries) and the offset its data starts at."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def write_safetensors(path: str | Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]],
                      make: Callable[[str], torch.Tensor | FileBytes], metadata: dict[str, str] | None = None, *,
                      workers: int = 1, holds: Callable[[str], int] | None = None, budget: int = 0) -> None:
    """Write ``entries`` (name, shape, dtype) to ``path``: the header first, then each tensor as ``make(name)``
    gives it (checked against its entry), in order; a :class:`FileBytes` is copied from its file as it is (its
    length checked against the entry). With ``workers`` > 1, the next tensors are made while one is written,
    as long as the bytes they hold while made (``holds(name)``; default: their size) stay within ``budget`` (at
    least the most any one holds; :func:`rewrite.io.made_ahead.made_in_order`)."""
    header, offset = {}, 0
    for name, shape, dtype in entries:
        size = nbytes(shape, dtype)
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    shapes = {name: (shape, dtype) for name, shape, dtype in entries}
    sizes = [(name, holds(name) if holds else nbytes(shape, dtype)) for name, shape, dtype in entries]
    budget = max([budget, *(size for _, size in sizes)])
    with open(path, "wb", buffering=0) as f:  # unbuffered: the file offset is where the next bytes go
        _write_all(f, memoryview(len(text).to_bytes(8, "little") + text))
        for name, tensor in made_in_order(sizes, make, workers=workers, budget=budget):
            shape, dtype = shapes[name]
            if isinstance(tensor, FileBytes):
                if tensor.length != nbytes(shape, dtype):
                    raise GrowfxError(f"{name} was announced as {list(shape)} {dtype} in {Path(path).name} "
                                      f"({nbytes(shape, dtype)} bytes) but is to be copied from {tensor.length} "
                                      f"bytes of {tensor.path}")
                _copy_range(tensor, f)
            elif tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise GrowfxError(f"{name} was announced as {list(shape)} {dtype} in {Path(path).name} but made as "
                                  f"{list(tensor.shape)} {tensor.dtype}")
            else:
                _write_all(f, _bytes(tensor))
            del tensor


def _write_all(f, view: memoryview) -> None:
    """Every byte of ``view`` written to the unbuffered file ``f`` (a write may take fewer)."""
    view = view.cast("B")
    while view:
        view = view[f.write(view):]


def _copy_range(source: FileBytes, f) -> None:
    """``source``'s bytes appended to the unbuffered file ``f``, ``CHUNK`` bytes at a time: in the kernel where it
    can, else through a buffer. Raises ``GrowfxError`` when the source file ends early."""
    with open(source.path, "rb", buffering=0) as src:
        offset, left = source.offset, source.length
        in_kernel = hasattr(os, "copy_file_range")
        buffer = None
        while left:
            if in_kernel:
                try:
                    done = os.copy_file_range(src.fileno(), f.fileno(), min(left, CHUNK), offset)
                except OSError as error:
                    if error.errno not in COPY_REFUSED:
                        raise
                    in_kernel = False
                    continue
            else:
                buffer = buffer if buffer is not None else memoryview(bytearray(min(CHUNK, left)))
                src.seek(offset)
                done = src.readinto(buffer[:min(len(buffer), left)])
                _write_all(f, buffer[:done])
            if done == 0:
                raise GrowfxError(f"{source.path} ended before the {source.length} bytes at {source.offset} it was "
                                  f"to hold (changed while it was read?)")
            offset += done
            left -= done


def _bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in C order, little-endian (what safetensors stores)."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """The bytes of a tensor of ``shape`` and ``dtype``."""
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def shard(entries: list[tuple[str, tuple[int, ...], torch.dtype]], max_bytes: int) -> list[list]:
    """``entries`` in order, cut into consecutive shards of at most ``max_bytes`` (a larger tensor alone)."""
    shards, current, size = [], [], 0
    for entry in entries:
        made = nbytes(entry[1], entry[2])
        if current and size + made > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += made
    if current:
        shards.append(current)
    return shards
