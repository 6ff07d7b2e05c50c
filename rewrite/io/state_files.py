"""Training state on disk without pickle: tensors in safetensors, everything else in JSON.

``save_state(tree, folder)`` writes a nested structure of dicts, lists, tuples, numbers, strings, ``None`` and
tensors (an optimizer's or a scheduler's ``state_dict``, RNG states, counters) as two files:
``tensors.safetensors`` (each tensor under the path that leads to it) and ``state.json`` (the structure, a
tensor standing as ``{"__tensor__": path}``). ``load_state(folder)`` gives the same structure back, with the
same key types (an optimizer's state is keyed by integers) and tuples as tuples, so ``load_state_dict``
receives what ``state_dict`` gave. Anything else (a function, an arbitrary object) is refused with its path:
it would need pickle. The folder is written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rewrite.errors import GrowfxError
from rewrite.io.sources import atomic_path

TENSORS, STRUCTURE = "tensors.safetensors", "state.json"
MARKERS = ("__tensor__", "__tuple__", "__items__")


def save_state(tree, folder: str | Path, *, replace: bool = True) -> Path:
    """Write ``tree`` to ``folder`` (see the module docstring)."""
    with atomic_path(Path(folder), replace=replace) as target:
        target.mkdir()
        write_state(tree, target)
    return Path(folder)


def write_state(tree, folder: Path) -> None:
    """Write ``tree`` into the existing ``folder`` (not atomically: for a caller that writes it atomically)."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(tree, "", tensors)
    save_file(tensors, str(folder / TENSORS))
    (folder / STRUCTURE).write_text(json.dumps(structure))


def load_state(folder: str | Path):
    """The structure ``save_state`` wrote to ``folder``."""
    folder = Path(folder)
    for name in (TENSORS, STRUCTURE):
        if not (folder / name).is_file():
            raise GrowfxError(f"{folder} is not a saved training state: {name} is missing")
    tensors = load_file(str(folder / TENSORS))
    return _decode(json.loads((folder / STRUCTURE).read_text()), tensors)


def _encode(value, path: str, tensors: dict):
    if torch.is_tensor(value):
        tensors[path] = value.detach().cpu().clone().contiguous()
        return {"__tensor__": path}
    if isinstance(value, dict):
        items = [[key, _encode(item, _join(path, key), tensors)] for key, item in value.items()]
        for key, _ in items:
            if key is not None and not isinstance(key, (str, int, float, bool)):
                raise GrowfxError(f"cannot save the key {key!r} at {path or 'the top'} without pickle")
        if all(isinstance(key, str) and key not in MARKERS for key, _ in items):
            return dict(items)
        return {"__items__": items}
    if isinstance(value, (list, tuple)):
        encoded = [_encode(item, _join(path, i), tensors) for i, item in enumerate(value)]
        return {"__tuple__": encoded} if isinstance(value, tuple) else encoded
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise GrowfxError(f"cannot save {type(value).__name__} at {path or 'the top'} without pickle "
                      "(only tensors, numbers, strings, lists, tuples and dicts)")


def _join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def _decode(value, tensors: dict):
    if isinstance(value, list):
        return [_decode(item, tensors) for item in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__tuple__" in value:
        return tuple(_decode(item, tensors) for item in value["__tuple__"])
    if "__items__" in value:
        return {key: _decode(item, tensors) for key, item in value["__items__"]}
    return {key: _decode(item, tensors) for key, item in value.items()}
