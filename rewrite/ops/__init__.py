"""Op knowledge: the one place that knows what ops do. Every other layer asks here.

* ``kinds``: naming. Every call form a front-end produces, normalised to a canonical kind.
* ``axes``: axis rules. What each kind couples, produces, consumes, reduces or composes, for the dimension
  analysis.
* ``literals``: what growth patches besides tensors. Module size attributes, and view, norm and split sizes.
* ``structure``: what structural rules read. Transparent and homogeneous ops, weighted operands, gains,
  hand-written RMSNorm, attention.

A new op is taught here: alias it to a kind in ``kinds.ALIASES``, or give its kind a rule in ``axes.RULES``.
"""

from .axes import RULES, Axis, Call, Facts, all_axes, reshape_run
from .kinds import ELEMENTWISE, canonical_kind, is_bookkeeping, op_name, real_users, short_name
from .literals import patch_literals, patch_split, resize_module_attributes
from .structure import (
    ACTIVATIONS,
    FEATURE_LOCAL,
    HOMOGENEOUS,
    HOMOGENEOUS_REDUCTIONS,
    IDEMPOTENT,
    TRANSPARENT,
    WEIGHTED,
    Attention,
    attention,
    offset_parameter,
    operand,
    rms_epsilon,
)

__all__ = [
    "ACTIVATIONS", "ELEMENTWISE", "FEATURE_LOCAL", "HOMOGENEOUS", "HOMOGENEOUS_REDUCTIONS", "IDEMPOTENT", "RULES",
    "TRANSPARENT", "WEIGHTED", "Attention", "Axis", "Call", "Facts", "attention", "canonical_kind",
    "is_bookkeeping", "offset_parameter", "op_name", "operand", "patch_literals", "patch_split", "real_users",
    "reshape_run", "resize_module_attributes", "rms_epsilon", "short_name",
]
