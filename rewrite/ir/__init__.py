"""The IR: ``Graph`` (a ``torch.fx.GraphModule`` with shapes, owners, tensors and its declared lineage), the
tracing front-ends (``torch.fx.symbolic_trace`` and ``torch.export``), running a graph node by node, the
numerical comparison of values, and the summary. Imports only ``rewrite.ops`` and the base modules."""
