"""A device that is not the CPU, for a suite that has only a CPU: catches the mistakes CUDA would catch.

``meta`` does not catch device mistakes (its kernels accept CPU operands, and growfx short-cuts meta tensors).
Here a tensor on the ``pretend`` device keeps its values in a CPU tensor but says it lives elsewhere
(``x.device == torch.device("pretend", 0)``; PyTorch's PrivateUse1 backend, renamed, with a Python device guard
so autograd, slicing and optimizers run). Every aten op that touches one goes through :func:`_run`, which
raises where CUDA raises:

* a CPU tensor with one or more dimensions meets a pretend tensor in an op (0-d CPU tensors pass: CUDA takes them
  as scalars); ``copy_``/``_to_copy`` (moving between devices) and advanced indexing (``aten.index``,
  ``index_put_``: CUDA accepts CPU index tensors there) are allowed;
* a CPU ``torch.Generator`` fills a pretend tensor (``randn(..., device=pretend, generator=cpu)``, ``normal_``);
* a factory asked for the pretend device makes one (``torch.zeros(.., device=x.device)``), on the CPU inside.

Factories reach :func:`_run` through a fallback kernel for the device's dispatch key, so it works on every
thread, as a device does. ``to_pretend(x)`` moves a tensor, a state dict or a module onto the device.
``SYNCS`` counts host synchronisations (``.item()``, ``.tolist()``, ``nonzero``, a device-to-CPU copy) and
indexings by a boolean mask, for code that must do neither every step. Its RNG state
(``torch.pretend.get_rng_state``) is a CPU generator of its own.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten, tree_map

NAME = "pretend"
aten = torch.ops.aten

# ops that may take CPU tensors beside device ones, as on CUDA
ALLOWED_MIXED = {aten.copy_.default, aten._to_copy.default, aten.index.Tensor, aten.index_put_.default,
                 aten.index_put.default, aten._index_put_impl_.default, aten._has_compatible_shallow_copy_type.default,
                 aten.set_.source_Tensor, aten.lift_fresh.default, aten.detach.default, aten.alias.default}
SYNCING = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default, aten.nonzero.default}
MASK_INDEXING = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}


class DeviceMismatch(RuntimeError):
    """What CUDA would raise: ``Expected all tensors to be on the same device``."""


class _Counter:
    def __init__(self):
        self.count = 0
        self.masked = 0  # indexing by a boolean mask: an index tensor materialised (and, on a GPU, a sync)


SYNCS = _Counter()


class _Backend:
    """``torch.pretend``: what PyTorch asks a device module for, and an RNG state of its own."""

    def __init__(self):
        self.generator = torch.Generator().manual_seed(0)

    def is_initialized(self) -> bool:
        return True

    def is_available(self) -> bool:
        return False  # not an accelerator the rest of the session should use (DCP would take its streams)

    def current_device(self) -> int:
        return 0

    def device_count(self) -> int:
        return 1

    def _is_in_bad_fork(self) -> bool:
        return False

    def manual_seed_all(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def manual_seed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def get_rng_state(self, device=None) -> torch.Tensor:
        return self.generator.get_state()

    def set_rng_state(self, state: torch.Tensor, device=None) -> None:
        self.generator.set_state(state)


class _Guard(torch._C._acc.DeviceGuard):
    """One device (autograd starts a thread per device it counts)."""

    def type_(self):
        return torch._C._autograd.DeviceType.PrivateUse1

    def device_count(self) -> int:
        return 1


class _Hooks(torch._C._acc.PrivateUse1Hooks):
    def is_available(self) -> bool:
        return False

    def has_primary_context(self, index) -> bool:
        return True

    def is_built(self) -> bool:
        return True

    def device_count(self) -> int:
        return 1


_installed = False


def install() -> None:
    """Rename PrivateUse1 to ``pretend`` and give it a device guard (once a process; the renaming is for good)."""
    global _installed
    if _installed:
        return
    from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

    if torch._C._get_privateuse1_backend_name() != NAME:
        _setup_privateuseone_for_python_backend(NAME, backend_module=_Backend(), hook=_Hooks(), device_guard=_Guard())
        _LIBRARY.fallback(lambda op, *args, **kwargs: _run(op, args, kwargs), "PrivateUse1")
        for name in SIZED_BY_THEIR_ARGUMENTS:  # else they decompose into empty + an out= op that resizes
            op = getattr(aten, name.split(".")[0]).__getattr__(name.split(".")[1] if "." in name else "default")
            _ATEN.impl(name, lambda *args, _op=op, **kwargs: _run(_op, args, kwargs), "PrivateUse1")
    _installed = True


_LIBRARY = torch.library.Library("_", "IMPL")  # factories asked for the device (no tensor argument) land here
_ATEN = torch.library.Library("aten", "IMPL")
SIZED_BY_THEIR_ARGUMENTS = ("arange", "arange.start", "arange.start_step", "linspace", "randperm")


def device() -> torch.device:
    install()
    return torch.device(NAME, 0)


class Pretend(torch.Tensor):
    """A tensor whose values are the CPU tensor ``inner`` and whose device is ``pretend:0``."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        install()
        out = torch.Tensor._make_wrapper_subclass(cls, inner.shape, strides=inner.stride(),
                                                  storage_offset=inner.storage_offset(), dtype=inner.dtype,
                                                  device=device(), requires_grad=inner.requires_grad)
        out.inner = inner
        return out

    def __repr__(self):
        return f"Pretend({self.inner!r})"

    def __tensor_flatten__(self):
        return ["inner"], None

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return Pretend(inner["inner"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def _on_pretend(value) -> bool:
    return isinstance(value, torch.device) and value.type == NAME or isinstance(value, str) and value.startswith(NAME)


def _run(func, args, kwargs):
    leaves, _ = tree_flatten((args, kwargs))
    pretend = any(isinstance(x, Pretend) for x in leaves)
    wanted = _on_pretend(kwargs.get("device"))
    if func in SYNCING and pretend:
        SYNCS.count += 1
    if func in MASK_INDEXING and pretend and any(isinstance(x, torch.Tensor) and x.dtype == torch.bool
                                                  for x in leaves[1:]):
        SYNCS.masked += 1
    if func is aten._to_copy.default and pretend and not wanted and kwargs.get("device") is not None:
        SYNCS.count += 1  # to the CPU
    if (pretend or wanted) and func not in ALLOWED_MIXED:
        cpu = [x for x in leaves if isinstance(x, torch.Tensor) and not isinstance(x, Pretend)
               and x.device.type == "cpu" and x.dim() > 0]
        if cpu:
            raise DeviceMismatch(f"{func}: a CPU tensor of shape {tuple(cpu[0].shape)} meets a tensor on the "
                                 f"{NAME} device (CUDA raises: Expected all tensors to be on the same device)")
        generator = kwargs.get("generator")
        if generator is not None and generator.device.type == "cpu":
            raise DeviceMismatch(f"{func}: a CPU generator fills a tensor on the {NAME} device (CUDA raises: "
                                 f"Expected a 'cuda' device type for generator)")
    if func is aten._to_copy.default and wanted:  # onto the device: a copy on the CPU, wrapped
        inner_kwargs = dict(kwargs, device=torch.device("cpu"))
        source = args[0].inner if isinstance(args[0], Pretend) else args[0]
        return Pretend(func(source, *args[1:], **inner_kwargs))
    unwrapped_kwargs = dict(kwargs)
    if wanted:
        unwrapped_kwargs["device"] = torch.device("cpu")
    if func is aten._to_copy.default and pretend and kwargs.get("device") is not None and not wanted:
        return func(*tree_map(_inner, args), **unwrapped_kwargs)  # off the device: a plain CPU tensor
    out = func(*tree_map(_inner, args), **tree_map(_inner, unwrapped_kwargs))
    if not (pretend or wanted):
        return out
    if func is aten.copy_.default and not isinstance(args[0], Pretend):
        return out  # a device tensor copied into a CPU one
    if func is aten._local_scalar_dense.default or func is aten.equal.default:
        return out
    return tree_map(_wrap, out)


def _inner(x):
    return x.inner if isinstance(x, Pretend) else x


def _wrap(x):
    return Pretend(x) if isinstance(x, torch.Tensor) and not isinstance(x, Pretend) else x


def to_pretend(x):
    """A tensor, a state dict or a module's parameters and buffers moved onto the pretend device."""
    if isinstance(x, torch.nn.Module):
        moved: dict[int, torch.Tensor] = {}  # tied tensors stay tied
        with torch.no_grad():
            for module in x.modules():
                for slots in (module._parameters, module._buffers):
                    for name, t in list(slots.items()):
                        if t is None or isinstance(t, Pretend):
                            continue
                        if id(t) not in moved:
                            inner = Pretend(t.detach().clone())
                            moved[id(t)] = (torch.nn.Parameter(inner, t.requires_grad)
                                            if isinstance(t, torch.nn.Parameter) else inner)
                        slots[name] = moved[id(t)]
                for name, t in list(vars(module).items()):  # constants a tracer lifted (a causal mask)
                    if isinstance(t, torch.Tensor) and not isinstance(t, Pretend) and not name.startswith("_"):
                        setattr(module, name, Pretend(t.detach().clone()))
        return x
    if isinstance(x, dict):
        return {k: to_pretend(v) for k, v in x.items()}
    if isinstance(x, torch.Tensor):
        return Pretend(x.detach().clone()) if x.device.type == "cpu" else x
    return x


def to_cpu(x):
    """What ``to_pretend`` moved, back on the CPU (plain tensors)."""
    if isinstance(x, dict):
        return {k: to_cpu(v) for k, v in x.items()}
    if isinstance(x, Pretend):
        return x.inner.clone()
    return x


class counting_syncs:
    """``with counting_syncs() as syncs``: ``syncs.count`` host synchronisations on the pretend device so far."""

    def __enter__(self):
        self.start, self.start_masked = SYNCS.count, SYNCS.masked
        return self

    def __exit__(self, *exc):
        return False

    @property
    def count(self) -> int:
        return SYNCS.count - self.start

    @property
    def masked(self) -> int:
        """Boolean-mask indexings (each materialises an index tensor) so far."""
        return SYNCS.masked - self.start_masked


install()  # before any backward pass of the process: autograd counts each device's threads once, at the first
