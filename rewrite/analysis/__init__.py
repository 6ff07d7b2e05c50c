"""Analysis of a Graph: dimension groups (which axes must grow together), size propagation through heads and
fused projections, layouts of grown axes, and residual blocks. Reads graphs; never changes them."""
