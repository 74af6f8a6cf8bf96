"""One error hierarchy for everything a user can get wrong.

Every message names the object, the reason and the fix, in one line. The CLI prints
``idap-onnx: error: <message>`` and exits 1 (no traceback unless ``--verbose``).
"""

from __future__ import annotations


class IdapError(Exception):
    """Base class of the errors that are the user's to fix (bad file, bad flag, bad data)."""


class ModelLoadError(IdapError):
    """The model file cannot be read: missing, not ONNX, truncated, external data missing."""


class UnsupportedModelError(IdapError):
    """The model is valid ONNX but uses something idap-onnx cannot handle (opset, domain)."""


class UsageError(IdapError):
    """A bad argument: unknown group or block, bad ratio, output path equal to the input."""


class SurgeryError(IdapError):
    """A rewrite was requested that the dependency graph declines (frozen group, bad index)."""
