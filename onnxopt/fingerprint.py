"""A digest of what a model computes: two models with the same fingerprint give the same outputs.

The pass manager uses it to know, without running the model again, that the model a lossy pass hands on is one
its search already checked against the budget (:meth:`onnxopt.manager.PassManager.run`). The digest covers
everything that decides the outputs and nothing that does not:

- the graph inputs and outputs (names and element types), every node in graph order (domain, op type,
  overload, the names of its inputs and outputs, its attributes, subgraphs included, tensors by their bytes);
- every initializer, by name: name, element type, shape and raw bytes, hashed from the tensor in place (no copy
  of the weights; a 2 GB model is read once, never serialized as one protobuf).

Shape annotations (``value_info``, shape inference's results), doc strings and metadata are left out: the
cleanup after a pass (unused nodes removed, shapes re-inferred) or a search trial's own shape inference must
not make the same computation look different. The names are part of the digest, so a rename counts as a
change: a false "different" costs one extra budget check, never a wrong "same".
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx_ir as ir

__all__ = ["fingerprint"]


def fingerprint(model: ir.Model) -> str:
    """The hex digest of what ``model`` computes (see the module docstring)."""
    digest = hashlib.blake2b(digest_size=20)
    for domain, version in sorted(model.opset_imports.items()):
        digest.update(f"opset {domain}:{version};".encode())
    _graph(digest, model.graph)
    for function in model.functions.values():
        digest.update(f"function {function.domain}:{function.name}:{function.overload};".encode())
        for node in function:
            _node(digest, node)
    return digest.hexdigest()


def _graph(digest, graph: ir.Graph) -> None:
    for label, values in (("in", graph.inputs), ("out", graph.outputs)):
        for value in values:
            digest.update(f"{label} {value.name}:{value.dtype};".encode())
    for name, value in sorted(graph.initializers.items()):  # their order means nothing (shape inference shuffles it)
        _tensor(digest, name, value.const_value)
    for node in graph:
        _node(digest, node)


def _node(digest, node: ir.Node) -> None:
    inputs = ",".join("" if v is None else v.name or "" for v in node.inputs)
    outputs = ",".join(v.name or "" for v in node.outputs)
    digest.update(f"node {node.domain}:{node.op_type}:{node.overload}({inputs})->({outputs})".encode())
    for name, attr in sorted(node.attributes.items()):
        digest.update(f"@{name}:{attr.type}=".encode())
        if attr.is_ref():  # a function's reference to its caller's attribute
            digest.update(f"ref {attr.ref_attr_name};".encode())
            continue
        value = attr.value
        if attr.type == ir.AttributeType.GRAPH:
            _graph(digest, value)
        elif attr.type == ir.AttributeType.GRAPHS:
            for graph in value:
                _graph(digest, graph)
        elif attr.type == ir.AttributeType.TENSOR:
            _tensor(digest, name, value)
        elif attr.type == ir.AttributeType.TENSORS:
            for tensor in value:
                _tensor(digest, name, tensor)
        else:
            digest.update(repr(value).encode())
    digest.update(b";")


def _tensor(digest, name: str, tensor) -> None:
    if tensor is None:
        digest.update(f"tensor {name}: none;".encode())
        return
    digest.update(f"tensor {name}:{tensor.dtype}:{tuple(tensor.shape)}=".encode())
    try:
        array = np.ascontiguousarray(tensor.numpy())
        digest.update(memoryview(array).cast("B"))
    except Exception:  # a dtype numpy cannot hold as it is (4-bit, float8 as bytes): the packed bytes
        digest.update(tensor.tobytes())
    digest.update(b";")
