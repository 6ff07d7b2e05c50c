"""Hugging Face model folders (config.json + weights) loaded offline, and example inputs for a Hugging Face model."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from rewrite.errors import GrowfxError

TOKENS = (2, 8)  # batch, sequence of the example inputs


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


def example_inputs(model, batch: int = TOKENS[0], length: int = TOKENS[1]) -> tuple[tuple, dict]:
    """Example inputs for a Hugging Face model, from its config and ``main_input_name``: token ids, images, or
    log-mel features (Whisper: ``num_mel_bins`` x twice ``max_source_positions`` frames, the length its
    encoder requires); an encoder-decoder also gets ``decoder_input_ids``."""
    config = model.config
    name = getattr(model, "main_input_name", "input_ids")
    text = config.get_text_config()
    if name == "input_ids":
        args = (torch.randint(0, text.vocab_size, (batch, length)),)
    elif name == "pixel_values":
        size = getattr(config, "image_size", 32)
        size = size if isinstance(size, int) else size[0]
        args = (torch.randn(batch, getattr(config, "num_channels", 3), size, size),)
    elif name == "input_features" and hasattr(config, "num_mel_bins"):
        args = (torch.randn(batch, config.num_mel_bins, 2 * config.max_source_positions),)
    else:
        raise ValueError(f"no example inputs for {type(model).__name__}: its main input is {name!r}")
    kwargs = {}
    if getattr(config, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = torch.randint(0, text.vocab_size, (batch, length))
    return args, kwargs
