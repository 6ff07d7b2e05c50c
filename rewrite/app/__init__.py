"""The application layer: the command line, the demo and the built-in example models. The only part of the
engine that imports the rule library (``passes``)."""
