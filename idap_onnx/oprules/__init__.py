"""The op-rule table (see ``base``); importing this package registers every rule.

Rules are split by op family: ``elementwise``, ``conv_gemm``, ``movement``, ``reduce_pool``,
``normalization``, ``attention``. ``lookup(domain, op_type, opset)`` finds the rule in force.
"""

from idap_onnx.oprules import (  # noqa: F401  (registration side effects)
    attention,
    conv_gemm,
    elementwise,
    movement,
    normalization,
    reduce_pool,
)
from idap_onnx.oprules.base import RULES, OpRule, lookup, register

# Ops that create channels; an unregistered one of these is reported as declined.
PRODUCER_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum", "Attention", "LSTM", "GRU"}

__all__ = ["RULES", "OpRule", "PRODUCER_OPS", "lookup", "register"]
