"""The two tracers that feed the one IR, and the choice between them.

* ``fx``: ``torch.fx.symbolic_trace``. Hand-written modules, in milliseconds; standard leaf modules
  (``nn.Linear``, norms, activations) stay ``call_module`` nodes, composite ``torch.nn`` layers are traced
  through. Fails on Hugging Face models
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

from rewrite.ir.lazy_compile import compile_on_first_use, recompiles_deferred
from rewrite.ops.kinds import MODULE_KINDS

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


@contextlib.contextmanager
def stack_traces(record: bool):
    """Whether torch.fx's tracers record each node's Python stack (``node.meta["stack_trace"]``, the source line
    ``print_readable`` shows) for the duration: capturing and formatting it is 8% of a Hugging Face export.
    A plan on ``meta`` records none: nothing of it runs, so no error points back into the model's code."""
    before = torch.fx.config.do_not_emit_stack_traces
    torch.fx.config.do_not_emit_stack_traces = before or not record
    try:
        yield
    finally:
        torch.fx.config.do_not_emit_stack_traces = before


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
    """symbolic_trace's tracer, but buffers read in code (RoPE tables) become ``get_attr`` nodes, and only the
    ``torch.nn`` modules the op knowledge has a kind for stay leaves: composites (``TransformerEncoderLayer``,
    ``MultiheadAttention``) are traced through, so the analysis sees their linears and norms. Where their code
    cannot be traced symbolically, fx fails and ``auto`` goes on to torch.export."""

    proxy_buffer_attributes = True

    def is_leaf_module(self, module: torch.nn.Module, qualified_name: str) -> bool:
        return super().is_leaf_module(module, qualified_name) and type(module).__name__ in MODULE_KINDS


def auto_dynamic_shapes(fn, args: tuple, kwargs: dict) -> dict:
    """A ``dynamic_shapes`` spec that lets torch.export decide every tensor axis (``Dim.AUTO``)."""
    bound = inspect.signature(fn.forward if isinstance(fn, torch.nn.Module) else fn).bind(*args, **kwargs)
    return {name: pytree.tree_map(_auto_dims, value) for name, value in bound.arguments.items()}


def _auto_dims(value):
    if isinstance(value, torch.Tensor):
        return {axis: Dim.AUTO for axis in range(value.dim())} or None
    return None


def trace_export(model: torch.nn.Module, args: tuple, kwargs: dict, *, dynamic: bool = True) -> torch.fx.GraphModule:
    """``torch.export.export`` with symbolic batch/sequence axes where possible, static otherwise (or static
    only, with ``dynamic=False``: about half the time, for a graph that only plans a growth)."""
    program = None
    if dynamic:
        try:
            program = _exported(model, args, kwargs, auto_dynamic_shapes(model, args, kwargs))
        except Exception:  # noqa: BLE001 - symbolic shapes are a bonus; a static graph is still a graph
            program = None
    if program is None:
        program = _exported(model, args, kwargs, None)
    with recompiles_deferred():  # module() builds it through four GraphModules, each compiling its code
        module = program.module(check_guards=False)  # the guards: a pre-hook checks the inputs instead of a node
    _dropout_as_modules(module)
    _batch_norm_as_modules(module)
    compile_on_first_use(module)
    return module


def _exported(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic_shapes) -> torch.export.ExportedProgram:
    """``torch.export.export`` (non-strict), its passes not each compiling the code of the graph they rewrote
    (six times: 1.0-1.4 s of 5.4 s on an 80-layer Llama); a graph that one of them runs makes its code then."""
    with recompiles_deferred():
        return torch.export.export(model, tuple(args), dict(kwargs), strict=False, dynamic_shapes=dynamic_shapes)


def _dropout_as_modules(gm: torch.fx.GraphModule) -> None:
    """Dropout that follows the module's mode. Export traces in eval mode and bakes ``train=False`` into each
    ``aten.dropout``, so a grown model trained from such a graph would silently train without dropout. Each one
    becomes a ``call_module`` of an ``nn.Dropout(p)`` at the path of the module it belonged to (the original's
    name, ``transformer.h.0.attn.resid_dropout``), which ``.train()`` and ``.eval()`` switch like the original.
    (Dropout inside ``scaled_dot_product_attention`` is traced as ``dropout_p=0`` and stays off.)"""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.dropout.default:
            continue
        x, p = node.args[0], float(node.args[1])
        stack = node.meta.get("nn_module_stack") or {}
        owner = list(stack.values())[-1][0] if stack else ""
        path = owner if owner and not owner.startswith("_empty") else "dropout"
        candidate, n = path, 0
        while _taken(gm, candidate):
            n += 1
            candidate = f"{path}_{n}"
        gm.add_submodule(candidate, torch.nn.Dropout(p).eval())  # traced in eval mode; .train() turns it on
        _call_module_instead(gm, node, candidate, x)


BATCH_NORMS = {3: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}


def _batch_norm_as_modules(gm: torch.fx.GraphModule) -> None:
    """BatchNorm that follows the module's mode. Export bakes ``training=False`` into ``aten.batch_norm``, so in
    train mode it would keep normalising with the running statistics and never update them. Each one whose
    tensors live on one module becomes a ``call_module`` of a real ``nn.BatchNorm{1,2,3}d`` at that module's path,
    holding the very same weight, bias and running statistics (the names do not change)."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.batch_norm.default:
            continue
        x, weight, bias, mean, var, _, momentum, eps = node.args[:8]
        tensors = [t for t in (weight, bias, mean, var) if isinstance(t, torch.fx.Node)]
        owners = {str(t.target).rpartition(".")[0] for t in tensors if t.op == "get_attr"}
        value = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
        if len(owners) != 1 or not isinstance(mean, torch.fx.Node) or value is None or value.dim() not in BATCH_NORMS:
            continue  # not one module's tensors: leave the op as traced
        path = owners.pop()
        holder = gm.get_submodule(path)
        norm = BATCH_NORMS[value.dim()](mean.meta["val"].shape[0], eps=eps, momentum=momentum,
                                        affine=isinstance(weight, torch.fx.Node), device="meta")
        for name, ref in (("weight", weight), ("bias", bias), ("running_mean", mean), ("running_var", var)):
            if isinstance(ref, torch.fx.Node):
                setattr(norm, name, getattr(holder, str(ref.target).rpartition(".")[2]))
        tracked = getattr(holder, "num_batches_tracked", None)
        norm.register_buffer("num_batches_tracked", tracked)  # None when the original kept no count
        norm.eval()  # traced in eval mode; .train() turns batch statistics on
        gm.add_submodule(path, norm)
        _call_module_instead(gm, node, path, x)
        for ref in tensors:
            if not ref.users:
                gm.graph.erase_node(ref)


def _call_module_instead(gm: torch.fx.GraphModule, node: torch.fx.Node, path: str, x: torch.fx.Node) -> None:
    """``node`` replaced by a call of the module at ``path`` on ``x`` (same metadata, same users)."""
    with gm.graph.inserting_before(node):
        replacement = gm.graph.call_module(path, (x,))
    replacement.meta = dict(node.meta)
    node.replace_all_uses_with(replacement)
    gm.graph.erase_node(node)


def _taken(gm: torch.nn.Module, path: str) -> bool:
    try:
        gm.get_submodule(path)
    except AttributeError:
        return False
    return True


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
