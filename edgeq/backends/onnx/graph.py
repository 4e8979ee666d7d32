"""A small ONNX graph builder: named nodes, initializers kept as numpy arrays (or, for weights,
as :class:`Deferred` shapes computed only when written) until written.

Only ``onnx`` (no onnxruntime, no torch). Names are made unique and deterministic (a counter
per prefix), so the same model gives the same bytes.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from edgeq.errors import EdgeqError

MS_DOMAIN = "com.microsoft"


class Deferred:
    """An initializer whose values are computed when the model is written (so a graph of a large
    model holds no weight bytes): its dtype and shape are known while the graph is built;
    ``source()`` — shared by the initializers computed together, e.g. a weight's codes and
    scales — yields ``(name, byte offset, array)`` pieces of them, a bounded amount at a time."""

    __slots__ = ("dtype", "shape", "source")

    def __init__(self, dtype, shape, source):
        self.dtype, self.shape, self.source = np.dtype(dtype), tuple(int(s) for s in shape), source

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class GraphBuilder:
    def __init__(self):
        import onnx  # noqa: F401  (fail early with the caller's message if missing)

        self.nodes = []
        self.inits: dict[str, np.ndarray | Deferred] = {}
        self.inputs = []
        self.outputs = []
        self.overridable: set[str] = set()  # initializers that are also graph inputs
        self._count: dict[str, int] = defaultdict(int)
        self._consts: dict[tuple, str] = {}

    def name(self, prefix: str) -> str:
        n = self._count[prefix]
        self._count[prefix] += 1
        return prefix if n == 0 else f"{prefix}_{n}"

    def init(self, name: str, value: np.ndarray | Deferred) -> str:
        if name in self.inits:
            raise EdgeqError(f"onnx graph: initializer {name} defined twice")
        self.inits[name] = value if isinstance(value, Deferred) else np.ascontiguousarray(value)
        return name

    def const(self, value, dtype=np.int64) -> str:
        """A small shared constant (shapes, axes, scalars)."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(self.name(f"const_{arr.dtype.name}"), arr)
        return self._consts[key]

    def op(self, op_type: str, inputs, name: str | None = None, domain: str = "", n_out: int = 1,
           outputs=None, **attrs):
        """Add a node; returns its output name (or a list when ``n_out > 1``). ``outputs``: explicit
        output names (graph outputs are named this way, with no Identity in between)."""
        from onnx import helper

        base = self.name(name or op_type.lower())
        if outputs is not None:
            outs = list(outputs)
            n_out = len(outs)
        else:
            outs = [base] if n_out == 1 else [f"{base}:{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=base, domain=domain or None,
                                           **attrs))
        return outs[0] if n_out == 1 else outs

    def input(self, name: str, elem_type: int, shape) -> str:
        from onnx import helper

        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, name: str, elem_type: int, shape) -> str:
        """Declare graph output ``name`` (a node must produce it: ``op(..., outputs=[name])``)."""
        from onnx import helper

        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def subgraph(self) -> "GraphBuilder":
        """A builder for a control-flow branch (an ``If`` node's ``then_branch``): its own nodes and
        outputs, but the parent's names, constants and initializers (the branch reads them from
        the outer scope, so onnxruntime keeps one copy and prepacks each weight once)."""
        sub = GraphBuilder.__new__(GraphBuilder)
        sub.nodes, sub.inputs, sub.outputs = [], [], []
        sub.inits, sub.overridable, sub._count, sub._consts = self.inits, self.overridable, self._count, self._consts
        return sub

    def branch_graph(self, graph_name: str, outputs):
        """This (sub)builder's nodes as a GraphProto with the given ``(name, elem_type)`` outputs
        (shapes left open: an If's branches may differ in shape)."""
        from onnx import helper

        return helper.make_graph(self.nodes, graph_name, [],
                                 [helper.make_tensor_value_info(n, t, None) for n, t in outputs])

    def overridable_init(self, name: str, value: np.ndarray, shape) -> str:
        """An initializer also declared as a graph input (onnxruntime lets a run override it)."""
        from onnx import helper

        self.init(name, value)
        self.overridable.add(name)
        self.inputs.append(helper.make_tensor_value_info(name, _elem_type(value.dtype), shape))
        return name

    def model(self, graph_name: str, opset: int, ir_version: int, tensor_proto):
        """ModelProto; ``tensor_proto(name, array or Deferred)`` turns each initializer into a TensorProto."""
        from onnx import helper

        inits = [tensor_proto(n, a) for n, a in self.inits.items()]
        g = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, 1)],
                                 ir_version=ir_version, producer_name="edgeq")


def _elem_type(dtype) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
