"""Grow inside a running FSDP2 job, without a checkpoint: ``grow_online(model, optimizer, passes)``.

Called on every process of the job with its sharded model and optimizer, between two steps:

1. **Plan** on ``meta`` from the model's config (``plan_native``): the growth map and the grown config.
2. **Build** the grown class with its parameters on ``meta`` and shard it the way ``resume`` does
   (``rewrite.training.fsdp.sharded``): every process allocates only its shards.
3. **Weights**, one tensor at a time, in the same order on every process: the source parameters a grown
   tensor is made from are gathered (``DTensor.full_tensor``, an all-gather), the grown tensor is made through
   the map, and each process keeps its own shard of it (``distribute_tensor`` without communication: every
   process holds the same full tensor).
4. **Optimizer state** the same way, through ``carry_optimizer``'s rules (``plan_state``, ``carry_field``):
   moments gathered, carried, and sharded like their parameter; ``step`` kept; a parameter with nothing to
   carry starts with no state. The new optimizer has the old one's class, hyperparameters and groups (each
   grown parameter in its source's group).

The original model and optimizer are only read. Peak memory per process: both sharded models and states, and
one full tensor with its sources. The result is the same as saving a checkpoint, growing it offline and
resuming (``tests/test_fsdp_growth.py`` checks both against the in-memory growth).
"""

from __future__ import annotations

import warnings

import torch

from rewrite.errors import GrowfxError
from rewrite.io.grow_checkpoint import NativePlan, meta_inputs, plan_native
from rewrite.ir.trace import trace
from rewrite.training.carry import (carry_field, check_optimizer, check_policy, constructor_defaults,
                                    grown_param_groups, source_state)
from rewrite.training.fsdp import empty_model, shard_layers, sharded


def grow_online(model: torch.nn.Module, optimizer: torch.optim.Optimizer, passes: list, *, policy: str = "mapped",
                copies: str = "fresh", shard=shard_layers, device: str | torch.device | None = None):
    """(grown model, its optimizer, the plan): ``model`` (sharded with FSDP2) and ``optimizer`` grown by
    ``passes`` on every process of the default group, between two training steps (the parameters sharded, not
    gathered for a forward; see the module docstring). The grown shards go on ``device``: by default where the
    model's own shards are."""
    import torch.distributed as dist

    check_optimizer(optimizer)
    check_policy(policy, copies)
    if not dist.is_initialized():
        raise GrowfxError("grow_online runs on a process group: call it on every process of the FSDP2 job")
    config = getattr(model, "config", None)
    if config is None:
        raise GrowfxError(f"{type(model).__name__} has no Hugging Face config to plan the growth from")
    mesh = _mesh_of(model)
    with torch.device("meta"):
        original = _unsharded_class(model)(config).eval()
    args, kwargs = meta_inputs(original)
    plan = plan_native(trace(original, args, kwargs), original, passes, args, kwargs)
    plan.refuse_mixture("growing a running FSDP2 job")
    device = device if device is not None else next(model.parameters()).device
    grown = sharded(empty_model(plan.config), mesh, shard, device)
    old = dict(model.named_parameters(remove_duplicate=False))
    old.update(model.named_buffers())
    _weights(plan, old, grown)
    return grown, _optimizer(plan, model, optimizer, grown, policy, copies), plan


def _unsharded_class(model: torch.nn.Module) -> type:
    """The model's own class: ``fully_shard`` swaps in a subclass that also derives from ``FSDPModule``."""
    from torch.distributed.fsdp import FSDPModule

    return next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule))


def _mesh_of(model: torch.nn.Module):
    for parameter in model.parameters():
        if hasattr(parameter, "device_mesh"):
            return parameter.device_mesh
    raise GrowfxError(f"{type(model).__name__}'s parameters are not sharded (no DTensor): wrap it with "
                      f"fully_shard first, or grow it in memory with rewrite.apply")


class _Gathered:
    """The original's tensors by name, each gathered whole when a recipe reads it."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        return _full(self.tensors[name])


def _full(value: torch.Tensor) -> torch.Tensor:
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def _into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the whole tensor ``full`` into ``target``: its own shard when ``target`` is a DTensor."""
    with torch.no_grad():
        if hasattr(target, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            mine = distribute_tensor(full.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None)
            target.to_local().copy_(mine.to_local())
        else:
            target.copy_(full)


def _weights(plan: NativePlan, old: dict, grown: torch.nn.Module) -> None:
    sources = _Gathered(old)
    targets = dict(grown.named_parameters(remove_duplicate=False))
    targets.update(grown.named_buffers())
    for name in grown.state_dict():  # each has a recipe of its shape (plan_native)
        _into(targets[name], plan.grown.map.make(name, sources).to(targets[name].dtype))


def _optimizer(plan: NativePlan, model, optimizer, grown, policy: str, copies: str):
    growth = plan.grown.map
    old_names = {id(p): n for n, p in model.named_parameters()}
    groups = grown_param_groups(optimizer, growth, grown, old_names)
    new = type(optimizer)(groups, **constructor_defaults(optimizer))
    if policy == "reset":
        return new
    by_name = dict(model.named_parameters())
    for name, parameter in grown.named_parameters():  # the same order on every process: the gathers match
        shape = tuple(parameter.shape)
        state, kinds, refused = source_state(optimizer, growth, name, shape, by_name, policy, copies)
        if refused is not None:
            warnings.warn(f"grow_online reset {refused[0]} of {name}: {refused[1]}", stacklevel=3)
        if kinds is None:
            continue  # no state to carry: it starts as Adam does, and counts its own steps
        carried = {}
        for field, kind in kinds.items():
            value = state[field]
            if not hasattr(value, "device_mesh"):  # step, and anything not sharded: as carry makes it
                carried[field] = carry_field(growth, name, value, kind, shape)
                continue
            made = carry_field(growth, name, value.full_tensor(), kind, shape)
            if tuple(made.shape) != shape:
                raise GrowfxError(f"{field} of {name} is {tuple(made.shape)}, not its parameter's shape {shape}: "
                                  f"a sharded statistic of another shape is not carried online")
            carried[field] = torch.empty_like(parameter.detach(), dtype=made.dtype)
            _into(carried[field], made)
        new.state[parameter] = carried
    return new
