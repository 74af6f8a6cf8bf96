"""Deployment: what turns a pruned ONNX graph into the artifact a runtime runs, and times it.

- ``latency``: models (and engines) timed side by side on ONNX Runtime or TensorRT.
"""
