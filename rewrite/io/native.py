"""``to_native``: a grown Hugging Face model back in its own class, with an updated config.

The grown graph keeps Hugging Face's parameter names (new blocks take the next layer indices; scalings and
norm corrections are already folded into weights), so the native model is the original class built from a
config whose sizes are read off the grown graph, and loaded with the grown tensors:

* ``num_hidden_layers``: the blocks of the stack (``rewrite.blocks``);
* ``hidden_size``: the residual stream entering the first block;
* ``num_attention_heads``, ``head_dim``: the query of each attention (``rewrite.ops.attention``); key-value heads
  keep the original query/KV ratio (the width passes keep it);
* ``intermediate_size`` (or ``n_inner``, ``ffn_dim``, ...): the dense MLPs (``rewrite.pattern.mlp``), or the
  width contracted by the layers that end a residual branch without attention (a fused ``gate_up_proj``,
  Mixtral's expert stacks);
* norm epsilons: the literal of every RMSNorm / LayerNorm (``widen_hidden`` scales them).

Every one of these must be the same in all layers, or the model is not representable in one config. After
loading, the native model is run on the example inputs and compared with the grown graph: anything the
class cannot express (a router from ``upcycle_moe``, a kept RoPE table, an explicit attention temperature)
shows up as a parameter without a place or as a different output, and raises ``NotRepresentableError``
with the reason. The graph form stays usable either way.

An upcycled model (``upcycle_moe``) is written as its family's mixture-of-experts class where one exists
(``rewrite.io.native_moe``: Llama/Mistral -> Mixtral, Qwen2 -> Qwen2-MoE, Qwen3 -> Qwen3-MoE), which
dispatches tokens to their top-k experts only.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import warnings

import torch

from rewrite.analysis.blocks import blocks, branch_layers, depends_on
from rewrite.errors import GrowthError, NotRepresentableError
from rewrite.ir.frontends import first_line, is_huggingface
from rewrite.io.native_moe import MOE_CLASSES, moe_target, moe_tensors, upcycled
from rewrite.ir.graph import Graph
from rewrite.ops import HOMOGENEOUS, attention, canonical_kind, operand, real_users, rms_epsilon
from rewrite.transform.growth_map import named_tensors
from rewrite.transform.pattern import mlp
from rewrite.verification.verify import verify

EPSILON_FIELDS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon")
# The MLP size under the names Hugging Face configs give it (GPT-2: n_inner, OPT: ffn_dim, T5: d_ff,
# DistilBERT: hidden_dim). A name that meant something else would be caught by the check after loading.
MLP_FIELDS = ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "ffn_hidden_size", "hidden_dim")
# In mixtures whose configs size dense layers, experts and shared experts apart: each role's field, the first
# the config has (else the MLP field above). A shared expert is a dense MLP whose module name says so.
MIXTURE_FIELDS = {
    "dense": ("intermediate_size_mlp",),  # Llama4: dense layers; its intermediate_size is the experts'
    "experts": ("moe_intermediate_size",),  # Qwen2/3-MoE, DeepSeek: intermediate_size is the dense layers'
    "shared": ("shared_expert_intermediate_size",),  # Qwen2-MoE
}
SHARED_EXPERT = "shared_expert"
# Encoder-decoder configs size each side apart (Whisper, T5, BART): side -> what -> candidate fields.
SIDE_FIELDS = {
    "encoder": {"layers": ("encoder_layers", "num_layers"), "mlp": ("encoder_ffn_dim",)},
    "decoder": {"layers": ("decoder_layers", "num_decoder_layers"), "mlp": ("decoder_ffn_dim",)},
}
# Config fields that list layer indices rather than hold one entry per layer (dense layers in a mixture).
LAYER_INDEX_FIELDS = ("mlp_only_layers", "moe_layers")
LAYER_PREFIX_FIELDS = ("first_k_dense_replace",)  # how many leading layers are dense (DeepSeek)


def to_native(grown, like: torch.nn.Module) -> torch.nn.Module:
    """An instance of ``like``'s class with the grown sizes in its config and the grown weights.

    ``grown`` is a ``rewrite.Grown`` (or its Graph); ``like`` the original Hugging Face model. The native model
    holds the grown model's tensors themselves, not copies (an upcycled model's stacked experts excepted):
    train one and the other sees it; ``copy.deepcopy`` it for a model of its own."""
    graph: Graph = getattr(grown, "graph", grown)
    cls, config, moe = native_config(graph, like)
    tensors = dict(named_tensors(graph.module))
    dtype = _dtype(graph, like)
    if hasattr(config, "dtype"):
        config.dtype = dtype  # what save_pretrained writes, and from_pretrained loads as
    device = next((t.device for t in tensors.values() if not t.is_meta), torch.device("cpu"))
    if moe is not None:
        native = _placed(build_native(cls, config, None), dtype, like, device).eval()
        tensors = moe_tensors(tensors, moe, MOE_CLASSES[like.config.model_type], native.state_dict())
        _load(native, tensors)
    else:  # parameters on meta, then the grown tensors themselves: no second copy of the grown model
        with parameters_on_meta():
            native = _placed(build_native(cls, config, set(tensors)), dtype, like, device).eval()
        _load(native, tensors, assign=True)
    report = verify(graph, native, graph.example_args, graph.example_kwargs, title="native vs grown graph")
    if not report.ok:
        raise NotRepresentableError(
            f"{cls.__name__} with the grown config does not compute the grown function "
            f"(max abs error {report.max_abs_error:.3g}): the graph holds something the class cannot express, "
            f"such as a kept rotary table or an explicit attention temperature"
            + (", or a router whose float32 softmax chooses other experts than the graph's" if moe else "")
        )
    return native


def native_config(graph: Graph, like: torch.nn.Module):
    """(class, config, mixture) of the native model the grown graph becomes, from shapes alone (a graph on the
    ``meta`` device will do): ``like``'s class with the grown sizes, or the family's mixture class for an
    upcycled model (``mixture`` then says which layers, else None). Raises ``NotRepresentableError`` when the
    config cannot hold the grown sizes."""
    config = getattr(like, "config", None)
    if config is None or not is_huggingface(like):
        raise NotRepresentableError(f"{type(like).__name__} is not a Hugging Face model: use the graph form")
    updated = copy.deepcopy(config)
    wanted = grown_config(graph, like)
    for field, value in wanted.items():
        if not _derived(updated, field):  # a derived field (Falcon's head_dim) is checked below instead
            setattr(updated, field, value)
    try:  # the checks from_pretrained will run on the saved config
        config = type(config).from_dict(updated.to_dict())
    except Exception as e:  # noqa: BLE001 - the config's own validator says which sizes disagree
        raise NotRepresentableError(f"{type(config).__name__} rejects the grown sizes: {first_line(e)}") from e
    for field, value in wanted.items():
        if getattr(config, field) != value:
            raise NotRepresentableError(
                f"{type(config).__name__}.{field} would be {getattr(config, field)!r} where the grown model "
                f"needs {value!r} (the config derives it from other fields)")
    moe = upcycled(graph)
    if moe is None:
        return type(like), config, None
    cls, config = moe_target(like, config, moe, _layer_of(graph, moe.mlps))
    return cls, config, moe


def grown_config(graph: Graph, like: torch.nn.Module) -> dict:
    """The config fields whose values growth changed, read off the grown graph (see the module docstring)."""
    config = like.config
    found = blocks(graph)
    fields: dict = {}
    stacks: dict[str, list] = {}
    for block in found:
        stacks.setdefault(block.stack, []).append(block)
    if len(stacks) == 1:
        fields["num_hidden_layers"] = len(found)
        fields.update(_per_layer(graph, config, found))
    for stack, members in stacks.items() if len(stacks) > 1 else ():  # an encoder-decoder: a count per stack
        field = _side_field(config, stack, "layers")
        if field is None:
            raise NotRepresentableError(f"{type(config).__name__} has no layer count for the stack {stack}")
        fields[field] = len(members)
    if found:
        fields["hidden_size"] = _one("hidden size", [graph.shape(b.stream_in)[-1] for b in found])
    heads = [_heads(graph, op) for n in graph.compute_nodes() if (op := attention(graph, n)) is not None]
    if heads:
        query, key_dim, value_dim = _one("attention heads and head size", heads)
        separate = hasattr(config, "v_head_dim")  # multi-head latent attention (DeepSeek): q/k and v sized apart
        if separate:
            qk = config.qk_nope_head_dim + config.qk_rope_head_dim
            if key_dim != qk:
                raise NotRepresentableError(
                    f"key/query head size {key_dim} is not {type(config).__name__}'s qk_nope_head_dim + "
                    f"qk_rope_head_dim = {qk}: a grown latent-attention head is not written back")
            fields["v_head_dim"] = value_dim
        elif key_dim != value_dim:
            raise NotRepresentableError(
                f"key/query head size {key_dim} differs from value head size {value_dim}; "
                f"{type(like).__name__} has one head_dim"
            )
        old_heads = getattr(config, "num_attention_heads")
        fields["num_attention_heads"] = query
        kv = getattr(config, "num_key_value_heads", None)
        if kv is not None:
            if (query * kv) % old_heads:
                raise NotRepresentableError(f"{query} query heads do not keep the ratio {old_heads}/{kv}")
            fields["num_key_value_heads"] = query * kv // old_heads
        if separate:
            pass  # the head sizes are their own fields: nothing ties them to the hidden size
        elif hasattr(config, "head_dim"):
            fields["head_dim"] = key_dim
        elif fields.get("hidden_size", config.hidden_size) != query * key_dim:
            raise NotRepresentableError(
                f"{query} heads of size {key_dim} do not fill the hidden size "
                f"{fields.get('hidden_size', config.hidden_size)} and {type(like).__name__} has no head_dim; "
                f"grow heads and hidden size together (add_heads, widen_heads, widen_hidden) so that they do"
            )
    fields.update(_mlp_sizes(graph, config, found))
    epsilon = _epsilon(graph)
    for field in EPSILON_FIELDS:
        if epsilon is not None and getattr(config, field, None) is not None:
            fields[field] = epsilon
    return fields


def _derived(config, field: str) -> bool:
    """Is ``field`` a read-only property of the config class (computed from other fields)?"""
    attribute = getattr(type(config), field, None)
    return isinstance(attribute, property) and attribute.fset is None


def _mlp_sizes(graph: Graph, config, found) -> dict:
    """The MLP size fields. Dense MLPs (the MLP pattern, else the layers that end an MLP branch) go under the
    config's MLP name; in a mixture, stacks of experts and shared experts go where the config keeps them apart
    (``MIXTURE_FIELDS``: Qwen-MoE's ``moe_intermediate_size``, Llama4's dense ``intermediate_size_mlp``)."""
    inputs = _mlp_inputs(graph, found)
    matched = [(m["module"], graph.shape(m["up"][0])[-1]) for m in mlp().find(graph)]
    shared = [w for module, w in matched if SHARED_EXPERT in module.rpartition(".")[2]]
    dense = [(module, w) for module, w in matched if SHARED_EXPERT not in module.rpartition(".")[2]]
    dense = dense or ([] if matched else [(None, w) for w, stack in inputs if not stack])
    experts = [w for w, stack in inputs if stack]
    if not (dense or experts or shared):
        return {}
    field = next((f for f in MLP_FIELDS if hasattr(config, f)), None)
    chosen = {role: next((f for f in MIXTURE_FIELDS[role] if hasattr(config, f)), None) for role in MIXTURE_FIELDS}
    named = [((_side_field(config, module, "mlp") if module is not None else None) or chosen["dense"] or field, w)
             for module, w in dense]  # an encoder's and a decoder's MLPs under their own fields (Whisper)
    named += [(chosen["experts"] or field, w) for w in experts]
    named += [(chosen["shared"] or chosen["experts"] or field, w) for w in shared]
    if any(name is None for name, _ in named):
        raise NotRepresentableError(
            f"{type(config).__name__} has no MLP size field (one of {', '.join(MLP_FIELDS)})")
    sizes: dict[str, list[int]] = {}
    for name, width in named:
        sizes.setdefault(name, []).append(width)
    return {name: _one(f"MLP size ({name})", values) for name, values in sizes.items()}


def _side_field(config, path: str, what: str) -> str | None:
    """The config field sizing ``what`` ("layers", "mlp") for the encoder or decoder side that ``path`` (a
    module path) is in, if the config sizes the sides apart (``SIDE_FIELDS``)."""
    parts = path.split(".")
    side = next((s for s in SIDE_FIELDS if s in parts), None)
    return next((f for f in SIDE_FIELDS[side][what] if hasattr(config, f)), None) if side else None


def _mlp_inputs(graph: Graph, found) -> list[tuple[int, bool]]:
    """(width, from a stack of experts) for each block's MLP output projection, where the MLP pattern does not
    match (a fused ``gate_up_proj`` split by ``chunk``, a stack of experts, ``x @ W.T``): the layers that end a
    residual branch and are not fed by an attention of their own unit (sequential or parallel blocks)."""
    sizes = []
    for block in found:
        position = {node: i for i, node in enumerate(block.nodes)}
        attentions = [n for n in block.nodes if attention(graph, n) is not None]
        start = -1
        units = sorted(block.units, key=lambda unit: position.get(unit.add, len(block.nodes)))
        for unit in units:  # a unit owns the nodes after the previous unit's add, up to its own
            end, start = start, position.get(unit.add, len(block.nodes))
            own = [n for n in attentions if end < position[n] < start]
            try:
                layers = branch_layers(graph, unit.branch)
            except GrowthError:  # a branch no layer scales: it tells nothing about the MLP size
                continue
            for layer in layers:
                if not any(depends_on(layer.node if layer.node.op != "get_attr" else _reader(layer.node), n)
                           for n in own):
                    width = _contracted(graph, layer.node)
                    stack = layer.node.op == "get_attr" and len(graph.shape(layer.node)) == 3
                    sizes += [(width, stack)] if width is not None else []
    return sizes


def _reader(node):
    """The op that reads a tensor (through single-input ops on it: casts, transposes), for asking what else
    feeds that op."""
    while len(real_users(node)) == 1 and (node.op == "get_attr" or not node.all_input_nodes[1:]):
        node = real_users(node)[0]
    return node


def _contracted(graph: Graph, node) -> int | None:
    """The input width a layer contracts: a linear's input features, or for a weight read by ``get_attr``
    (an expert stack, indexed and multiplied) the inner size of the product it feeds."""
    for _ in range(4):
        kind = canonical_kind(graph, node)
        if kind in ("linear", "addmm"):
            return graph.shape(operand(graph, node, "input"))[-1]
        if kind in ("matmul", "grouped_mm"):
            return graph.shape(node.args[0])[-1]
        users = real_users(node)
        if len(users) != 1 or not (node.op == "get_attr" or kind in HOMOGENEOUS or kind == "index"):
            return None
        node = users[0]
    return None


def _per_layer(graph: Graph, config, found) -> dict:
    """Config lists with one entry per layer (``layer_types``, ...), at the new depth. Each grown layer takes
    the entry of the layer it was copied or moved from (``Graph.origins``); a layer whose origin is not a
    layer of the original stack takes the entry all old layers share, if they share one. Lists of layer
    indices (``LAYER_INDEX_FIELDS``) list the grown layers that come from the listed ones, and a count of
    leading layers (``LAYER_PREFIX_FIELDS``) counts the grown layers that come from them."""
    old = config.num_hidden_layers
    fields = {}
    origins = []
    for block in found:
        stack, _, index = graph.origin(f"{block.stack}.{block.index}").rpartition(".")
        origins.append(int(index) if stack == block.stack and index.isdigit() and int(index) < old else None)
    for field, value in config.to_dict().items():
        if len(found) != old and field in LAYER_PREFIX_FIELDS and isinstance(value, int) and 0 < value < old:
            fields[field] = _prefix(field, value, origins)
            continue
        if len(found) == old or not isinstance(value, list):
            continue
        if field in LAYER_INDEX_FIELDS:  # the grown layers that come from the listed ones
            if any(origin is None for origin in origins):
                raise NotRepresentableError(
                    f"config.{field} lists layers {value} and a grown layer does not come from an old one")
            fields[field] = [i for i, origin in enumerate(origins) if origin in value]
            continue
        if len(value) != old:
            continue
        entries = []
        for block, origin in zip(found, origins):
            if origin is not None:
                entries.append(value[origin])
            elif len({repr(v) for v in value}) == 1:
                entries.append(value[0])
            else:
                raise NotRepresentableError(
                    f"config.{field} differs between layers and layer {block.stack}.{block.index} of the grown "
                    f"model does not come from one of them, so its entry is not known")
        fields[field] = entries
    return fields


def _prefix(field: str, count: int, origins: list[int | None]) -> int:
    """How many leading grown layers come from the first ``count`` old ones (DeepSeek's dense layers before its
    mixtures); refused when such layers are not all in front."""
    leading = [origin is not None and origin < count for origin in origins]
    new = leading.index(False) if False in leading else len(leading)
    if any(leading[new:]):
        raise NotRepresentableError(
            f"config.{field} = {count} keeps the first layers apart, and a grown copy of one of them is not "
            f"among the first: the class cannot hold it")
    return new


def _one(what: str, values: list):
    distinct = list(dict.fromkeys(values))
    if len(distinct) != 1:
        raise NotRepresentableError(f"the layers differ in {what} ({', '.join(map(str, distinct))}): one config "
                                    f"cannot hold them")
    return distinct[0]


def _heads(graph: Graph, op) -> tuple[int, int, int]:
    """(query heads, key head size, value head size) of an attention."""
    return graph.shape(op.query)[-3], op.key_dim, graph.shape(op.value)[-1]


def _epsilon(graph: Graph) -> float | None:
    """The epsilon every norm of the graph uses (None when there are no norms)."""
    values = []
    for node in graph.compute_nodes():
        kind = canonical_kind(graph, node)
        if node.op == "call_module" and kind in ("layer_norm", "rms_norm"):
            values.append(graph.module.get_submodule(node.target).eps)
        elif kind == "layer_norm":
            values.append(node.args[4] if len(node.args) > 4 else node.kwargs.get("eps", 1e-5))
        elif kind == "rms_norm":
            values.append(node.args[3] if len(node.args) > 3 else node.kwargs.get("eps"))
        elif kind == "mean" and (found := rms_epsilon(node)) is not None:
            add, index = found
            values.append(add.args[index])
    values = [v for v in values if v is not None]
    return float(_one("norm epsilon", [round(float(v), 15) for v in values])) if values else None


def _layer_of(graph: Graph, paths) -> dict[str, int]:
    """The position in the block stack of the block holding each module path."""
    found = blocks(graph)
    return {path: next((i for i, b in enumerate(found) if path.startswith(f"{b.stack}.{b.index}.")), -1)
            for path in paths}


def _load(native: torch.nn.Module, grown: dict[str, torch.Tensor], assign: bool = False) -> None:
    """The ``grown`` tensors into ``native``, checked name by name and shape by shape: copied into its tensors,
    or with ``assign`` put in their place (its parameters are on ``meta``; a head tied to the embeddings is tied
    again to what the embeddings now hold)."""
    state = native.state_dict(keep_vars=True)
    buffers = dict(native.named_buffers())  # non-persistent ones (rotary tables) are not in the state dict
    unplaced = [n for n in grown if n not in state and n not in buffers]
    if unplaced:
        raise NotRepresentableError(
            f"{len(unplaced)} grown tensors have no place in {type(native).__name__} "
            f"(e.g. {', '.join(unplaced[:3])})"
        )
    for name, target in state.items():
        if name not in grown:
            if is_tied_head(native, name):
                continue
            raise NotRepresentableError(f"the grown graph has no tensor for {type(native).__name__}'s {name}")
        if tuple(grown[name].shape) != tuple(target.shape):
            raise NotRepresentableError(
                f"{name} is {tuple(grown[name].shape)} in the grown graph but {tuple(target.shape)} in "
                f"{type(native).__name__} with the grown config"
            )
    if assign:
        _assign(native, {name: grown[name] for name in state if name in grown})
        return
    with torch.no_grad():
        for name, target in state.items():
            if name in grown:
                target.copy_(grown[name])


def _assign(native: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    tied = {name for name in native.state_dict() if is_tied_head(native, name)}
    for name, tensor in tensors.items():
        path, _, leaf = name.rpartition(".")
        holder = native.get_submodule(path)
        if leaf in holder._parameters:
            holder._parameters[leaf] = tensor if isinstance(tensor, torch.nn.Parameter) else torch.nn.Parameter(
                tensor, requires_grad=holder._parameters[leaf].requires_grad)
        else:
            holder._buffers[leaf] = tensor
    for name in tied - set(tensors):  # the head the embeddings fill: the embeddings' tensor again
        path, _, leaf = name.rpartition(".")
        native.get_submodule(path)._parameters[leaf] = native.get_input_embeddings().weight
    left = [name for name, t in (*native.named_parameters(), *native.named_buffers()) if t.is_meta]
    if left:
        raise NotRepresentableError(f"{type(native).__name__}'s {left[0]} has no tensor in the grown graph")


@contextlib.contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on ``meta`` (as they are registered, before any
    initialisation runs) and their buffers where the constructor makes them.

    Hugging Face's weight initialisation (``post_init``) still runs, for the buffers it computes (rotary
    tables), but skips the parameters: each is marked initialised (``_is_hf_initialized``, which transformers'
    init functions check) while the context is open, and unmarked as it closes. Initialising a ``meta``
    tensor computes nothing, and torch does it in Python (``torch._refs``): 0.2-0.3 s of a SmolLM2 build."""
    register = torch.nn.Module.register_parameter
    marked = []

    def on_meta(module, name, parameter):
        if parameter is not None and parameter.device.type != "meta":
            parameter = torch.nn.Parameter(parameter.to("meta"), requires_grad=parameter.requires_grad)
        if parameter is not None and not hasattr(parameter, "_is_hf_initialized"):
            parameter._is_hf_initialized = True
            marked.append(parameter)
        register(module, name, parameter)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register
        for parameter in marked:
            del parameter._is_hf_initialized


def build_native(cls, config, names: set[str] | None) -> torch.nn.Module:
    """``cls(config)``, or, when its parameters are not the grown graph's, ``cls(config, flag=...)`` with the
    constructor's boolean arguments (``add_pooling_layer=False``) set as the original instance was built:
    the combination whose parameter names are among ``names`` (None: the class as the config builds it)."""
    flags = [p.name for p in list(inspect.signature(cls.__init__).parameters.values())[2:]
             if isinstance(p.default, bool)][:3]

    def fits(model) -> bool:
        return {n for n, _ in model.named_parameters()} <= names

    with torch.random.fork_rng(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")  # a part written with width 0
        native = cls(config)
    if names is None or fits(native) or not flags:
        return native
    for values in itertools.product((True, False), repeat=len(flags)):
        with torch.random.fork_rng():
            candidate = cls(config, **dict(zip(flags, values)))
        if fits(candidate):
            return candidate
    return native  # _load then names what has no place


def _placed(native: torch.nn.Module, dtype: torch.dtype, like: torch.nn.Module, device) -> torch.nn.Module:
    """``native`` (built in float32 on the CPU) in the grown model's ``dtype`` on its ``device``; the buffers
    the class computes (rotary tables: not in the state dict) in the dtype ``like``'s buffer of that name has
    (``from_pretrained`` keeps them float32 in a bfloat16 model; ``model.to(bfloat16)`` rounds them), so the
    grown model computes what the original did."""
    persistent = set(native.state_dict())
    original = dict(like.named_buffers())
    computed = [(module, name, f"{prefix}.{name}" if prefix else name, buffer)
                for prefix, module in native.named_modules() for name, buffer in module._buffers.items()
                if buffer is not None and (f"{prefix}.{name}" if prefix else name) not in persistent]
    native = native.to(device=device if not any(p.is_meta for p in native.parameters()) else None, dtype=dtype)
    for module, name, qualified, buffer in computed:
        kept = original[qualified].dtype if qualified in original else buffer.dtype
        module._buffers[name] = buffer.to(device=device, dtype=kept if buffer.is_floating_point() else buffer.dtype)
    return native


def _dtype(graph: Graph, like: torch.nn.Module) -> torch.dtype:
    """The floating-point dtype of the grown model's parameters (the original's, which growth keeps)."""
    dtypes = {t.dtype for t in graph.module.parameters() if t.is_floating_point()}
    if len(dtypes) == 1:
        return dtypes.pop()
    return getattr(like, "dtype", torch.get_default_dtype())


def is_tied_head(native: torch.nn.Module, name: str) -> bool:
    """Is ``name`` the output head tied to the input embeddings (filled through them)?"""
    output = native.get_output_embeddings() if hasattr(native, "get_output_embeddings") else None
    inputs = native.get_input_embeddings() if hasattr(native, "get_input_embeddings") else None
    return output is not None and inputs is not None and output.weight is inputs.weight and name.endswith(
        "weight") and native.get_submodule(name.rpartition(".")[0]) is output
