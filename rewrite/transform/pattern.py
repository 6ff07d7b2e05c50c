"""Patterns: what a rule matches, with named captures, the same on graphs from either front-end.

Nodes are matched by canonical kind (``rewrite.ops``), so ``op("linear")`` matches ``call_module
nn.Linear``, ``aten.linear`` with ``get_attr`` weights, ``F.linear`` and GPT-2's ``addmm`` alike::

    op("linear", "up") >> op(ACTIVATIONS, "act") >> op("linear", "down")   # a chain: each feeds the next
    op({"linear", "conv"}, "layer", module="features.*") >> optional(op("batch_norm")) >> op("relu", "act")
    residual()                  # x + F(x): captures "x", "branch" (F(x)) and "add"
    block(layers=[0, 2])        # a residual block of a layer stack (rewrite.blocks.Block), captured as "block"
    mlp()                       # a dense MLP: "input" -> "up" layers -> element-wise ops -> "down" layer

A chain step follows the data input of the next op (through casts and dropout), so ``a >> b`` means "b
computes on a's output". ``where=`` adds a predicate on the node. ``Match`` gives the captures and a
front-end-neutral view of them: ``weight``/``bias`` (tensor names), ``module`` (owning module).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Callable, Iterable

import torch.fx
from torch.fx.passes.shape_prop import TensorMetadata

from rewrite.analysis.blocks import Block, blocks, depends_on, resolve, why_no_blocks
from rewrite.names import numbered_block
from rewrite.ops import ELEMENTWISE, TRANSPARENT, WEIGHTED, canonical_kind, operand, real_users


@dataclasses.dataclass
class Match:
    """One place a pattern matched: ``match["name"]`` is a node (or a Block, or a list of nodes)."""

    graph: Any
    captures: dict[str, Any]
    root: str  # the capture that names the site

    def __getitem__(self, name: str):
        return self.captures[name]

    def __contains__(self, name: str) -> bool:
        return name in self.captures

    @property
    def site(self) -> str:
        """Where it matched, as a module name."""
        value = self.captures[self.root]
        if isinstance(value, str):
            return value
        if isinstance(value, Block):
            return value.name
        node = value[-1] if isinstance(value, list) else value
        return self.graph.owner(node) or node.name

    def weight(self, name: str) -> str | None:
        """Name of the weight tensor of the captured weighted op (linear, conv, addmm, embedding)."""
        return operand(self.graph, self.captures[name], "weight")

    def bias(self, name: str) -> str | None:
        return operand(self.graph, self.captures[name], "bias")

    def input(self, name: str) -> torch.fx.Node:
        """The data input of the captured op (``x`` of ``linear(x, W, b)``, whatever the front-end)."""
        node = self.captures[name]
        found = operand(self.graph, node, "input")
        return found if found is not None else node.args[0]

    def module(self, name: str) -> str:
        return self.graph.owner(self.captures[name])

    def rebind(self, graph) -> "Match":
        """The same match on an edited copy of the graph (nodes by name, blocks by stack and index)."""
        from rewrite.analysis.blocks import block_at

        def bind(value):
            if isinstance(value, Block):
                found = block_at(graph, value.stack, value.index)
                if not isinstance(found, Block):
                    raise LookupError(found)
                return found
            if isinstance(value, torch.fx.Node):
                return graph.node(value.name)
            if isinstance(value, list):
                return [bind(v) for v in value]
            return value

        return Match(graph, {k: bind(v) for k, v in self.captures.items()}, self.root)


class Pattern:
    """Base class: ``find(graph)`` lists every match; ``a >> b`` is a chain."""

    name: str | None = None

    def find(self, graph) -> list[Match]:
        raise NotImplementedError

    def explain(self, graph) -> list[tuple[str, str]]:
        """(site, reason) for the candidates ``find`` did not match, where the pattern can say: what a rule
        that matched nothing reports."""
        return []

    def __rshift__(self, other: "Pattern") -> "Chain":
        return Chain([*_steps(self), *_steps(other)])


def _steps(pattern: Pattern) -> list["Op"]:
    if isinstance(pattern, Chain):
        return list(pattern.steps)
    if isinstance(pattern, Op):
        return [pattern]
    raise TypeError(f"only op() patterns chain with >>, not {type(pattern).__name__}")


@dataclasses.dataclass
class Op(Pattern):
    kinds: frozenset[str] | None  # None: any compute node
    name: str | None = None
    module: str | None = None  # glob on the owning module
    where: Callable[[Any, torch.fx.Node], bool] | None = None
    optional: bool = False

    def test(self, graph, node: torch.fx.Node) -> bool:
        if node.op not in ("call_module", "call_function", "call_method") or graph.is_bookkeeping(node):
            return False
        if self.kinds is not None and canonical_kind(graph, node) not in self.kinds:
            return False
        if self.module is not None and not fnmatch.fnmatchcase(graph.owner(node), self.module):
            return False
        return self.where is None or bool(self.where(graph, node))

    def find(self, graph) -> list[Match]:
        return Chain([self]).find(graph)


def op(kind: str | Iterable[str] = "*", name: str | None = None, *, module: str | None = None,
       where: Callable[[Any, torch.fx.Node], bool] | None = None) -> Op:
    """A node of canonical ``kind`` (or any of several; ``"*"``: any), captured as ``name``; ``module`` is
    a glob on the module that owns it; ``where(graph, node)`` a further predicate."""
    kinds = None if kind == "*" else frozenset([kind] if isinstance(kind, str) else kind)
    return Op(kinds, name, module, where)


def optional(step: Op) -> Op:
    """A chain step that may be absent."""
    return dataclasses.replace(step, optional=True)


@dataclasses.dataclass
class Chain(Pattern):
    steps: list[Op]

    def find(self, graph) -> list[Match]:
        if not self.steps or self.steps[0].optional:
            raise ValueError("a chain starts with a step that is not optional")
        found = []
        for node in graph.module.graph.nodes:
            if self.steps[0].test(graph, node):
                for captured in self._extend(graph, node, 1, {self.steps[0].name: node}):
                    captured.pop(None, None)
                    found.append(Match(graph, captured, _root(self.steps, captured)))
        return found

    def _extend(self, graph, node, index: int, captured: dict):
        if index == len(self.steps):
            yield dict(captured)
            return
        step = self.steps[index]
        if step.optional:
            yield from self._extend(graph, node, index + 1, captured)
        for user in consumers(graph, node):
            if step.test(graph, user):
                yield from self._extend(graph, user, index + 1, {**captured, step.name: user})


def _root(steps: list[Op], captured: dict) -> str:
    named = [s.name for s in steps if s.name in captured]
    if not named:
        raise ValueError("a pattern names at least one of its steps")
    return named[0]


def consumers(graph, node: torch.fx.Node) -> list[torch.fx.Node]:
    """The ops that compute on ``node``'s value as their data input, looking through casts and dropout."""
    out = []
    for user in real_users(node):
        if user.op == "output":
            continue
        kind = canonical_kind(graph, user)
        if kind in TRANSPARENT and user.args and user.args[0] is node:
            out += consumers(graph, user)
        elif kind in WEIGHTED or user.op == "call_module":
            if resolve(graph, operand(graph, user, "input")) is resolve(graph, node):
                out.append(user)
        else:
            out.append(user)
    return out


@dataclasses.dataclass
class Residual(Pattern):
    """``x + F(x)`` anywhere: an add whose other operand is computed from ``x``."""

    name: str = "add"

    def find(self, graph) -> list[Match]:
        found = []
        for node in graph.compute_nodes():
            if canonical_kind(graph, node) != "add" or len(node.args) < 2:
                continue
            a, b = node.args[:2]
            if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)):
                continue
            for x, branch in ((a, b), (b, a)):
                if depends_on(branch, resolve(graph, x)):
                    found.append(Match(graph, {"x": x, "branch": branch, self.name: node}, self.name))
                    break
        return found


def residual(name: str = "add") -> Residual:
    return Residual(name)


@dataclasses.dataclass
class BlockPattern(Pattern):
    name: str = "block"
    layers: tuple[int, ...] | None = None
    stack: str | None = None

    def find(self, graph) -> list[Match]:
        found = [b for b in blocks(graph) if self.stack in (None, b.stack)]
        stacks = list(dict.fromkeys(b.stack for b in found))
        if self.stack is None and len(stacks) > 1:
            found = [b for b in found if b.stack == stacks[0]]  # the first stack unless one is named
        if self.layers is not None:
            found = [b for b in found if b.index in self.layers]
        return [Match(graph, {self.name: b}, self.name) for b in found]

    def explain(self, graph) -> list[tuple[str, str]]:
        every = blocks(graph)
        found = [b for b in every if self.stack in (None, b.stack)]
        if not found:
            reasons = why_no_blocks(graph)
            if self.stack is not None:
                reasons = [(s, r) for s, r in reasons if s == self.stack] or [
                    (self.stack, f"no residual blocks in {self.stack}; stacks with blocks: "
                                 f"{', '.join(dict.fromkeys(b.stack for b in every)) or 'none'}")]
            return reasons
        stack = found[0].stack
        indices = [b.index for b in found if b.stack == stack]
        return [(stack, f"no block with index {', '.join(map(str, self.layers or ()))}; the stack has blocks "
                        f"{indices[0]}..{indices[-1]}")]


def block(name: str = "block", layers: Iterable[int] | None = None, stack: str | None = None) -> BlockPattern:
    """A residual block of a layer stack (see ``rewrite.blocks``); ``layers`` keeps some indices."""
    return BlockPattern(name, None if layers is None else tuple(layers), stack)


# Ops an MLP's hidden units pass through between its input and output layers: one unit at a time.
_UNITWISE = ELEMENTWISE | {"view", "transpose", "unsqueeze", "squeeze", "split", "getitem"}


@dataclasses.dataclass
class MLP(Pattern):
    """A dense MLP inside one numbered block: ``input`` -> weighted ``up`` layers (one, or gate and up) ->
    unit-wise ops -> one weighted ``down`` layer. Captures ``input``, ``up`` (list), ``down``, ``nodes``
    (the MLP's nodes in graph order, ``down`` last) and ``module`` (the common owner of its layers)."""

    name: str = "mlp"

    def find(self, graph) -> list[Match]:
        found = []
        for down in graph.compute_nodes():
            if canonical_kind(graph, down) not in WEIGHTED or canonical_kind(graph, down) == "embedding":
                continue
            if operand(graph, down, "weight") is None:
                continue
            captured = _mlp_behind(graph, down)
            if captured is not None:
                found.append(Match(graph, {**captured, self.name: down}, "module"))
        return found


def mlp(name: str = "mlp") -> MLP:
    return MLP(name)


def _mlp_behind(graph, down: torch.fx.Node) -> dict | None:
    inner, ups, todo = set(), [], [operand(graph, down, "input")]
    while todo:
        node = todo.pop()
        if not isinstance(node, torch.fx.Node) or node in inner:
            continue
        kind = canonical_kind(graph, node) if node.op != "get_attr" else "get_attr"
        if kind in WEIGHTED and operand(graph, node, "weight") is not None and kind != "embedding":
            if node not in ups:
                ups.append(node)
            continue
        if kind not in _UNITWISE or node.op in ("placeholder", "get_attr"):
            return None
        inner.add(node)
        todo += [v for v in node.all_input_nodes if v.op != "get_attr" and _is_tensor(v)]
    if not ups:
        return None
    inputs = {operand(graph, up, "input") for up in ups}
    if len(inputs) != 1:
        return None
    members = inner | set(ups)
    for node in members:
        if any(user not in members and user is not down and not graph.is_bookkeeping(user) for user in node.users):
            return None  # an intermediate value used outside: not a self-contained MLP
    owners = [graph.owner(n) for n in [*ups, down]]
    blocks_of = {numbered_block(o) for o in owners}
    if len(blocks_of) != 1 or None in blocks_of:
        return None
    order = {n: i for i, n in enumerate(graph.module.graph.nodes)}
    nodes = sorted(members, key=order.__getitem__) + [down]
    return {"input": inputs.pop(), "up": sorted(ups, key=order.__getitem__), "down": down, "nodes": nodes,
            "module": _common_prefix(owners)}


def _is_tensor(node: torch.fx.Node) -> bool:
    return isinstance(node.meta.get("tensor_meta"), TensorMetadata)


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)
