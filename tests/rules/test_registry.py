"""The op-rule table itself (``idap_onnx.oprules.base``): every rule is documented and
exercised by these tests; lookup honours ``since``; ops without a rule, and channels that reach
a graph output, are fixed."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    analyze,
    assert_declined,
    assert_exact,
    assert_frozen,
    group_of,
    parse,
    random_feeds,
    rel_l2,
    resolve,
    run,
)

from idap_onnx.oprules import RULES, lookup
from idap_onnx.passes.prune_channels import prune_channels, zero_units

HERE = Path(__file__).resolve().parent


def _rule_functions() -> dict[object, list[str]]:
    """Rule function -> the op types it is registered for (all domains, all ``since``)."""
    by_fn: dict[object, list[str]] = defaultdict(list)
    for (_domain, op_type), rules in RULES.items():
        for rule in rules:
            by_fn[rule.fn].append(op_type)
    return by_fn


def _fn_id(fn) -> str:
    return f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"


RULE_FUNCTIONS = _rule_functions()


@pytest.mark.parametrize("key", sorted(RULES), ids=lambda k: f"{k[0] or 'ai.onnx'}.{k[1]}")
def test_every_registered_rule_has_a_docstring(key):
    for rule in RULES[key]:
        assert rule.doc, f"rule {rule.fn.__qualname__} for {key} has no docstring"


# Each rule *function* must be exercised by the test module of its rule module: at least one of
# the op types it is registered for appears (as a word) in ``test_<module>.py``. Op types that
# share a function with a tested sibling (the long lists of unary ops, pools and reductions)
# need no test of their own: the rule cannot tell them apart.
@pytest.mark.parametrize("fn", list(RULE_FUNCTIONS), ids=_fn_id)
def test_every_rule_function_is_exercised_by_its_test_module(fn):
    module = fn.__module__.rsplit(".", 1)[-1]
    test_file = HERE / f"test_{module}.py"
    assert test_file.exists(), f"no test module for rule module {module!r}"
    text = test_file.read_text()
    ops = RULE_FUNCTIONS[fn]
    assert any(re.search(rf"\b{re.escape(op)}\b", text) for op in ops), (
        f"none of {sorted(set(ops))} (rule {fn.__qualname__}) appears in {test_file.name}"
    )


def test_lookup_honours_since_and_the_ai_onnx_alias():
    assert lookup("", "LayerNormalization", 16) is None
    assert lookup("", "LayerNormalization", 17).since == 17
    assert lookup("", "Slice", 9) is None and lookup("", "Slice", 10) is not None
    assert lookup("ai.onnx", "Conv", 13) is lookup("", "Conv", 13)
    assert lookup("com.example", "Conv", 13) is None


# -- what happens without a rule --------------------------------------------------------------


def test_op_without_a_rule_on_channels_declines():
    model = parse(
        """
        g (float[1,3,6,6] x) => (float[1,2,6,6] y, int64[1,2,6,6] i) {
            a = Conv(x, W1)
            y, i = TopK<axis=1>(a, k)
        }""",
        W1=(4, 3, 1, 1),
        k=np.array([2], np.int64),
    )
    graph = analyze(model)
    assert_declined(graph, "y", "no rule for op ai.onnx.TopK")
    assert_frozen(graph, "a", "no rule for op ai.onnx.TopK")


def test_custom_domain_op_declines():
    model = parse(
        """
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
            a = Conv(x, W1)
            y = com.example.Mystery(a)
        }""",
        domains={"com.example": 1},
        W1=(4, 3, 1, 1),
    )
    graph = analyze(model)
    assert_declined(graph, "y", "no rule for op com.example.Mystery")
    assert_frozen(graph, "a", "no rule for op com.example.Mystery")


def test_old_slice_without_a_rule_declines():
    # Slice-1 (starts/ends attributes) predates the rule's ``since=10``
    model = parse(
        """
        g (float[1,3,6,6] x) => (float[1,2,6,6] y) {
            a = Conv(x, W1)
            y = Slice<starts=[0], ends=[2], axes=[1]>(a)
        }""",
        9,
        W1=(4, 3, 1, 1),
    )
    assert_declined(analyze(model), "y", "no rule for op ai.onnx.Slice")


def test_producer_op_without_a_rule_declines_even_on_untracked_input():
    model = parse(
        """
        g (float[1,5,6] x) => (float[1,5,4] y) {
            y = Einsum<equation="bsd,df->bsf">(x, W)
        }""",
        W=(6, 4),
    )
    assert_declined(analyze(model), "y", "no rule for op ai.onnx.Einsum")


# -- graph boundary ---------------------------------------------------------------------------


def test_channels_reaching_a_graph_output_are_fixed():
    model = parse(
        """
        g (float[1,3,6,6] x) => (float[1,4,6,6] y, float[1,5,6,6] z) {
            a = Conv(x, W1)
            y = Relu(a)
            z = Conv(y, W2)
        }""",
        W1=(4, 3, 1, 1),
        W2=(5, 4, 1, 1),
    )
    graph = analyze(model)
    assert_frozen(graph, "a", "reaches graph output 'y'")
    assert group_of(graph, "a").prunable_units == []


def test_a_chain_ending_in_an_exact_consumer_is_prunable():
    model = parse(
        """
        g (float[1,3,6,6] x) => (float[1,5,6,6] z) {
            a = Conv(x, W1)
            y = Relu(a)
            z = Conv(y, W2)
        }""",
        W1=(4, 3, 1, 1),
        W2=(5, 4, 1, 1),
    )
    assert group_of(analyze(model), "a").prunable_units == [0, 1, 2, 3]
    assert_exact(model, {"a": [0, 1, 2]})


# -- the harness itself -----------------------------------------------------------------------


def test_pruned_and_zeroed_differ_where_the_group_is_inexact():
    # the comparison assert_exact makes has teeth: through a Sigmoid the removed channels read
    # sigmoid(0) = 0.5 in the zeroed model, which the pruned model drops
    model = parse(
        """
        g (float[1,3,6,6] x) => (float[1,5,6,6] z) {
            a = Conv(x, W1, B1)
            s = Sigmoid(a)
            z = Conv(s, W2)
        }""",
        W1=(4, 3, 1, 1),
        B1=(4,),
        W2=(5, 4, 1, 1),
    )
    graph = analyze(model)
    removal = resolve(graph, {"a": [1]})
    feeds = random_feeds(model)
    (pruned,) = run(prune_channels(model, removal, graph=graph), feeds)
    (zeroed,) = run(zero_units(model, removal, graph=graph), feeds)
    assert rel_l2(pruned, zeroed) > 1e-3
