"""The human-readable summary of a Graph: where it came from, ops by kind, parameters, module tree.

Repeated siblings of one class with the same parameter count (the layers of a stack) are collapsed
into one line, ``h.0-11  GPT2Block x12``, and only the first of them is expanded.
"""

from __future__ import annotations

import re
import torch

FRONTEND_NAMES = {
    "fx": "torch.fx.symbolic_trace, module level",
    "export": "torch.export, ATen level",
}


def human(n: int) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def summarize(graph, *, depth: int = 3) -> str:
    tensors = graph.tensors()
    params = [t for t in tensors.values() if t.kind == "parameter"]
    buffers = [t for t in tensors.values() if t.kind != "parameter"]
    tied = [f"{', '.join(t.aliases)} = {t.name}" for t in params if t.aliases]
    inputs = [
        f"{n.name}{list(graph.shape(n)) if graph.shape(n) is not None else ''}"
        for n in graph.module.graph.nodes
        if n.op == "placeholder"
    ]
    ops = graph.op_counts()
    lines = [
        f"Graph of {graph.source_class} (traced with {FRONTEND_NAMES.get(graph.frontend, graph.frontend)})",
        f"  inputs:     {', '.join(inputs) or '(none)'}",
        f"  fixed:      {graph.fixed_kwargs}" if graph.fixed_kwargs else None,
        f"  ops:        {sum(ops.values())} in {len(ops)} kinds",
        f"  parameters: {human(sum(p.numel for p in params))} ({sum(p.numel for p in params):,}) in "
        f"{len(params)} tensors" + (f"; tied: {'; '.join(tied)}" if tied else ""),
        f"  buffers:    {human(sum(b.numel for b in buffers))} in {len(buffers)} tensors" if buffers else None,
        "ops by kind:",
    ]
    lines += _columns([f"{kind} x{count}" for kind, count in ops.most_common()])
    lines.append("module tree (parameters):")
    lines += _tree(graph.module, depth)
    return "\n".join(line for line in lines if line is not None)


def _columns(items: list[str], width: int = 100) -> list[str]:
    lines, current = [], "  "
    for item in items:
        if len(current) + len(item) + 2 > width and current.strip():
            lines.append(current.rstrip())
            current = "  "
        current += item + "  "
    if current.strip():
        lines.append(current.rstrip())
    return lines


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _tree(root: torch.nn.Module, depth: int) -> list[str]:
    lines: list[str] = []

    def children_of(module: torch.nn.Module, prefix: str) -> list[tuple[str, torch.nn.Module]]:
        # A container of numbered layers (ModuleList, or its plain stand-in after export) is inlined.
        out = []
        for name, child in module.named_children():
            if name == "_guards_fn":
                continue
            grandchildren = list(child.named_children())
            if grandchildren and all(re.fullmatch(r"\d+", n) for n, _ in grandchildren):
                out += [(f"{prefix}{name}.{n}", c) for n, c in grandchildren]
            else:
                out.append((f"{prefix}{name}", child))
        return out

    def visit(module: torch.nn.Module, level: int) -> None:
        children = children_of(module, "")
        i = 0
        while i < len(children):
            name, child = children[i]
            stem, _, index = name.rpartition(".")
            j = i + 1
            if index.isdigit():
                while j < len(children):
                    other_name, other = children[j]
                    other_stem, _, other_index = other_name.rpartition(".")
                    if other_stem != stem or not other_index.isdigit():
                        break
                    if _module_class(other) != _module_class(child) or _count(other) != _count(child):
                        break
                    j += 1
            label = name if j == i + 1 else f"{name}-{children[j - 1][0].rpartition('.')[2]}"
            repeat = "" if j == i + 1 else f" x{j - i}"
            each = " each" if repeat else ""
            lines.append(f"{'  ' * level}{label}  {_module_class(child)}{repeat}  {human(_count(child))}{each}")
            if level < depth:
                visit(child, level + 1)
            i = j

    visit(root, 1)
    return lines


def _module_class(module: torch.nn.Module) -> str:
    # ep.module() rebuilds the hierarchy as plain Modules; the original class is kept where known.
    return getattr(module, "_growfx_class", None) or type(module).__name__
