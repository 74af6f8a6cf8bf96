"""The OCR case's data and measures (``tools/ocr.py``, issue 18) on rapidocr's shipped models,
and the budget taken from the pipeline's own measure through ``optimize --metric``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from tools_loader import load_tool

from idap_onnx.cli.main import main

pytest.importorskip("rapidocr_onnxruntime")
ocr = load_tool("ocr")


def test_the_splits_are_fixed_and_disjoint():
    splits = ocr.strings()
    assert {k: len(v) for k, v in splits.items()} == ocr.SPLITS
    calib, val, test = (set(splits[k]) for k in ("calib", "val", "test"))
    assert not calib & val and not calib & test and not val & test
    assert splits["test"][:2] == ["1969 any fish about", "after true work country"]


def test_rendering_is_deterministic():
    a, b = ocr.line_images("val")[:3], ocr.line_images("val")[:3]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    page = ocr.pages("test")[0][0]
    assert page.shape == (ocr.PAGE_H, ocr.PAGE_W, 3) and page.dtype == np.uint8


def test_character_accuracy_is_one_minus_the_normalized_edit_distance():
    assert ocr.edit_distance("kitten", "sitting") == 3
    assert ocr.char_accuracy("g0od cover", "good cover") == pytest.approx(1 - 1 / 9)
    assert ocr.char_accuracy("", "") == 1.0
    assert ocr.char_accuracy("abc", "") == 0.0
    assert ocr.char_accuracy("a b", "ab") == 1.0  # spaces ignored, as PaddleOCR's RecMetric


def test_box_agreement():
    a = np.array([[0, 0, 10, 10], [20, 0, 30, 10]], float)
    assert ocr.box_agreement(a, a) == 1.0
    assert ocr.box_agreement(a[:1], a) == pytest.approx(2 / 3)  # P 1, R 1/2: one box missed
    assert ocr.box_agreement(np.zeros((0, 4)), a) == 0.0
    assert ocr.box_agreement(a + [2, 0, 2, 0], a) == 1.0  # IoU 8/12: still the same lines
    assert ocr.box_agreement(a + [5, 0, 5, 0], a) == 0.0  # IoU 5/15: no match
    merged = np.array([[0, 0, 30, 10]], float)  # two lines found as one box
    assert ocr.box_agreement(merged, a) == 0.0


def test_the_original_recognizer_reads_the_rendered_lines():
    x = ocr.rec_inputs(ocr.line_images("val")[:32])
    sess = ort.InferenceSession(str(ocr.rapidocr_models()["rec"]),
                                providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x})[0]
    labels = np.array(ocr.strings()["val"][:32])
    accuracy = ocr.rec_char_accuracy([y], [y], labels)
    assert accuracy > 98.0, ocr.ctc_decode(y)
    # a shuffled alphabet reads nonsense: the measure can fail
    assert ocr.rec_char_accuracy([y[:, :, ::-1]], [y], labels) < 20.0


def test_the_detector_finds_every_line_of_a_page():
    images, texts = ocr.pages("test")
    x = ocr.det_inputs(images[:2])
    sess = ort.InferenceSession(str(ocr.rapidocr_models()["det"]),
                                providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x})[0]
    assert [len(ocr.boxes(m)) for m in y] == [len(t) for t in texts[:2]]
    assert ocr.det_box_agreement([y], [y], None) == 100.0
    assert ocr.det_box_agreement([np.zeros_like(y)], [y], None) == 0.0


def test_optimize_budgets_the_recognizer_by_its_character_accuracy(tmp_path: Path, capsys):
    """The CLI route of docs/OCR.md at a small scale: rendered strings as labels (a .npy of
    text), the metric from tools/ocr.py, one stage-1 step. The model keeps the alphabet
    rapidocr reads from its metadata, and the drop the report states is within the budget."""
    lines = ocr.line_images("val")[:48]
    np.savez(tmp_path / "rec.npz", x=ocr.rec_inputs(lines))
    np.save(tmp_path / "labels.npy", np.array(ocr.strings()["val"][:48]))
    model = tmp_path / "rec.onnx"
    model.write_bytes(ocr.rapidocr_models()["rec"].read_bytes())
    out = tmp_path / "rec.opt.onnx"
    code = main(["optimize", str(model), "--calib", str(tmp_path / "rec.npz"),
                 "--labels", str(tmp_path / "labels.npy"), "--val-fraction", "0.5",
                 "--metric", f"{ocr.__file__}:rec_char_accuracy", "--max-drop", "1",
                 "--steps", "1", "--stages", "1", "--latency", "off", "-o", str(out),
                 "--json", str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["metric"] == "rec_char_accuracy"
    assert report["final"]["drop"] <= 1.0
    meta = {p.key for p in onnx.load(str(out)).metadata_props}
    assert "character" in meta
