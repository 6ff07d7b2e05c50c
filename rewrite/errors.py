"""The errors growfx raises. Each names the thing that is wrong (model, op, node, parameter)."""

from __future__ import annotations


class GrowfxError(Exception):
    """Base class of every error growfx raises on purpose."""


class TraceError(GrowfxError):
    """No front-end could turn the model into a graph; the message gives each front-end's reason."""

    def __init__(self, model_class: str, reasons: dict[str, str]):
        self.model_class = model_class
        self.reasons = dict(reasons)
        lines = [f"cannot trace {model_class}:"]
        lines += [f"  {frontend}: {reason}" for frontend, reason in reasons.items()]
        super().__init__("\n".join(lines))


class InputError(GrowfxError):
    """The inputs given do not fit the model or graph they are meant for."""


class UnsupportedOpError(GrowfxError):
    """The dimension analysis met an op whose semantics it does not know, on an axis that matters."""

    def __init__(self, op: str, node: str, detail: str = ""):
        self.op = op
        self.node = node
        self.detail = detail
        message = f"the dimension analysis does not know op {op!r} (node {node!r})"
        super().__init__(f"{message}: {detail}" if detail else message)


class GrowthError(GrowfxError):
    """A growth pass cannot do what was asked on this graph; the message says why."""


class NotExactError(GrowthError):
    """The planned growth would not preserve the function; the message says why and what would."""


class VerificationError(GrowfxError):
    """A rewrite claimed exact changed the outputs; ``.report`` has the comparison."""

    def __init__(self, message: str, report):
        self.report = report
        super().__init__(f"{message}\n{report}")


class NotRepresentableError(GrowfxError):
    """The grown function cannot be written as the original model class; the message says why."""
