"""`trace(model, args, kwargs)`: any model into the one IR, with the front-end that works.

The model is traced in eval mode (each submodule's flag is restored afterwards) so that dropout and
BatchNorm statistics do not make the graph random. The traced graph is run on the example inputs and
must reproduce the model's outputs; a front-end whose graph does not is treated as failed.
"""

from __future__ import annotations

import functools
import logging

import torch

from rewrite.errors import GrowfxError, TraceError
from rewrite.ir.frontends import (TRACERS, accepted_kwargs, candidate_frontends, eval_mode, first_line,
                                  fixed_inputs, stack_traces, trace_export)
from rewrite.ir.graph import Graph
from rewrite.ir.lazy_compile import compile_now
from rewrite.ir.compare import compare_outputs

log = logging.getLogger("growfx")


def trace(
    model: torch.nn.Module, args=(), kwargs: dict | None = None, *, frontend: str = "auto", static: bool = False
) -> Graph:
    """Trace ``model`` on example inputs into a :class:`Graph`.

    ``frontend`` is ``"fx"`` (``torch.fx.symbolic_trace``), ``"export"`` (``torch.export``) or
    ``"auto"``: Hugging Face models go to export, everything else tries fx first, then export.
    ``graph.frontend`` says which one was used. Raises :class:`TraceError` naming the model class
    and each front-end's reason when none works. A model on the ``meta`` device (built without weights, with
    inputs on ``meta`` too) is traced by torch.export alone, with static shapes (a plan needs no more): nothing
    runs to compare with. ``static=True`` has torch.export fix every input shape too (about half the time of
    a dynamic-shape export on Hugging Face models): the graph then runs on inputs of the example shapes only,
    which is all a growth written as a checkpoint needs; an ``.pt2`` archive or ONNX model keeps them dynamic.
    A graph traced on ``meta`` records no source line on its nodes (``frontends.stack_traces``).
    """
    if not isinstance(model, torch.nn.Module):
        raise GrowfxError(f"trace expects a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(args, tuple):
        args = (args,)
    kwargs = dict(kwargs or {})
    if frontend == "auto":
        order = candidate_frontends(model)
    elif frontend in TRACERS:
        order = (frontend,)
    else:
        raise GrowfxError(f"unknown frontend {frontend!r}; choose 'auto', 'fx' or 'export'")

    fixed = accepted_kwargs(model, kwargs)
    call_kwargs = {**kwargs, **fixed}
    reasons: dict[str, str] = {}
    on_meta = any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    if on_meta:  # shapes without weights: torch.export traces fake tensors; nothing runs to compare with
        order = ("export",)
    with eval_mode(model), torch.no_grad(), stack_traces(record=not on_meta):
        try:
            expected = None if on_meta else model(*args, **call_kwargs)
        except Exception as e:  # noqa: BLE001 - a model that cannot run on its inputs cannot be traced
            raise GrowfxError(
                f"{type(model).__name__} fails on the example inputs: {first_line(e)}"
            ) from e
        for name in order:
            try:
                graph = _trace_with(name, model, args, kwargs, fixed, static=on_meta or static)
                # without weights nothing runs to compare with: the shapes export recorded are enough
                output = None if on_meta and graph.shapes_from_export() else graph.propagate_shapes(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - each front-end's failure is reported, not raised
                reasons[name] = first_line(e)
                log.debug("front-end %s failed on %s", name, type(model).__name__, exc_info=True)
                continue
            bad = [] if on_meta else [row for row in compare_outputs(expected, output) if not row.ok]
            if bad:
                reasons[name] = (
                    f"the traced graph does not reproduce the model on the example inputs "
                    f"({bad[0].name}: max abs error {bad[0].max_abs_error:.3g}{', ' + bad[0].note if bad[0].note else ''})"
                )
                continue
            log.info("traced %s with %s", type(model).__name__, name)
            if not on_meta:  # the graph is the user's to run, export or compile: its code is made now
                compile_now(graph.module)
            return graph
    raise TraceError(type(model).__name__, reasons)


def _trace_with(name: str, model: torch.nn.Module, args: tuple, kwargs: dict, fixed: dict, *,
                static: bool = False) -> Graph:
    tracer = functools.partial(trace_export, dynamic=False) if static and name == "export" else TRACERS[name]
    gm = tracer(model, args, {**kwargs, **fixed})
    fixed = {**fixed, **fixed_inputs(kwargs)}
    if name == "fx":
        gm.eval()
    _name_module_classes(gm, model)
    _keep_persistence(gm, model)
    return Graph(
        gm,
        frontend=name,
        source_class=type(model).__name__,
        example_args=args,
        example_kwargs={k: v for k, v in kwargs.items() if k not in fixed},
        fixed_kwargs=fixed,
    )


def _name_module_classes(gm: torch.fx.GraphModule, model: torch.nn.Module) -> None:
    """Both tracers rebuild the module tree from plain Modules; remember each one's original class."""
    for path, original in model.named_modules():
        if not path:
            continue
        try:
            sub = gm.get_submodule(path)
        except AttributeError:
            continue
        if type(sub) is torch.nn.Module:
            sub._growfx_class = type(original).__name__


def _keep_persistence(gm: torch.fx.GraphModule, model: torch.nn.Module) -> None:
    """A buffer the model keeps out of its state dict (a rotary table) stays out of the graph's: fx registers
    every buffer it copies as persistent, so the grown module's state dict would carry names the model's
    (and the native class's) does not."""
    for path, original in model.named_modules():
        for leaf in original._non_persistent_buffers_set:
            name = f"{path}.{leaf}" if path else leaf
            owner, _, local = name.rpartition(".")
            try:
                holder = gm.get_submodule(owner) if owner else gm
            except AttributeError:
                continue
            if local in holder._buffers:
                holder._non_persistent_buffers_set.add(local)

