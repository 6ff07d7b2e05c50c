"""``Editor``: the one way rules change a graph's structure and parameters.

A rule's rewrite gets an Editor on a private copy of the graph (the original is never touched; the copy
owns its parameters), or on the graph itself when it is an intermediate of ``rewrite.apply`` that nothing reads
again (``Graph.in_place``). It emits nodes at a cursor (``call``, ``linear``), copies subgraphs with their
parameters under a new module name (``copy``), rewires users (``replace_uses``), renumbers a layer stack
(``renumber``), reads and sets tensors by their dotted names (``tensor``, ``transform`` with growth-map ops,
``draw``, ``add_parameter``, ``set_tensor``), and folds a scalar into the layers that produce a value
(``scale``). Every tensor it makes is recorded in the growth map of the result (``grown.lineage.step_map``):
copies with their source, ops with their parameters, values a rule computed itself as opaque. New nodes are
ATen calls with ``get_attr`` parameters, whichever front-end made the graph, so every later pass, the
verifier and the ONNX exporter read them like any other node. ``finish`` checks the graph and records
every node's shape on the example inputs (on ``meta``, only the nodes the edit touched and what their shapes
change).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable

import torch
import torch.fx

from rewrite.analysis.blocks import branch_layers
from rewrite.errors import GrowthError
from rewrite.ir.graph import Graph, attribute
from rewrite.ir.lazy_compile import compile_on_first_use
from rewrite.ir.module_copy import copied
from rewrite.names import moved, prefixes, under
from rewrite.transform.growth_map import COPY, NEW, GrowthMap, Recipe, shapes_of, tensor_names
from rewrite.transform.growth_ops import Fill, Op, Scale
from rewrite.transform.run_ops import run_ops
from rewrite.transform.lineage import grown_lineage


class Editor:
    def __init__(self, graph: Graph):
        self._source_tensors = shapes_of(graph.module)  # as they were: an in-place graph's module is edited
        self.module: torch.fx.GraphModule = graph.module_to_edit()
        self.source = graph
        self.graph = graph.with_module(self.module)  # the view rules read while editing
        self.fx = self.module.graph
        self._cursor: torch.fx.Node | None = None
        self.copied: dict[str, str] = {}  # new tensor name -> the tensor it was copied from
        self.origins: dict[str, str] = dict(graph.lineage.origins)  # module -> its module in the traced model
        self._names = tensor_names(self.module)  # identity -> name, for the tensors as the source graph has them
        self._made: dict[int, tuple[torch.Tensor, Recipe]] = {}  # identity -> (tensor, how it was made)
        # planning on shapes (``rewrite.transform.materialise``): new tensors are held on meta too, their
        # recipes keep the values
        tensors = (*self.module.parameters(), *self.module.buffers())
        self._meta = any(t.is_meta for t in tensors)
        # where what a rule adds goes: the model's device (a value a rule builds on the CPU is moved there)
        self.device = next((t.device for t in tensors if not t.is_meta), torch.device("cpu"))
        # what the edit touched, so that on meta only those nodes' shapes are computed again (``finish``)
        self._touched: set[torch.fx.Node] = set()
        self._reshaped = False  # a tensor was replaced by one of another shape: every reader may change
        # identity -> where the module tree holds it (every tied name): found once, kept up to date by replacing,
        # found again after the Editor adds holders (copies, new parameters) or removes them (erase)
        self._holders: dict[int, list[tuple[dict, str]]] | None = None

    # -- nodes -------------------------------------------------------------------------------------
    def node(self, name: str) -> torch.fx.Node:
        return self.graph.node(name)

    def at(self, node: torch.fx.Node) -> "Editor":
        """Emit the next nodes right after ``node`` (each after the one before)."""
        self._cursor = node
        return self

    def _emit(self, make: Callable[[], torch.fx.Node], owner: str | None) -> torch.fx.Node:
        if self._cursor is None:
            raise GrowthError("Editor.at(node) must place the cursor before nodes are emitted")
        with self.fx.inserting_after(self._cursor):
            node = make()
        if owner is not None:
            node.meta["nn_module_stack"] = {owner or "root": (owner, "growfx")}
        self._cursor = node
        self._touched.add(node)
        return node

    def call(self, op, *args, owner: str | None = None, **kwargs) -> torch.fx.Node:
        """A new ``call_function`` node after the cursor (an ATen op: ``torch.ops.aten.relu.default``)."""
        return self._emit(lambda: self.fx.call_function(op, args, kwargs), owner)

    def get(self, name: str) -> torch.fx.Node:
        """A ``get_attr`` node reading the tensor ``name``."""
        with warnings.catch_warnings():  # fx warns about plain tensor attributes: export's lifted constants
            warnings.filterwarnings("ignore", "Attempted to insert a get_attr Node with no underlying reference")
            return self._emit(lambda: self.fx.get_attr(name), None)

    def linear(self, x: torch.fx.Node, weight: str, bias: str | None = None, owner: str | None = None):
        """``x @ W.T + b`` with ``W`` (and ``b``) read from the named tensors."""
        w = self.get(weight)
        b = self.get(bias) if bias else None
        return self.call(torch.ops.aten.linear.default, x, w, b, owner=owner)

    def copy(self, nodes: list[torch.fx.Node], inputs: dict, rename: tuple[str, str] | None = None):
        """Copy ``nodes`` (in order) after the cursor; values in ``inputs`` are replaced by their mapping, and
        with ``rename=(old, new)`` every module and tensor under ``old`` that the nodes read is copied to the
        same path under ``new`` (so the copy has its own parameters; tied ones stay tied) and read from
        there. Returns {original node: copy}; ``copied`` maps each new tensor name to its source."""
        mapping: dict[torch.fx.Node, torch.fx.Node] = dict(inputs)
        attrs: dict[str, torch.fx.Node] = {}
        clones: dict[int, torch.Tensor] = {}
        moves = dict([rename]) if rename is not None else {}
        if rename is not None:
            self.origins[rename[1]] = self.origins.get(rename[0], rename[0])

        def arg(value: torch.fx.Node) -> torch.fx.Node:
            if value in mapping:
                return mapping[value]
            if rename is not None and value.op == "get_attr" and under(str(value.target), rename[0]):
                target = moved(str(value.target), moves)
                if target not in attrs:
                    self._copy_tensor(str(value.target), target, clones)
                    attrs[target] = self.get(target)
                return attrs[target]
            return value

        for node in nodes:
            if rename is not None and node.op == "call_module" and under(str(node.target), rename[0]):
                self._copy_submodule(str(node.target), moved(str(node.target), moves), clones)
            for value in node.all_input_nodes:
                arg(value)  # new get_attr nodes go before the copy that reads them
            new = self._emit(lambda: self.fx.node_copy(node, arg), None)
            new.meta = dict(node.meta)
            if new.op == "call_module":
                new.target = moved(str(new.target), moves)
            if moves:
                _rename_meta(new, lambda path: moved(path, moves))
            mapping[node] = new
        return mapping

    def _copy_tensor(self, old: str, new: str, clones: dict) -> None:
        self._holders = None
        tensor = self.tensor(old)
        if id(tensor) not in clones:
            clone = tensor.detach().clone()
            clones[id(tensor)] = torch.nn.Parameter(clone, tensor.requires_grad) if isinstance(
                tensor, torch.nn.Parameter) else clone
            recipe = self._copy_of(tensor, old, new)
            if recipe is not None:  # None: a constant torch.export lifted, not a parameter or buffer
                self._record(clones[id(tensor)], recipe)
        parent, _, leaf = new.rpartition(".")
        holder = self._module_at(parent)
        if hasattr(holder, leaf):
            raise GrowthError(f"cannot copy {old} to {new}: the name is taken")
        source_parent, _, source_leaf = old.rpartition(".")
        source = self.module.get_submodule(source_parent)
        if isinstance(clones[id(tensor)], torch.nn.Parameter):
            holder.register_parameter(leaf, clones[id(tensor)])
        elif source_leaf in source._buffers:
            persistent = source_leaf not in source._non_persistent_buffers_set
            holder.register_buffer(leaf, clones[id(tensor)], persistent=persistent)
        else:  # a constant torch.export lifted out of forward: it stays a plain attribute, like its source
            setattr(holder, leaf, clones[id(tensor)])
        self.copied[new] = old

    def _copy_submodule(self, old: str, new: str, clones: dict) -> None:
        self._holders = None
        parent, _, leaf = new.rpartition(".")
        holder = self._module_at(parent)
        if hasattr(holder, leaf):
            return
        source = self.module.get_submodule(old)
        memo = {id(t): clones[id(t)] for t in (*source.parameters(), *source.buffers()) if id(t) in clones}
        module = copied(source, memo)
        for (local, tensor), (_, original) in zip(
            (*module.named_parameters(), *module.named_buffers()), (*source.named_parameters(), *source.named_buffers())
        ):
            if id(original) not in clones:
                clones[id(original)] = tensor
                recipe = self._copy_of(original, f"{old}.{local}", f"{new}.{local}")
                if recipe is not None:
                    self._record(tensor, recipe)
            self.copied[f"{new}.{local}"] = f"{old}.{local}"
        holder.add_module(leaf, module)

    def _module_at(self, path: str) -> torch.nn.Module:
        """The module at ``path``, creating empty parents as needed."""
        holder = self.module
        for part in path.split(".") if path else []:
            if not hasattr(holder, part):
                holder.add_module(part, torch.nn.Module())
            holder = getattr(holder, part)
        return holder

    def replace_uses(self, old: torch.fx.Node, new: torch.fx.Node, keep: set | None = None) -> None:
        """Every user of ``old`` reads ``new`` instead, except ``new`` itself and the nodes in ``keep``."""
        keep = set(keep or ()) | {new}
        self._touched.update(user for user in old.users if user not in keep)
        old.replace_all_uses_with(new, delete_user_cb=lambda user: user not in keep)

    def erase(self, nodes: list[torch.fx.Node]) -> None:
        """Remove ``nodes`` (their checks too) and the parameters and modules no node reads any more."""
        doomed = list(nodes)
        doomed += [u for n in nodes for u in n.users if self.graph.is_bookkeeping(u) and u not in doomed]
        order = {n: i for i, n in enumerate(self.fx.nodes)}
        inputs = {v for n in doomed for v in n.all_input_nodes if v.op == "get_attr"}
        for node in sorted(doomed, key=order.__getitem__, reverse=True):
            if any(user not in doomed for user in node.users):
                raise GrowthError(f"cannot erase {node.name}: {next(iter(node.users)).name} still reads it")
            self.fx.erase_node(node)
        for node in inputs:
            if not node.users:
                self.fx.erase_node(node)
                if not any(n.op == "get_attr" and n.target == node.target for n in self.fx.nodes):
                    parent, _, leaf = str(node.target).rpartition(".")
                    delattr(self.module.get_submodule(parent) if parent else self.module, leaf)
        _delete_unused_submodules(self.module)
        self._holders = None

    def renumber(self, stack: str, start: int, shift: int) -> None:
        """Move the modules ``stack.j`` (j >= start) to ``stack.(j+shift)``, in the module tree, in the
        nodes that read them and in their owner metadata, to make room for new layers."""
        holder = self.module.get_submodule(stack)
        children = list(holder._modules.items())
        holder._modules.clear()
        moves = {}
        for key, child in children:
            if key.isdigit() and int(key) >= start:
                moves[f"{stack}.{key}"] = f"{stack}.{int(key) + shift}"
                key = str(int(key) + shift)
            holder._modules[key] = child
        holder._modules = dict(sorted(holder._modules.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else -1))
        origins = {name: origin for name, origin in self.origins.items() if name not in moves}
        self.origins = origins | {new: self.origins.get(old, old) for old, new in moves.items()}
        # tensors copied earlier in this edit live under the moved modules now (their sources are the
        # traced model's, which do not move)
        self.copied = {moved(new, moves): old for new, old in self.copied.items()}
        prefix = f"{stack}."  # the moved modules are this stack's children

        def renamed(path: str) -> str:  # a moved module is the path's first part after the stack's
            if not path.startswith(prefix):
                return path
            end = path.find(".", len(prefix))
            block = path if end < 0 else path[:end]
            return path if block not in moves else moves[block] + path[len(block):]

        for node in self.fx.nodes:
            if node.op in ("call_module", "get_attr"):
                node.target = renamed(str(node.target))
            _rename_meta(node, renamed)

    # -- tensors -----------------------------------------------------------------------------------
    def tensor(self, name: str) -> torch.Tensor:
        return attribute(self.module, name)

    def set_tensor(self, name: str, value: torch.Tensor) -> None:
        """Replace the tensor ``name`` by ``value`` (a parameter stays a parameter); tied names all see the new
        one. The growth map records it as opaque: a value computed by the rule, stored in the map. Prefer
        ``transform`` (growth-map ops) or ``draw`` where they say what the rule does."""
        value = value.detach()
        fill = Fill("value", tuple(value.shape), value.dtype, value=value.clone())
        self._replace(name, value, Recipe(None, role=NEW, start=fill, note=f"opaque: set by a rule at {name}"))

    def transform(self, name: str, *ops: Op) -> None:
        """Replace the tensor ``name`` by what the growth-map ``ops`` make of it (``Scale``, ``Redraw``, ...);
        the map records the ops, so it can remake the tensor from the original's."""
        old = self.tensor(name)
        recipe = self._recipe_of(old)
        if recipe is None:
            raise GrowthError(f"{name} is not a parameter or buffer the Editor knows, so the growth map cannot "
                              f"say how it was made")
        self._replace(name, run_ops(old, ops), recipe.then(*ops))

    def add_parameter(self, name: str, value: torch.Tensor) -> str:
        """A new parameter ``name`` holding ``value`` (parent modules are created as needed); returns its name.
        The growth map records zeros as zeros and any other value as an opaque value."""
        value = value.detach()
        kind = "value" if value.is_meta or value.count_nonzero() else "zeros"
        fill = Fill(kind, tuple(value.shape), value.dtype, value=value.clone() if kind == "value" else None)
        return self._add(name, value, Recipe(None, role=NEW, start=fill))

    def draw(self, name: str, shape: tuple[int, ...], std: float, seed: int, dtype=torch.float32) -> str:
        """A new parameter ``name`` drawn from ``N(0, std^2)`` with ``seed`` (a router, a fresh projection); the
        growth map records the seed, not the value."""
        fill = Fill("normal", tuple(shape), dtype, seed=seed, std=std)
        value = torch.empty(shape, dtype=dtype, device="meta") if self._meta else fill.make(self.device)
        return self._add(name, value, Recipe(None, role=NEW, start=fill))

    def _add(self, name: str, value: torch.Tensor, recipe: Recipe) -> str:
        self._holders = None
        parent, _, leaf = name.rpartition(".")
        holder = self._module_at(parent)
        if hasattr(holder, leaf):
            raise GrowthError(f"cannot add parameter {name}: the name is taken")
        parameter = torch.nn.Parameter(value.to("meta" if self._meta else self.device))
        holder.register_parameter(leaf, parameter)
        self._record(parameter, recipe)
        return name

    def _replace(self, name: str, value: torch.Tensor, recipe: Recipe) -> None:
        old = self.tensor(name)
        self._reshaped |= old.shape != value.shape or old.dtype != value.dtype
        value = value.to("meta" if self._meta else old.device)
        if isinstance(old, torch.nn.Parameter):
            value = torch.nn.Parameter(value.detach(), old.requires_grad)
        holders = [(store, key) for store, key in self._holders_of(old) if store.get(key) is old]
        for store, key in holders:  # every name tied to it
            store[key] = value
        self._holders.pop(id(old), None)
        self._holders[id(value)] = holders
        self._record(value, recipe)

    def _holders_of(self, tensor: torch.Tensor) -> list[tuple[dict, str]]:
        """(store, key) of every parameter or buffer slot of the module tree that holds ``tensor``."""
        if self._holders is None:
            self._holders = {}
            for module in self.module.modules():
                for store in (module._parameters, module._buffers):
                    for key, held in store.items():
                        if held is not None:
                            self._holders.setdefault(id(held), []).append((store, key))
        return self._holders.get(id(tensor), [])

    def _record(self, tensor: torch.Tensor, recipe: Recipe) -> None:
        self._made[id(tensor)] = (tensor, recipe)  # the tensor is kept alive, so its identity stays its own

    def _recipe_of(self, tensor: torch.Tensor) -> Recipe | None:
        """How ``tensor`` was made: recorded here, or a tensor of the source graph (None for neither)."""
        if id(tensor) in self._made:
            return self._made[id(tensor)][1]
        if id(tensor) in self._names:
            return Recipe(self._names[id(tensor)])
        return None

    def _copy_of(self, tensor: torch.Tensor, old: str, new: str) -> Recipe | None:
        recipe = self._recipe_of(tensor)
        if recipe is None:
            return None
        role = NEW if recipe.role == NEW else COPY
        return dataclasses.replace(recipe, role=role, note=recipe.note or f"copy of {old} as {new}")

    def scale(self, value: torch.fx.Node, factor: float) -> list[str]:
        """Scale ``value`` by ``factor >= 0`` by scaling the weights and biases of the layers that produce it
        (``rewrite.blocks.branch_layers``; a gain used as ``c + w`` becomes ``factor (c + w) - c``); returns
        the scaled tensors' names."""
        if factor < 0:
            raise GrowthError(f"cannot fold a negative scale {factor} through homogeneous ops")
        offsets = {}  # tensor name -> c, where the graph multiplies by c + tensor
        for layer in branch_layers(self.graph, value):
            offsets.setdefault(layer.weight, layer.offset)
            if layer.bias is not None:
                offsets.setdefault(layer.bias, 0.0)
        for name, offset in offsets.items():
            self.transform(name, Scale(factor, offset))
        return list(offsets)

    # -- result ------------------------------------------------------------------------------------
    def finish(self) -> Graph:
        """The edited graph, checked, compiled, with every node's shape on the source's example inputs."""
        try:
            self.fx.lint()
        except Exception as e:  # noqa: BLE001 - a rule built a malformed graph: say so, in one line
            from rewrite.ir.frontends import first_line

            raise GrowthError(f"a rewrite left a malformed graph: {first_line(e)}") from e
        compile_on_first_use(self.module)
        source = self.source
        step = GrowthMap.between(self._source_tensors, self.module, {i: r for i, (_, r) in self._made.items()},
                                 self._names)
        grown = source.with_module(self.module, grown_lineage(source.lineage, step, origins=self.origins))
        try:
            if not (self._meta and not self._reshaped and grown.propagate_changed(self._touched)):
                grown.propagate_shapes(*source.example_args, **source.example_kwargs)
        except Exception as e:  # noqa: BLE001
            from rewrite.ir.frontends import first_line

            raise GrowthError(f"the rewritten graph does not run: {first_line(e)}") from e
        return grown


def _delete_unused_submodules(module: torch.fx.GraphModule) -> None:
    """``GraphModule.delete_all_unused_submodules`` in one pass over the nodes and one over the modules: a module
    is used when a ``call_module`` or ``get_attr`` node reads it, a module under it, or, for ``call_module``,
    the module it is under (torch's own keeps the used names in a list, which made each erase cost 2 ms on a
    12-layer model)."""
    every = dict(module.named_modules(remove_duplicate=False))  # by every path that reaches it
    used, called = set(), set()
    for node in module.graph.nodes:
        if node.op in ("call_module", "get_attr") and isinstance(node.target, str):
            used.update(prefixes(node.target))
            if node.op == "call_module" and node.target in every:
                called.add(node.target)

    def in_use(name: str) -> bool:  # a called module is used too: the name itself needs no check of its own
        return name in used or any(prefix in called for prefix in prefixes(name))

    for name in [name for name, _ in module.named_modules() if name and not in_use(name)]:
        module.delete_submodule(name)


def _rename_meta(node: torch.fx.Node, rename: Callable[[str], str]) -> None:
    """The module paths in a node's owner metadata, each after ``rename``. The metadata is replaced, never
    edited: a copied node shares it with its original."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return
    renamed: dict[str, Any] | None = None
    for key, value in stack.items():
        path = value[0] if isinstance(value, tuple) else value
        if not isinstance(path, str) or (new := rename(path)) == path:
            continue
        renamed = renamed if renamed is not None else dict(stack)
        renamed[key] = (new, *value[1:]) if isinstance(value, tuple) else new
    if renamed is not None:
        node.meta["nn_module_stack"] = renamed
