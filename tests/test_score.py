"""``idap-onnx score`` and ``score_api.score`` on real exported models: a torchvision ResNet-18
(1x3x64x64, legacy exporter, opset 17) and the zoo's tiny BERT (token ids, attention mask)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from tools_loader import load_tool

from idap_onnx.calib.data import load_data, split
from idap_onnx.calib.scores import UNIT_SCORES
from idap_onnx.cli import commands
from idap_onnx.cli.args import to_json
from idap_onnx.cli.main import main
from idap_onnx.dependency import analyze_model
from idap_onnx.model_io import load_model
from idap_onnx.planner import weight_scores
from idap_onnx.score_api import DEVICES, score

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
PROVIDER = "CUDAExecutionProvider" if CUDA else "CPUExecutionProvider"
N = 20  # samples in the .npz


@pytest.fixture(scope="module")
def resnet(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("score") / "resnet18.onnx"
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, torch.randn(1, 3, 64, 64), str(path), dynamo=False, opset_version=17,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((N, 3, 64, 64)).astype(np.float32)


@pytest.fixture(scope="module")
def npz(tmp_path_factory, images) -> Path:
    path = tmp_path_factory.mktemp("data") / "calib.npz"
    np.savez(path, input=images)
    return path


@pytest.fixture(scope="module")
def bert() -> Path:
    return load_tool("zoo").build("bert_tiny")


@pytest.fixture(scope="module")
def bert_npz(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "tokens.npz"
    rng = np.random.default_rng(0)
    np.savez(path, input_ids=rng.integers(0, 1000, (12, 128)).astype(np.int64),
             attention_mask=np.ones((12, 128), dtype=np.int64))
    return path


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _removable(report) -> list[float]:
    return [r.score for r in report.ranking()]


# -- API ---------------------------------------------------------------------------------------


def test_api_scores_every_unit_and_ranks_blocks_ascending(resnet, npz):
    report = score(resnet, npz, val_fraction=0.25, batch_size=4)
    assert report.provider == PROVIDER
    assert (report.samples, report.validation_samples) == (15, 5)
    assert dict(report.input_shapes) == {"input": (1, 3, 64, 64)}
    assert report.score == "idap" and report.mean_compensation
    assert len(report.groups) > 5 and any(not g.frozen for g in report.groups)
    for g in report.groups:  # a frozen group is never removed, so it is not measured
        if g.frozen:
            assert all(math.isnan(s) for s in g.scores), g.id
        else:
            assert all(math.isfinite(s) and s >= 0 for s in g.scores), g.id
    d_l = [b.divergence for b in report.blocks]
    assert len(d_l) >= 8 and d_l == sorted(d_l) and all(v > 0 for v in d_l)
    data = json.loads(to_json(report.to_dict(top=5)))  # finite, serializable
    assert data["schema_version"] == 1 and data["command"] == "score"
    assert data["provider"] == PROVIDER and data["samples"] == 15
    assert data["data"]["validation_samples"] == 5
    assert [b["d_l"] for b in data["blocks"]] == d_l
    assert [len(g["scores"]) for g in data["groups"]] == [g.size for g in _groups(resnet)]
    assert {"load_s", "analyze_s", "calibrate_s", "score_s", "total_s", "samples_per_s"} <= set(
        data["timing"])
    least = [r["score"] for r in data["least_important"]]
    most = [r["score"] for r in data["most_important"]]
    assert len(least) == len(most) == 5
    assert least == sorted(least) and most == sorted(most, reverse=True) and least[-1] <= most[-1]


def _groups(path):
    model = load_model(path)
    return analyze_model(model, {"input": [1, 3, 64, 64]}).groups


def test_calibration_uses_only_the_calibration_part(resnet, npz, images):
    report = score(resnet, npz, val_fraction=0.3, batch_size=2)
    cal, val = split(load_data(npz, load_model(resnet)), 0.3, 0)
    picked = np.stack([cal[i]["input"] for i in range(len(cal))])
    alone = score(resnet, {"input": picked}, batch_size=2)
    assert report.samples == alone.samples == len(cal) == N - len(val)
    for a, b in zip(report.groups, alone.groups, strict=True):
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-9, atol=1e-15)
    assert [b.name for b in report.blocks] == [b.name for b in alone.blocks]
    # and the validation samples do change the scores when they are included
    everything = score(resnet, {"input": images}, batch_size=2)
    assert not np.allclose(_removable(everything), _removable(report))


def test_score_measures_an_offloaded_copy_exactly_like_the_loaded_model(resnet, images):
    """``score`` runs its pass on ``model_io.offloaded`` (weights on disk, not twice in
    memory): every unit score and D_l equals the pass on the fully loaded model."""
    from idap_onnx.blocks import find_blocks
    from idap_onnx.calib.scores import block_divergence, unit_scores
    from idap_onnx.calib.stats import collect, plan_probes

    report = score(resnet, {"input": images}, batch_size=4, device="cpu")
    model = load_model(resnet)
    graph = analyze_model(model, {"input": [1, 3, 64, 64]})
    blocks = find_blocks(model, graph.index)
    feeds = [{"input": images[i:i + 4]} for i in range(0, N, 4)]
    stats = collect(model, plan_probes(graph, blocks, scores=("idap",)), feeds, device="cpu")
    want = unit_scores(graph, stats, "idap")
    for g in report.groups:
        np.testing.assert_array_equal(np.asarray(g.scores), want[g.id])
    d_l = block_divergence(stats)
    assert {b.name: b.divergence for b in report.blocks} == d_l


def test_transformer_scores_heads_and_sublayers(bert, bert_npz):
    report = score(bert, bert_npz, batch_size=4)
    assert report.samples == 12 and report.provider == PROVIDER
    assert dict(report.input_shapes) == {"input_ids": (1, 128), "attention_mask": (1, 128)}
    scores = _removable(report)
    assert scores and all(math.isfinite(s) and s >= 0 for s in scores) and max(scores) > 0
    d_l = [b.divergence for b in report.blocks]
    assert len(d_l) >= 4 and d_l == sorted(d_l)  # attention and MLP sub-layers of 2 layers


def test_progress_bar_reports_samples_per_second(resnet, npz, capsys):
    score(resnet, npz, batch_size=10, progress=True)
    err = capsys.readouterr().err
    assert "calibrate" in err and "samples/s" in err and f"{N}/{N}" in err


def test_choices_spelled_out_in_the_cli_match_the_library():
    assert commands.SCORE_CHOICES == UNIT_SCORES and commands.DEVICE_CHOICES == DEVICES


# -- CLI ---------------------------------------------------------------------------------------


def test_cli_prints_provider_units_and_blocks_and_writes_json(capsys, resnet, npz, tmp_path):
    out_json = tmp_path / "scores.json"
    code, out, err = _run(capsys, "score", resnet, "--calib", npz, "--top", "3",
                          "--batch-size", "4", "--json", out_json)
    assert code == 0, err
    data = json.loads(out_json.read_text())
    assert data["command"] == "score" and data["provider"] == PROVIDER and data["samples"] == N
    assert f"Provider: {PROVIDER}" in out
    assert "Least important (removed first): 3" in out and "Most important: 3" in out
    names = [b["name"] for b in data["blocks"]]
    table = out[out.index("Blocks ranked by D_l"):]
    assert [table.index(n) for n in names] == sorted(table.index(n) for n in names)
    for row in data["least_important"] + data["most_important"]:
        assert f"{row['producer']}[{row['channel']}]" in out
    assert out.rstrip().splitlines()[-1].startswith("PASSED (")
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left behind


def test_cli_json_to_stdout_and_l1_score(capsys, resnet, npz):
    code, out, err = _run(capsys, "score", resnet, "--calib", npz, "--score", "l1", "--json", "-")
    assert code == 0, err
    data = json.loads(out)
    assert data["score"] == "l1" and "PASSED" in err
    expected = weight_scores(analyze_model(load_model(resnet), {"input": [1, 3, 64, 64]}), "l1")
    for g in data["groups"]:
        np.testing.assert_allclose(g["scores"], expected[g["id"]])
    assert [b["d_l"] for b in data["blocks"]] == sorted(b["d_l"] for b in data["blocks"])


def test_cli_reads_an_image_folder_and_random_data_warns_once(capsys, resnet, tmp_path):
    folder = _image_folder(tmp_path, 8)
    code, out, err = _run(capsys, "score", resnet, "--calib", folder, "--image-crop", "64x64",
                          "--no-progress")
    assert code == 0, err
    assert "images from" in out and "Calibrated on 8 samples" in out
    code, out, err = _run(capsys, "score", resnet, "--calib", "random", "--num-random", "8")
    assert code == 0
    assert err.strip().splitlines() == [
        "idap-onnx: warning: random calibration data is synthetic: use it for smoke tests only"]


def _image_folder(tmp_path: Path, n: int, broken: bool = False) -> Path:
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 256, (80, 72, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:02d}.png")
    if broken:
        (folder / "zz_broken.png").write_bytes(b"not a png")
    return folder


def _bad_data(tmp_path: Path, case: str) -> tuple[list[str], str]:
    """(extra argv, expected message part) for each kind of bad calibration input."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 3, 64, 64)).astype(np.float32)
    path = tmp_path / "bad.npz"
    if case == "shape":
        np.savez(path, input=x[:, :, :32, :32])
        return ["--calib", path], "reshape the data"
    if case == "names":
        np.savez(path, image=x)
        return ["--calib", path], "not model inputs"
    if case in ("nan", "inf"):
        x[3, 1, 2, 2] = np.nan if case == "nan" else np.inf
        np.savez(path, input=x)
        return ["--calib", path], "contains NaN" if case == "nan" else "contains Inf"
    if case == "empty folder":
        (tmp_path / "empty").mkdir()
        return ["--calib", tmp_path / "empty"], "holds no"
    if case == "unreadable image":
        return ["--calib", _image_folder(tmp_path, 9, broken=True)], "cannot be read"
    if case == "fewer than one batch":
        np.savez(path, input=x[:9])
        return ["--calib", path, "--val-fraction", "0.2"], "fewer than one batch (8)"
    if case == "input shape disagrees":
        np.savez(path, input=x)
        return ["--calib", path, "--input-shape", "input:1x3x32x32"], "disagrees"
    raise AssertionError(case)


BAD = ["shape", "names", "nan", "inf", "empty folder", "unreadable image",
       "fewer than one batch", "input shape disagrees"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_error_line_and_exit_1(capsys, resnet, tmp_path, case):
    argv, message = _bad_data(tmp_path, case)
    out_json = tmp_path / "scores.json"
    code, _, err = _run(capsys, "score", resnet, *argv, "--json", out_json)
    assert code == 1, case
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("idap-onnx: error: ") and message in lines[0], lines[0]
    assert not out_json.exists()


def test_bad_dtype_for_token_ids_is_one_error_line(capsys, bert, tmp_path):
    path = tmp_path / "float_ids.npz"
    np.savez(path, input_ids=np.zeros((8, 128), np.float32),
             attention_mask=np.ones((8, 128), np.int64))
    code, _, err = _run(capsys, "score", bert, "--calib", path)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "floats do not cast safely to integers" in lines[0]


@pytest.mark.skipif(CUDA, reason="ONNX Runtime has the CUDA provider here")
def test_device_cuda_without_the_provider_is_a_user_error(capsys, resnet, npz):
    code, _, err = _run(capsys, "score", resnet, "--calib", npz, "--device", "cuda")
    assert code == 1 and err.count("\n") == 1 and "no CUDA provider" in err


def test_help_lists_flags_defaults_and_examples(capsys):
    code, out, _ = _run(capsys, "score", "--help")
    assert code == 0
    for flag in ("MODEL", "--calib", "--score", "--no-mean-compensation", "--json", "--top",
                 "--batch-size", "--val-fraction", "--device", "--tokenizer", "--image-crop",
                 "--image-layout", "--image-mean", "--image-std", "--seq-len", "--num-random",
                 "--input-shape", "--no-progress"):
        assert flag in out, flag
    assert "default" in out.lower() and "examples:" in out
