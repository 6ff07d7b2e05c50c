"""Shapes an edit's new nodes share with nodes already in the graph, found instead of computed.

A node's shape, dtype and strides on ``meta`` are a function of what it calls (the function, the method name,
or the state of the module: its class, its tensors' shapes and dtypes, its plain attributes, its submodules'),
of its inputs' shapes, dtypes and strides, and of its constant arguments. When a node an edit made has the
same *signature* (all of those) as a node whose shape the graph recorded before the edit, its shape is that
node's: a copied block's nodes have the signatures of the block they copy, so
:meth:`rewrite.ir.graph.Graph.propagate_changed` need not run their meta kernels (0.2 ms a node; 0.08 s of a
0.2 s plan that inserts twelve layers).

A signature holds only values that compare by value (numbers, strings, dtypes, shapes, tuples of them,
functions and classes by identity); anything else (a tensor's value, a config object, a module with hooks)
makes a node without one, which is then computed as before. The recorded pairs are read as the graph recorded
them before the edit (``snapshot``): a node whose inputs changed is never paired with its old shape. A new
node whose signature no recorded node has is computed once, and its shapes are then those of every later node
of that signature (``learn``): the second to eighth experts of a layer made into a mixture, and every later
layer made into one, run no meta kernel.
"""

from __future__ import annotations

import enum
import types
from collections import deque
from typing import Any

import torch
import torch.fx
from torch.fx.passes.shape_prop import TensorMetadata

_NONE = object()  # no signature

_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.memory_format,
          torch.layout, enum.Enum, type, types.FunctionType, types.BuiltinFunctionType, types.MethodType)


class ShapeMemo:
    """The recorded shapes of a graph's nodes, by signature, looked up for nodes an edit made or rewired."""

    def __init__(self, module: torch.fx.GraphModule, fresh: set[torch.fx.Node]):
        """``fresh``: the nodes whose recorded shapes do not hold (new or rewired by the edit)."""
        self.modules = dict(module.named_modules())
        self.snapshot = {node: node.meta.get("tensor_meta") for node in module.graph.nodes}
        self._module_keys: dict[str, Any] = {}
        self._signatures: dict[torch.fx.Node, Any] = {}  # node looked up -> its signature, until learnt
        self._pending: dict[Any, deque[torch.fx.Node]] = {}  # kind -> recorded nodes not yet keyed
        self._known: dict[Any, dict[Any, Any]] = {}  # kind -> signature -> recorded metadata
        for node in module.graph.nodes:
            if node.op in ("call_function", "call_method", "call_module") and node not in fresh \
                    and self.snapshot[node] is not None:
                self._pending.setdefault(self._kind(node), deque()).append(node)

    def lookup(self, node: torch.fx.Node, inputs: dict[torch.fx.Node, Any]) -> Any:
        """The metadata a recorded node of ``node``'s signature has (``inputs``: the values of ``node``'s input
        nodes now); None when no recorded node has it."""
        if node.op not in ("call_function", "call_method", "call_module"):
            return None
        signature = self._signatures[node] = self._signature(node, lambda i: _value_key(inputs[i]))
        if signature is _NONE:
            return None
        kind = self._kind(node)
        known = self._known.setdefault(kind, {})
        pending = self._pending.get(kind, ())
        while signature not in known and pending:
            recorded = pending.popleft()
            key = self._signature(recorded, lambda i: _metadata_key(self.snapshot.get(i)))
            if key is not _NONE:
                known.setdefault(key, self.snapshot[recorded])
        return known.get(signature)

    def learn(self, node: torch.fx.Node, metadata: Any) -> None:
        """``node``'s shapes, just computed for the signature :meth:`lookup` found no recorded node of: what a
        later node of that signature takes (the eight experts of a layer made into a mixture, the layers after
        the first one an edit adds)."""
        signature = self._signatures.pop(node, _NONE)
        if signature is not _NONE and metadata is not None:
            self._known.setdefault(self._kind(node), {}).setdefault(signature, metadata)

    def _kind(self, node: torch.fx.Node) -> Any:
        if node.op == "call_module":
            return node.op, type(self.modules.get(node.target))
        return node.op, node.target

    def _signature(self, node: torch.fx.Node, key_of_input) -> Any:
        target = self._module_key(node.target) if node.op == "call_module" else node.target
        if target is _NONE:
            return _NONE
        arguments = _key((node.args, node.kwargs), key_of_input)
        return _NONE if arguments is _NONE else (node.op, target, arguments)

    def _module_key(self, path: str) -> Any:
        if path not in self._module_keys:
            module = self.modules.get(path)
            self._module_keys[path] = _NONE if module is None else _state_key(module)
        return self._module_keys[path]


def _state_key(module: torch.nn.Module) -> Any:
    """What a module's output shapes can depend on: every submodule's class, plain attributes and tensors'
    shapes, dtypes and strides (``_NONE`` when it has hooks or an attribute that does not compare by value)."""
    parts = []
    for path, sub in module.named_modules():
        if sub._forward_hooks or sub._forward_pre_hooks:
            return _NONE
        attributes = _key({k: v for k, v in vars(sub).items() if not k.startswith("_")}, None)
        tensors = _key({**sub._parameters, **sub._buffers}, None)
        if attributes is _NONE or tensors is _NONE:
            return _NONE
        parts.append((path, type(sub), attributes, tensors))
    return tuple(parts)


def _key(value: Any, key_of_input) -> Any:
    """A hashable stand-in for ``value`` that is equal exactly when the values are (``_NONE`` for a value that
    does not compare by value); graph nodes in it by ``key_of_input``."""
    if isinstance(value, torch.fx.Node):
        return _NONE if key_of_input is None else key_of_input(value)
    if isinstance(value, torch.Tensor):  # a constant: its values are not in its shape
        return _NONE if not value.is_meta else ("tensor", _tensor_key(value))
    if isinstance(value, _PLAIN):
        return type(value), value
    if isinstance(value, (tuple, list, torch.Size)):
        items = tuple(_key(v, key_of_input) for v in value)
        return _NONE if _NONE in items else (type(value), items)
    if isinstance(value, dict):
        items = tuple((k, _key(v, key_of_input)) for k, v in value.items())
        return _NONE if any(v is _NONE for _, v in items) or not all(isinstance(k, str) for k, _ in items) \
            else (dict, items)
    if isinstance(value, slice):
        items = tuple(_key(v, key_of_input) for v in (value.start, value.stop, value.step))
        return _NONE if _NONE in items else (slice, items)
    return _NONE


def _tensor_key(tensor: torch.Tensor) -> Any:
    return tensor.shape, tensor.dtype, tensor.stride()


def _value_key(value: Any) -> Any:
    """A node's value now: a tensor by its metadata, as the graph records it."""
    if isinstance(value, torch.Tensor):
        return _tensor_key(value)
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return type(value), tuple(_tensor_key(v) for v in value)
    return _key(value, None)


def _metadata_key(metadata: Any) -> Any:
    """A recorded node's value by its metadata, the same key as :func:`_value_key` gives its value (meta)."""
    if isinstance(metadata, TensorMetadata):
        return _metadata_tensor_key(metadata)
    if isinstance(metadata, (tuple, list)) and metadata and all(isinstance(m, TensorMetadata) for m in metadata):
        return type(metadata), tuple(_metadata_tensor_key(m) for m in metadata)
    return _NONE


def _metadata_tensor_key(metadata: TensorMetadata) -> Any:
    if metadata.is_quantized:
        return _NONE
    return metadata.shape, metadata.dtype, tuple(metadata.stride)
