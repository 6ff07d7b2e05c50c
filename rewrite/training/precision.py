"""Where training runs: the dtype it computes in, how close two of its losses must be, and its RNG state.

* :func:`compute_dtype`: autocast's dtype when autocast is on for the model's device, else the narrowest
  floating dtype of its parameters (a bfloat16 model computes in bfloat16, whatever its norms keep).
* :func:`same_loss`: whether a loss stayed what it was, to the tolerance of that dtype (one table for every
  check growfx makes: ``rewrite.ir.compare.TOLERANCES``; float32 under TF32 matmuls is looser);
  :func:`check_kept` raises when an exact growth moved it further.
* :func:`rng_state` / :func:`set_rng_state`: the CPU's generator and the default generator of every other
  device the model lives on (``torch.get_device_module(type).get_rng_state``), so dropout on a GPU resumes
  bit-identical too.
"""

from __future__ import annotations

import contextlib

import torch

from rewrite.errors import GrowthError
from rewrite.ir.compare import default_tolerance


def devices_of(model: torch.nn.Module) -> list[torch.device]:
    """The devices other than the CPU (and meta) the model's parameters and buffers live on, in order."""
    seen: dict[str, torch.device] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.device.type not in ("cpu", "meta"):
            seen.setdefault(str(tensor.device), tensor.device)
    return list(seen.values())


def device_type(model: torch.nn.Module) -> str:
    """The device type the model computes on (``cpu`` for a model on the CPU)."""
    devices = devices_of(model)
    return devices[0].type if devices else "cpu"


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype the model's matrix products run in (see the module docstring)."""
    where = device_type(model)
    if torch.amp.is_autocast_available(where) and torch.is_autocast_enabled(where):
        return torch.get_autocast_dtype(where)
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    return min(floats, key=lambda d: torch.finfo(d).bits) if floats else torch.float32


def same_loss(before: float, after: float, dtype: torch.dtype) -> bool:
    """Whether ``after`` is ``before`` to the tolerance of ``dtype`` (relative to ``max(1, |before|)``)."""
    rtol, atol = default_tolerance(dtype)
    return abs(after - before) <= atol + rtol * max(1.0, abs(before))


def check_kept(stage: int, exact: bool, before: float, after: float, dtype: torch.dtype) -> None:
    """``GrowthError`` when stage ``stage``, planned ``exact``, moved the fixed-batch loss from ``before`` to
    ``after`` by more than ``dtype``'s rounding (what both trainers check after a growth)."""
    if exact and not same_loss(before, after, dtype):
        raise GrowthError(f"stage {stage} was planned exact but moved the loss on the fixed batch from "
                          f"{before:.6g} to {after:.6g} (more than {str(dtype).removeprefix('torch.')} rounding)")


def autocast(model: torch.nn.Module, dtype: torch.dtype | None):
    """``torch.autocast`` on the model's device type in ``dtype``; nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type(model), dtype=dtype)


def rng_state(model: torch.nn.Module) -> dict:
    """The CPU's RNG state and that of every device the model lives on."""
    return {"cpu": torch.get_rng_state(),
            "devices": {str(d): torch.get_device_module(d.type).get_rng_state(d) for d in devices_of(model)}}


def set_rng_state(state) -> None:
    """Restore what :func:`rng_state` saved (a bare tensor: a checkpoint that saved the CPU's only)."""
    if torch.is_tensor(state):
        torch.set_rng_state(state)
        return
    torch.set_rng_state(state["cpu"])
    for name, value in state["devices"].items():
        where = torch.device(name)
        torch.get_device_module(where.type).set_rng_state(value, where)
