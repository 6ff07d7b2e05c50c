"""An upcycled dense model written back as its family's native mixture-of-experts class.

``upcycle_moe`` turns each chosen MLP ``<mlp>`` into ``<mlp>.router.weight`` and experts ``<mlp>.experts.<e>.*``
(copies of the dense MLP) behind ``softmax -> top-k -> renormalise``. The grown graph evaluates every expert;
Hugging Face's MoE classes dispatch sparsely with the same router where their config allows it:

=============  ===============  ==========================================================================
dense family   native MoE       router and what the config sets
=============  ===============  ==========================================================================
llama/mistral  mixtral          softmax in float32, top-k, always renormalised; every layer is a mixture
                                (a partial upcycle is refused: the class has no dense layers)
qwen2          qwen2_moe        ``norm_topk_prob=True``; its shared expert is written with zero width
                                (``shared_expert_intermediate_size=0``: it adds exactly zero); dense layers
                                are listed in ``mlp_only_layers``
qwen3          qwen3_moe        ``norm_topk_prob=True``; dense layers in ``mlp_only_layers``
=============  ===============  ==========================================================================

The routers compute their softmax in float32; the graph computes it in the model's dtype, so a bfloat16
model can choose another expert where two gates tie within bfloat16's precision (the check after loading
reports it). The experts are stacked: ``gate_up_proj[e] = cat(gate_proj, up_proj)`` (gate first, as the
class's ``chunk(2)`` reads it), ``down_proj[e] = down_proj``, router ``gate.weight = router.weight``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from rewrite.errors import NotRepresentableError
from rewrite.ir.graph import Graph
from rewrite.transform.growth_map import NEW

_EXPERT = re.compile(r"^(?P<mlp>.+)\.experts\.(?P<e>\d+)\.(?P<rest>.+)$")


@dataclass(frozen=True)
class MoEClass:
    model_type: str  # the mixture family's model_type (the key of transformers' auto mappings)
    experts_field: str
    size_field: str  # the expert MLP width
    fixed: dict = field(default_factory=dict)  # router semantics and what the dense family implied
    dense_layers_field: str | None = None  # where the class lists layers that stay dense; None: it has none
    zeroed: tuple[str, ...] = ()  # parts of the mixture the upcycled function does not use, written as zeros


_MIXTRAL = MoEClass("mixtral", "num_local_experts", "intermediate_size", {"router_jitter_noise": 0.0})
MOE_CLASSES = {
    "llama": _MIXTRAL,
    "mistral": _MIXTRAL,
    "qwen2": MoEClass("qwen2_moe", "num_experts", "moe_intermediate_size",
                      {"norm_topk_prob": True, "shared_expert_intermediate_size": 0, "qkv_bias": True,
                       "decoder_sparse_step": 1}, "mlp_only_layers", ("shared_expert.", "shared_expert_gate.")),
    "qwen3": MoEClass("qwen3_moe", "num_experts", "moe_intermediate_size",
                      {"norm_topk_prob": True, "decoder_sparse_step": 1}, "mlp_only_layers"),
}


@dataclass(frozen=True)
class Upcycled:
    """The layers ``upcycle_moe`` made mixtures: their MLP paths, experts per layer and top-k."""

    mlps: tuple[str, ...]
    experts: int
    top_k: int


def upcycled(graph: Graph) -> Upcycled | None:
    """The mixtures of the grown graph, found by the names ``upcycle_moe`` gives (None if there are none)."""
    names = [name for name, _ in graph.module.named_parameters()]
    made = graph.lineage.growth_map.recipes if graph.lineage.growth_map is not None else {}
    routers = [name[: -len(".router.weight")] for name in names if name.endswith(".router.weight")
               and name in made and made[name].role == NEW]  # a router growth drew, not the model's own (Llama4)
    if not routers:
        return None
    counts = {mlp: len({m["e"] for n in names if (m := _EXPERT.match(n)) and m["mlp"] == mlp}) for mlp in routers}
    top_ks = {node.args[1] for node in graph.compute_nodes() if node.target is torch.ops.aten.topk.default
              and any(owner.endswith(".router") for owner in _owners(node))}
    if len(set(counts.values())) != 1 or len(top_ks) != 1:
        raise NotRepresentableError(
            f"the mixtures differ between layers (experts {sorted(set(counts.values()))}, top-k {sorted(top_ks)}): "
            f"one config cannot hold them")
    return Upcycled(tuple(routers), counts[routers[0]], top_ks.pop())


def _owners(node) -> list[str]:
    return [path for path, _ in node.meta.get("nn_module_stack", {}).values()]


def moe_target(like: torch.nn.Module, config, moe: Upcycled, layer_of: dict[str, int]):
    """(class, config) of the native mixture for ``like``'s family, with ``config``'s grown dense fields."""
    import transformers
    from transformers.models.auto import modeling_auto

    family = MOE_CLASSES.get(config.model_type)
    if family is None:
        raise NotRepresentableError(
            f"{type(like).__name__} has no mixture-of-experts class growfx writes to (known: "
            f"{', '.join(sorted(MOE_CLASSES))}): keep the graph form of the upcycled model")
    cls = _same_head(type(like), config.model_type, family.model_type, modeling_auto, transformers)
    dense = sorted(set(range(config.num_hidden_layers)) - {layer_of[mlp] for mlp in moe.mlps})
    if dense and family.dense_layers_field is None:
        raise NotRepresentableError(
            f"{cls.__name__} has experts in every layer, but layers {dense} stay dense: upcycle every layer "
            f"(layers=None) or keep the graph form")
    values = {key: value for key, value in config.to_dict().items()
              if key not in ("model_type", "architectures", "transformers_version")}
    values.update(family.fixed)
    values[family.experts_field] = moe.experts
    values["num_experts_per_tok"] = moe.top_k
    values[family.size_field] = config.intermediate_size
    if family.dense_layers_field is not None:
        values[family.dense_layers_field] = dense
    config_class = transformers.AutoConfig.for_model(family.model_type).__class__
    return cls, config_class.from_dict(values)


def _same_head(dense_class, dense_type: str, moe_type: str, modeling_auto, transformers):
    """The mixture family's class with the same head as ``dense_class`` (``LlamaForCausalLM`` ->
    ``MixtralForCausalLM``), looked up in transformers' auto mappings."""
    for name in dir(modeling_auto):
        mapping = getattr(modeling_auto, name)
        if name.endswith("_MAPPING_NAMES") and isinstance(mapping, dict) \
                and mapping.get(dense_type) == dense_class.__name__ and isinstance(mapping.get(moe_type), str):
            return getattr(transformers, mapping[moe_type])
    raise NotRepresentableError(f"{moe_type} has no class with the head of {dense_class.__name__}")


@dataclass(frozen=True)
class Piece:
    """How one tensor of the native mixture is made from the grown graph's tensors: ``rename``: the tensor
    ``names[0]`` as it is (the router); ``stack``: one slice per expert, expert ``e`` the rows of ``experts[e]``
    concatenated (``gate_up_proj[e] = cat(gate_proj, up_proj)``); ``zeros``: a part the mixture adds that the
    upcycled function does not use."""

    kind: str
    names: tuple[str, ...] = ()
    experts: tuple[tuple[str, ...], ...] = ()

    def sources(self) -> list[str]:
        """The grown graph's tensors this piece reads."""
        return [*self.names, *(name for parts in self.experts for name in parts)]

    def shape(self, shape_of, zeros_shape: tuple) -> tuple | None:
        """The shape :meth:`make` gives, with ``shape_of(name)`` a grown graph's tensor's shape (None where it
        has none, and then this is None); ``zeros_shape`` is the class's own, for zeros."""
        if self.kind == "zeros":
            return tuple(zeros_shape)
        shapes = {name: shape_of(name) for name in self.sources()}
        if None in shapes.values():
            return None
        if self.kind == "rename":
            return tuple(shapes[self.names[0]])
        first = [shapes[name] for name in self.experts[0]]
        return (len(self.experts), sum(shape[0] for shape in first), *first[0][1:])

    def make(self, get, shape, dtype: torch.dtype) -> torch.Tensor:
        """The tensor, with ``get(name)`` giving a grown graph's tensor: a stack is filled expert by expert
        into a tensor of ``shape`` and ``dtype``, so that one expert's parts are held beside it at a time."""
        if self.kind == "rename":
            return get(self.names[0])
        out = torch.zeros(shape, dtype=dtype) if self.kind == "zeros" else torch.empty(shape, dtype=dtype)
        for e, parts in enumerate(self.experts):
            out[e].copy_(torch.cat([get(name) for name in parts]))
        return out


def moe_pieces(names, moe: Upcycled, family: MoEClass, native_names) -> dict[str, Piece]:
    """The native mixture's tensors (``native_names``: its state dict's names) that are made of the grown
    graph's mixture tensors (``names``), each with its :class:`Piece`; the names outside the mixtures stay as
    they are. Raises ``NotRepresentableError`` when an expert is not gate/up/down projections without bias."""
    names = set(names)
    pieces = {}
    for mlp in moe.mlps:
        for name in native_names:
            if any(name.startswith(f"{mlp}.{part}") for part in family.zeroed):
                pieces[name] = Piece("zeros")
        experts = range(moe.experts)
        extra = sorted(name for name in names if name.startswith(f"{mlp}.experts.")
                       and _EXPERT.match(name)["rest"] not in ("gate_proj.weight", "up_proj.weight", "down_proj.weight"))
        missing = [f"{mlp}.experts.{e}.{part}_proj.weight" for e in experts for part in ("gate", "up", "down")
                   if f"{mlp}.experts.{e}.{part}_proj.weight" not in names]
        if extra or missing:
            raise NotRepresentableError(
                f"the experts of {mlp} are not gate/up/down projections without bias "
                f"({', '.join((extra or missing)[:2])}): the mixture class cannot hold them")
        expert = lambda e, *parts: tuple(f"{mlp}.experts.{e}.{part}_proj.weight" for part in parts)  # noqa: E731
        pieces[f"{mlp}.gate.weight"] = Piece("rename", (f"{mlp}.router.weight",))
        pieces[f"{mlp}.experts.gate_up_proj"] = Piece("stack",
                                                      experts=tuple(expert(e, "gate", "up") for e in experts))
        pieces[f"{mlp}.experts.down_proj"] = Piece("stack", experts=tuple(expert(e, "down") for e in experts))
    return pieces


def in_mixture(name: str, moe: Upcycled) -> bool:
    """True for a grown graph's tensor inside one of the mixtures (written as a :class:`Piece` of one)."""
    return any(name.startswith(f"{mlp}.") for mlp in moe.mlps)


def moe_tensors(tensors: dict[str, torch.Tensor], moe: Upcycled, family: MoEClass,
                native: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The grown graph's tensors under the names of the native mixture (whose state dict is ``native``):
    experts stacked, router renamed, the parts the family adds (``MoEClass.zeroed``) zero."""
    out = {name: t for name, t in tensors.items() if not in_mixture(name, moe)}
    for name, piece in moe_pieces(tensors, moe, family, native).items():
        out[name] = piece.make(tensors.__getitem__, native[name].shape, native[name].dtype)
    return out
