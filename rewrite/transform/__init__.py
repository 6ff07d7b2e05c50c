"""Transformation: the policy protocol, resizing dimension groups, the growth map, the lineage of grown
graphs, the ``Editor``, patterns, rules and the pass manager (``apply``)."""
