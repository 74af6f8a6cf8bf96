"""`idap-onnx export` and `optimize --precision` on the trained digits CNN: what a user runs to
get the deployable artifact, the bad inputs that must fail in one line without leaving files,
and the budget judged on the exported model with a step back when the export breaks it."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from idap_onnx.cli.main import main
from idap_onnx.deploy import int8
from idap_onnx.deploy.export import export
from idap_onnx.deploy.latency import tensorrt_available

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tools_loader import load_tool  # noqa: E402

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("torch")


@pytest.fixture(scope="module")
def d() -> Path:
    return load_tool("digits").build().model_path.parent


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("idap-onnx: error:"), err
    return err[-1]


def test_help_names_every_flag_with_examples(capsys):
    assert main(["export", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--precision", "--calib", "--target", "--engine", "--input-shape",
                 "--min-shape", "--opt-shape", "--max-shape", "--calib-method", "--keep-fp32",
                 "--json", "--labels", "--int8-format", "--latency-batch", "examples:"):
        assert flag in text, flag
    assert main(["optimize", "--help"]) == 0
    assert "--precision {fp32,fp16,int8}" in capsys.readouterr().out


def test_export_int8_writes_a_smaller_checked_model_and_says_what_it_did(d, tmp_path, capsys):
    before = _sha(d / "digits.onnx")
    out = tmp_path / "digits.int8.onnx"
    argv = ["export", str(d / "digits.onnx"), "-o", str(out), "--precision", "int8",
            "--calib", str(d / "x_test.npz"), "--labels", str(d / "labels_test.npy"),
            "--samples", "128", "--latency-batch", "8", "--json", str(tmp_path / "e.json")]
    assert main(argv) == 0
    text = capsys.readouterr().out
    report = json.loads((tmp_path / "e.json").read_text())
    assert _sha(d / "digits.onnx") == before  # the input is untouched
    assert report["command"] == "export" and report["precision"] == "int8"
    assert report["target"] == "onnxruntime-cpu" and report["samples"] == 128
    lat = report["latency"]
    assert set(lat["timings"]) == {"source", "exported"} and lat["batch"] == 8
    assert "latency (onnxruntime" in text and "size:" in text and "PASSED" in text
    q = report["int8"]
    assert {t["candidate"] for t in q["trials"]} >= {"fp32", "QOperator U8S8", "QDQ U8S8"}
    if report["applied"] == "int8":  # int8 paid on this machine at batch 8
        assert report["bytes"]["exported"] < report["bytes"]["source"] / 3
        assert report["max_rel_error"] < 0.1
        assert report["metric"]["exported"] >= report["metric"]["source"] - 2.0
        assert "int8 form:" in text
    else:  # no int8 form ran faster: the fp32 model is written, and the text says so
        assert "keeping fp32" in q["note"] and report["max_rel_error"] == 0.0
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.load(d / "x_test.npz")["x"][:4]
    assert sess.run(None, {"x": x})[0].shape == (4, 10)  # fp32 in, fp32 out


def test_pinned_int8_export_is_deterministic(d, tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    for out in (a, b):
        argv = ["export", str(d / "digits.onnx"), "-o", str(out), "--precision", "int8",
                "--calib", str(d / "x_train.npz"), "--int8-format", "QDQ",
                "--int8-exclude", "gemm", "--no-latency"]
        assert main(argv) == 0
    assert a.read_bytes() == b.read_bytes()
    kinds = {n.op_type for n in onnx.load(str(a)).graph.node}
    assert "QuantizeLinear" in kinds and "Gemm" in kinds  # the gemm class stayed fp32


def test_export_fp16_keeps_fp32_inputs_and_outputs(d, tmp_path):
    res = export(d / "digits.onnx", tmp_path / "h.onnx", "fp16", calib=d / "x_val.npz",
                 samples=32, latency=False)
    assert res.applied == "fp16" and res.max_rel_error < 1e-2
    model = onnx.load(str(tmp_path / "h.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert res.bytes["exported"] < 0.6 * res.bytes["source"]


def test_export_fp32_from_memory_is_the_same_model(d, tmp_path):
    model = onnx.load(str(d / "digits.onnx"))
    res = export(model, tmp_path / "f.onnx", "fp32", latency=False)
    assert res.max_rel_error == 0.0 and res.source == "<in memory>"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--precision", "int8"], "needs calibration data"),
        (["--precision", "int4", "--calib", "{d}/x_train.npz"], "unknown precision 'int4'"),
        (["--precision", "int8", "--calib", "{d}/x_train.npz", "--keep-fp32", "nope"],
         "no node named nope"),
        (["--precision", "int8", "--calib", "{d}/x_train.npz", "--int8-exclude", "gemm"],
         "--int8-exclude needs --int8-format"),
    ],
)
def test_bad_input_is_one_line_exit_1_and_no_file(d, tmp_path, capsys, extra, message):
    out = tmp_path / "x.onnx"
    argv = ["export", str(d / "digits.onnx"), "-o", str(out),
            *[a.replace("{d}", str(d)) for a in extra]]
    assert main(argv) == 1
    assert message in _one_error_line(capsys)
    assert not list(tmp_path.iterdir())


def test_output_over_the_input_is_refused(d, tmp_path, capsys):
    src = tmp_path / "m.onnx"
    src.write_bytes((d / "digits.onnx").read_bytes())
    assert main(["export", str(src), "-o", str(src), "--precision", "fp32"]) == 1
    _one_error_line(capsys)
    assert src.read_bytes() == (d / "digits.onnx").read_bytes()


def test_engine_without_tensorrt_fails_before_any_work(d, tmp_path, capsys):
    if tensorrt_available()[0]:
        pytest.skip("TensorRT and a CUDA GPU are present here")
    argv = ["export", str(d / "digits.onnx"), "-o", str(tmp_path / "x.onnx"), "--precision",
            "int8", "--calib", str(d / "x_train.npz"), "--engine", str(tmp_path / "x.plan")]
    assert main(argv) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "--engine needs TensorRT" in err[0]  # no data read, no rounds
    assert not list(tmp_path.iterdir())


def test_a_failing_engine_build_leaves_no_file(d, tmp_path, monkeypatch):
    from idap_onnx.deploy import export as export_mod
    from idap_onnx.deploy.tensorrt import ShapeProfile
    from idap_onnx.errors import IdapError

    def fail(*_a, **_k):
        raise IdapError("TensorRT could not build an engine: In node 3: unsupported")

    monkeypatch.setattr(export_mod, "_engine_ready", lambda *a: ShapeProfile({}))
    monkeypatch.setattr(export_mod, "_build_engine", fail)
    with pytest.raises(IdapError, match="could not build"):
        export(d / "digits.onnx", tmp_path / "x.onnx", "fp16", calib=d / "x_val.npz",
               engine=tmp_path / "x.plan", latency=False)
    assert not list(tmp_path.iterdir())


def _optimize(d: Path, out: Path, *extra: str) -> list[str]:
    return ["optimize", str(d / "digits.onnx"), "--calib", str(d / "x_train.npz"),
            "--val-fraction", "0.3", "--stages", "1", "-o", str(out), *extra]


def test_optimize_precision_int8_reports_three_models_side_by_side(d, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    argv = _optimize(d, out, "--labels", str(d / "labels_train.npy"), "--max-drop", "1",
                     "--target-flops", "0.5", "--round-to", "8", "--precision", "int8",
                     "--latency-batch", "8")
    assert main(argv) == 0
    text = capsys.readouterr().out
    report = json.loads((tmp_path / "o.report.json").read_text())
    exp = report["export"]
    assert report["settings"]["precision"] == "int8"
    assert set(exp["models"]) == {"original", "optimized", "exported"}
    assert exp["models"]["exported"]["drop"] <= 1.0  # the budget, judged on the export
    md = (tmp_path / "o.report.md").read_text()
    assert "## Deployed precision: int8" in md and "| pruned fp32 |" in md
    assert "int8 export" in text
    timed = set(report["latency"]["timings"])
    if exp["applied"] == "int8":  # int8 paid at batch 8 here: the three timed in one call
        assert timed == {"original", "optimized", "exported"}
        assert Path(exp["path"]) == tmp_path / "o.int8.onnx" and Path(exp["path"]).exists()
        assert exp["models"]["exported"]["bytes"] < exp["models"]["optimized"]["bytes"] / 3
        assert "| pruned int8 |" in md
    else:  # no int8 form ran faster (a busy machine): fp32 kept, nothing more written
        assert timed == {"original", "optimized"} and "keeping fp32" in exp["note"]
        assert not (tmp_path / "o.int8.onnx").exists()


def test_optimize_steps_back_when_the_int8_export_breaks_the_budget(d, tmp_path, monkeypatch):
    # The form pinned (QOperator U8S8, untimed) so the test does not depend on timings.
    monkeypatch.setattr(int8._Search, "run",
                        lambda self, feed: self.fixed(int8.Int8Form(self.target, "QOperator")))
    out = tmp_path / "s.onnx"
    argv = _optimize(d, out, "--metric", "rel-l2", "--max-error", "0.03", "--precision",
                     "int8", "--latency", "off", "--round-to", "1")
    assert main(argv) == 0
    report = json.loads((tmp_path / "s.report.json").read_text())
    exp = report["export"]
    accepted = [s for s in report["steps"] if s["accepted"]]
    assert exp["stepped_back"] >= 1 and not exp["tried"][0]["holds"]
    assert exp["tried"][-1]["holds"] and exp["models"]["exported"]["error"] <= 0.03
    # the written fp32 model is the accepted step the export holds on
    back = accepted[len(accepted) - 1 - exp["stepped_back"]]
    assert report["final"]["macs"] == back["macs"]
    assert "stepped back" in exp["note"]
    written = onnx.load(str(out))
    exported = onnx.load(str(tmp_path / "s.int8.onnx"))
    assert len(written.graph.initializer) and any(
        n.op_type == "QLinearConv" for n in exported.graph.node)
