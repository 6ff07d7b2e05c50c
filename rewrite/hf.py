"""Load a Hugging Face model folder (config.json + weights) offline, with example inputs for it."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import GrowfxError


def load_folder(folder: str | os.PathLike) -> torch.nn.Module:
    """The model class the config names (``architectures[0]``), else ``AutoModel``; local files only."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise GrowfxError(f"{folder} is not a Hugging Face model folder: it has no config.json")
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    model_class = model_class or transformers.AutoModel
    try:
        model = model_class.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - the loader's own message says what is missing
        raise GrowfxError(f"cannot load {folder} as {getattr(model_class, '__name__', model_class)}: {e}") from e
    return model.eval()
