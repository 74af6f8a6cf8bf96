"""TensorRT deployment (``deploy.tensorrt``, ``deploy.trtexec``): what needs no GPU is tested
here (profiles from shapes, the trtexec commands of TensorRT 10 and 11, the parsing of its
documented outputs, the check that no symbol TensorRT 11 removed is referenced); building and
timing real engines runs wherever ``tensorrt`` imports and a CUDA GPU exists (or ``trtexec``
is on the PATH), and is skipped with the reason elsewhere."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from tools_loader import load_tool

from idap_onnx.deploy.latency import (
    BACKENDS,
    LatencyUnavailable,
    measure,
    tensorrt_available,
    tensorrt_source,
)
from idap_onnx.deploy.tensorrt import ShapeProfile, build_engine, dynamic_inputs, is_engine
from idap_onnx.deploy.trtexec import Trtexec, find_trtexec, parse_times, parse_version
from idap_onnx.errors import IdapError, UsageError
from idap_onnx.model_io import load_model

REPO = Path(__file__).resolve().parent.parent

# -------------------------------------------------------------------------- shape profiles


def test_input_shape_fixes_min_opt_and_max():
    profile = ShapeProfile.parse(["images:1x3x224x224", "input:0:8x128"])
    assert profile.shapes == {
        "images": ((1, 3, 224, 224),) * 3,
        "input:0": ((8, 128),) * 3,  # a name may hold ':'
    }
    assert profile.trtexec_args() == ["--shapes=images:1x3x224x224,input:0:8x128"]


def test_min_opt_max_give_a_range():
    profile = ShapeProfile.parse(
        ["mask:1x128"], min_shape=["ids:1x16"], opt_shape=["ids:8x128"], max_shape=["ids:32x512"])
    assert profile.shapes == {"mask": ((1, 128),) * 3,
                              "ids": ((1, 16), (8, 128), (32, 512))}
    assert profile.trtexec_args() == ["--minShapes=mask:1x128,ids:1x16",
                                      "--optShapes=mask:1x128,ids:8x128",
                                      "--maxShapes=mask:1x128,ids:32x512"]
    assert ShapeProfile.parse().shapes == {} and ShapeProfile.parse().trtexec_args() == []


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"input_shape": ["images"]}, "'images' is not NAME:DIMS"),
    ({"input_shape": ["images:1x3xNx224"]}, "not NAME:DIMS with positive dims"),
    ({"input_shape": ["images:0x3"]}, "positive dims"),
    ({"input_shape": [":1x3"]}, "not NAME:DIMS"),
    ({"input_shape": ["a:1", "a:2"]}, "--input-shape names input a twice"),
    ({"min_shape": ["a:1"], "max_shape": ["a:4"]}, r"missing a \(no --opt-shape\)"),
    ({"min_shape": ["a:1"], "opt_shape": ["a:2"], "max_shape": ["a:4x4"]}, "different ranks"),
    ({"min_shape": ["a:4"], "opt_shape": ["a:2"], "max_shape": ["a:8"]}, "min <= opt <= max"),
    ({"input_shape": ["a:1"], "min_shape": ["a:1"], "opt_shape": ["a:1"],
      "max_shape": ["a:1"]}, "given by --input-shape and by"),
])
def test_bad_shape_text_is_a_usage_error(kwargs, message):
    with pytest.raises(UsageError, match=message):
        ShapeProfile.parse(**kwargs)


def test_a_feed_gives_a_fixed_profile_of_the_dynamic_inputs(tmp_path):
    feed = {"x": np.zeros((4, 1, 8, 8), np.float32)}
    assert ShapeProfile.of_feed(feed).shapes == {"x": ((4, 1, 8, 8),) * 3}
    digits = load_tool("digits").build().model_path  # batch dim symbolic
    assert dynamic_inputs(digits) == [load_model(digits).graph.input[0].name]
    static = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4] x) => (float[1, 4] y) { y = Relu(x) }""")
    onnx.save(static, tmp_path / "static.onnx")
    assert dynamic_inputs(tmp_path / "static.onnx") == []
    assert ShapeProfile.of_feed({"x": np.zeros((1, 4))}, []).trtexec_args() == []


# ----------------------------------------------------------------------- trtexec, by version


@pytest.mark.parametrize(("banner", "version"), [
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v110400] [b12] # trtexec --help", (11, 4, 0)),
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v100900] [b34] # trtexec --onnx=m.onnx",
     (10, 9, 0)),
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v100200] # D:\\TensorRT-10.2.0.19\\bin\\trtexec.exe",
     (10, 2, 0)),
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v8601] # trtexec", (8, 6, 1)),
])
def test_version_is_read_from_the_banner(banner, version):
    assert parse_version("=== Model Options ===\n" + banner + "\n") == version


def test_no_banner_is_an_error():
    with pytest.raises(IdapError, match="cannot read the TensorRT version"):
        parse_version("usage: something else")


PROFILE = ShapeProfile.parse(["x:1x3x224x224"])


def test_tensorrt_11_commands_carry_no_removed_or_default_flags():
    tool = Trtexec("/opt/trt/bin/trtexec", (11, 4, 0))
    assert tool.build_command("m.onnx", "m.plan", PROFILE, "cache.bin") == [
        "/opt/trt/bin/trtexec", "--onnx=m.onnx", "--saveEngine=m.plan", "--skipInference",
        "--shapes=x:1x3x224x224", "--timingCacheFile=cache.bin"]
    assert tool.time_command("m.plan", "t.json", shapes=PROFILE, iterations=50,
                             warmup_ms=100) == [
        "/opt/trt/bin/trtexec", "--loadEngine=m.plan", "--shapes=x:1x3x224x224",
        "--warmUp=100", "--iterations=50", "--duration=0", "--exportTimes=t.json"]


def test_tensorrt_10_commands_ask_for_strong_types_cuda_graphs_and_no_copies():
    tool = Trtexec("trtexec", (10, 9, 0))
    assert tool.build_command("m.onnx", "m.plan") == [
        "trtexec", "--onnx=m.onnx", "--saveEngine=m.plan", "--skipInference", "--stronglyTyped"]
    assert tool.time_command("m.plan", "t.json", shapes=PROFILE, iterations=20) == [
        "trtexec", "--loadEngine=m.plan", "--shapes=x:1x3x224x224", "--warmUp=200",
        "--iterations=20", "--duration=0", "--exportTimes=t.json",
        "--useCudaGraph", "--noDataTransfers"]


# What trtexec writes with --exportTimes (samples/common/sampleReporting.cpp, exportJSONTrace):
# one object per timed iteration, warm-up runs left out.
EXPORT_TIMES = """[
  { "startEnqMs" : 0.512, "endEnqMs" : 0.538, "startH2dMs" : 0.539, "endH2dMs" : 0.539, \
"startComputeMs" : 0.539, "endComputeMs" : 1.771, "startD2hMs" : 1.771, "endD2hMs" : 1.771, \
"h2dMs" : 0, "computeMs" : 1.232, "d2hMs" : 0, "latencyMs" : 1.232 }
, { "startEnqMs" : 1.772, "endEnqMs" : 1.79, "startH2dMs" : 1.79, "endH2dMs" : 1.79, \
"startComputeMs" : 1.79, "endComputeMs" : 3.01, "startD2hMs" : 3.01, "endD2hMs" : 3.01, \
"h2dMs" : 0, "computeMs" : 1.22, "d2hMs" : 0, "latencyMs" : 1.22 }
, { "startEnqMs" : 3.011, "endEnqMs" : 3.03, "startH2dMs" : 3.031, "endH2dMs" : 3.1, \
"startComputeMs" : 3.1, "endComputeMs" : 4.35, "startD2hMs" : 4.35, "endD2hMs" : 4.41, \
"h2dMs" : 0.069, "computeMs" : 1.25, "d2hMs" : 0.06, "latencyMs" : 1.379 }
]
"""


def test_export_times_give_one_compute_time_per_iteration():
    assert parse_times(EXPORT_TIMES) == [1.232, 1.22, 1.25]


@pytest.mark.parametrize("text", ["[]", "{}", '[{"latencyMs": 1.0}]', "not json"])
def test_other_export_times_text_is_an_error(text):
    with pytest.raises(IdapError, match="exportTimes"):
        parse_times(text)


# ------------------------------------------------------------------ symbols TensorRT 11 removed

REMOVED = [
    r"BuilderFlag\.(FP16|BF16|INT8|FP8|INT4|FP4)\b", r"EXPLICIT_BATCH",
    r"platform_has_fast_(fp16|int8|tf32)", r"int8_calibrator", r"IInt8\w*Calibrator",
    r"\.dynamic_range\b", r"device_memory_size\b", r"set_output_type", r"supports_model",
    r"(OBEY|PREFER)_PRECISION_CONSTRAINTS", r"\.precision\s*=",
]


def test_no_symbol_removed_by_tensorrt_11_is_referenced():
    pattern = re.compile("|".join(REMOVED))
    found = []
    scanned = 0
    for folder in ("idap_onnx", "calib", "passes", "tools"):
        for path in sorted((REPO / folder).rglob("*.py")):
            scanned += 1
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert scanned > 50
    assert found == []
    assert pattern.search("config.set_flag(trt.BuilderFlag.FP16)")  # the defect it guards


# ------------------------------------------------------------ fp16 before a strongly typed build


def test_fp16_builds_start_from_an_fp16_onnx_file(tmp_path):
    digits = load_tool("digits")
    path = digits.build().model_path
    feed = {"x": digits.load_splits()["test"][0][:8]}
    feed = {load_model(path).graph.input[0].name: feed["x"]}
    assert tensorrt_source(path, feed, False, tmp_path / "a.onnx") == path
    converted = tensorrt_source(path, feed, True, tmp_path / "a.onnx")
    model = load_model(converted)
    assert any(t.data_type == 10 for t in model.graph.initializer)  # float16 weights
    assert model.graph.input[0].type.tensor_type.elem_type == 1  # fp32 in
    engine = tmp_path / "m.plan"
    engine.write_bytes(b"")
    assert is_engine(engine) and tensorrt_source(engine, feed, True, tmp_path / "b.onnx") == engine


def test_engines_need_a_tensorrt_backend(tmp_path):
    engine = tmp_path / "m.plan"
    engine.write_bytes(b"x")
    with pytest.raises(UsageError, match="m.plan is a TensorRT engine; time it with the tensorrt"):
        measure({"m": str(engine)}, {"x": np.zeros((1, 4), np.float32)})
    assert "trtexec" in BACKENDS


def test_polygraphy_errors_are_collected_one_per_line():
    """The engine build reports parser errors from Polygraphy's logger (where Polygraphy's
    ``check_onnx_parser_errors`` logs each ``parser.get_error(i)`` before it raises)."""
    pytest.importorskip("polygraphy")
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    from idap_onnx.deploy.tensorrt import _polygraphy_errors

    before = G_LOGGER.use_python_logging_system
    with _polygraphy_errors() as lines, pytest.raises(PolygraphyException):
        G_LOGGER.error("In node 3 with name: Conv_3 and operator: Conv (parseNode): bad")
        G_LOGGER.warning("not an error")
        G_LOGGER.critical("Could not parse ONNX correctly")
    assert lines == ["In node 3 with name: Conv_3 and operator: Conv (parseNode): bad",
                     "Could not parse ONNX correctly"]
    assert G_LOGGER.use_python_logging_system == before


# ----------------------------------------------------------------- real engines, where possible


def _digits():
    digits = load_tool("digits")
    path = digits.build().model_path
    name = load_model(path).graph.input[0].name
    return path, {name: digits.load_splits()["test"][0][:4]}


def test_build_engine_without_tensorrt_says_what_is_missing(tmp_path):
    ok, why = tensorrt_available()
    if ok:
        pytest.skip("TensorRT and a CUDA GPU are present: the missing-backend error cannot occur")
    path, feed = _digits()
    with pytest.raises(LatencyUnavailable, match="tensorrt|CUDA"):
        build_engine(path, tmp_path / "d.plan", profile=ShapeProfile.of_feed(feed))
    assert not (tmp_path / "d.plan").exists()
    with pytest.raises(UsageError, match="does not exist"):
        build_engine(tmp_path / "missing.onnx", tmp_path / "d.plan")


def test_build_engine_checks_the_profile_against_the_inputs(tmp_path):
    path, _ = _digits()
    name = load_model(path).graph.input[0].name
    with pytest.raises(UsageError, match=f"input {name} of .* has dynamic dims"):
        build_engine(path, tmp_path / "d.plan")
    with pytest.raises(UsageError, match="has no input images"):
        build_engine(path, tmp_path / "d.plan",
                     profile=ShapeProfile.parse([f"{name}:1x1x8x8", "images:1x3"]))
    assert list(tmp_path.iterdir()) == []


def test_engine_builds_and_times_next_to_its_onnx(tmp_path):
    ok, why = tensorrt_available()
    if not ok:
        pytest.skip(why)
    path, feed = _digits()
    fp16 = tensorrt_source(path, feed, True, tmp_path / "d16.onnx")
    plan = build_engine(fp16, tmp_path / "d16.plan", profile=ShapeProfile.of_feed(feed),
                        timing_cache=tmp_path / "cache.bin")
    assert plan.stat().st_size > 0 and (tmp_path / "cache.bin").stat().st_size > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    report = measure({"fp32": path, "fp16 plan": str(plan)}, feed, backend="tensorrt",
                     rounds=2, per_round=5, warmup=2)
    assert {n: t.runs for n, t in report.timings.items()} == {"fp32": 10, "fp16 plan": 10}
    assert all(t.median_ms > 0 for t in report.timings.values())


def test_tensorrt_api_path_builds_the_same_network(tmp_path):
    """The path taken where Polygraphy is not installed, run directly."""
    ok, why = tensorrt_available()
    if not ok:
        pytest.skip(why)
    from idap_onnx.deploy.tensorrt import _build_with_tensorrt, load_engine, tensorrt_modules

    trt, _ = tensorrt_modules()
    path, feed = _digits()
    fp16 = tensorrt_source(path, feed, True, tmp_path / "d16.onnx")
    plan = _build_with_tensorrt(trt, fp16, ShapeProfile.of_feed(feed), tmp_path / "tc.bin", None)
    (tmp_path / "d16.plan").write_bytes(plan)
    _, engine = load_engine(trt, tmp_path / "d16.plan")
    assert engine.num_io_tensors == 2 and (tmp_path / "tc.bin").stat().st_size > 0


def test_engine_build_failure_lists_the_parser_errors(tmp_path):
    ok, why = tensorrt_available()
    if not ok:
        pytest.skip(why)
    custom = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>
        g (float[1, 4] x) => (float[1, 4] y) { y = com.example.NoSuchOp(x) }""")
    onnx.save(custom, tmp_path / "custom.onnx")
    with pytest.raises(IdapError, match="(?s)TensorRT c.*NoSuchOp"):
        build_engine(tmp_path / "custom.onnx", tmp_path / "custom.plan")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["custom.onnx"]


def test_a_file_that_is_not_onnx_is_a_usage_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(UsageError, match="'.*bad.onnx' is not an ONNX file"):
        build_engine(bad, tmp_path / "bad.plan")
    assert not (tmp_path / "bad.plan").exists()


def test_trtexec_times_an_onnx_file_and_its_engine(tmp_path):
    tool = find_trtexec()
    if tool is None:
        pytest.skip("trtexec is not on the PATH (it ships with TensorRT's tar/deb packages)")
    path, feed = _digits()
    report = measure({"fp32": path}, feed, backend="trtexec", rounds=2, per_round=5)
    assert report.timings["fp32"].runs >= 10 and report.device.startswith("trtexec")
