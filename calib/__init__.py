"""Calibration: data readers (``data``), in-graph statistics through ONNX Runtime
(``stats``) and the IDAP++ flow-divergence scores (``scores``)."""
