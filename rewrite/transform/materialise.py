"""Plan on shapes, then build each grown tensor once: the two halves of ``rewrite.apply``.

**Planning** (:func:`on_meta`) runs every pass on a copy of the traced graph whose parameters and buffers
are on the ``meta`` device: the rules analyse, copy blocks and resize exactly as they would on weights, but
no weight is allocated, copied or filled, and each pass's growth map (``lineage.step_map``) records how its
tensors are made from the ones before.

**Materialising** (:func:`materialise`) makes every tensor of the planned graph from the original's tensors
by running its recipe in the plan's composed growth map, tensor by tensor, and puts it in place of the meta
tensor (tied names share it). The passes' ops run in one go, so a tensor two passes grow (the MLP of
``widen_hidden`` + ``widen_mlp``) is built once. ``GrowthMap.then`` composes them (``growth_ops.composed``):
``run_ops(run_ops(x, a), b) == run_ops(x, a + b)`` holds when nothing is rounded between them (float32,
float64, integers) and ``b`` draws no noise before its first ``Take`` (noise is scaled by the std of the
tensor before the last Take); elsewhere a ``PassEnd`` between them rounds the tensor and resets that scale,
as running the passes one at a time does. Tensors are made by a few threads at once (each tensor's values
depend on its own seeds only, so the bits do not depend on the order; a large draw spreads its chunks over the
cores itself: ``rewrite.transform.draws``). Peak memory is the original, the grown tensors, and the scratch of
the tensors being made, which is given back to the system after each tensor.

A rule that computes a value from the weights (``Editor.set_tensor`` of a value made from a meta tensor,
a tensor registered without the Editor) or reads one (``.item()`` on a meta tensor) cannot be planned on
shapes; :class:`NeedsWeights` says so and ``apply`` runs the passes on the weights instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.utils._pytree as pytree

from rewrite.ir.graph import Graph
from rewrite.transform.growth_map import GrowthMap, named_tensors, tensor_names


WORKERS = 4  # tensors made at once, at most one per torch thread (copies and draws overlap between tensors)


def workers() -> int:
    """How many tensors to make at once: one per torch thread, at most ``WORKERS``."""
    return max(1, min(WORKERS, torch.get_num_threads()))


class NeedsWeights(Exception):
    """The plan depends on the weights' values, not only their shapes (see the module docstring)."""


def all_on_meta(graph: Graph) -> bool:
    """True when every parameter and buffer of ``graph`` is on ``meta`` (a model built without weights)."""
    tensors = [tensor for _, tensor in named_tensors(graph.module)]
    return bool(tensors) and all(t.is_meta for t in tensors)


def on_meta(graph: Graph, in_place: bool = False) -> Graph:
    """A copy of ``graph`` whose parameters and buffers are on ``meta`` (constants the tracer lifted stay as
    they are), with its example inputs on ``meta`` too: what the passes plan on; ``in_place``: the first rewrite
    edits this copy itself (``Graph.in_place``)."""
    memo: dict[int, torch.Tensor] = {}
    for tensor in (*graph.module.parameters(), *graph.module.buffers()):
        if id(tensor) not in memo:
            shape = tensor.detach().to("meta")
            memo[id(tensor)] = (torch.nn.Parameter(shape, tensor.requires_grad)
                                if isinstance(tensor, torch.nn.Parameter) else shape)
    planned = graph.with_module(graph.module_copy(memo), disposable=True, in_place=in_place)
    planned.example_args = to_meta(graph.example_args)
    planned.example_kwargs = to_meta(graph.example_kwargs)
    return planned


def check_shapes_only(step: GrowthMap, rule: str) -> None:
    """``NeedsWeights`` when a pass's map holds a value that was computed on ``meta`` (a value from the
    weights, which planning does not have)."""
    for name, recipe in step.recipes.items():
        start = recipe.start
        if start is not None and start.value is not None and start.value.is_meta:
            raise NeedsWeights(f"{rule} computes {name} from the weights' values")


def materialise(planned: Graph, original: Graph, meanwhile: Callable[[], object] | None = None) -> Graph:
    """The graph ``planned`` (on meta, made from ``original`` by passes whose composed growth map its lineage
    holds) with every tensor made from ``original``'s tensors; it takes ``original``'s example inputs.
    ``planned``'s module is filled in place: it is the result. ``meanwhile()`` runs on this thread while the
    worker threads make the tensors (they spend their time in torch's kernels, without the interpreter lock):
    Python work that does not read the tensors, such as generating the grown graph's code."""
    sources = dict(named_tensors(original.module))
    growth = planned.lineage.growth_map
    module = planned.module
    tensors = dict(named_tensors(module))
    todo = [(name, tensors[name]) for name in tensor_names(module).values()]  # each tensor once
    for name, _ in todo:
        recipe = growth.recipes.get(growth.canonical(name))
        if recipe is None:
            raise NeedsWeights(f"the planned graph has a tensor {name} its growth map does not make")
        if recipe.source is not None and recipe.source not in sources:
            raise NeedsWeights(f"the growth map reads {recipe.source}, which the traced model does not have")
    todo = _longest_first(todo, [growth.work(name) for name, _ in todo])

    def make(item):
        name = item[0]
        value = growth.make(name, sources)
        recipe = growth.recipes[growth.canonical(name)]
        if recipe.source is not None and not recipe.ops:  # every op and every fill makes a new tensor; an
            value = value.detach().clone()  # unchanged one is copied, never a view of a source
        return_freed_memory()  # the scratch of this tensor, before the next one takes new pages
        return value

    with ThreadPoolExecutor(workers()) as pool:
        pending = pool.map(make, todo)
        if meanwhile is not None:
            meanwhile()
        values = list(pending)
    made: dict[int, torch.Tensor] = {}  # id of the meta tensor -> the real one
    for (name, tensor), value in zip(todo, values):
        made[id(tensor)] = (torch.nn.Parameter(value, tensor.requires_grad)
                            if isinstance(tensor, torch.nn.Parameter) else value)
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for key, tensor in store.items():
                if tensor is not None and id(tensor) in made:
                    store[key] = made[id(tensor)]
    return original.with_module(module, planned.lineage)


def _longest_first(todo: list, costs: list[int], share: int = 8) -> list:
    """``todo`` with its longest tensors first (those that cost more than ``1 / share`` of a worker's share of
    the whole), the rest in their order. A long tensor left for last (an output head's noise) would keep one
    worker busy alone at the end; among the others, module order mixes draws (bound by the processor) with
    copies (bound by memory) and large tensors with small ones (bound by the interpreter), which two workers
    overlap better than the same kind at once."""
    limit = sum(costs) / (share * workers())
    long = sorted((i for i, cost in enumerate(costs) if cost > limit), key=lambda i: -costs[i])
    rest = [i for i, cost in enumerate(costs) if cost <= limit]
    return [todo[i] for i in (*long, *rest)]


def return_freed_memory() -> None:
    """Give the heap pages freed since the last call back to the system (glibc's ``malloc_trim``; nothing
    elsewhere). A tensor's scratch (a Take before a Redraw, a float32 working copy of a bfloat16 tensor) is
    freed into the heap, where the next tensor, of another size, often cannot reuse it: without this, peak
    memory grows by the holes (0.15 GB on a 430M-parameter build)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_libc()


def to_meta(value):
    """``value`` (tensors in any nesting) with every tensor on ``meta``."""
    return pytree.tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, value)


__all__ = ["NeedsWeights", "all_on_meta", "check_shapes_only", "materialise", "on_meta", "return_freed_memory",
           "to_meta", "workers"]
