"""The op-rule table: how each ONNX op treats the channel axis.

A rule is a stateless function ``rule(node, ctx)`` registered for ``(domain, op_type)`` from an
opset version on. It reads the layouts of the node's inputs from ``ctx`` and:

- sets the layouts of its outputs (pass-through, moved axis, merged, split, new space);
- couples channels that must be removed together (``ctx.join``, ``ctx.bundle``);
- records the edits that removal needs (``ctx.edit``: slice a constant along an axis by the
  keep mask of a tensor, rewrite a ``group`` attribute, a Reshape shape, Split sizes, Slice
  bounds);
- fixes channels it cannot remove (``ctx.fix``) with a reason, and marks where removal is not
  exact (``ctx.inexact``);
- tracks which elements stay zero when the removed channels' parameters are zeroed, so the
  analysis knows where pruning is exact (``nonzero`` arrays).

An op without a rule fixes every channel that reaches it ("no rule for op ...").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

    from idap_onnx.dependency import AnalysisContext

RuleFn = Callable[["onnx.NodeProto", "AnalysisContext"], None]


@dataclass(frozen=True)
class OpRule:
    """One registered rule: ``fn`` handles ``op_type`` of ``domain`` from opset ``since`` on."""

    domain: str
    op_type: str
    since: int
    fn: RuleFn

    @property
    def doc(self) -> str:
        return (self.fn.__doc__ or "").strip()


RULES: dict[tuple[str, str], list[OpRule]] = {}


def register(*op_types: str, domain: str = "", since: int = 1) -> Callable[[RuleFn], RuleFn]:
    """Register ``fn`` as the rule of ``op_types`` (in ``domain``) from opset ``since`` on."""

    def wrap(fn: RuleFn) -> RuleFn:
        for op in op_types:
            rules = RULES.setdefault((domain, op), [])
            rules.append(OpRule(domain, op, since, fn))
            rules.sort(key=lambda r: r.since)
        return fn

    return wrap


def lookup(domain: str, op_type: str, opset: int) -> OpRule | None:
    """The rule for ``op_type`` at ``opset``: the registered one with the highest ``since``."""
    domain = "" if domain == "ai.onnx" else domain
    best = None
    for rule in RULES.get((domain, op_type), []):
        if rule.since <= opset:
            best = rule
    return best
