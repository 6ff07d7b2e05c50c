"""Verification: two callables compared on the same inputs, down to the first diverging node of a graph."""
