"""Dotted module and tensor names: which module a name is under, where a move takes it, and the numbered
block of a layer stack it lives in (``model.layers.3`` for ``model.layers.3.mlp.up.weight``)."""

from __future__ import annotations

import re

_NUMBERED_BLOCK = re.compile(r"^(.*?\.\d+)(\.|$)")


def under(name: str, prefix: str) -> bool:
    """Is ``name`` the module ``prefix`` or inside it?"""
    return name == prefix or name.startswith(prefix + ".")


def prefixes(name: str):
    """The modules on the path of ``name``, outermost first, ``name`` last: ``a``, ``a.b``, ``a.b.c``."""
    dot = name.find(".")
    while dot >= 0:
        yield name[:dot]
        dot = name.find(".", dot + 1)
    yield name


def moved(name: str, moves: dict[str, str]) -> str:
    """``name`` after the modules in ``moves`` (old prefix -> new prefix) were moved: the first that holds it.
    The modules holding ``name`` are its dotted prefixes, each looked up once."""
    held = [prefix for prefix in prefixes(name) if prefix in moves]
    if not held:
        return name
    old = held[0] if len(held) == 1 else min(held, key=list(moves).index)
    return moves[old] + name[len(old):]


def numbered_block(name: str) -> str | None:
    """The first numbered module on the path of ``name`` (``blocks.1`` for ``blocks.1.attn``), or None."""
    match = _NUMBERED_BLOCK.match(name)
    return match.group(1) if match else None


def in_layers(name: str, layers: list[int] | None) -> bool:
    """Is ``name`` inside one of the numbered blocks ``layers`` (every name, when ``layers`` is None)?"""
    if layers is None:
        return True
    block = numbered_block(name)
    return block is not None and int(block.rpartition(".")[2]) in layers
