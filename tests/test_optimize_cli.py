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
        "--latency",
        "--latency-batch",
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
    out_text = capsys.readouterr().out
    assert "PASSED" in out_text
    # the result timed against the original, side by side, on a real sample
    latency = report["latency"]
    assert latency["backend"] == "onnxruntime" and latency["batch"] == 1
    assert set(latency["timings"]) == {"original", "optimized"}
    assert latency["speedup"]["original"] == 1.0
    assert "latency (onnxruntime" in out_text
    assert "## Latency (measured side by side)" in (tmp_path / "d.report.md").read_text()
    # the least-squares refit ran by default, and the report says what it cost
    assert report["settings"]["refit"] is True
    stage1 = [s for s in report["steps"] if s["stage"] == 1]
    assert sum(s["refitted"] for s in stage1) > 0
    assert all(0 < s["refit_seconds"] <= s["seconds"] for s in stage1)
    assert "least-squares refit (" in (tmp_path / "d.report.md").read_text()


def test_no_refit_turns_the_refit_off(digits_dir, tmp_path):
    out = tmp_path / "d.onnx"
    argv = [*_base(digits_dir), "--stages", "1", "--steps", "2", "--max-drop", "50",
            "--latency", "off", "--no-refit", "-o", str(out), "--json", str(tmp_path / "r.json")]
    assert main(argv) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["settings"]["refit"] is False
    assert all(s["refitted"] == 0 and s["refit_seconds"] == 0 for s in report["steps"])
    assert "least-squares refit" not in (tmp_path / "d.report.md").read_text()


def test_optimize_fine_tunes_each_step_with_finetune(digits_dir, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    argv = [*_base(digits_dir), "--stages", "1", "--steps", "2", "--max-drop", "50",
            "--finetune", "-o", str(out)]
    assert main(argv) == 0
    assert out.exists()
    report = json.loads((tmp_path / "o.report.json").read_text())
    assert report["settings"]["finetune"] is True
    assert "fine-tuned" in capsys.readouterr().err


def test_config_file_mirrors_flags_and_the_command_line_wins(digits_dir, tmp_path):
    config = tmp_path / "idap.toml"
    config.write_text(
        'max-drop = 0.5\nsteps = 2\nstages = "1"\ntarget-flops = 0.9\nlatency = "off"\n'
    )
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
    assert json.loads((tmp_path / "c.json").read_text())["latency"] is None  # latency = "off"


def test_dry_run_reports_sensitivity_without_writing_a_model(digits_dir, tmp_path):
    assert main([*_base(digits_dir), "--dry-run", "--json", str(tmp_path / "s.json")]) == 0
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["groups"] and all(len(g["results"]) >= 2 for g in report["groups"])
    assert report["blocks"]
    assert not list(tmp_path.glob("*.onnx"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["-o", "{tmp}/missing/x.onnx"], "does not exist"),
        (["--max-drop", "1", "--max-error", "0.1", "-o", "{tmp}/x.onnx"], "not both"),
        (["--stages", "3", "-o", "{tmp}/x.onnx"], "stages"),
        (["--labels", "{tmp}/short.npy", "-o", "{tmp}/x.onnx"], "labels have 3 entries"),
        (["--config", "{tmp}/bad.toml", "-o", "{tmp}/x.onnx"], "unknown setting"),
        (["--latency-batch", "0", "-o", "{tmp}/x.onnx"], "latency_batch 0"),
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
        # A shell without job control starts background jobs (`.ci/run &`, nohup) with SIGINT
        # ignored, and the child would inherit that and run on: give it the default, as a
        # terminal's Ctrl-C would find it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
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


def test_latency_on_tensorrt_without_it_fails_before_the_run(digits_dir, tmp_path, capsys):
    from idap_onnx.deploy.latency import tensorrt_available

    if tensorrt_available()[0]:
        pytest.skip("TensorRT and a CUDA GPU are present here")
    out = tmp_path / "t.onnx"
    assert main([*_base(digits_dir), "--latency", "tensorrt", "-o", str(out)]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert err[-1].startswith("idap-onnx: error:") and "tensorrt" in err[-1]
    assert "stage 1" not in captured.err  # nothing was optimized first
    assert not out.exists()


def test_the_report_flags_layers_cut_below_a_quarter_of_their_width(digits_dir, tmp_path):
    """80 % of the MACs taken without the refit at exact widths cuts the CNN's narrowest
    conv below 25 % of its width: report.md says so above the kept-width table and marks
    that row; the settings record the coherence factor (on by default, off with
    --no-coherence)."""
    from idap_onnx.optimize_report import STRIPPED

    def run(*extra):
        argv = [*_base(digits_dir), "--stages", "1", "--no-refit", "--max-drop", "100",
                "--target-flops", "0.2", "--latency", "off", "--round-to", "1", *extra,
                "-o", str(tmp_path / "d.onnx"), "--json", str(tmp_path / "r.json")]
        assert main(argv) == 0
        return (json.loads((tmp_path / "r.json").read_text()),
                (tmp_path / "d.report.md").read_text())

    report, md = run()
    assert report["settings"]["coherence"] is True
    stripped = [n for n, k in report["kept"].items() if k["after"] < STRIPPED * k["before"]]
    assert stripped
    assert f"**{len(stripped)} layer(s) cut below 25 % of their width**" in md
    for name in stripped:
        assert f"| `{name}` | {report['kept'][name]['before']} | " in md
    assert md.count("(stripped) |") == len(stripped)
    report, _ = run("--no-coherence")
    assert report["settings"]["coherence"] is False


METRIC_MODULE = '''
import numpy as np


def digit_accuracy(outputs, ref_outputs, labels):
    """Top-1 in [0, 1] of the candidate's logits against the true digits."""
    return float(np.mean(outputs[0].argmax(axis=1) == labels))


def logit_gap(outputs, ref_outputs, labels):
    """Mean absolute logit change: lower is better."""
    return float(np.mean(np.abs(outputs[0] - ref_outputs[0])))


logit_gap.higher_is_better = False

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def named_digit_accuracy(outputs, ref_outputs, labels):
    """Top-1 against labels given as the digits' names (strings)."""
    return float(np.mean([NAMES[int(k)] == name for k, name in
                          zip(outputs[0].argmax(axis=1), labels, strict=True)]))
'''


def test_a_metric_of_your_own_budgets_the_run(digits_dir, tmp_path):
    """--metric file.py:function: the budget is that function on the validation part, in its
    own units (here a top-1 in [0, 1], so --max-drop 0.01 is one point)."""
    metric = tmp_path / "my_metric.py"
    metric.write_text(METRIC_MODULE)
    out = tmp_path / "m.onnx"
    argv = [*_base(digits_dir), "--metric", f"{metric}:digit_accuracy", "--max-drop", "0.01",
            "--no-refit", "--stages", "1", "--target-flops", "0.7", "--latency", "off",
            "-o", str(out)]
    assert main(argv) == 0
    report = json.loads((tmp_path / "m.report.json").read_text())
    assert report["metric"] == "digit_accuracy"
    assert report["original"]["metric"] - report["final"]["metric"] <= 0.01 + 1e-9
    assert report["final"]["macs"] < report["original"]["macs"]


def test_a_metric_of_your_own_reads_labels_of_any_kind(digits_dir, tmp_path, capsys):
    """With --metric MODULE:FUNCTION the labels are whatever that function reads (here the
    digits' names, one per line of a .txt); a built-in metric still wants class indices."""
    metric = tmp_path / "my_metric.py"
    metric.write_text(METRIC_MODULE)
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    y = np.load(digits_dir / "labels_train.npy")
    (tmp_path / "names.txt").write_text("\n".join(names[k] for k in y) + "\n")
    base = _base(digits_dir)[:4] + _base(digits_dir)[6:]  # without its --labels FILE
    argv = [*base, "--labels", str(tmp_path / "names.txt"), "--max-drop", "0.01",
            "--no-refit", "--stages", "1", "--target-flops", "0.7", "--latency", "off"]
    out = tmp_path / "m.onnx"
    assert main([*argv, "--metric", f"{metric}:named_digit_accuracy", "-o", str(out)]) == 0
    report = json.loads((tmp_path / "m.report.json").read_text())
    assert report["original"]["metric"] > 0.9  # the names line up with the samples
    assert report["original"]["metric"] - report["final"]["metric"] <= 0.01 + 1e-9
    capsys.readouterr()
    assert main([*argv, "-o", str(tmp_path / "n.onnx")]) == 1
    assert "of class indices (labels of another kind need --metric" in capsys.readouterr().err


def test_a_lower_is_better_metric_is_judged_upwards(digits_dir, tmp_path):
    """A function with ``higher_is_better = False`` counts a rise as the drop."""
    import onnx
    from onnx import numpy_helper

    from idap_onnx.metrics import Evaluator, load_metric

    (tmp_path / "my_metric.py").write_text(METRIC_MODULE)
    fn = load_metric(f"{tmp_path / 'my_metric.py'}:logit_gap")
    x = np.load(digits_dir / "x_train.npz")
    model = onnx.load(digits_dir / "digits.onnx")
    ev = Evaluator(model, _first_input(model, x), metric=fn)
    assert ev.metric_name == "logit_gap" and not ev.higher_is_better
    assert ev.drop(ev.evaluate(model)) == 0.0
    w = model.graph.initializer[0]
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 1.5, w.name))
    assert ev.drop(ev.evaluate(model)) > 0  # the logits moved: the gap rose


def _first_input(model, npz):
    return {model.graph.input[0].name: npz[npz.files[0]][:32]}


@pytest.mark.parametrize(
    ("spec", "extra", "message"),
    [
        ("nosuchmodule_xyz:f", ["--max-drop", "1"], "cannot import nosuchmodule_xyz"),
        ("{tmp}/absent.py:f", ["--max-drop", "1"], "absent.py does not exist"),
        ("{tmp}/my_metric.py:nothere", ["--max-drop", "1"], "has no function 'nothere'"),
        ("{tmp}/my_metric.py:digit_accuracy", [], "needs --max-drop D"),
        ("accuracy", ["--max-drop", "1"], "give a built-in"),
    ],
)
def test_a_bad_metric_is_one_line_and_exit_1(digits_dir, tmp_path, capsys, spec, extra,
                                              message):
    (tmp_path / "my_metric.py").write_text(METRIC_MODULE)
    argv = [*_base(digits_dir), "--metric", spec.format(tmp=tmp_path), *extra,
            "-o", str(tmp_path / "never.onnx")]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("idap-onnx: error: --metric") and message in err[-1]
    assert not (tmp_path / "never.onnx").exists()
