"""A GraphModule's Python code generated when it is first used, not after every edit.

``GraphModule.recompile`` writes Python source for the whole graph and compiles it: about 0.2 s on an 80-layer
model. Tracing calls it four times inside ``ExportedProgram.module()`` and a growth once per pass and rule, yet
the intermediate graphs of a plan never run, and a plan on the ``meta`` device does not run its last one either.

``compile_on_first_use(module)`` leaves the code to be generated the first time the module is called or its
``code`` is read, and then it is exactly what ``recompile`` would have written. Until then:

* ``inspect.signature(module.forward)`` answers with the signature the code will have, read off the graph;
* ``_in_spec``/``_out_spec``, which export's input checks read before ``forward``, are set as ``recompile``
  would set them;
* ``GraphModule.recompile`` itself still works and makes the module current.

Each GraphModule has a class of its own (``GraphModule.__new__``), so the stand-ins set on that class concern
that module alone.
"""

from __future__ import annotations

import contextlib
import inspect
import threading

import torch.fx
from torch.fx.graph import _PyTreeCodeGen


def _first_use(signature: inspect.Signature):
    """A class's ``forward`` until the code exists: makes it, then runs it."""

    def forward(self, *args, **kwargs):
        compile_now(self)
        return self.forward(*args, **kwargs)

    forward.__signature__ = signature  # what inspect.signature reads; unbound, so ``self`` first
    forward._growfx_first_use = True
    return forward


class _CodeOnRead:
    """The class's ``_code`` until the code exists (``GraphModule.code`` and ``__str__`` read it): makes it.
    ``recompile`` writes ``_code`` through it into the instance, where it is read from once the code is made."""

    def __get__(self, module, owner=None):
        if module is None:
            return self
        compile_now(module)
        return module.__dict__["_code"]

    def __set__(self, module, value) -> None:
        module.__dict__["_code"] = value


def compile_on_first_use(module: torch.fx.GraphModule) -> None:
    """Instead of ``module.recompile()`` after an edit: the code is made when first needed (module docstring)."""
    own = type(module)
    own.forward = _first_use(_signature_to_be(module))
    own._code = _CodeOnRead()
    _set_specs(module)


def compile_now(module: torch.fx.GraphModule) -> None:
    """Make the code of a module left by :func:`compile_on_first_use` (nothing when it is current)."""
    if not is_pending(module):
        return
    own = type(module)
    del own.forward
    del own._code
    recompile = own.recompile
    (_RECOMPILE if recompile is compile_on_first_use else recompile)(module)


def copy_code(module: torch.fx.GraphModule, copy_: torch.fx.GraphModule) -> None:
    """``copy_``, a copy of ``module`` with the same graph, runs ``module``'s code: its compiled ``forward`` (and
    what ``recompile`` stores beside it), or, while that is pending, the same promise of it."""
    own = type(copy_)
    own.forward = vars(type(module))["forward"]
    if is_pending(module):
        own._code = _CodeOnRead()
    for name in ("_code", "_lineno_map", "_prologue_start"):
        if name in vars(module):
            copy_.__dict__[name] = vars(module)[name]
    _set_specs(copy_)


def _set_specs(module: torch.fx.GraphModule) -> None:
    """``_in_spec``/``_out_spec`` as ``recompile`` sets them for an exported graph: its code and export's input
    pre-hook read them."""
    codegen = module.graph._codegen
    if isinstance(codegen, _PyTreeCodeGen):
        module._in_spec = codegen.pytree_info.in_spec
        module._out_spec = codegen.pytree_info.out_spec


def is_pending(module: torch.nn.Module) -> bool:
    """True while ``module``'s code waits to be made."""
    return getattr(vars(type(module)).get("forward"), "_growfx_first_use", False)


def _signature_to_be(module: torch.fx.GraphModule) -> inspect.Signature:
    """The signature ``recompile`` gives ``forward`` (without annotations), read off the graph: an exported
    graph's code takes the original forward's argument names (``_PyTreeCodeGen.gen_fn_def``); the plain code
    takes one argument per placeholder, ``*name`` and ``**name`` included, with the placeholder's default."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    codegen = module.graph._codegen
    if isinstance(codegen, _PyTreeCodeGen) and codegen.pytree_info is not None:
        names = [name for name in codegen.pytree_info.orig_args if name != "self"]
        return inspect.Signature([inspect.Parameter(name, kind) for name in ("self", *names)])
    parameters = [inspect.Parameter("self", kind)]
    for node in module.graph.find_nodes(op="placeholder"):
        target = str(node.target)
        if target.startswith("**"):
            parameters.append(inspect.Parameter(target[2:], inspect.Parameter.VAR_KEYWORD))
        elif target.startswith("*"):
            parameters.append(inspect.Parameter(target[1:], inspect.Parameter.VAR_POSITIONAL))
            kind = inspect.Parameter.KEYWORD_ONLY
        else:
            default = node.args[0] if node.args else inspect.Parameter.empty
            parameters.append(inspect.Parameter(target, kind, default=default))
    return inspect.Signature(parameters)


_RECOMPILE = torch.fx.GraphModule.recompile
_DEFERRING = threading.RLock()
_depth = 0  # recompiles_deferred entered, not yet left (it nests: a trace inside an export)


@contextlib.contextmanager
def recompiles_deferred():
    """Within: ``GraphModule.recompile`` is :func:`compile_on_first_use`, for every GraphModule. For torch code
    that rewrites a graph in several passes, each ending with a recompile, and runs the graph seldom or never
    (``torch.export.export``: six times; ``ExportedProgram.module()``: four); a module it does run makes its
    code then. Other threads wait to enter."""
    global _depth
    with _DEFERRING:
        _depth += 1
        torch.fx.GraphModule.recompile = compile_on_first_use
        try:
            yield
        finally:
            _depth -= 1
            if _depth == 0:
                torch.fx.GraphModule.recompile = _RECOMPILE
