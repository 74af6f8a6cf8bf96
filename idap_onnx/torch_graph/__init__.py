"""ONNX graphs as trainable torch modules (the fine-tuning round trip, METHOD.md section 6).

``OnnxModule(model)`` executes an ONNX graph with torch operators, its float weights as
``nn.Parameter``s named after their initializers; ``write_back(module, model)`` puts the trained
values back into a copy of the same graph; ``unsupported_ops(model)`` lists what the executor
cannot run (checked before any work).
"""

from idap_onnx.torch_graph.module import OnnxModule, unsupported_ops, write_back

__all__ = ["OnnxModule", "unsupported_ops", "write_back"]
