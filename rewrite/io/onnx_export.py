"""Export a module or Graph to ONNX and check the file in onnxruntime against torch.

`export_onnx` uses the dynamo exporter (opset 18+, with ``rewrite.io.onnx_ops`` for the ops it cannot
translate, such as the grouped matrix product of Hugging Face's default experts), writes one self-contained file when the weights fit
under protobuf's 2 GB limit (external data beside it otherwise), writes atomically (a temp file renamed
into place), runs ``onnx.checker``, and compares onnxruntime with torch on the example inputs and, with
``dynamic=True``, on a second shape in which every symbolic axis of the file is one longer (inputs are
tiled along those axes, so token ids stay in the vocabulary and masks stay masks).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from rewrite.errors import GrowfxError, InputError
from rewrite.ir.frontends import accepted_kwargs, auto_dynamic_shapes, eval_mode, first_line
from rewrite.io.onnx_ops import translations
from rewrite.ir.compare import compare_outputs
from rewrite.verification.verify import Report

PROTOBUF_LIMIT = 2 * 1024**3
# Above this many bytes of weights the onnxscript graph optimizer is skipped: on a 227M-parameter model it
# takes most of a minute on two cores, and the unoptimised graph computes the same (checked below).
OPTIMIZE_LIMIT = 256 * 1024**2


class OnnxModel:
    """An ONNX file in onnxruntime, called like the torch module it came from.

    Tensor inputs are matched to the file's inputs by keyword name where the names agree, the rest in
    order; non-tensor inputs (flags the exporter fixed as constants) are ignored. With ``like`` (an
    output of the torch module), outputs come back in that structure, e.g. a ``ModelOutput`` or
    ``(logits, None)``: the file's outputs fill its tensor leaves, its other leaves are kept.
    """

    def __init__(self, path: str | os.PathLike, like: Any = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.like = pytree.tree_flatten(like) if like is not None else None

    def match(self, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        """The file's input names, each with the tensor of the call that feeds it."""
        named = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor) and k in self.input_names}
        rest = [
            leaf
            for leaf in pytree.tree_leaves((args, {k: v for k, v in kwargs.items() if k not in named}))
            if isinstance(leaf, torch.Tensor)
        ]
        free = [n for n in self.input_names if n not in named]
        if len(rest) != len(free):
            raise InputError(
                f"{self.path.name} takes inputs {self.input_names}; got {len(named) + len(rest)} tensors"
            )
        named.update(zip(free, rest))
        return named

    def feed(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        return {name: t.detach().cpu().numpy() for name, t in self.match(args, kwargs).items()}

    def __call__(self, *args, **kwargs):
        outputs = [torch.from_numpy(o) for o in self.session.run(None, self.feed(args, kwargs))]
        if self.like is not None:  # the file returns the tensor leaves; None, ints and flags stay as they were
            leaves, spec = self.like
            if sum(isinstance(leaf, torch.Tensor) for leaf in leaves) == len(outputs):
                produced = iter(outputs)
                return pytree.tree_unflatten(
                    [next(produced) if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves], spec)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def export_onnx(
    module, args=(), path: str | os.PathLike = "model.onnx", kwargs: dict | None = None, *, dynamic: bool = True
) -> Report:
    """Export ``module`` (an ``nn.Module``, ``GraphModule`` or :class:`rewrite.Graph`) to ``path``.

    Returns the comparison of onnxruntime against torch; ``report.path`` is the file written.
    """
    from rewrite.ir.graph import Graph

    if not isinstance(args, tuple):
        args = (args,)
    kwargs = dict(kwargs or {})
    if isinstance(module, Graph):
        args, kwargs = module.call_inputs(args, kwargs)
        fn, name = module.module, module.source_class
    elif isinstance(module, torch.nn.Module):
        kwargs = {**accepted_kwargs(module, kwargs), **kwargs}
        fn, name = module, type(module).__name__
    else:
        raise GrowfxError(f"export_onnx expects a torch.nn.Module or rewrite.Graph, got {type(module).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    with eval_mode(fn), torch.no_grad():
        with _timed(seconds, "torch forward"):
            expected = fn(*args, **kwargs)
        notes, axes = _export(fn, name, args, kwargs, path, dynamic, seconds)
        with _timed(seconds, "onnxruntime session"):
            session = OnnxModel(path, like=expected)
        with _timed(seconds, "onnxruntime run"):
            got = session(*args, **kwargs)
        rows = _named(f"{_shapes(args, kwargs)}", compare_outputs(expected, got))
        if dynamic and axes:
            args2, kwargs2 = _grow_inputs(session, args, kwargs, axes)
            with _timed(seconds, "torch forward"):
                expected2 = fn(*args2, **kwargs2)
            with _timed(seconds, "onnxruntime run"):
                got2 = session(*args2, **kwargs2)
            rows += _named(f"{_shapes(args2, kwargs2)}", compare_outputs(expected2, got2))
    size = sum(p.stat().st_size for p in (path, _data_file(path)) if p.exists())
    notes.insert(0, f"{path} ({size / 1e6:.1f} MB), symbolic axes: {_describe_axes(axes) or 'none'}")
    notes.append("seconds: " + ", ".join(f"{phase} {t:.1f}" for phase, t in seconds.items()))
    return Report(rows, title=f"onnx export of {name} vs onnxruntime", notes=notes, path=path, seconds=seconds)


@contextlib.contextmanager
def _timed(seconds: dict[str, float], phase: str):
    """Add the block's wall time to ``seconds[phase]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - start


def _export(fn, name: str, args: tuple, kwargs: dict, path: Path, dynamic: bool, seconds: dict[str, float]):
    """Export to a temp file, check it, rename into place.

    Returns (notes for the report, {input name: symbolic axes}). torch.export runs first so the
    symbolic axes are the ones it proved dynamic (the ONNX exporter alone would label every
    ``Dim.AUTO`` axis symbolic, also those a weight fixes).
    """
    import onnx

    notes: list[str] = []
    program = None
    with _timed(seconds, "torch.export"):
        if dynamic:
            try:
                program = _program(fn, args, kwargs, auto_dynamic_shapes(fn, args, kwargs))
            except Exception as e:  # noqa: BLE001 - symbolic axes are a bonus; retried with static shapes
                notes.append(f"static shapes: symbolic shapes failed to export ({first_line(e, 160)})")
        if program is None:
            try:
                program = _program(fn, args, kwargs, None)
            except Exception as e:  # noqa: BLE001
                raise GrowfxError(f"ONNX export of {name} failed in torch.export: {first_line(e)}") from e
    weights = sum(t.numel() * t.element_size() for t in (*fn.parameters(), *fn.buffers()))
    external = weights >= PROTOBUF_LIMIT
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".growfx-onnx-") as tmp:
        tmp_path = Path(tmp) / path.name
        try:
            with _quiet(), _timed(seconds, "ONNX translation and writing"):
                torch.onnx.export(program, (), str(tmp_path), dynamo=True, external_data=external, verbose=False,
                                  optimize=weights < OPTIMIZE_LIMIT, custom_translation_table=translations())
            with _timed(seconds, "onnx.checker"):
                onnx.checker.check_model(str(tmp_path), full_check=False)
        except Exception as e:  # noqa: BLE001
            raise GrowfxError(f"ONNX export of {name} failed: {first_line(e)}") from e
        if external:
            os.replace(_data_file(tmp_path), _data_file(path))
        os.replace(tmp_path, path)
    return notes, _symbolic_axes(program)


def _program(fn, args: tuple, kwargs: dict, dynamic_shapes):
    with _quiet():
        return torch.export.export(fn, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's warnings about optional packages; errors still propagate."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(open(os.devnull, "w")):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _data_file(path: Path) -> Path:
    return path.with_name(path.name + ".data")


def _symbolic_axes(program) -> dict[str, list[int]]:
    """For each user input of the exported program, the axes whose size is symbolic."""
    user_inputs = set(program.graph_signature.user_inputs)
    axes = {}
    for node in program.graph.nodes:
        value = node.meta.get("val")
        if node.op == "placeholder" and node.name in user_inputs and isinstance(value, torch.Tensor):
            symbolic = [i for i, size in enumerate(value.shape) if not is_concrete_int(size)]
            if symbolic:
                axes[node.name] = symbolic
    return axes


def _describe_axes(axes: dict[str, list[int]]) -> str:
    return ", ".join(f"{name}{axis}" for name, axis in axes.items())


def _grow_inputs(session: OnnxModel, args: tuple, kwargs: dict, axes: dict[str, list[int]]):
    """The same inputs with every symbolic axis one longer, tiled so the values stay valid."""
    feed_names = {id(t): n for n, t in session.match(args, kwargs).items()}

    def grow(leaf):
        name = feed_names.get(id(leaf))
        if name is None or name not in axes:
            return leaf
        for axis in axes[name]:
            size = leaf.shape[axis]
            leaf = leaf.index_select(axis, torch.arange(size + 1) % size)
        return leaf

    return pytree.tree_map(grow, args), pytree.tree_map(grow, kwargs)


def _shapes(args: tuple, kwargs: dict) -> str:
    tensors = [leaf for leaf in pytree.tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
    return "[" + ", ".join("x".join(map(str, t.shape)) for t in tensors[:2]) + "]"


def _named(prefix: str, rows):
    for row in rows:
        row.name = f"{prefix} {row.name}"
    return rows
