"""Model files in and out: what ``growfx grow`` reads and writes. No pickle is ever loaded.

Sources (``load_file``; ``rewrite.app.models.load`` adds the built-in names):
* a Hugging Face model folder (``config.json`` + ``*.safetensors``; folders with only pickled
  ``pytorch_model.bin`` weights are refused);
* a GGUF file (dequantised to float32 by transformers), written back as a Hugging Face folder;
* a ``torch.export`` archive (``.pt2``), with the example inputs stored in it.

Destinations are written atomically: everything goes to a temporary sibling first and is renamed into
place at the end, so an interrupted run leaves no half-written output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from rewrite.errors import GrowfxError
from rewrite.io.hf import example_inputs, load_folder
from rewrite.ir.frontends import auto_dynamic_shapes, first_line, is_huggingface

@dataclasses.dataclass
class Source:
    model: torch.nn.Module
    args: tuple
    kwargs: dict
    kind: str  # "zoo", "hf", "gguf", "pt2"
    label: str
    tokenizer: object | None = None  # for Hugging Face language models, when one can be loaded
    dtype: torch.dtype | None = None  # the dtype the weights are stored in (a folder's), written back in it

    @property
    def is_huggingface(self) -> bool:
        return is_huggingface(self.model)


def load_file(path: str | Path) -> Source:
    """Load the model file or folder at ``path`` (see the module docstring); ``GrowfxError`` with the reason
    otherwise."""
    path = Path(path)
    if not path.exists():
        raise GrowfxError(f"{str(path)!r} does not exist: expected a Hugging Face folder, a .gguf file or a .pt2 archive")
    if path.is_dir():
        return _load_folder(path)
    if path.suffix == ".gguf":
        return load_gguf(path)
    if path.suffix == ".pt2":
        return _load_pt2(path)
    raise GrowfxError(f"cannot read {path}: expected a Hugging Face folder, a .gguf file or a .pt2 archive")


def _language_inputs(model, tokenizer) -> tuple[tuple, dict]:
    if tokenizer is None or getattr(model, "main_input_name", "input_ids") != "input_ids":
        return example_inputs(model)
    batch = tokenizer(["The grown model computes the same function.", "Growth keeps what was learned."],
                      return_tensors="pt", padding=True)
    if batch["input_ids"].shape[-1] == 0:  # a tokenizer built from the config alone, with no vocabulary
        return example_inputs(model)
    kwargs = {"attention_mask": batch["attention_mask"]} if "attention_mask" in batch else {}
    return (batch["input_ids"],), kwargs


def _tokenizer(folder: Path, **options):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **options)
    except Exception:  # noqa: BLE001 - a model without a usable tokenizer is still a model
        return None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_folder(folder: Path) -> Source:
    if not (folder / "config.json").is_file():
        raise GrowfxError(f"{folder} is not a Hugging Face model folder: it has no config.json")
    if not any(folder.glob("*.safetensors")):
        raise GrowfxError(f"{folder} has no .safetensors weights (pickled weights are never loaded)")
    model = load_folder(folder)  # in float32: growth's corrections (divisions by k) computed in full precision
    tokenizer = _tokenizer(folder)
    args, kwargs = _language_inputs(model, tokenizer)
    dtype = stored_dtype(folder)
    label = f"{folder} ({type(model).__name__}{f', stored as {dtype}' if dtype != torch.float32 else ''})"
    return Source(model, args, kwargs, "hf", label, tokenizer, dtype)


def stored_dtype(folder: Path) -> torch.dtype:
    """The dtype of a folder's floating-point weights: the config's ``dtype`` (``torch_dtype``), else the first
    floating-point tensor's in the first safetensors file's header; float32 when neither says."""
    config = json.loads((folder / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype")
    if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    from safetensors import safe_open

    with safe_open(str(sorted(folder.glob("*.safetensors"))[0]), framework="pt") as f:
        for key in f.keys():
            dtype = getattr(torch, {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}.get(
                f.get_slice(key).get_dtype(), "int64"))
            if dtype.is_floating_point:
                return dtype
    return torch.float32


def load_gguf(path: Path) -> Source:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                     local_files_only=True).eval()
    except Exception as e:  # noqa: BLE001
        raise GrowfxError(f"cannot load {path} as a GGUF language model: {first_line(e)}") from e
    if hasattr(model.config, "quantization_config"):  # dequantised on load: the model is plain float32
        del model.config.quantization_config
    tokenizer = _tokenizer(path.parent, gguf_file=path.name)
    args, kwargs = _language_inputs(model, tokenizer)
    return Source(model, args, kwargs, "gguf", f"{path.name} ({type(model).__name__}, dequantised)", tokenizer)


def _load_pt2(path: Path) -> Source:
    try:
        program = torch.export.load(path)
    except Exception as e:  # noqa: BLE001
        raise GrowfxError(f"cannot read {path} as a torch.export archive: {first_line(e)}") from e
    if program.example_inputs is None:
        raise GrowfxError(f"{path} stores no example inputs; export it with torch.export.export(model, args)")
    args, kwargs = program.example_inputs
    return Source(program.module(), tuple(args), dict(kwargs), "pt2", f"{path.name} (torch.export archive)")


# -- writing ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(destination: Path, *, replace: bool):
    """A temporary sibling of ``destination`` to write into; renamed into place when the block succeeds,
    removed when it fails. An existing destination is replaced only with ``replace``."""
    destination = Path(destination)
    if destination.exists() and not replace:
        raise GrowfxError(f"{destination} exists (pass --force to replace it)")
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    target = temporary / destination.name
    try:
        yield target
        if destination.exists():
            old = temporary / "replaced"
            os.replace(destination, old)
        os.replace(target, destination)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def save_huggingface(native: torch.nn.Module, destination: Path, tokenizer=None, *, replace: bool = False,
                     dtype: torch.dtype | None = None) -> Path:
    """``save_pretrained`` (safetensors) of the native model, with the tokenizer, written atomically; with
    ``dtype`` (the source folder's), the weights and the config are written in it, as the source was."""
    if dtype is not None and dtype != native.dtype:
        # new tensors in the model, rather than converting the ones it holds in place: those may be a grown
        # model's too (``to_native`` shares them), which must keep its dtype
        overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        try:
            native = native.to(dtype)
        finally:
            torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
        native.config.dtype = dtype
    with atomic_path(destination, replace=replace) as folder:
        native.save_pretrained(folder, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
    return destination


def save_pt2(graph, destination: Path, *, replace: bool = False) -> Path:
    """A ``torch.export`` archive of the grown graph, with its example inputs, written atomically."""
    args, kwargs = graph.call_inputs(graph.example_args, graph.example_kwargs)
    try:
        program = torch.export.export(graph.module, args, kwargs, dynamic_shapes=auto_dynamic_shapes(graph.module, args, kwargs))
    except Exception as e:  # noqa: BLE001
        raise GrowfxError(f"cannot export the grown graph to {destination}: {first_line(e)}") from e
    with atomic_path(destination, replace=replace) as path:
        torch.export.save(program, path)
    return destination
