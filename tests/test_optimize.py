"""`optimize` on a CNN trained here on real handwritten digits (scikit-learn's 1797 8x8
digits): the budget holds on the validation part, undone steps show in the report, stage 2
ranks blocks by ascending layer divergence, and runs are deterministic."""

from __future__ import annotations

import numpy as np
import pytest
from tools_loader import load_tool

from idap_onnx.metrics import Evaluator
from idap_onnx.optimize import OptimizeConfig
from idap_onnx.optimize_api import prepare, run_optimize, write_outputs


@pytest.fixture(scope="module")
def digits():
    return load_tool("digits").build()


def _samples(x: np.ndarray) -> list[dict[str, np.ndarray]]:
    return [{"x": xi} for xi in x]


def _test_accuracy(model, digits) -> float:
    x, y = digits.test
    return Evaluator(model, [{"x": x}], labels=y, metric="top1").original_metric


def test_budget_holds_on_validation_and_test_accuracy_is_reported(digits):
    x, y = digits.train
    config = OptimizeConfig(max_drop=1.0, target_flops=0.3)
    result = run_optimize(str(digits.model_path), _samples(x), config, labels=y, val_fraction=0.3)
    assert result.final["drop"] <= 1.0  # validation accuracy within 1 point
    assert result.final["macs"] < result.original["macs"]
    accepted = [s for s in result.steps if s.accepted]
    assert accepted and all(s.drop <= 1.0 for s in accepted)
    test_before = _test_accuracy(str(digits.model_path), digits)
    test_after = _test_accuracy(result.model, digits)
    print(f"test accuracy {test_before:.4f} -> {test_after:.4f}")  # reported, not bounded
    assert 0.0 < test_after <= 1.0


def test_the_refit_is_on_by_default_and_recovers_what_the_removal_cost(digits):
    """The same removals with the default least-squares refit and with ``refit=False``: the
    refitted steps end much closer to the original (relative output error on validation)."""
    x, y = digits.train
    runs = {}
    for refit in (True, False):
        config = OptimizeConfig(target_flops=0.5, max_drop=100, stages=(1,), refit=refit)
        assert OptimizeConfig().refit is True
        runs[refit] = run_optimize(str(digits.model_path), _samples(x), config, labels=y,
                                   val_fraction=0.3)
    on, off = runs[True], runs[False]
    print(f"error at 50 % MACs: refit {on.final['error']:.4f}, without {off.final['error']:.4f}")
    assert on.final["error"] < 0.5 * off.final["error"]
    assert all(s.refitted > 0 for s in on.steps) and not any(s.refitted for s in off.steps)


def test_a_step_that_breaks_the_budget_is_undone_and_reported(digits, tmp_path):
    x, y = digits.train
    config = OptimizeConfig(max_drop=0.5, p0=0.6, steps=2, retries=2, stages=(1,), refit=False)
    result = run_optimize(str(digits.model_path), _samples(x), config, labels=y, val_fraction=0.3)
    undone = [s for s in result.steps if not s.accepted]
    assert undone, "a 60 % first step without the refit should break a 0.5-point budget"
    assert undone[0].attempt == 0 and undone[0].fraction == pytest.approx(0.6)
    assert result.final["drop"] <= 0.5  # the returned model is the last inside the budget
    paths = write_outputs(result, tmp_path / "digits_opt.onnx")
    report = paths["json"].read_text()
    assert '"accepted": false' in report
    assert "undone" in paths["markdown"].read_text()
    assert all(p.exists() for p in paths.values())


def test_max_group_ratio_bounds_each_group_against_its_original_width(digits):
    """Every step removes a fraction of what is left; ``max_group_ratio`` still bounds the
    whole run: no group ends below half its original units with ``max_group_ratio=0.5``,
    however far the MACs target asks (stage 1 of a 10 % target runs out of units first)."""
    import onnx

    from idap_onnx.dependency import analyze_model

    x, y = digits.train
    config = OptimizeConfig(target_flops=0.1, max_drop=100, stages=(1,), refit=False,
                            max_group_ratio=0.5, round_to=1)
    result = run_optimize(str(digits.model_path), _samples(x), config, labels=y,
                          val_fraction=0.3)
    shapes = {"x": [1, *x.shape[1:]]}
    before = {g.key: g.size for g in analyze_model(onnx.load(digits.model_path), shapes).groups
              if not g.frozen}
    after = {g.key: g.size for g in analyze_model(result.model, shapes).groups}
    assert len([s for s in result.steps if s.accepted]) > 1
    assert any(after[k] < n for k, n in before.items())
    assert all(after[k] >= n / 2 for k, n in before.items()), (before, after)


def test_stage_two_alone_tries_blocks_in_ascending_layer_divergence(digits):
    x, y = digits.train
    config = OptimizeConfig(max_error=10.0, stages=(2,))  # a budget loose enough to accept
    result = run_optimize(
        str(digits.model_path), _samples(x), config, labels=None, val_fraction=0.3
    )
    divergences = list(result.block_divergence.values())
    assert divergences == sorted(divergences)
    tried = [s.blocks[0] for s in result.steps if s.stage == 2]
    assert tried == list(result.block_divergence)[: len(tried)]
    assert result.removed_blocks, "stage 2 removes at least one block within the budget"


def test_two_runs_with_the_same_seed_write_identical_models(digits, tmp_path):
    x, y = digits.train
    config = OptimizeConfig(max_drop=1.0, target_flops=0.5, seed=3)
    outs = []
    for k in range(2):
        result = run_optimize(
            str(digits.model_path), _samples(x), config, labels=y, val_fraction=0.3
        )
        path = write_outputs(result, tmp_path / f"run{k}.onnx")["model"]
        outs.append(path.read_bytes())
    assert outs[0] == outs[1]


def test_calibration_and_validation_parts_are_disjoint(digits):
    x, y = digits.train
    prep = prepare(str(digits.model_path), _samples(x), labels=y, val_fraction=0.3)
    n_cal = sum(len(b["x"]) for b in prep.calib)
    assert n_cal + prep.evaluator.n_samples == len(x)


def test_the_optimized_model_keeps_inputs_outputs_and_dynamic_axes(digits):
    import onnx

    from idap_onnx.verify import io_signature

    x, y = digits.train
    config = OptimizeConfig(max_drop=1.0, target_flops=0.5)
    result = run_optimize(str(digits.model_path), _samples(x), config, labels=y, val_fraction=0.3)
    original = onnx.load(str(digits.model_path))
    onnx.checker.check_model(result.model, full_check=True)
    assert io_signature(result.model) == io_signature(original)

    def dims(model):
        return [
            [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (*model.graph.input, *model.graph.output)
        ]

    assert dims(result.model) == dims(original)  # the symbolic batch stays symbolic
    # no recorded shapes where the input had none: the runtime fuses the same way
    assert not original.graph.value_info and not result.model.graph.value_info


def test_a_slower_result_is_said_plainly_with_what_to_try():
    """The report's latency section says when the result ran slower, and what to try."""
    from idap_onnx.optimize_report import slower_hint

    lat = {"device": "onnxruntime CPUExecutionProvider",
           "speedup": {"original": 1.0, "optimized": 0.6}}
    assert "SLOWER" in slower_hint(lat, round_to=1) and "--round-to auto" in slower_hint(lat, 1)
    assert "--latency-table" in slower_hint(lat, round_to="auto")
    faster = {"device": "cpu", "speedup": {"original": 1.0, "optimized": 1.4}}
    assert slower_hint(faster, round_to=1) is None
    assert slower_hint(None, round_to=1) is None


def test_the_time_saved_per_mac_saved_is_given_with_what_to_try_below_0_9():
    """``(1 - t/t0) / (1 - m/m0)``: half the MACs at 2x is 1.0; at 1.5x it is 0.67, and the
    report's line then says the cut saved less time than MACs and names ``--target-latency``."""
    from idap_onnx.optimize_report import conversion_line, saved_per_mac_saved

    assert saved_per_mac_saved(2.0, 0.5) == pytest.approx(1.0)
    assert saved_per_mac_saved(1.5, 0.5) == pytest.approx(2 / 3)
    assert saved_per_mac_saved(0.8, 0.5) < 0  # slower: a negative saving
    assert saved_per_mac_saved(1.2, 1.0) is None  # no MAC removed
    assert conversion_line({"saved_per_mac_saved": 0.95}) == "- latency saved / MACs saved: 0.95"
    low = conversion_line({"saved_per_mac_saved": 0.67})
    assert low.startswith("- latency saved / MACs saved: 0.67 (") and "--target-latency" in low
    assert conversion_line({"saved_per_mac_saved": None}) is None and conversion_line(None) is None


def test_a_missed_target_says_why_stage_one_stopped_and_what_to_change(digits, tmp_path):
    """One small step (and the three more a target adds) cannot reach 10 % of the MACs: the
    result says so, with the setting to raise, in the result, report.json and report.md; a
    reached target says that too."""
    x, y = digits.train
    short = OptimizeConfig(target_flops=0.1, max_drop=100, stages=(1,), steps=1, p0=0.01,
                           refit=False, latency="off")
    result = run_optimize(str(digits.model_path), _samples(x), short, labels=y,
                          val_fraction=0.3)
    assert result.targets_met is False
    assert result.stop == "steps: all 4 steps ran (1 of the schedule and 3 more toward the target)"
    assert [s.iteration for s in result.steps if s.accepted] == [0, 1, 2, 3]
    assert result.target_note.startswith("target not met: MACs ")
    assert "raise --p0 (0.01) or --steps (1)" in result.target_note
    paths = write_outputs(result, tmp_path / "short.onnx")
    assert "**target not met" in paths["markdown"].read_text()
    reached = run_optimize(str(digits.model_path), _samples(x),
                           OptimizeConfig(target_flops=0.9, max_drop=100, stages=(1,),
                                          refit=False, latency="off"),
                           labels=y, val_fraction=0.3)
    assert reached.targets_met is True and reached.stop == "target met"
    assert reached.target_note == ""


def test_a_proto_from_onnx_load_is_normalized_and_left_as_it_was(digits):
    """``optimize`` takes what ``onnx.load`` returns (unnamed nodes here) as ``load_model``
    would leave the file, on a copy: the same removals, the caller's proto untouched, and the
    model's metadata (rapidocr keeps its recognizer's alphabet there) carried to the result."""
    import onnx

    from idap_onnx.optimize import optimize

    x, y = digits.train
    proto = onnx.load(str(digits.model_path))
    for node in proto.graph.node:
        node.name = ""
    onnx.helper.set_model_props(proto, {"character": "0\n1\n2"})
    before = proto.SerializeToString()
    prep = prepare(str(digits.model_path), _samples(x), labels=y, val_fraction=0.3)
    config = OptimizeConfig(max_drop=1.0, target_flops=0.5, stages=(1,), latency="off")
    from_proto = optimize(proto, prep.calib, prep.evaluator, config)
    from_file = optimize(prep.model, prep.calib, prep.evaluator, config)
    assert proto.SerializeToString() == before
    assert from_proto.final["macs"] == from_file.final["macs"] < from_proto.original["macs"]
    assert {p.key: p.value for p in from_proto.model.metadata_props} == {"character": "0\n1\n2"}
