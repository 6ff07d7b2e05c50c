"""The library of growth rules. Each family lives in its own module with its algebra in the docstring.

Empty until the width and depth issues land: the engine in `rewrite/` (trace, Graph, verify,
export_onnx) is what they build on.
"""
