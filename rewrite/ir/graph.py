"""`Graph`: the one IR every rule sees. A `torch.fx.GraphModule` plus what the tracer learnt about it.

A Graph knows, for every node, the shape and dtype of its value on the example inputs
(``node.meta["tensor_meta"]``, as ``torch.fx.passes.shape_prop`` writes it), which module owns it (the
``call_module`` target, or the innermost entry of ``meta["nn_module_stack"]`` for ATen-level graphs),
and, for every parameter and buffer, the nodes that read it. A Graph shares its tensors with the model
it was traced from; growth passes build new tensors and never write to these.

A grown Graph also carries its :class:`Lineage`: one immutable record of how it relates to the graph it
was traced as (the node map the verifier projects through, where copied and moved modules come from,
the growth map of its tensors). Nothing else is attached to a Graph from outside.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

from rewrite.errors import InputError
from rewrite.ir.compare import same_value
from rewrite.ir.lazy_compile import copy_code
from rewrite.ir.module_copy import copied
from rewrite.ir.run import run_graph, run_on_meta
from rewrite.ir.shape_memo import ShapeMemo
from rewrite.ir.summary import summarize
from rewrite.ops import is_bookkeeping, op_name


@dataclasses.dataclass(frozen=True)
class Lineage:
    """How a grown graph relates to the graph it was traced as; empty for a traced graph.

    * ``node_map``: grown node name -> (original node name, projection of its value onto the original
      units), for ``rewrite.verify`` to name the first diverging node through growth;
    * ``origins``: module -> the module of the traced model it was copied or moved from;
    * ``growth_map``: every tensor of this graph as computed from the traced model's tensors
      (a ``rewrite.GrowthMap``), composed over every pass;
    * ``step_map``: the same for the last pass alone (its sources are the previous graph's tensors).
    """

    node_map: Mapping[str, tuple[str, Callable]] = dataclasses.field(default_factory=dict)
    origins: Mapping[str, str] = dataclasses.field(default_factory=dict)
    growth_map: Any = None
    step_map: Any = None



@dataclasses.dataclass
class TensorInfo:
    """One parameter, buffer or constant tensor of a graph, with every name it goes by."""

    name: str
    kind: str  # "parameter", "buffer" or "constant"
    shape: torch.Size
    dtype: torch.dtype
    aliases: list[str]  # other names of the same tensor (tied weights)
    readers: list[str]  # names of the nodes that read it

    @property
    def numel(self) -> int:
        return self.shape.numel()


class Graph:
    """A traced model: ``graph.module`` runs it, ``str(graph)`` summarises it."""

    def __init__(
        self,
        module: torch.fx.GraphModule,
        *,
        frontend: str,
        source_class: str,
        example_args: tuple = (),
        example_kwargs: dict | None = None,
        fixed_kwargs: dict | None = None,
        lineage: Lineage | None = None,
        disposable: bool = False,
        in_place: bool = False,
    ):
        self.module = module
        self.frontend = frontend
        self.source_class = source_class
        self.fixed_kwargs = dict(fixed_kwargs or {})  # inputs the front-end fixed, e.g. use_cache=False
        self.example_args = tuple(example_args)
        self.example_kwargs = dict(example_kwargs or {})
        self.lineage = lineage or Lineage()
        # an intermediate of ``rewrite.apply``, replaced by the next pass's result: its tensors may move on
        self.disposable = disposable or in_place
        # an intermediate nothing reads again: the next rewrite edits its module itself (``module_to_edit``)
        self.in_place = in_place
        self._nodes: dict[str, torch.fx.Node] = {}
        self._derived: dict[str, Any] = {}

    def origin(self, module_name: str) -> str:
        """The module of the traced model that ``module_name`` was copied or moved from (or itself)."""
        return self.lineage.origins.get(module_name, module_name)

    def module_copy(self, memo: dict | None = None) -> torch.fx.GraphModule:
        """A deep copy of the GraphModule for a rewrite to edit (``memo`` maps tensors to their replacements).
        Tensors are cloned, so the result owns its parameters, unless this graph is ``disposable``: then
        untouched tensors move."""
        memo = dict(memo or {})
        if self.disposable:
            for tensor in (*self.module.parameters(), *self.module.buffers()):
                memo.setdefault(id(tensor), tensor)
        return _deep_copied(self.module, memo)

    def module_to_edit(self, memo: dict | None = None) -> torch.fx.GraphModule:
        """The GraphModule a rewrite edits: :meth:`module_copy`, or for an ``in_place`` graph its module itself,
        with the tensors ``memo`` maps replaced (once: the graph is then spent, and a second rewrite copies the
        edited module). Copying a 12-layer model's GraphModule takes about 13 ms, a third of planning a pass."""
        if not self.in_place or not _names_as_copied(self.module.graph):
            return self.module_copy(memo)
        self.in_place = False
        replaced = {key: tensor for key, tensor in (memo or {}).items() if id(tensor) != key}  # not kept as is
        if replaced:
            _replace_tensors(self.module, replaced)
        return self.module

    def with_module(self, module: torch.fx.GraphModule, lineage: Lineage | None = None,
                    disposable: bool = False, in_place: bool = False) -> "Graph":
        """A Graph of ``module`` (a rewritten copy of this one) with this graph's provenance and example inputs,
        and ``lineage`` (default: this graph's)."""
        return Graph(
            module,
            frontend=self.frontend,
            source_class=self.source_class,
            example_args=self.example_args,
            example_kwargs=self.example_kwargs,
            fixed_kwargs=self.fixed_kwargs,
            lineage=self.lineage if lineage is None else lineage,
            disposable=disposable,
            in_place=in_place,
        )

    def __deepcopy__(self, memo: dict) -> "Graph":
        """A copy with its own module and tensors; the lineage is immutable and shared, derived facts are not
        copied (they are recomputed on the copy when asked for)."""
        return Graph(_deep_copied(self.module, memo), frontend=self.frontend, source_class=self.source_class,
                     example_args=copy.deepcopy(self.example_args, memo),
                     example_kwargs=copy.deepcopy(self.example_kwargs, memo),
                     fixed_kwargs=copy.deepcopy(self.fixed_kwargs, memo), lineage=self.lineage)

    def handed_over(self, in_place: bool = False) -> "Graph":
        """This graph marked ``disposable`` (its tensors may move into the next rewrite's result), or ``in_place``
        (the next rewrite edits its module), sharing what was derived from it: ``rewrite.apply`` hands the
        intermediates it made to the next pass this way."""
        graph = self.with_module(self.module, disposable=True, in_place=in_place)
        graph._nodes, graph._derived = self._nodes, self._derived
        return graph

    def derived(self, key: str, compute: Callable[[], Any]) -> Any:
        """A fact derived from this graph (its dimension analysis), computed once: a Graph is not edited
        after it is made (rules edit a copy and make a new one)."""
        if key not in self._derived:
            self._derived[key] = compute()
        return self._derived[key]

    # -- running -----------------------------------------------------------------------------
    def call_inputs(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The caller's inputs plus the fixed ones, as the GraphModule takes them (in signature order)."""
        for name, value in self.fixed_kwargs.items():
            if name in kwargs and not same_value(kwargs[name], value):
                raise InputError(
                    f"the graph of {self.source_class} was traced with {name}={value!r} fixed; "
                    f"got {name}={kwargs[name]!r} (trace again with that value)"
                )
        params = inspect.signature(self.module.forward).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        merged = {**self.fixed_kwargs, **kwargs}
        order = {name: i for i, name in enumerate(params)}
        keep = [k for k in merged if takes_any or k in params or k not in self.fixed_kwargs]
        return tuple(args), {k: merged[k] for k in sorted(keep, key=lambda k: order.get(k, len(order)))}

    def __call__(self, *args, **kwargs):
        args, kwargs = self.call_inputs(args, kwargs)
        return self.module(*args, **kwargs)

    def run(self, *args, **kwargs) -> tuple[Any, dict[str, Any]]:
        """Interpret the graph; returns (output, {node name: value}) for every node."""
        args, kwargs = self.call_inputs(args, kwargs)
        return run_graph(self.module, args, kwargs)

    def propagate_shapes(self, *args, **kwargs) -> Any:
        """Run on the inputs and record every node's shape and dtype in ``meta["tensor_meta"]``."""
        output, values = self.run(*args, **kwargs)
        for node in self.module.graph.nodes:
            if node.name in values:
                node.meta["tensor_meta"] = _metadata(values[node.name])
        return output

    def propagate_changed(self, dirty: set[torch.fx.Node]) -> bool:
        """On a graph whose tensors are on ``meta``: the shapes of the ``dirty`` nodes (new or rewired by an edit)
        and of every node whose input's shape then changed, recomputed from their inputs'
        recorded shapes (an input that is not a tensor, a size read at run time, is computed the same way from
        its own inputs), instead of running the whole graph. False when some input cannot be made that way (a
        graph input that is not a tensor): run :meth:`propagate_shapes` then."""
        changed: set[torch.fx.Node] = set()
        values: dict[torch.fx.Node, Any] = {}
        runner = [None]  # one interpreter for every node run
        memo = ShapeMemo(self.module, dirty)  # a node with the signature of one recorded before: its shapes

        def run(node: torch.fx.Node):
            inputs = {i: value_of(i) for i in node.all_input_nodes}
            value, runner[0] = run_on_meta(self.module, node, inputs, runner[0])
            values[node] = value
            return value

        def value_of(node: torch.fx.Node):
            if node not in values:
                value = _from_metadata(node.meta.get("tensor_meta"))
                if value is None and node.op == "placeholder":
                    raise _NotFromShapes
                values[node] = run(node) if value is None else value
            return values[node]

        try:
            for node in self.module.graph.nodes:
                if node.op in ("placeholder", "output"):
                    continue
                if node not in dirty and not any(i in changed for i in node.all_input_nodes):
                    continue
                metadata = memo.lookup(node, {i: value_of(i) for i in node.all_input_nodes})
                values[node] = _from_metadata(metadata)
                if values[node] is None:
                    metadata = _metadata(run(node))
                    memo.learn(node, metadata)
                if node.meta.get("tensor_meta") != metadata:
                    node.meta["tensor_meta"] = metadata
                    changed.add(node)
        except (_NotFromShapes, RecursionError):
            return False
        self._output_metadata()
        return True

    def _output_metadata(self) -> None:
        output = next(n for n in self.module.graph.nodes if n.op == "output")
        output.meta["tensor_meta"] = pytree.tree_map(
            lambda a: a.meta.get("tensor_meta") if isinstance(a, torch.fx.Node) else None, output.args[0])

    def shapes_from_export(self) -> bool:
        """Every node's shape and dtype from the fake values torch.export recorded (``meta["val"]``), instead of
        running the graph: True when every node but export's own checks has one (else nothing is changed)."""
        nodes = [n for n in self.module.graph.nodes if n.op != "output"]
        if not all("val" in n.meta or self.is_bookkeeping(n) for n in nodes):
            return False
        for node in nodes:
            node.meta["tensor_meta"] = _metadata(node.meta.get("val"))
        self._output_metadata()
        return True

    # -- nodes ---------------------------------------------------------------------------------
    @property
    def nodes(self) -> list[torch.fx.Node]:
        return list(self.module.graph.nodes)

    def node(self, name: str) -> torch.fx.Node:
        """The node called ``name`` (a dictionary lookup; the index is rebuilt when the graph has changed)."""
        node = self._nodes.get(name)
        if node is None or node.graph is not self.module.graph or node.name != name:
            self._nodes = {n.name: n for n in self.module.graph.nodes}
            node = self._nodes.get(name)
        if node is None:
            raise KeyError(f"no node named {name!r} in the graph of {self.source_class}")
        return node

    def _as_node(self, node: torch.fx.Node | str) -> torch.fx.Node:
        return self.node(node) if isinstance(node, str) else node

    def shape(self, node: torch.fx.Node | str) -> torch.Size | tuple | None:
        """Shape of the node's value on the example inputs (a tuple of shapes for tuple outputs)."""
        return self._metadata(node, "shape")

    def dtype(self, node: torch.fx.Node | str) -> torch.dtype | tuple | None:
        return self._metadata(node, "dtype")

    def _metadata(self, node: torch.fx.Node | str, field: str):
        return pytree.tree_map(
            lambda m: getattr(m, field) if isinstance(m, TensorMetadata) else None,
            self._as_node(node).meta.get("tensor_meta"),
            is_leaf=lambda m: isinstance(m, TensorMetadata),
        )

    def owner(self, node: torch.fx.Node | str) -> str:
        """Qualified name of the module that owns the node ('' for the top-level model)."""
        node = self._as_node(node)
        if node.op == "call_module":
            return str(node.target)
        if node.op == "get_attr":
            return str(node.target).rpartition(".")[0]
        stack = node.meta.get("nn_module_stack")
        if stack:
            path = next(reversed(stack.values()))[0]
            return "" if path.startswith("_empty_nn_module_stack") else path
        return ""

    def op_kind(self, node: torch.fx.Node | str) -> str:
        """A readable, front-end-neutral name of what the node does: "Linear", "aten.linear", "add"."""
        return op_name(self._as_node(node), self.module)

    def is_bookkeeping(self, node: torch.fx.Node) -> bool:
        """True for nodes torch.export inserts for its own checks (guards, shape asserts)."""
        if node.op == "call_module":
            return is_bookkeeping(str(node.target))
        if node.op == "call_function":
            return is_bookkeeping(op_name(node).rpartition(".")[2])
        return False

    def compute_nodes(self) -> list[torch.fx.Node]:
        """Nodes that compute something the model computes (no inputs, attributes, output, checks)."""
        return [
            n
            for n in self.module.graph.nodes
            if n.op in ("call_module", "call_function", "call_method") and not self.is_bookkeeping(n)
        ]

    def op_counts(self) -> Counter:
        return Counter(self.op_kind(n) for n in self.compute_nodes())

    @property
    def input_names(self) -> list[str]:
        return [n.name for n in self.module.graph.nodes if n.op == "placeholder"]

    # -- tensors -------------------------------------------------------------------------------
    def tensors(self) -> dict[str, TensorInfo]:
        """Every parameter, buffer and constant, keyed by its first name; tied names are aliases."""
        by_identity: dict[int, TensorInfo] = {}
        kinds = (
            ("parameter", self.module.named_parameters(remove_duplicate=False)),
            ("buffer", self.module.named_buffers(remove_duplicate=False)),
        )
        for kind, named in kinds:
            for name, tensor in named:
                info = by_identity.get(id(tensor))
                if info is None:
                    by_identity[id(tensor)] = TensorInfo(name, kind, tensor.shape, tensor.dtype, [], [])
                elif name != info.name:
                    info.aliases.append(name)
        by_name = {}
        for info in by_identity.values():
            by_name[info.name] = info
            for alias in info.aliases:
                by_name[alias] = info
        for node in self.module.graph.nodes:
            if node.op == "get_attr":
                info = by_name.get(str(node.target))
                if info is None:  # a constant tensor the tracer lifted out of the code
                    value = attribute(self.module, str(node.target))
                    if not isinstance(value, torch.Tensor):
                        continue
                    info = TensorInfo(str(node.target), "constant", value.shape, value.dtype, [], [])
                    by_identity[id(value)] = by_name[info.name] = info
                info.readers.extend(u.name for u in node.users if u.name not in info.readers)
            elif node.op == "call_module":
                sub = self.module.get_submodule(node.target)
                prefix = f"{node.target}."
                for local, _ in (*sub.named_parameters(), *sub.named_buffers()):
                    info = by_name.get(prefix + local)
                    if info is not None and node.name not in info.readers:
                        info.readers.append(node.name)
        return {info.name: info for info in by_identity.values()}

    def parameters(self) -> dict[str, TensorInfo]:
        """The learnable parameters (tied ones once), with the nodes that read them."""
        return {k: v for k, v in self.tensors().items() if v.kind == "parameter"}

    @property
    def num_parameters(self) -> int:
        return sum(info.numel for info in self.parameters().values())

    # -- printing ------------------------------------------------------------------------------
    def summary(self) -> str:
        return summarize(self)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return (
            f"<Graph of {self.source_class} via {self.frontend}: {len(self.compute_nodes())} ops, "
            f"{self.num_parameters:,} parameters>"
        )


def _deep_copied(module: torch.fx.GraphModule, memo: dict) -> torch.fx.GraphModule:
    """A deep copy of ``module`` that runs the code of ``module``'s graph (the copy's graph is the same until it
    is edited, and every edit ends by asking for new code) instead of generating and compiling it again:
    ``GraphModule``'s own deepcopy recompiles, about 20 ms on a 12-layer model, 0.2 s on an 80-layer one, once
    per rule application."""
    source = type(module)
    with warnings.catch_warnings():  # deepcopy of export's pytree specs warns about a deprecated alias
        warnings.simplefilter("ignore", FutureWarning)
        if vars(source).get("forward") is None or not isinstance(module, torch.fx.GraphModule) \
                or type(module)._deepcopy_init is not torch.fx.GraphModule._deepcopy_init:
            return copy.deepcopy(module, memo)
        source._deepcopy_init = lambda self: functools.partial(_init_with_code_of, module)
        for child in module.children():  # the module tree copied directly: GraphModule's deepcopy finds it
            copied(child, memo)
        try:
            return copy.deepcopy(module, memo)
        finally:
            del source._deepcopy_init


def _names_as_copied(fx_graph: torch.fx.Graph) -> bool:
    """Name the nodes an edit adds as in a copy of ``fx_graph``: a copy's namespace holds only the names of the
    nodes it has (not those of nodes erased before, which a later node may then take), each numbered name
    counted from the last of its stem in graph order. False (nothing changed) when a copy would rename a node,
    or when this torch's fx keeps its names another way (the namespace is fx's own, not its API)."""
    if not hasattr(fx_graph, "_graph_namespace") or not hasattr(torch.fx.graph, "_Namespace"):
        return False
    namespace = torch.fx.graph._Namespace()
    nodes = list(fx_graph.nodes)
    for node in [*(n for n in nodes if n.op != "output"), *(n for n in nodes if n.op == "output")]:
        name = namespace.create_name(node.name if node.op != "output" else "output", None)
        if name != node.name:
            return False
        namespace.associate_name_with_obj(name, node)
    fx_graph._graph_namespace = namespace
    return True


def _replace_tensors(module: torch.nn.Module, memo: dict) -> None:
    """Every parameter, buffer and tensor attribute of ``module`` whose identity ``memo`` maps, replaced by what it
    maps to (tied names all see the replacement): what a deep copy with ``memo`` holds, without the copy."""
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for key, tensor in store.items():
                if tensor is not None and id(tensor) in memo:
                    store[key] = memo[id(tensor)]
        for key, value in vars(sub).items():
            if isinstance(value, torch.Tensor) and id(value) in memo:
                vars(sub)[key] = memo[id(value)]


def _init_with_code_of(module: torch.fx.GraphModule, copy_: torch.fx.GraphModule, root, graph) -> None:
    """``GraphModule.__init__`` of ``copy_`` without the recompile, running ``module``'s code (its class is the
    copy's alone: a GraphModule gets a class of its own)."""
    own = type(copy_)
    own.recompile = lambda self: None
    try:
        torch.fx.GraphModule.__init__(copy_, root, graph)
    finally:
        del own.recompile
    copy_code(module, copy_)


def attribute(root: torch.nn.Module, target: str):
    """The tensor (or module) at a dotted name: ``blocks.0.fc.weight``."""
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class _NotFromShapes(Exception):
    """A value :meth:`Graph.propagate_changed` cannot make from recorded shapes."""


def _from_metadata(metadata):
    """A meta tensor (or tuple of them) of the recorded shape, dtype and strides; None for anything else."""
    if isinstance(metadata, TensorMetadata):
        return torch.empty_strided(metadata.shape, metadata.stride, dtype=metadata.dtype, device="meta")
    if isinstance(metadata, (tuple, list)) and metadata and all(isinstance(m, TensorMetadata) for m in metadata):
        return type(metadata)(_from_metadata(m) for m in metadata)
    return None


def _metadata(value):
    return pytree.tree_map(
        lambda v: _extract_tensor_metadata(v) if isinstance(v, torch.Tensor) else None, value
    )
