"""The library of growth rules. Each family lives in its own module with its algebra in the docstring.

* ``net2wider`` (``passes.widen``): Net2WiderNet for any traced model: grow one module's output units and
  everything coupled to them.
* ``mlp`` (``passes.widen_mlp``): transformer MLP intermediate size, found from the analysis.
* ``heads`` (``passes.add_heads``): more attention heads, grouped-query attention included.
* ``head_size`` (``passes.widen_heads``): key/query size (temperature-corrected) and value size of heads.
* ``hidden`` (``passes.widen_hidden``): the residual stream, with RMSNorm gain and epsilon corrected.
* ``depth`` (``passes.add_layers``, ``passes.split_layers``): identity blocks (exact on pre-norm stacks), and
  blocks split into k scaled copies (approximate, measured).
* ``net2deeper`` (``passes.net2deeper``): an identity layer after an idempotent activation.
* ``moe`` (``passes.upcycle_moe``): dense MLPs become experts behind a renormalised top-k router.
* ``policies``: the init policies ``zero``, ``clone``, ``net2net``, ``sparkling`` (subclass ``Policy``, the
  engine's ``rewrite.Policy``, for your own: return growth-map ops per role, declare ``preserves``, and pass
  the object as ``init=``).
* ``width``: ``WidthPass``, the plan skeleton every width pass shares (a pass says its ``growths``).

Use them through ``rewrite.apply(model, [passes.widen("fc1", factor=2)], args)``.
"""

from .policies import POLICIES, Policy, policy
from .depth import add_layers, split_layers
from .moe import upcycle_moe
from .net2deeper import net2deeper
from .head_size import WidenHeads, widen_heads
from .heads import AddHeads, add_heads
from .hidden import WidenHidden, widen_hidden
from .mlp import WidenMLP, widen_mlp
from .net2wider import Widen, widen

__all__ = [
    "POLICIES",
    "AddHeads",
    "Policy",
    "Widen",
    "WidenHeads",
    "WidenHidden",
    "WidenMLP",
    "add_heads",
    "add_layers",
    "net2deeper",
    "split_layers",
    "upcycle_moe",
    "policy",
    "widen",
    "widen_heads",
    "widen_hidden",
    "widen_mlp",
]
