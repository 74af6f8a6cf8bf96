"""Deployment: what turns a pruned ONNX graph into the artifact a runtime runs, and times it.

- ``latency``: models (and engines) timed side by side on ONNX Runtime, TensorRT or trtexec.
- ``fp16``: fp16 weights and compute with fp32 I/O (ONNX Runtime's converter), fp32 kept
  where fp16 overflows, checked against the fp32 model.
- ``tensorrt``: strongly typed TensorRT engines (TensorRT 10 and 11), shape profiles.
- ``trtexec``: the ``trtexec`` latency backend, its commands per TensorRT version.
- ``export``: a model at fp32, fp16 or int8 for its runtime, checked and timed against its
  source, written atomically (``idap-onnx export``, ``optimize --precision``).
- ``int8``: ONNX Runtime's static quantization in the target's form, nodes chosen by timing.
"""
