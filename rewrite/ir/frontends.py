"""The two tracers that feed the one IR, and the choice between them.

* ``fx``: ``torch.fx.symbolic_trace``. Hand-written modules, in milliseconds; standard leaf modules
  (``nn.Linear``, norms, activations) stay ``call_module`` nodes. Fails on Hugging Face models
  (control flow in masking code, ``co_varnames``), on data-dependent Python control flow, and on
  in-place item assignment of proxies.
* ``export``: ``torch.export.export`` (non-strict). Every model PyTorch can export, Hugging Face ones
  included; ATen-level nodes, parameters as ``get_attr``, the owning module in
  ``meta["nn_module_stack"]``. Batch and sequence axes are made symbolic where the model allows
  (``Dim.AUTO``), so graphs (and their ONNX files) accept other shapes. Causal LMs are exported with
  ``use_cache=False``; the key-value cache is not an output of the graph.

Every trace is checked: the graph is run on the example inputs and must reproduce the model's outputs,
otherwise that front-end counts as failed (a trace that silently baked in one branch is caught here).
"""

from __future__ import annotations

import contextlib
import inspect
import operator
from typing import Callable

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.export import Dim

FRONTENDS = ("fx", "export")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Put every submodule in eval mode for the duration, then restore each one's flag.

    Flags are set directly: ``ep.module()`` refuses ``.eval()`` (its graph has the mode baked in).
    """
    flags = [(m, m.training) for m in model.modules()]
    for m, _ in flags:
        m.training = False
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def accepted_kwargs(model: torch.nn.Module, kwargs: dict) -> dict:
    """Keyword inputs a front-end adds for the graph to be traceable; the caller's own win."""
    added = {}
    params = inspect.signature(model.forward).parameters
    config = getattr(model, "config", None)
    if "use_cache" in params and "use_cache" not in kwargs and config is not None:
        added["use_cache"] = False
    return added


def trace_fx(model: torch.nn.Module, args: tuple, kwargs: dict) -> torch.fx.GraphModule:
    """``torch.fx.symbolic_trace``; keyword inputs without tensors are fixed as constants.

    The placeholders of fixed inputs are removed, so the graph no longer takes them; the Graph
    that wraps it records their values (see ``fixed_inputs``) and refuses calls that differ.
    """
    concrete = fixed_inputs(kwargs)
    tracer = _BufferProxyTracer()
    graph = tracer.trace(model, concrete_args=concrete or None)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    names = list(inspect.signature(model.forward).parameters)
    for node, name in zip(placeholders, names):
        if name in concrete:
            _erase_with_guard(graph, node)
    return torch.fx.GraphModule(tracer.root, graph, type(model).__name__)


def _erase_with_guard(graph: torch.fx.Graph, placeholder: torch.fx.Node) -> None:
    """Remove a fixed input's placeholder and the ``value == constant`` assert fx hangs on it."""
    guard = [placeholder]
    for node in guard:
        for user in node.users:
            if user.target in (operator.eq, torch._assert) and user not in guard:
                guard.append(user)
    if all(user in guard for node in guard for user in node.users):
        for node in reversed(guard):
            graph.erase_node(node)


def fixed_inputs(kwargs: dict) -> dict:
    """The keyword inputs that hold no tensor: tracers treat them as constants of the graph."""
    return {
        name: value
        for name, value in kwargs.items()
        if not any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value))
    }


class _BufferProxyTracer(torch.fx.Tracer):
    """symbolic_trace's tracer, but buffers read in code (RoPE tables) become ``get_attr`` nodes."""

    proxy_buffer_attributes = True


def auto_dynamic_shapes(fn, args: tuple, kwargs: dict) -> dict:
    """A ``dynamic_shapes`` spec that lets torch.export decide every tensor axis (``Dim.AUTO``)."""
    bound = inspect.signature(fn.forward if isinstance(fn, torch.nn.Module) else fn).bind(*args, **kwargs)
    return {name: pytree.tree_map(_auto_dims, value) for name, value in bound.arguments.items()}


def _auto_dims(value):
    if isinstance(value, torch.Tensor):
        return {axis: Dim.AUTO for axis in range(value.dim())} or None
    return None


def trace_export(model: torch.nn.Module, args: tuple, kwargs: dict) -> torch.fx.GraphModule:
    """``torch.export.export`` with symbolic batch/sequence axes where possible, static otherwise."""
    dynamic = auto_dynamic_shapes(model, args, kwargs)
    try:
        program = torch.export.export(model, tuple(args), dict(kwargs), dynamic_shapes=dynamic, strict=False)
    except Exception:  # noqa: BLE001 - symbolic shapes are a bonus; a static graph is still a graph
        program = torch.export.export(model, tuple(args), dict(kwargs), strict=False)
    return program.module()


TRACERS: dict[str, Callable[[torch.nn.Module, tuple, dict], torch.fx.GraphModule]] = {
    "fx": trace_fx,
    "export": trace_export,
}


def candidate_frontends(model: torch.nn.Module) -> tuple[str, ...]:
    """The order ``frontend="auto"`` tries: Hugging Face models straight to export (fx never works)."""
    if is_huggingface(model):
        return ("export",)
    return FRONTENDS


def is_huggingface(model: torch.nn.Module) -> bool:
    """Is ``model`` a Hugging Face ``PreTrainedModel`` (the one test every layer uses)?"""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def first_line(error: BaseException, limit: int = 240) -> str:
    """An exception as one readable line: the type and first message line of its root cause.

    Chained errors (torch.onnx wraps the failing op's error in two banners) are followed through
    ``__cause__`` to the innermost one, which names the op.
    """
    while error.__cause__ is not None:
        error = error.__cause__
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    line = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
