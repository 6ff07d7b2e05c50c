"""The passes by name, for the command line: ``growfx passes`` lists them, ``--pass name:key=value,...`` builds one.

Each entry is the pass's factory and, in one line, when it is exact (the module docstrings have the algebra).
"""

from __future__ import annotations

import ast
import inspect

from rewrite.errors import GrowfxError

from .depth import add_layers, split_layers
from .head_size import widen_heads
from .heads import add_heads
from .hidden import widen_hidden
from .mlp import widen_mlp
from .moe import upcycle_moe
from .net2deeper import net2deeper
from .net2wider import widen

CATALOG = {
    "widen": (widen, "net2net/zero/clone exact unless a norm, softmax or sum runs along the axis (clone also under norms)"),
    "widen_mlp": (widen_mlp, "exact with zero, clone, net2net"),
    "add_heads": (add_heads, "exact with zero, clone, net2net; with GQA n is a multiple of the query/KV ratio"),
    "widen_heads": (widen_heads, "v: exact with zero, clone, net2net; qk: exact with zero, refused under RoPE"),
    "widen_hidden": (widen_hidden, "zero: exact with RMSNorm (gain and eps corrected), refused under LayerNorm; "
                                   "clone: exact with both"),
    "add_layers": (add_layers, "exact on pre-norm stacks; refused on post-norm (BERT) unless exact=False"),
    "split_layers": (split_layers, "never exact: second order in the branch, the error is measured and reported"),
    "net2deeper": (net2deeper, "exact when the activation is idempotent (ReLU); refused otherwise"),
    "upcycle_moe": (upcycle_moe, "exact (renormalised top-k gates); not representable in a dense native class"),
}


class PassSpecError(GrowfxError):
    """A ``--pass`` argument names an unknown pass or parameter, or a bad value."""


def signature_of(name: str) -> str:
    factory, _ = CATALOG[name]
    parts = []
    for parameter in inspect.signature(factory).parameters.values():
        if parameter.default is inspect.Parameter.empty:
            parts.append(parameter.name)
        else:
            parts.append(f"{parameter.name}={parameter.default!r}")
    return f"{name}({', '.join(parts)})"


def describe() -> list[str]:
    return [f"{signature_of(name):<72} {when}" for name, (_, when) in CATALOG.items()]


def build(spec: str):
    """``"widen_mlp:factor=2"``, ``"add_layers:n=4,init=copy"``, ``"upcycle_moe:experts=4,top_k=2,layers=[0,1]"``."""
    name, _, arguments = spec.partition(":")
    if name not in CATALOG:
        raise PassSpecError(f"unknown pass {name!r}; choose one of {', '.join(CATALOG)}")
    factory, _ = CATALOG[name]
    parameters = inspect.signature(factory).parameters
    kwargs = {}
    for item in _split(arguments):
        key, equals, text = item.partition("=")
        key = key.strip()
        if not equals:
            raise PassSpecError(f"{name}: expected key=value, got {item!r}")
        if key not in parameters:
            raise PassSpecError(f"{name} has no parameter {key!r} (parameters: {', '.join(parameters)})")
        kwargs[key] = _value(text.strip())
    missing = [p for p, v in parameters.items() if v.default is inspect.Parameter.empty and p not in kwargs]
    if missing:
        raise PassSpecError(f"{name} needs {', '.join(missing)} (e.g. --pass {name}:{missing[0]}=...)")
    try:
        return factory(**kwargs)
    except GrowfxError as e:
        raise PassSpecError(str(e)) from e
    except TypeError as e:
        raise PassSpecError(f"{name}: {e}") from e


def _split(arguments: str) -> list[str]:
    """Split on commas outside brackets: ``layers=[0,1],n=2`` -> two items."""
    items, depth, current = [], 0, ""
    for char in arguments:
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    if current.strip():
        items.append(current)
    return [i for i in items if i.strip()]


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word: init=copy, at=blocks.*.fc
