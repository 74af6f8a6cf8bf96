"""`idap-onnx optimize` from the command line: flags, config file, dry run, bad input,
and an interrupted run that leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from idap_onnx.cli.main import main

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tools_loader import load_tool  # noqa: E402


@pytest.fixture(scope="module")
def digits_dir() -> Path:
    return load_tool("digits").build().model_path.parent


def _base(d: Path) -> list[str]:
    return [
        "optimize",
        str(d / "digits.onnx"),
        "--calib",
        str(d / "x_train.npz"),
        "--labels",
        str(d / "labels_train.npy"),
        "--val-fraction",
        "0.3",
    ]


def test_help_explains_every_flag(capsys):
    assert main(["optimize", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in (
        "--target-flops",
        "--target-params",
        "--max-drop",
        "--max-error",
        "--labels",
        "--metric",
        "--round-to",
        "--max-group-ratio",
        "--ignore",
        "--refit",
        "--stages",
        "--max-blocks",
        "--dry-run",
        "--config",
        "--finetune",
    ):
        assert flag in text, flag


def test_optimize_writes_model_and_reports(digits_dir, tmp_path, capsys):
    out = tmp_path / "d.onnx"
    code = main(
        [
            *_base(digits_dir),
            "--max-drop",
            "1",
            "--target-flops",
            "0.5",
            "-o",
            str(out),
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["schema_version"] == 1 and report["command"] == "optimize"
    assert report["final"]["drop"] <= 1.0
    assert report["final"]["macs"] <= 0.5 * report["original"]["macs"] * 1.05
    for suffix in (".report.json", ".report.md", "_metric_vs_macs.png", "_kept_per_layer.png"):
        assert (tmp_path / f"d{suffix}").exists(), suffix
    assert "PASSED" in capsys.readouterr().out


def test_config_file_mirrors_flags_and_the_command_line_wins(digits_dir, tmp_path):
    config = tmp_path / "idap.toml"
    config.write_text('max-drop = 0.5\nsteps = 2\nstages = "1"\ntarget-flops = 0.9\n')
    out = tmp_path / "c.onnx"
    assert (
        main(
            [
                *_base(digits_dir),
                "--config",
                str(config),
                "--steps",
                "3",
                "-o",
                str(out),
                "--json",
                str(tmp_path / "c.json"),
            ]
        )
        == 0
    )
    settings = json.loads((tmp_path / "c.json").read_text())["settings"]
    assert settings["max_drop"] == 0.5 and settings["stages"] == [1]
    assert settings["steps"] == 3  # given on the command line


def test_dry_run_reports_sensitivity_without_writing_a_model(digits_dir, tmp_path):
    assert main([*_base(digits_dir), "--dry-run", "--json", str(tmp_path / "s.json")]) == 0
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["groups"] and all(len(g["results"]) >= 2 for g in report["groups"])
    assert report["blocks"]
    assert not list(tmp_path.glob("*.onnx"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "needs -o OUT"),
        (["--max-drop", "1", "--max-error", "0.1", "-o", "{tmp}/x.onnx"], "not both"),
        (["--stages", "3", "-o", "{tmp}/x.onnx"], "stages"),
        (["--labels", "{tmp}/short.npy", "-o", "{tmp}/x.onnx"], "labels have 3 entries"),
        (["--config", "{tmp}/bad.toml", "-o", "{tmp}/x.onnx"], "unknown setting"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(digits_dir, tmp_path, capsys, extra, message):
    np.save(tmp_path / "short.npy", np.array([1, 2, 3]))
    (tmp_path / "bad.toml").write_text("colour = 'blue'\n")
    argv = [*_base(digits_dir)] + [a.replace("{tmp}", str(tmp_path)) for a in extra]
    if "--labels" in extra:
        i = argv.index("--labels")  # the later --labels wins in argparse
        assert argv[i + 1].endswith("labels_train.npy")
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("idap-onnx: error:") and message in err[0]


def test_an_interrupted_run_leaves_no_output_and_exits_non_zero(digits_dir, tmp_path):
    out = tmp_path / "i.onnx"
    exe = Path(sys.executable).with_name("idap-onnx")
    proc = subprocess.Popen(
        [
            str(exe),
            *_base(digits_dir),
            "--max-drop",
            "1",
            "--steps",
            "50",
            "--p0",
            "0.01",
            "--stages",
            "1",
            "-o",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    deadline = time.time() + 60
    while time.time() < deadline:  # wait for the first evaluated step
        line = proc.stderr.readline()
        if "stage 1 step" in line:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "interrupted" in err
    assert not list(tmp_path.iterdir())
