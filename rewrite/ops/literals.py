"""What growth patches besides tensors: standard modules' size attributes and the literal sizes in a graph
(view shapes, norm shapes, split sizes) of the axes that grew."""

from __future__ import annotations

import operator

import torch
import torch.fx

from .kinds import short_name

# Size attributes of standard modules, recomputed from their grown weights: attribute -> (tensor, axes).
MODULE_SIZES = {
    "Linear": {"in_features": ("weight", 1), "out_features": ("weight", 0)},
    "Conv1d": {"in_channels": ("weight", 1), "out_channels": ("weight", 0)},
    "Conv2d": {"in_channels": ("weight", 1), "out_channels": ("weight", 0)},
    "Conv3d": {"in_channels": ("weight", 1), "out_channels": ("weight", 0)},
    "Embedding": {"num_embeddings": ("weight", 0), "embedding_dim": ("weight", 1)},
    "BatchNorm1d": {"num_features": ("running_mean", 0)},
    "BatchNorm2d": {"num_features": ("running_mean", 0)},
    "BatchNorm3d": {"num_features": ("running_mean", 0)},
    "LayerNorm": {"normalized_shape": ("weight", None)},
    "RMSNorm": {"normalized_shape": ("weight", None)},
}


def resize_module_attributes(module: torch.nn.Module) -> None:
    """Make a standard module's size attributes agree with its (grown) tensors."""
    for attribute, (tensor_name, axis) in MODULE_SIZES.get(type(module).__name__, {}).items():
        tensor = getattr(module, tensor_name, None)
        if tensor is None:
            continue
        setattr(module, attribute, tuple(tensor.shape) if axis is None else tensor.shape[axis])


def whole_shape(node: torch.fx.Node) -> torch.fx.Node | None:
    """The tensor whose whole shape ``node`` is (fx's ``x.shape``, ``x.size()``), else None."""
    if node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",):
        return node.args[0]
    if node.op == "call_method" and node.target == "size" and len(node.args) == 1:
        return node.args[0]
    return None


def shape_read(node, *, exported: bool = True) -> tuple[torch.fx.Node, int] | None:
    """(tensor, axis) when ``node`` reads one size of a tensor's shape at run time: ``x.shape[i]``,
    ``x.size()[i]``, ``x.size(i)`` (fx) or, with ``exported``, ``aten.sym_size.int(x, i)`` (torch.export, which
    reads only the sizes it keeps symbolic); None otherwise."""
    if not isinstance(node, torch.fx.Node):
        return None
    read = None
    if node.op == "call_method" and node.target == "size" and len(node.args) == 2:
        read = node.args
    elif node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node):
        tensor = whole_shape(node.args[0])
        read = (tensor, node.args[1]) if tensor is not None else None
    elif exported and node.op == "call_function" and getattr(node.target, "__name__", "") == "sym_size.int":
        read = node.args[:2]
    if read is None or not isinstance(read[0], torch.fx.Node) or not isinstance(read[1], int):
        return None
    return read[0], read[1]


def view_sizes(node: torch.fx.Node) -> list | None:
    """The sizes a view, reshape or expand names for its output axes (``x.view(b, t, 4, -1)`` or
    ``aten.view(x, [b, t, 4, -1])``), literals or nodes; None when it names none (``flatten``, ``view_as``)."""
    if node.op == "call_method" and len(node.args) > 2:
        return list(node.args[1:])
    if len(node.args) > 1 and isinstance(node.args[1], (list, tuple)):
        return list(node.args[1])
    return None


def creation_sizes(node: torch.fx.Node):
    """(sizes, rebuild) of a tensor made from its sizes and a constant (``zeros(1, h, q, k)``, ``aten.full(size,
    v)``, ``x.new_zeros(size)``): the sizes as a list, and how to make the node's args from a new list."""
    at = 1 if short_name(node).startswith("new_") else 0
    args = node.args
    if len(args) > at and isinstance(args[at], (list, tuple)):
        return list(args[at]), lambda s: (*args[:at], type(args[at])(s), *args[at + 1:])
    if at == 0 and node.op == "call_function" and not isinstance(node.target, torch._ops.OpOverload) \
            and short_name(node) in ("zeros", "ones", "empty") and args:  # torch.zeros(1, h, q, k)
        return list(args), lambda s: tuple(s)
    return None


def patch_literals(node: torch.fx.Node, kind: str, grown: dict[int, tuple[int, int]]) -> None:
    """Rewrite the literal sizes a node's arguments give for its grown output axes.

    ``grown`` maps an output axis to (old size, new size). Views, reshapes, expands and tensors made from their
    sizes (``zeros``, ``full``, ``new_ones``) name every output size; layer/RMS norms name the normalized
    (trailing) sizes. Symbolic sizes and -1 are left alone.
    """
    if kind in ("view", "expand"):
        sizes = view_sizes(node)
        if sizes is None:
            return
        if node.op == "call_method" and len(node.args) > 2:
            rebuild = lambda s: (node.args[0], *s)  # noqa: E731
        else:
            rebuild = lambda s: (node.args[0], type(node.args[1])(s), *node.args[2:])  # noqa: E731
        offset = 0
    elif kind == "creation":
        found = creation_sizes(node)
        if found is None:
            return
        sizes, rebuild = found
        offset = 0
    elif kind in ("layer_norm", "rms_norm") and len(node.args) > 1 and isinstance(node.args[1], (list, tuple)):
        sizes = list(node.args[1])
        rebuild = lambda s: (node.args[0], type(node.args[1])(s), *node.args[2:])  # noqa: E731
        rank = len(node.meta["tensor_meta"].shape)
        offset = rank - len(sizes)
    else:
        return
    changed = False
    for axis, (old, new) in grown.items():
        index = axis - offset
        if 0 <= index < len(sizes) and isinstance(sizes[index], int) and sizes[index] == old:
            sizes[index] = new
            changed = True
    if changed:
        node.args = rebuild(sizes)
        _view_to_reshape(node)


def _view_to_reshape(node: torch.fx.Node) -> None:
    """A ``view`` whose sizes growth changed becomes a ``reshape``: its input may be laid out differently
    after growth (SDPA returns another layout once the value head size differs from the key's), and a view of
    a non-contiguous tensor fails where a reshape copies."""
    if node.op == "call_method" and node.target == "view":
        node.target = "reshape"
    elif node.op == "call_function" and node.target is torch.ops.aten.view.default:
        node.target = torch.ops.aten.reshape.default


def patch_split(node: torch.fx.Node, parts: dict[int, "object"]) -> None:
    """Rewrite a split's sizes when some of its parts grew along the split axis.

    ``parts`` maps an element index to {axis: layout} of that element's grown axes. An equal split
    (``split(x, 32)``) or ``chunk(x, 3)`` whose parts no longer share one size becomes ``split_with_sizes``
    (GPT-NeoX's per-head q|k|v once the value part grows); a chunk whose parts all grew alike keeps its count.
    """
    if len(node.args) < 2:
        return
    chunk = short_name(node) == "chunk"
    metas = node.meta["tensor_meta"]
    rank = len(metas[0].shape)
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    dim = dim + rank if dim < 0 else dim
    grown = {index: axes[dim] for index, axes in parts.items() if dim in axes}
    if not grown:  # the parts grew along other axes: the split's sizes (literal or computed) still hold
        return
    given = node.args[1] if isinstance(node.args[1], (list, tuple)) and not chunk else [None] * len(metas)
    sizes = [size if isinstance(size, torch.fx.Node) else meta.shape[dim] for size, meta in zip(given, metas)]
    for index, layout in grown.items():
        if sizes[index] == layout.old_size:
            sizes[index] = layout.new_size
    if chunk and len(set(sizes)) == 1:  # chunk(x, n) names a count: equal growth keeps it valid
        return
    if chunk:
        if node.op == "call_method":
            node.target = "split"
        elif node.op == "call_function":
            node.target = torch.ops.aten.split_with_sizes.default if isinstance(
                node.target, torch._ops.OpOverload) else torch.split
        node.args = (node.args[0], list(sizes), dim, *node.args[3:])
        return
    if isinstance(node.args[1], int) and len(set(sizes)) == 1 and sum(sizes) % sizes[0] == 0:
        node.args = (node.args[0], sizes[0], *node.args[2:])
        return
    if node.target is torch.ops.aten.split.Tensor:
        node.target = torch.ops.aten.split_with_sizes.default
    node.args = (node.args[0], list(sizes), *node.args[2:])

