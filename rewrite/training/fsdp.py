"""Resume a grown distributed checkpoint under FSDP2, on any number of processes: PyTorch's own flow.

``resume(folder, optimizer)`` does what an FSDP2 training script does to load a checkpoint, for the grown
model, on the default process group:

1. build the grown class from ``folder/config.json`` (written by ``grow_distributed_checkpoint``) with its
   parameters on ``meta`` and its buffers computed (:func:`empty_model`: a non-persistent buffer such as a
   rotary table is made by the module's constructor, which is never in a checkpoint);
2. ``fully_shard`` every layer (the classes in the model's ``_no_split_modules``) and the root, on a 1-d
   device mesh over all processes;
3. ``to_empty`` (each process allocates its shards only), the computed buffers put back, tied weights tied;
4. the optimizer built on the sharded parameters, ``get_state_dict``, ``dcp.load`` (DCP reshards from the
   checkpoint's row chunks to this world size; through ``rewrite.io.dcp_files``' safe reader),
   ``set_state_dict``.

For a script of your own, do the same steps with your model, sharding and optimizer; only step 1's buffers
and tied weights need care.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rewrite.errors import GrowfxError
from rewrite.io.dcp_files import SafeLoadPlanner, SafeReader
from rewrite.io.grow_checkpoint import meta_model, parameters_on_meta


def empty_model(config, where: str = "the config") -> torch.nn.Module:
    """The model class a Hugging Face ``config`` names, its parameters on ``meta``, its buffers computed."""
    with parameters_on_meta():
        return meta_model(config, where, device=None)


def folder_config(folder: str | Path):
    """The Hugging Face config in ``folder/config.json``."""
    import transformers

    if not (Path(folder) / "config.json").is_file():
        raise GrowfxError(f"{folder} has no config.json: pass the model (built on meta) to resume")
    return transformers.AutoConfig.from_pretrained(folder, local_files_only=True)


def shard_layers(model: torch.nn.Module, mesh) -> torch.nn.Module:
    """``fully_shard`` each layer (the module classes the model names in ``_no_split_modules``, as Hugging
    Face models do) and then the root."""
    from torch.distributed.fsdp import fully_shard

    layers = set(getattr(model, "_no_split_modules", None) or ())
    if not layers:
        raise GrowfxError(f"{type(model).__name__} names no layer classes (_no_split_modules): pass shard= to "
                          f"resume")
    for module in model.modules():
        if type(module).__name__ in layers:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def sharded(model: torch.nn.Module, mesh, shard=shard_layers, device: str = "cpu") -> torch.nn.Module:
    """Steps 2-3 of the module docstring on ``model`` (parameters on ``meta``, buffers computed): sharded,
    each process's shards allocated (uninitialised), computed buffers put back, tied weights tied; in
    training mode."""
    computed = [(module, name, buffer) for module in model.modules() for name, buffer in module._buffers.items()
                if buffer is not None and name in module._non_persistent_buffers_set]
    shard(model, mesh)
    model.to_empty(device=device)
    for module, name, buffer in computed:
        module._buffers[name] = buffer.to(device)
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.train()


def resume(folder: str | Path, optimizer, *, model: torch.nn.Module | None = None, mesh=None,
           shard=shard_layers, device: str = "cpu", model_key: str = "model", optim_key: str = "optim"):
    """The sharded grown model and its optimizer loaded from the DCP checkpoint ``folder`` on the default
    process group (see the module docstring). ``optimizer``: parameters -> optimizer (the same class and
    hyperparameters the checkpoint's state is for); ``model``: the grown model built on ``meta`` (default: from
    ``folder/config.json``)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise GrowfxError("resume runs on a process group: call torch.distributed.init_process_group first")
    model = empty_model(folder_config(folder), f"{folder}/config.json") if model is None else model
    sharded(model, mesh if mesh is not None else init_device_mesh(device, (dist.get_world_size(),)), shard, device)
    optim = optimizer(model.parameters())
    model_state, optim_state = get_state_dict(model, optim)
    dcp.load({model_key: model_state, optim_key: optim_state}, storage_reader=SafeReader(folder),
             planner=SafeLoadPlanner())
    set_state_dict(model, optim, model_state_dict=model_state, optim_state_dict=optim_state)
    return model, optim
