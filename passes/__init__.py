"""onnxopt's graph rewrites, one module per pass; installed as ``onnxopt.passes``.

Passes are looked up by name through :mod:`onnxopt.registry`; import a module here only to use its
pass class directly (``from onnxopt.passes.simplify import SimplifyPass``).
"""
