"""Op naming: every call form a front-end produces, normalised to one canonical kind.

``call_module nn.Linear``, ``aten.linear`` and ``F.linear`` are all ``linear``; ``Tensor.view``, ``aten.view``
and ``aten.reshape`` are ``view``. ``op_name`` is the one way a node's own name is read (a module's class,
``Tensor.<method>``, ``<namespace>.<op>`` or a function's name); ``canonical_kind`` maps it to its kind.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch.fx.passes.shape_prop import TensorMetadata

# -- canonical kinds --------------------------------------------------------------------------------
ELEMENTWISE = {
    "add", "sub", "rsub", "mul", "div", "true_divide", "floordiv", "pow", "where", "maximum", "minimum",
    "eq", "ne", "lt", "le", "gt", "ge", "__and__", "__or__", "logical_and", "logical_or", "logical_not",
    "masked_fill", "clamp", "clamp_min", "clamp_max", "relu", "gelu", "silu", "tanh", "sigmoid", "exp",
    "log", "neg", "rsqrt", "sqrt", "abs", "cos", "sin", "erf", "softplus", "dropout", "to", "type", "float",
    "half", "bfloat16", "double", "contiguous", "clone", "detach", "alias", "lift_fresh_copy", "_to_copy",
    "square", "reciprocal", "sign", "bitwise_not", "leaky_relu", "hardtanh", "elu", "mish", "hardswish",
    "hardsigmoid", "relu6", "identity", "div_", "mul_", "add_", "type_as", "sigmoid_", "tanh_", "copy",
    "fill", "zeros_like", "ones_like", "full_like", "empty_like", "logsigmoid", "remainder",
}
MODULE_KINDS = {
    "Linear": "linear", "Conv1d": "conv", "Conv2d": "conv", "Conv3d": "conv", "Embedding": "embedding",
    "LayerNorm": "layer_norm", "RMSNorm": "rms_norm", "BatchNorm1d": "batch_norm", "BatchNorm2d": "batch_norm",
    "BatchNorm3d": "batch_norm", "ReLU": "relu", "GELU": "gelu", "SiLU": "silu", "Tanh": "tanh",
    "Sigmoid": "sigmoid", "Dropout": "dropout", "Identity": "identity", "LeakyReLU": "leaky_relu",
    "Softplus": "softplus", "Mish": "mish", "Hardswish": "hardswish", "ReLU6": "relu6", "ELU": "elu",
    "AdaptiveAvgPool1d": "pool", "AdaptiveAvgPool2d": "pool", "AvgPool2d": "pool", "MaxPool2d": "pool",
    "AdaptiveMaxPool2d": "pool", "MaxPool1d": "pool", "AvgPool1d": "pool", "Flatten": "flatten",
    "Softmax": "softmax",
}
ALIASES = {
    "reshape": "view", "_unsafe_view": "view", "view_as": "view", "reshape_as": "view", "unflatten": "view",
    "flatten": "view", "conv1d": "conv", "conv2d": "conv", "conv3d": "conv", "convolution": "conv",
    "_native_batch_norm_legit_no_training": "batch_norm", "max_pool2d": "pool", "avg_pool2d": "pool",
    "adaptive_avg_pool2d": "pool", "adaptive_avg_pool1d": "pool", "max_pool1d": "pool", "avg_pool1d": "pool",
    "_adaptive_avg_pool2d": "pool", "max_pool2d_with_indices": "pool", "permute": "permute", "t": "transpose",
    "swapaxes": "transpose", "transpose_": "transpose", "matmul": "matmul", "mm": "matmul", "bmm": "matmul",
    "log_softmax": "softmax", "_softmax": "softmax", "_log_softmax": "softmax", "softmax": "softmax",
    "chunk": "split", "split_with_sizes": "split", "tensor_split": "split", "unsafe_split": "split",
    "concat": "cat", "concatenate": "cat", "expand_as": "expand", "repeat_interleave": "repeat",
    "unsqueeze_": "unsqueeze", "squeeze_": "squeeze", "select": "select", "amax": "mean", "sum": "mean",
    "var": "mean", "std": "mean", "mean": "mean", "max": "mean", "min": "mean", "norm": "mean",
    "linalg_vector_norm": "mean", "native_layer_norm": "layer_norm", "embedding": "embedding",
    "getattr": "ignore", "size": "ignore", "dim": "ignore", "sym_numel": "ignore", "numel": "ignore",
    "scalar_tensor": "opaque",
    "arange": "opaque", "cumsum": "opaque", "diff": "opaque", "new_ones": "creation", "new_zeros": "creation",
    "zeros": "creation", "ones": "creation", "full": "creation", "empty": "creation",
    "gather": "opaque", "scatter": "opaque", "one_hot": "opaque", "nonzero": "opaque", "where_cond": "opaque",
    "index_select": "opaque", "index": "index", "sort": "opaque", "argsort": "opaque", "argmax": "opaque", "tril": "opaque",
    "triu": "opaque", "masked_select": "opaque", "index_put": "opaque", "index_add": "opaque",
    "new_full": "creation", "new_empty": "creation", "arange_start": "opaque", "lift_fresh": "opaque",
    "_local_scalar_dense": "ignore", "item": "ignore", "scaled_dot_product_attention": "sdpa",
    "topk": "topk", "_unsafe_index": "opaque", "embedding_bag": "opaque", "amin": "mean", "any": "mean",
    "all": "mean", "stack": "stack", "unbind": "unbind", "floor_divide": "floordiv", "copy_": "copy",
    "fmod": "remainder", "bitwise_and": "__and__", "bitwise_or": "__or__",
    "_grouped_mm": "grouped_mm", "grouped_mm_fallback": "grouped_mm",  # transformers' default experts on CPU
}
# Overloads whose meaning differs from their family's: ``max(x, dim)`` reduces, ``max(x, other)`` is an
# element-wise maximum (T5 clamps with it). For ATen the overload's name decides; for the fx forms
# (``torch.max``, ``Tensor.max``), whether the second operand is a tensor.
BINARY_FORMS = {"max": "maximum", "min": "minimum"}
BINARY_OVERLOADS = {"other", "binary_out"}
# Nodes torch.export adds for its own checks (guards, shape and metadata assertions): they compute nothing.
BOOKKEEPING = {"_guards_fn", "_assert_tensor_metadata", "_assert", "_assert_scalar", "sym_size",
               "sym_constrain_range_for_size"}
ALIASES.update({name: "ignore" for name in BOOKKEEPING})


def is_bookkeeping(name: str) -> bool:
    """Is an op (by its own name) one of torch.export's checks rather than part of the model?"""
    return name in BOOKKEEPING or name.startswith("_assert")
ARITHMETIC = {operator.add: "add", operator.sub: "sub", operator.mul: "mul", operator.truediv: "div",
              operator.floordiv: "floordiv", operator.neg: "neg", operator.pow: "pow", operator.getitem: "getitem",
              operator.eq: "eq", operator.and_: "__and__", operator.or_: "__or__", operator.lt: "lt",
              operator.gt: "gt", operator.le: "le", operator.ge: "ge", operator.ne: "ne", operator.matmul: "matmul"}



def op_name(node: torch.fx.Node, root: torch.nn.Module | None = None) -> str:
    """A readable, front-end-neutral name of what the node does: "Linear", "aten.linear", "Tensor.view",
    "add". ``root`` (the GraphModule) resolves ``call_module`` targets to their class."""
    if node.op == "call_module":
        return type(root.get_submodule(node.target)).__name__ if root is not None else str(node.target)
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_function":
        target = node.target
        if target in ARITHMETIC:
            return ARITHMETIC[target]
        if isinstance(target, torch._ops.OpOverload):
            return f"{target.namespace}.{target._opname}"
        return getattr(target, "__name__", str(target))
    return node.op


def short_name(node: torch.fx.Node) -> str:
    """The op's own name without its namespace: ``linear`` for ``aten.linear``, ``view`` for ``Tensor.view``."""
    return op_name(node).rpartition(".")[2]


def canonical_kind(graph, node: torch.fx.Node, module: torch.nn.Module | None = None) -> str:
    """The canonical kind of a node: ``linear``, ``view``, ``add``, ..., or its raw name if unknown. ``module``:
    a ``call_module`` node's module, when the caller has it."""
    if node.op == "call_module":
        name = type(module).__name__ if module is not None else op_name(node, graph.module)
        return MODULE_KINDS.get(name, name)
    if node.op == "call_function" and node.target is getattr and node.args[1:] == ("T",):
        name = "numpy_T"  # fx records ``x.T`` as getattr(x, "T"); torch.export as aten.numpy_T
    else:
        name = short_name(node)
    if name in BINARY_FORMS and _binary_form(node):
        return BINARY_FORMS[name]
    return ALIASES.get(name, name)


def _binary_form(node: torch.fx.Node) -> bool:
    """Is this ``min``/``max`` call the element-wise form with a second tensor?"""
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._overloadname in BINARY_OVERLOADS
    other = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    if not isinstance(other, torch.fx.Node):
        return False
    meta = other.meta.get("tensor_meta")
    return meta is None or isinstance(meta, TensorMetadata)  # before shape propagation, a node is a tensor


def real_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The users of a node that compute something (not torch.export's metadata assertions)."""
    return [user for user in node.users if not is_bookkeeping(short_name(user))]
