"""A tiny ONNX file writer for the tokenizer's loading tests: initializers under the names
upstream's exports give them, nodes that carry names only (the graph is not meant to run)."""

from __future__ import annotations

import numpy as np


class OnnxGraph:
    def __init__(self) -> None:
        from onnx import helper, numpy_helper

        self._helper, self._numpy_helper = helper, numpy_helper
        self.inits: list = []
        self.nodes: list = []

    def init(self, name: str, value: np.ndarray) -> str:
        self.inits.append(self._numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, name: str, inputs: list[str], **attrs) -> None:
        self.nodes.append(self._helper.make_node(op, inputs, [f"{name}_out"], name=name, **attrs))

    def save(self, path, graph_name: str) -> None:
        import onnx

        helper = self._helper
        graph = helper.make_graph(
            self.nodes + [helper.make_node("Identity", ["x"], ["y"], name="Identity")], graph_name,
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], initializer=self.inits)
        onnx.save(helper.make_model(graph), str(path))
