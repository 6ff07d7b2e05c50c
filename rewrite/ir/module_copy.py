"""``copy.deepcopy`` of a module tree, without the generic machinery for the parts every module has.

A deep copy of a module goes through ``__reduce_ex__`` for the module and for each of its dozen dictionaries
(parameters, buffers, submodules, hooks), most of them empty: 7 ms for a 12-layer model's 138 modules, a
third of copying its GraphModule, and most of a rule's copy of an MLP for each of eight experts.
:func:`copied` builds what ``deepcopy`` builds for a plain ``nn.Module`` subclass (the class's ``__new__``,
the state ``Module.__getstate__`` gives, deep-copied with the same ``memo``, then ``__setstate__``), copying
directly: the parameter, buffer and submodule dictionaries entry by entry (tensors through ``memo``, as
``deepcopy`` would take them), empty containers as new empty ones, immutable values as they are, and
anything else with ``copy.deepcopy`` and the same ``memo``. A module whose class copies or pickles itself in
its own way (``__deepcopy__``, ``__reduce_ex__``, ``__getstate__``, ``__setstate__``, ``__slots__``) is
copied by ``copy.deepcopy``.
"""

from __future__ import annotations

import copy
import enum
import types
import weakref
from collections import OrderedDict

import torch

_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.memory_format,
              torch.layout, enum.Enum, type, types.FunctionType, types.BuiltinFunctionType)
_CONTAINERS = ("_parameters", "_buffers", "_modules")
_EMPTY = (dict, OrderedDict, set, list)


def copied(module: torch.nn.Module, memo: dict) -> torch.nn.Module:
    """``copy.deepcopy(module, memo)`` (see the module docstring)."""
    if id(module) in memo:
        return memo[id(module)]
    cls = type(module)
    if not _plain(cls):
        return copy.deepcopy(module, memo)
    new = cls.__new__(cls)
    memo[id(module)] = new
    memo.setdefault(id(memo), []).append(module)  # kept alive while ``memo`` is, as ``deepcopy`` does
    state = {}
    for key, value in module.__getstate__().items():
        if key in _CONTAINERS and type(value) is dict:
            state[key] = {name: _entry(item, memo) for name, item in value.items()}
        elif isinstance(value, _IMMUTABLE):
            state[key] = value
        elif type(value) in _EMPTY and not value:
            state[key] = type(value)()
        else:
            state[key] = copy.deepcopy(value, memo)
    new.__setstate__(state)
    return new


def _entry(value, memo: dict):
    if value is None:
        return None
    if isinstance(value, torch.nn.Module):
        return copied(value, memo)
    return copy.deepcopy(value, memo)


_PLAIN: "weakref.WeakKeyDictionary[type, bool]" = weakref.WeakKeyDictionary()  # a GraphModule's class is its own


def _plain(cls: type) -> bool:
    """True when ``cls`` copies as ``nn.Module`` does: no copy or pickle method of its own, no slots."""
    if cls not in _PLAIN:
        module = torch.nn.Module
        _PLAIN[cls] = (
            getattr(cls, "__deepcopy__", None) is None
            and cls.__reduce_ex__ is object.__reduce_ex__ and cls.__reduce__ is object.__reduce__
            and cls.__getstate__ is module.__getstate__ and cls.__setstate__ is module.__setstate__
            and not any("__slots__" in vars(base) for base in cls.__mro__)
        )
    return _PLAIN[cls]


__all__ = ["copied"]
