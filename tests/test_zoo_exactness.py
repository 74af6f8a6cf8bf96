"""The surgery self-check on the light zoo: real architectures no one here wrote.

For each model: random units of random prunable groups are zeroed and pruned; exact groups
must compute what the zeroed model computes, every pruned graph must pass the checker, run
in ONNX Runtime with the original inputs/outputs and have the predicted MACs, and removed
residual blocks must equal the model with that branch forced to zero
(``idap_onnx.selfcheck``). ``tools/zoo_coverage.py`` runs the same over the whole zoo.
"""

from __future__ import annotations

import pytest
from tools_loader import load_tool

from idap_onnx.model_io import load_model
from idap_onnx.selfcheck import self_check

zoo = load_tool("zoo")
LIGHT = [name for name, entry in zoo.ZOO.items() if entry.light]


@pytest.mark.zoo
@pytest.mark.parametrize("name", LIGHT)
@pytest.mark.parametrize("seed", [0, 1])
def test_surgery_self_check_passes(name: str, seed: int) -> None:
    model = load_model(zoo.build(name))
    result = self_check(model, zoo.make_inputs(name), seed=seed)
    assert result.ok, result.errors
    assert result.exact_groups_tested + result.inexact_groups_tested > 0


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "bert_tiny", "rapidocr_det"])
def test_most_compute_is_prunable(name: str) -> None:
    result = self_check(load_model(zoo.build(name)), zoo.make_inputs(name))
    assert result.prunable_share >= 0.8
