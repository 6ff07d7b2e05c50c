"""Axis rules: what each canonical op does to the axes of its operands (the dimension analysis reads them).

Every call form a front-end produces is normalised to a canonical kind (``rewrite.ops.kinds``) with canonical operands:
``call_module nn.Linear``, ``aten.linear`` and ``F.linear`` are all ``linear(x, weight, bias)``; GPT-2's
``Conv1D`` is ``addmm(bias, x, weight[in, out])``; ``Tensor.view``, ``aten.view`` and ``aten.reshape`` are
``view``. A rule then states what the op couples, through a :class:`Facts` collector:

* ``equal(a, b)``: the two axes must keep one size (an edge of the dimension graph);
* ``role(a, r)``: a parameter axis ``produces`` the axis (weight rows, conv out-channels, embedding
  columns), ``consumes`` it (weight columns, conv in-channels) or runs ``along`` it (biases, norm gains,
  BatchNorm statistics);
* ``reduces(a, kind)``: the op mixes values along the axis (a norm, a mean, a softmax, attention's
  ``1/sqrt(d)``), which decides whether zero-padding it can be exact;
* ``compose(whole, parts, how)``: the axis is made of others: ``factor`` (a view into heads x head_dim,
  the literal sizes ``encode`` it), ``concat`` (cat/split), ``slice`` (a part of it), ``repeat``.

Axes are ``(ref, axis)`` with ``ref`` ``"n:<node>"`` (``"n:<node>#i"`` for the i-th element of a tuple
output), ``"p:<parameter or floating-point buffer>"`` (tied names resolved to one) or ``"c:<integer or
boolean buffer>"`` (index tables such as ``position_ids``: constants, never grown). Ops whose rule is ``opaque``
(index arithmetic, mask building, ``arange``), and ops with no rule at all, couple nothing; the analysis blocks
the growable groups their axes are in (growing one raises ``UnsupportedOpError`` naming the op and node), and
every other group stays growable.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Callable

import torch
import torch.fx

from rewrite.errors import UnsupportedOpError

from .kinds import ELEMENTWISE
from .structure import TRANSPARENT
from .literals import shape_read, view_sizes

Axis = tuple[str, int]

# -- operands ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Call:
    """One node seen through the semantics: canonical kind, operands as refs, shapes, arguments."""

    node: torch.fx.Node
    kind: str
    operands: list[Any]  # refs ("n:..", "p:..") for tensors, plain values otherwise
    out: str
    shapes: dict[str, tuple]
    raw: str = ""  # the op's own name before aliasing: conv2d, convolution, sum, mean, ...
    module: torch.nn.Module | None = None

    def shape(self, ref) -> tuple:
        return self.shapes[ref]

    def is_tensor(self, value) -> bool:
        return isinstance(value, str) and value in self.shapes

    def arg(self, index: int, name: str, default=None):
        if index < len(self.node.args):
            return self.node.args[index]
        return self.node.kwargs.get(name, default)

    @property
    def out_shape(self) -> tuple:
        return self.shapes.get(self.out, ())


class Facts:
    """What rules say about axes; the dimension analysis turns it into groups."""

    def __init__(self):
        self.edges: list[tuple[Axis, Axis, str]] = []
        self.roles: list[tuple[Axis, str, str]] = []
        self.reductions: list[tuple[Axis, str, str]] = []
        self.compositions: list[tuple[Axis, list[Axis], str, str]] = []
        # size-1 axes, which may be real (one head) or broadcast: the analysis decides (``dims.analyse``)
        self.follows: list[tuple[Axis, Axis, str]] = []  # (input, output, node) a broadcasting op aligns
        self.runs: list[tuple[list[Axis], list[Axis], list[Axis], str]] = []  # a reshape's (source axes,
        # output axes, size-1 axes that belong to them if real, node)
        self.opaque: list[tuple[str, str, list[Axis], str]] = []  # (node, op, axes, why): axes of an op the
        # analysis cannot see through
        self.axes: set[Axis] = set()
        self.derived: dict[str, tuple[str, dict[int, int]]] = {}  # ref -> (parameter, {axis: parameter axis})

    def parameter_axis(self, ref: str, axis: int) -> Axis | None:
        """The parameter axis a ref's axis is, directly or through a selection of experts."""
        if ref.startswith("p:"):
            return (ref, axis)
        if ref in self.derived:
            parameter, axes = self.derived[ref]
            return (parameter, axes[axis]) if axis in axes else None
        return None

    def parameter_role(self, ref: str, axis: int, role: str, node: str) -> None:
        """``role`` for the parameter axis ``ref``'s axis is (directly, through a cast, a transpose or a selection
        of experts); nothing when it is an activation."""
        parameter = self.parameter_axis(ref, axis)
        if parameter is not None:
            self.role(parameter, role, node)

    def blind(self, node: str, op: str, axes: list[Axis], why: str = "") -> None:
        """The analysis cannot see what ``op`` at ``node`` does to ``axes``: the groups they are in are blocked."""
        self.opaque.append((node, op, axes, why))

    def equal(self, a: Axis, b: Axis, node: str) -> None:
        self.axes.update((a, b))
        self.edges.append((a, b, node))

    def follow(self, source: Axis, out: Axis, node: str) -> None:
        """Both axes have size 1 and a broadcasting op aligns them: ``out`` is ``source`` if ``source`` is a real
        axis (one head), and stays 1 if it is a broadcast one (a rotary table's head axis)."""
        self.axes.update((source, out))
        self.follows.append((source, out, node))

    def role(self, a: Axis, role: str, node: str) -> None:
        self.axes.add(a)
        self.roles.append((a, role, node))

    def reduces(self, a: Axis, kind: str, node: str) -> None:
        self.axes.add(a)
        self.reductions.append((a, kind, node))

    def compose(self, whole: Axis, parts: list[Axis], how: str, node: str) -> None:
        self.axes.update((whole, *parts))
        self.compositions.append((whole, parts, how, node))


# -- rules ------------------------------------------------------------------------------------------
Rule = Callable[[Facts, Call], None]


def _norm(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def broadcast(facts: Facts, call: Call, inputs: list[str], *, along: bool = True) -> None:
    """Align every tensor operand with the output from the right; size-1 (broadcast) axes stay free.

    A parameter in an element-wise op (a hand-written norm's gain, a bias added by hand), or a cast of one, runs
    along the axes it is aligned with.
    """
    out_shape = call.out_shape
    for ref in inputs:
        shape = call.shape(ref)
        offset = len(out_shape) - len(shape)
        for axis, size in enumerate(shape):
            if offset + axis < 0:
                continue
            if size != 1:
                facts.equal((ref, axis), (call.out, offset + axis), call.node.name)
                if along:  # a parameter, or one seen through a cast (a gain read as w.float())
                    facts.parameter_role(ref, axis, "along", call.node.name)
            elif out_shape[offset + axis] == 1:
                facts.follow((ref, axis), (call.out, offset + axis), call.node.name)


def elementwise(facts: Facts, call: Call) -> None:
    """Operands aligned with the output from the right. A cast or copy of a parameter (``w.float()``, as
    DeepSeek's router reads its weight) is that parameter to the ops that read it: they give its axes roles."""
    tensors = [o for o in call.operands if call.is_tensor(o)]
    if call.kind in ("type_as", "to"):  # x.type_as(y), x.to(y): y gives only a dtype (and device)
        tensors = tensors[:1]
    passes_through = call.kind in TRANSPARENT and len(tensors) == 1 and call.shape(tensors[0]) == call.out_shape
    broadcast(facts, call, tensors, along=not passes_through)
    if passes_through:
        found = [(axis, p) for axis in range(len(call.out_shape)) if (p := facts.parameter_axis(tensors[0], axis))]
        if found:
            facts.derived[call.out] = (found[0][1][0], {axis: p[1] for axis, p in found})


def linear(facts: Facts, call: Call) -> None:
    """y[..., o] = sum_i x[..., i] W[o, i] + b[o]."""
    x, weight, bias = (call.operands + [None, None])[:3]
    name = call.node.name
    rank = len(call.shape(x))
    for axis in range(rank - 1):
        facts.equal((x, axis), (call.out, axis), name)
    facts.equal((x, rank - 1), (weight, 1), name)
    facts.equal((call.out, rank - 1), (weight, 0), name)
    for ref, axis, role in ((weight, 1, "consumes"), (weight, 0, "produces"), (bias, 0, "along")):
        if call.is_tensor(ref):
            facts.parameter_role(ref, axis, role, name)
    if call.is_tensor(bias):
        facts.equal((bias, 0), (call.out, rank - 1), name)


def addmm(facts: Facts, call: Call) -> None:
    """y = bias + x @ W with W stored [in, out] (GPT-2's Conv1D): W rows consume, W columns produce."""
    bias, x, weight = call.operands[:3]
    name = call.node.name
    facts.equal((x, 0), (call.out, 0), name)
    facts.equal((x, 1), (weight, 0), name)
    facts.equal((call.out, 1), (weight, 1), name)
    if weight.startswith("p:"):
        facts.role((weight, 0), "consumes", name)
        facts.role((weight, 1), "produces", name)
    if call.is_tensor(bias):
        broadcast(facts, call, [bias])
        if bias.startswith("p:"):
            facts.role((bias, len(call.shape(bias)) - 1), "along", name)


def matmul(facts: Facts, call: Call) -> None:
    """(..., n, k) @ (..., k, m) -> (..., n, m); batch axes broadcast. A weight (or one selected from a stack
    of experts) on the left is [out, in], on the right [in, out]."""
    a, b = call.operands[:2]
    name = call.node.name
    sa, sb, so = call.shape(a), call.shape(b), call.out_shape
    if len(sa) < 2 or len(sb) < 2:
        raise _unsupported(call, "matmul of vectors")
    facts.equal((a, len(sa) - 1), (b, len(sb) - 2), name)
    facts.equal((a, len(sa) - 2), (call.out, len(so) - 2), name)
    facts.equal((b, len(sb) - 1), (call.out, len(so) - 1), name)
    # a weight on the left is [out, in] (W @ x, as batched experts apply theirs); on the right [in, out]
    for ref, shape, consumes, produces in ((a, sa, -1, -2), (b, sb, -2, -1)):
        for offset, role in ((consumes, "consumes"), (produces, "produces")):
            facts.parameter_role(ref, len(shape) + offset, role, name)
    for ref, shape in ((a, sa), (b, sb)):
        offset = len(so) - len(shape)
        for axis in range(len(shape) - 2):
            _batch_axis(facts, (ref, axis), (call.out, offset + axis), shape[axis], so[offset + axis], name)


def _batch_axis(facts: Facts, axis: Axis, out: Axis, size: int, out_size: int, node: str) -> None:
    """A broadcasting batch axis (of a matmul or an attention): the output's axis, unless it is size 1; a size-1
    one the output keeps at size 1 follows it (``Facts.follow``)."""
    if size != 1:
        facts.equal(axis, out, node)
    elif out_size == 1:
        facts.follow(axis, out, node)


def grouped_mm(facts: Facts, call: Call) -> None:
    """out[r] = a[r] @ b[g(r)] with a (M, K), b (G, K, N), offs (G,): the rows of each group (an expert's tokens,
    sorted, ``offs`` their cumulative ends) times that group's matrix. K is contracted, N produced; G runs
    along b's first axis and ``offs``."""
    a, b, offs = call.operands[:3]
    name = call.node.name
    facts.equal((a, 0), (call.out, 0), name)
    facts.equal((a, 1), (b, 1), name)
    facts.equal((b, 2), (call.out, 1), name)
    if call.is_tensor(offs):
        facts.equal((b, 0), (offs, 0), name)
    facts.parameter_role(b, 1, "consumes", name)
    facts.parameter_role(b, 2, "produces", name)


def conv(facts: Facts, call: Call) -> None:
    """y[n, o, ...] = sum_i x[n, i, ...] * W[o, i, ...] + b[o]; spatial axes depend on the kernel."""
    x, weight, bias = (call.operands + [None, None])[:3]
    if call.module is not None:
        groups = call.module.groups
    else:  # aten.convolution has (transposed, output_padding) before groups; conv1d/2d/3d do not
        groups = call.arg(8, "groups", 1) if call.raw == "convolution" else call.arg(6, "groups", 1)
    if groups != 1:
        raise _unsupported(call, f"grouped convolution (groups={groups})")
    name = call.node.name
    facts.equal((x, 0), (call.out, 0), name)
    facts.equal((x, 1), (weight, 1), name)
    facts.equal((call.out, 1), (weight, 0), name)
    facts.role((weight, 1), "consumes", name)
    facts.role((weight, 0), "produces", name)
    for axis in range(2, len(call.shape(weight))):
        facts.role((weight, axis), "kernel", name)
    if call.is_tensor(bias):
        facts.equal((bias, 0), (call.out, 1), name)
        facts.role((bias, 0), "along", name)


def batch_norm(facts: Facts, call: Call) -> None:
    """Eval-mode BatchNorm: a per-channel affine map; weight, bias and running statistics run along axis 1."""
    x = call.operands[0]
    name = call.node.name
    for axis in range(len(call.shape(x))):
        facts.equal((x, axis), (call.out, axis), name)
    for ref in call.operands[1:5]:
        if call.is_tensor(ref):
            facts.equal((ref, 0), (call.out, 1), name)
            facts.role((ref, 0), "along", name)


def _norm_over_last(facts: Facts, call: Call, count: int, kind: str, params: list) -> None:
    x = call.operands[0]
    name = call.node.name
    rank = len(call.shape(x))
    for axis in range(rank):
        facts.equal((x, axis), (call.out, axis), name)
    for axis in range(rank - count, rank):
        facts.reduces((call.out, axis), kind, name)
    for ref in params:
        if call.is_tensor(ref):
            for axis in range(count):
                facts.equal((ref, axis), (call.out, rank - count + axis), name)
                facts.role((ref, axis), "along", name)


def layer_norm(facts: Facts, call: Call) -> None:
    """(x - mean) / sqrt(var + eps) * w + b over the trailing normalized axes."""
    x, shape, weight, bias = (call.operands + [None] * 4)[:4]
    _norm_over_last(facts, call, len(_sizes(shape)), "layer_norm", [weight, bias])


def rms_norm(facts: Facts, call: Call) -> None:
    """x / sqrt(mean(x^2) + eps) * w over the trailing normalized axes."""
    x, shape, weight = (call.operands + [None] * 3)[:3]
    _norm_over_last(facts, call, len(_sizes(shape)), "rms_norm", [weight])


def embedding(facts: Facts, call: Call) -> None:
    """y[..., d] = W[ids[...], d]: the table's columns produce the output's last axis."""
    weight, ids = call.operands[:2]
    name = call.node.name
    for axis in range(len(call.shape(ids))):
        facts.equal((ids, axis), (call.out, axis), name)
    facts.equal((weight, 1), (call.out, len(call.out_shape) - 1), name)
    facts.role((weight, 1), "produces", name)
    facts.role((weight, 0), "indexed", name)


def pool(facts: Facts, call: Call) -> None:
    """Pooling keeps batch and channel axes; spatial sizes depend on the window."""
    x = call.operands[0]
    for axis in range(min(2, len(call.shape(x)))):
        facts.equal((x, axis), (call.out, axis), call.node.name)


def view(facts: Facts, call: Call) -> None:
    """Reshape: axes are matched by running products; a split or merged axis is a ``factor`` composition.
    A size read from a tensor's shape at run time (``x.view(b, t, x.shape[-1])``) ties the output axis to
    that tensor's axis: it follows whatever that axis grows to, so both must grow together. An inferred size
    (``-1``) is what the other sizes leave of the input, so it is part of its run even when it is 1 (one head
    split out of a projection by ``view(b, t, -1, d)``)."""
    x = call.operands[0]
    sizes = view_sizes(call.node) or ()
    inferred = {axis for axis, size in enumerate(sizes) if isinstance(size, int) and size == -1}
    align_reshape(facts, call.node.name, x, call.shape(x), call.out, call.out_shape, inferred)
    for out_axis, size in enumerate(sizes):
        source = size_source(size, call)
        if source is not None:
            facts.equal(source, (call.out, out_axis), call.node.name)


def size_source(value, call: Call) -> Axis | None:
    """The tensor axis a size argument is read from at run time (``literals.shape_read``: ``x.shape[i]``,
    ``x.size(i)``, ``x.size()[i]``, ``aten.sym_size.int(x, i)``); None for literals and computed sizes."""
    read = shape_read(value)
    if read is None or f"n:{read[0].name}" not in call.shapes:
        return None
    ref = f"n:{read[0].name}"
    return (ref, _norm(read[1], len(call.shapes[ref])))


def align_reshape(
    facts: Facts, name: str, src: str, src_shape: tuple, dst: str, dst_shape: tuple, inferred: set[int] = frozenset()
) -> None:
    """Match the axes of a reshape by running products: each run of source axes is a run of output axes
    (``reshape_run``). Size-1 axes leave the products alone, so the shapes place them only by position: between
    two runs, source and output size-1 axes pair up in order; an unpaired one is a member of the run after it
    (of the last run when none follows). An inferred output axis (``-1`` in ``inferred``) is what the other
    sizes leave of the input, so it is a member even at size 1 (one head split out of a projection by
    ``view(b, t, -1, d)``); any other unpaired size-1 axis is a head of one head or a broadcast axis, which the
    shapes cannot tell apart: it is left to the analysis (``Facts.runs``), which keeps it only if it is real."""
    runs: list[tuple[list[Axis], list[Axis], list[Axis]]] = []  # (source axes, output axes, possible axes)
    i = j = 0
    while True:
        loose_src, loose_dst = [], []
        while i < len(src_shape) and src_shape[i] == 1:
            loose_src.append(i)
            i += 1
        while j < len(dst_shape) and dst_shape[j] == 1:
            loose_dst.append(j)
            j += 1
        for a, b in zip(loose_src, loose_dst):
            facts.equal((src, a), (dst, b), name)
        loose_src, loose_dst = loose_src[len(loose_dst):], loose_dst[len(loose_src):]
        definite = [(dst, k) for k in loose_dst if k in inferred]
        possible = [(src, k) for k in loose_src] + [(dst, k) for k in loose_dst if k not in inferred]
        if i >= len(src_shape) or j >= len(dst_shape):
            if runs:
                runs[-1][1].extend(definite)
                runs[-1][2].extend(possible)
            break
        a, b = [i], [j]
        pa, pb = src_shape[i], dst_shape[j]
        while pa != pb:
            if pa < pb:
                i += 1
                a.append(i)
                pa *= src_shape[i]
            else:
                j += 1
                b.append(j)
                pb *= dst_shape[j]
        possible += [(src, k) for k in a if src_shape[k] == 1]
        possible += [(dst, k) for k in b if dst_shape[k] == 1 and k not in inferred]
        runs.append(([(src, k) for k in a if src_shape[k] != 1],
                     definite + [(dst, k) for k in b if dst_shape[k] != 1 or k in inferred], possible))
        i, j = i + 1, j + 1
    for a, b, possible in runs:
        if possible:
            facts.runs.append((sorted(a), sorted(b), possible, name))
        else:
            reshape_run(facts, name, sorted(a), sorted(b))


def reshape_run(facts: Facts, name: str, a: list[Axis], b: list[Axis]) -> None:
    """Source axes ``a`` and output axes ``b`` of a reshape hold the same elements: one each is one axis, else
    the single one is the ``factor`` whole of the others."""
    if len(a) == 1 and len(b) == 1:
        facts.equal(a[0], b[0], name)
    elif len(a) == 1:
        facts.compose(a[0], b, "factor", name)
    elif len(b) == 1:
        facts.compose(b[0], a, "factor", name)
    else:
        facts.compose(a[0], b, "factor", name)  # rare: many to many


def transpose(facts: Facts, call: Call) -> None:
    x = call.operands[0]
    rank = len(call.shape(x))
    if rank < 2:
        return elementwise(facts, call)
    d0 = _norm(call.arg(1, "dim0", 0), rank)
    d1 = _norm(call.arg(2, "dim1", 1), rank)
    order = list(range(rank))
    order[d0], order[d1] = order[d1], order[d0]
    _reorder(facts, call, x, order)


def reverse_axes(facts: Facts, call: Call) -> None:
    """``x.T`` (``aten.numpy_T``): every axis, in reverse order."""
    x = call.operands[0]
    _reorder(facts, call, x, list(reversed(range(len(call.shape(x))))))


def _reorder(facts: Facts, call: Call, x: str, order: list[int]) -> None:
    """The output's axis i is ``x``'s axis ``order[i]``. When ``x`` is a parameter (or a selection from
    one), so is the output, with its axes reordered: a later matmul gives the parameter's own axes their
    roles (``x @ W.T`` is a linear)."""
    for out_axis, in_axis in enumerate(order):
        facts.equal((x, in_axis), (call.out, out_axis), call.node.name)
        axis = facts.parameter_axis(x, in_axis)
        if axis is not None:
            parameter, axes = facts.derived.get(call.out, (axis[0], {}))
            facts.derived[call.out] = (parameter, {**axes, out_axis: axis[1]})


def permute(facts: Facts, call: Call) -> None:
    x = call.operands[0]
    rank = len(call.shape(x))
    dims = call.node.args[1:] if call.node.op == "call_method" else call.arg(1, "dims")
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = dims[0]
    _reorder(facts, call, x, [_norm(axis, rank) for axis in dims])


def expand(facts: Facts, call: Call) -> None:
    broadcast(facts, call, [call.operands[0]])


def reduction(facts: Facts, call: Call) -> None:
    """mean/sum/var/max/any over ``dim``: the reduced axes mix values; the others are kept. ``max(x, dim)``
    returns (values, indices): both keep the same axes."""
    x = call.operands[0]
    rank = len(call.shape(x))
    dims = call.arg(1, "dim", None)
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        dims = list(range(rank))
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not all(isinstance(d, int) for d in dims):
        facts.blind(call.node.name, call.raw, all_axes(call), f"reduction over computed axes {dims}")
        return
    dims = sorted(_norm(d, rank) for d in dims)
    outputs = [call.out] if call.out in call.shapes else _parts(call)
    for axis in dims:
        facts.reduces((x, axis), call.raw, call.node.name)
    for out in outputs:
        keep = len(call.shapes[out]) == rank
        out_axis = 0
        for axis in range(rank):
            if axis not in dims:
                facts.equal((x, axis), (out, out_axis), call.node.name)
            out_axis += 1 if axis not in dims or keep else 0


def stack(facts: Facts, call: Call) -> None:
    """stack(tensors, dim): a new axis at ``dim`` (its size is the number of tensors: nothing grows it), the
    tensors' axes around it. Interleaved rotary embeddings stack two halves and flatten them back."""
    tensors = [t for t in call.operands[0] if call.is_tensor(t)]
    rank = len(call.out_shape)
    dim = _norm(call.arg(1, "dim", 0), rank)
    for ref in tensors:
        for axis in range(rank - 1):
            facts.equal((ref, axis), (call.out, axis + (axis >= dim)), call.node.name)
    facts.blind(call.node.name, call.raw, [(call.out, dim)], "the number of stacked tensors is its size")


def unbind(facts: Facts, call: Call) -> None:
    """unbind(x, dim): one tensor per index of ``dim`` (the number of outputs is its size: nothing grows it),
    each with the other axes."""
    x = call.operands[0]
    rank = len(call.shape(x))
    dim = _norm(call.arg(1, "dim", 0), rank)
    for part in _parts(call):
        for axis in range(rank):
            if axis != dim:
                facts.equal((x, axis), (part, axis - (axis > dim)), call.node.name)
    facts.blind(call.node.name, call.raw, [(x, dim)], "the number of outputs is its size")


def _parts(call: Call) -> list[str]:
    """The refs of a tuple output's tensors, in order."""
    return [ref for ref in call.shapes if ref.startswith(call.out + "#")]


def softmax(facts: Facts, call: Call) -> None:
    x = call.operands[0]
    rank = len(call.shape(x))
    for axis in range(rank):
        facts.equal((x, axis), (call.out, axis), call.node.name)
    dim = call.module.dim if call.module is not None else call.arg(1, "dim", -1)
    facts.reduces((call.out, _norm(dim, rank)), "softmax", call.node.name)


def cat(facts: Facts, call: Call) -> None:
    """torch.cat skips a 1-D empty tensor whatever the others' rank (a cache that starts as ``tensor([])``)."""
    tensors = [t for t in call.operands[0] if call.is_tensor(t) and tuple(call.shape(t)) != (0,)]
    rank = len(call.out_shape)
    dim = _norm(call.arg(1, "dim", 0), rank)
    for ref in tensors:
        for axis in range(rank):
            if axis != dim:
                facts.equal((ref, axis), (call.out, axis), call.node.name)
    facts.compose((call.out, dim), [(ref, dim) for ref in tensors], "concat", call.node.name)


def split(facts: Facts, call: Call) -> None:
    x = call.operands[0]
    rank = len(call.shape(x))
    dim = _norm(call.arg(2, "dim", 0), rank)
    parts = _parts(call)
    for ref in parts:
        for axis in range(rank):
            if axis != dim:
                facts.equal((x, axis), (ref, axis), call.node.name)
    facts.compose((x, dim), [(ref, dim) for ref in parts], "concat", call.node.name)
    size = call.arg(1, "split_size", None)
    sizes = size if isinstance(size, (list, tuple)) else [size] * len(parts)
    for ref, part_size in zip(parts, sizes):  # split(x.shape[-1]): each part follows that axis
        source = size_source(part_size, call)
        if source is not None and call.shapes[ref][dim] == call.shapes[source[0]][source[1]]:
            facts.equal(source, (ref, dim), call.node.name)


def getitem(facts: Facts, call: Call) -> None:
    """Element of a tuple output, or tensor indexing with ints, slices, None and Ellipsis."""
    source, index = call.operands[0], call.node.args[1]
    name = call.node.name
    if not call.is_tensor(source):  # tuple element: the element's ref is "<source>#i"
        element = f"n:{call.node.args[0].name}#{index}"
        if element in call.shapes:
            for axis in range(len(call.shapes[element])):
                facts.equal((element, axis), (call.out, axis), name)
        return
    index = index if isinstance(index, tuple) else (index,)
    shape = call.shape(source)
    lists = [i for i in index if isinstance(i, list)]
    if any(isinstance(i, (torch.fx.Node, torch.Tensor)) for i in index) or len(lists) > 1 or any(
            not all(isinstance(v, int) for v in i) for i in lists):
        facts.blind(name, "advanced indexing", all_axes(call))
        return  # (one list of constant positions, x[:, [-1], :], picks along its axis like a slice)
    explicit = sum(1 for i in index if i is not None and i is not Ellipsis)
    expanded: list = []
    for i in index:
        if i is Ellipsis:
            expanded += [slice(None)] * (len(shape) - explicit)
        else:
            expanded.append(i)
    expanded += [slice(None)] * (len(shape) - sum(1 for i in expanded if i is not None))
    in_axis = out_axis = 0
    for i in expanded:
        if i is None:
            out_axis += 1
            continue
        if isinstance(i, int):
            in_axis += 1
            continue
        if isinstance(i, (slice, list)):
            if isinstance(i, slice) and call.out_shape[out_axis] == shape[in_axis]:
                facts.equal((source, in_axis), (call.out, out_axis), name)
            else:
                facts.compose((source, in_axis), [(call.out, out_axis)], "slice", name)
        in_axis += 1
        out_axis += 1


def select_or_slice(facts: Facts, call: Call) -> None:
    """aten.slice / aten.select / narrow: every axis but ``dim`` kept; ``dim`` is cut (or removed)."""
    x = call.operands[0]
    rank = len(call.shape(x))
    dim = _norm(call.arg(1, "dim", 0), rank)
    removed = len(call.out_shape) < rank
    for axis in range(rank):
        out_axis = axis - (1 if removed and axis > dim else 0)
        if axis == dim:
            if removed:
                continue
            if call.out_shape[axis] == call.shape(x)[axis]:
                facts.equal((x, axis), (call.out, axis), call.node.name)
            else:
                facts.compose((x, axis), [(call.out, axis)], "slice", call.node.name)
            continue
        facts.equal((x, axis), (call.out, out_axis), call.node.name)


def index(facts: Facts, call: Call) -> None:
    """x[..., idx, ...] with one index tensor at axis d: out = x axes before d, idx's axes, x axes after d.

    Axis d is a selection (the index values encode its size), as when an MoE picks expert weights.
    """
    x, indices = call.operands[0], call.operands[1]
    tensors = [(d, ref) for d, ref in enumerate(indices) if ref is not None]
    if len(tensors) != 1 or not call.is_tensor(tensors[0][1]):
        facts.blind(call.node.name, "index with several index tensors", all_axes(call))
        return
    (d, idx), name = tensors[0], call.node.name
    shape, idx_rank = call.shape(x), len(call.shape(tensors[0][1]))
    for axis in range(d):
        facts.equal((x, axis), (call.out, axis), name)
    for axis in range(idx_rank):
        facts.equal((idx, axis), (call.out, d + axis), name)
    for axis in range(d + 1, len(shape)):
        facts.equal((x, axis), (call.out, axis - 1 + idx_rank), name)
    facts.compose((x, d), [(idx, a) for a in range(idx_rank)], "select", name)
    if x.startswith("p:"):
        facts.role((x, d), "indexed", name)
        kept = {axis: axis for axis in range(d)}
        kept.update({axis - 1 + idx_rank: axis for axis in range(d + 1, len(shape))})
        facts.derived[call.out] = (x, kept)


def repeat(facts: Facts, call: Call) -> None:
    """repeat_interleave along ``dim``: the output axis is the input axis ``repeats`` times."""
    x = call.operands[0]
    rank = len(call.shape(x))
    dim = call.arg(2, "dim", None)
    if dim is None:
        facts.blind(call.node.name, "repeat_interleave without dim", all_axes(call))
        return
    dim = _norm(dim, rank)
    for axis in range(rank):
        if axis != dim:
            facts.equal((x, axis), (call.out, axis), call.node.name)
    facts.compose((call.out, dim), [(x, dim)], "repeat", call.node.name)


def sdpa(facts: Facts, call: Call) -> None:
    """softmax(q k^T / sqrt(E) + mask) v: q and k share E (and its temperature), k and v share S."""
    q, k, v = call.operands[:3]
    mask = call.operands[3] if len(call.operands) > 3 else call.node.kwargs.get("attn_mask")
    name = call.node.name
    sq, sk, sv = call.shape(q), call.shape(k), call.shape(v)
    rank = len(sq)
    facts.equal((q, rank - 1), (k, rank - 1), name)
    facts.reduces((q, rank - 1), "attention_scale", name)
    facts.equal((k, rank - 2), (v, rank - 2), name)
    facts.reduces((k, rank - 2), "softmax", name)
    facts.equal((q, rank - 2), (call.out, rank - 2), name)
    facts.equal((v, rank - 1), (call.out, rank - 1), name)
    for ref, shape in ((q, sq), (k, sk), (v, sv)):
        for axis in range(rank - 2):
            _batch_axis(facts, (ref, axis), (call.out, axis), shape[axis], call.out_shape[axis], name)
    if call.is_tensor(mask):
        shape = call.shape(mask)
        offset = rank - len(shape)
        for axis, size in enumerate(shape):
            target = offset + axis
            if size == 1 or target < 0:
                continue
            other = (q, target) if target == rank - 2 else (k, rank - 2) if target == rank - 1 else (call.out, target)
            facts.equal((mask, axis), other, name)


def topk(facts: Facts, call: Call) -> None:
    """values, indices = topk(x, k, dim): other axes kept; ``dim`` is a selection (indices encode it)."""
    x = call.operands[0]
    rank = len(call.shape(x))
    dim = _norm(call.arg(2, "dim", -1), rank)
    for part in (f"{call.out}#0", f"{call.out}#1"):
        if part in call.shapes:
            for axis in range(rank):
                if axis != dim:
                    facts.equal((x, axis), (part, axis), call.node.name)
            facts.compose((x, dim), [(part, dim)], "select", call.node.name)


def all_axes(call: Call) -> list[Axis]:
    refs = [o for o in _flat(call.operands) if call.is_tensor(o)]
    refs += [r for r in call.shapes if r == call.out or r.startswith(call.out + "#")]
    return [(r, a) for r in refs for a in range(len(call.shapes[r]))]


def opaque(facts: Facts, call: Call) -> None:
    facts.blind(call.node.name, call.raw, all_axes(call))


def ignore(facts: Facts, call: Call) -> None:
    return None


def creation(facts: Facts, call: Call) -> None:
    """``zeros(sizes)``, ``full(sizes, v)``, ``x.new_ones(sizes)``: every entry the same constant, so nothing
    couples its axes; where an op ties one to a growing axis, growth patches the literal size
    (``rewrite.ops.literals``) and the new entries hold the same constant. A size read at run time follows
    by itself; one computed otherwise is not patched, and the grown graph is checked to run."""
    return None


RULES: dict[str, Rule] = {
    **{kind: elementwise for kind in ELEMENTWISE},
    "linear": linear, "addmm": addmm, "matmul": matmul, "grouped_mm": grouped_mm, "conv": conv, "batch_norm": batch_norm,
    "layer_norm": layer_norm, "rms_norm": rms_norm, "embedding": embedding, "pool": pool, "view": view,
    "transpose": transpose, "numpy_T": reverse_axes, "permute": permute,
    "unsqueeze": view, "squeeze": view,  # size-1 axes only
    "expand": expand, "mean": reduction, "softmax": softmax, "cat": cat, "split": split, "getitem": getitem,
    "slice": select_or_slice, "select": select_or_slice, "narrow": select_or_slice, "repeat": repeat,
    "sdpa": sdpa, "topk": topk, "index": index, "stack": stack, "unbind": unbind, "opaque": opaque,
    "creation": creation,
    "ignore": ignore,
}


def _sizes(shape) -> tuple:
    if isinstance(shape, int):
        return (shape,)
    return tuple(shape)


def _flat(values) -> list:
    out = []
    for v in values:
        if isinstance(v, (list, tuple)):
            out += _flat(v)
        else:
            out.append(v)
    return out


def _unsupported(call: Call, detail: str):
    return UnsupportedOpError(call.kind, call.node.name, detail)
