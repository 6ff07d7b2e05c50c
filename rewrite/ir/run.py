"""Run a GraphModule on its caller's inputs, optionally keeping the value of every node.

Both front-ends produce `torch.fx.GraphModule`s, but they are called differently:
`symbolic_trace` graphs take the model's own parameters as placeholders, `torch.export`
graphs flatten a pytree of `(args, kwargs)` into placeholders and rebuild the output
structure (e.g. a Hugging Face `ModelOutput`) at the end. `flat_inputs` and `run_graph`
hide that difference so the verifier and shape propagation can interpret any of them.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.fx.graph import _PyTreeCodeGen

from rewrite.errors import InputError


def flat_inputs(gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """The values of `gm`'s placeholders, in order, for a call `gm(*args, **kwargs)`."""
    codegen = gm.graph._codegen
    try:
        bound = inspect.signature(gm.forward).bind(*args, **kwargs)
    except TypeError as e:
        raise InputError(f"inputs do not fit the graph's signature {_signature(gm)}: {e}") from None
    if isinstance(codegen, _PyTreeCodeGen):
        spec = codegen.pytree_info.in_spec
        kw_names = list(spec.children()[1].context) if spec.num_children == 2 else []
        values = bound.arguments
        missing = [n for n in kw_names if n not in values]
        if missing:
            raise InputError(f"the graph was traced with keyword inputs {kw_names}; missing {missing}")
        positional = tuple(v for k, v in values.items() if k not in kw_names)
        tree = (positional, {k: values[k] for k in kw_names})
        leaves, got = pytree.tree_flatten(tree)
        if got != spec:
            raise InputError(
                f"inputs have structure {got} but the graph was traced with {spec}"
            )
        return leaves
    bound.apply_defaults()
    return list(bound.arguments.values())


def _signature(gm: torch.fx.GraphModule) -> str:
    return str(inspect.signature(gm.forward))


class _Recorder(torch.fx.Interpreter):
    """An interpreter that keeps every node's value (no garbage collection of the environment). On a graph
    whose tensors are on ``meta`` (planned on shapes), the devices the tracer wrote into the graph (``x.to(cpu)``,
    ``arange(..., device=cpu)``) are read as ``meta``."""

    def __init__(self, gm: torch.fx.GraphModule, on_meta: bool = False):
        super().__init__(gm, garbage_collect_values=False)
        self.on_meta = on_meta

    def call_function(self, target, args, kwargs):
        return super().call_function(target, *self._devices(args, kwargs))

    def call_method(self, target, args, kwargs):
        return super().call_method(target, *self._devices(args, kwargs))

    def _devices(self, args, kwargs):
        if not self.on_meta:
            return args, kwargs
        meta = torch.device("meta")
        args, kwargs = pytree.tree_map_only(torch.device, lambda _: meta, (args, kwargs))
        if isinstance(kwargs.get("device"), str):
            kwargs = {**kwargs, "device": meta}
        return args, kwargs


def run_graph(
    gm: torch.fx.GraphModule, args: tuple = (), kwargs: dict | None = None
) -> tuple[Any, dict[str, Any]]:
    """Interpret `gm` on `(args, kwargs)`. Returns (output as the caller sees it, {node name: value})."""
    flat = flat_inputs(gm, tuple(args), dict(kwargs or {}))
    on_meta = any(isinstance(t, torch.Tensor) and t.is_meta for t in (*flat, *gm.parameters(), *gm.buffers()))
    interpreter = _Recorder(gm, on_meta)
    with torch.no_grad():
        out = interpreter.run(*flat, enable_io_processing=False)
    values = {node.name: value for node, value in interpreter.env.items()}
    return gm.graph.process_outputs(out), values


def run_on_meta(gm: torch.fx.GraphModule, node: torch.fx.Node, inputs: dict[torch.fx.Node, Any],
                interpreter: torch.fx.Interpreter | None = None) -> tuple[Any, torch.fx.Interpreter]:
    """The value of ``node`` alone, its input nodes' values given (``inputs``), on a graph whose tensors are on
    ``meta`` (devices read as ``meta``); returns the value and the interpreter, to reuse for the next node."""
    interpreter = interpreter or _Recorder(gm, on_meta=True)
    interpreter.env = dict(inputs)
    with torch.no_grad():
        return interpreter.run_node(node), interpreter
