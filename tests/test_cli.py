"""The ``idap-onnx`` command line, run in-process through ``main([...])`` (and once through the
installed console script), on a tiny exported CNN with a residual block."""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
import subprocess
import sys
import warnings

import onnx
import pytest

from idap_onnx import api
from idap_onnx.cli.main import main

torch = pytest.importorskip("torch")


class TinyCNN(torch.nn.Module):
    """conv -> relu -> (conv + skip) -> relu -> conv -> pool -> fc."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(x + self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("cli") / "tiny.onnx"
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            TinyCNN().eval(), torch.randn(1, 3, 16, 16), str(path), dynamo=False,
            opset_version=17, input_names=["input"], output_names=["logits"],
        )
    return path


def _digest(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- inspect -----------------------------------------------------------------------------------


def test_inspect_prints_tables_and_passes(capsys, model_path):
    code, out, err = _run(capsys, "inspect", model_path)
    assert code == 0, err
    assert "Channel groups:" in out and "Removable blocks:" in out and "res:/Add" in out
    assert out.rstrip().splitlines()[-1].startswith("PASSED (")


def test_inspect_json_to_stdout_parses(capsys, model_path):
    code, out, err = _run(capsys, "inspect", model_path, "--json", "-")
    assert code == 0, err
    data = json.loads(out)  # stdout holds only the JSON
    assert data["schema_version"] == 1 and data["command"] == "inspect"
    assert data["flops"] == 2 * data["macs"]
    assert "PASSED" in err


def test_inspect_json_file_is_deterministic(capsys, model_path, tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    assert _run(capsys, "inspect", model_path, "--json", first)[0] == 0
    assert _run(capsys, "inspect", model_path, "--json", second)[0] == 0
    assert first.read_bytes() == second.read_bytes()
    assert json.loads(first.read_text())["model"]["path"] == str(model_path)
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file


# -- prune -------------------------------------------------------------------------------------


def test_prune_writes_model_and_json_and_leaves_input_alone(capsys, model_path, tmp_path):
    before = _digest(model_path)
    out_path, report_path = tmp_path / "pruned.onnx", tmp_path / "prune.json"
    code, out, err = _run(capsys, "prune", model_path, "-o", out_path, "--ratio", "0.5",
                          "--score", "l2", "--json", report_path)
    assert code == 0, err
    assert _digest(model_path) == before
    pruned = onnx.load(str(out_path))
    onnx.checker.check_model(pruned)
    report = json.loads(report_path.read_text())
    assert report["schema_version"] == 1 and report["command"] == "prune"
    assert report["output"] == str(out_path)
    assert report["after"]["macs"] < report["before"]["macs"]
    assert report["config"]["score"] == "l2"
    assert report["verification"]["max_rel_err"] is not None
    assert "params " in out and " -> " in out and "PASSED (" in out


def test_prune_same_seed_same_bytes(capsys, model_path, tmp_path):
    outputs = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    for path in outputs:
        code, _, err = _run(capsys, "prune", model_path, "-o", path, "--ratio", "0.4",
                            "--score", "random", "--seed", "7", "--no-verify")
        assert code == 0, err
    assert outputs[0].read_bytes() == outputs[1].read_bytes()


def test_remove_blocks_writes_model(capsys, model_path, tmp_path):
    out_path = tmp_path / "noblock.onnx"
    code, out, err = _run(capsys, "remove-blocks", model_path, "-o", out_path,
                          "--blocks", "res:/Add", "--json", tmp_path / "blocks.json")
    assert code == 0, err
    assert "/Add" not in {n.name for n in onnx.load(str(out_path)).graph.node}
    report = json.loads((tmp_path / "blocks.json").read_text())
    assert report["command"] == "remove-blocks"
    assert [b["name"] for b in report["removed_blocks"]] == ["res:/Add"]


# -- errors ------------------------------------------------------------------------------------


@pytest.fixture()
def bad_files(tmp_path, model_path):
    not_onnx = tmp_path / "notes.onnx"
    not_onnx.write_text("not a model\n")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(model_path.read_bytes()[:2000])
    return {"missing": tmp_path / "missing.onnx", "not_onnx": not_onnx, "truncated": truncated}


@pytest.mark.parametrize(
    ("case", "argv", "message"),
    [
        ("missing file", ["inspect", "{missing}"], "does not exist"),
        ("not ONNX", ["inspect", "{not_onnx}"], "not an ONNX model"),
        ("truncated", ["inspect", "{truncated}"], "truncated"),
        ("output is input", ["prune", "{model}", "-o", "{model}", "--ratio", "0.3"],
         "never overwrites its input"),
        ("ratio 1.5", ["prune", "{model}", "-o", "{out}", "--ratio", "1.5"], "ratio 1.5"),
        ("unknown block", ["remove-blocks", "{model}", "-o", "{out}", "--blocks", "res:/nope"],
         "not a removable block"),
        ("unknown input", ["inspect", "{model}", "--input-shape", "image:1x3x16x16"],
         "has no input 'image'"),
    ],
)
def test_user_errors_are_one_line_and_exit_1(capsys, bad_files, model_path, tmp_path, case,
                                             argv, message):
    names = {**bad_files, "model": model_path, "out": tmp_path / "out.onnx"}
    before = _digest(model_path)
    code, _, err = _run(capsys, *[a.format(**names) for a in argv])
    assert code == 1, case
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("idap-onnx: error: ") and message in lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "out.onnx").exists()
    assert _digest(model_path) == before


def test_verbose_shows_the_traceback(capsys, tmp_path):
    code, _, err = _run(capsys, "inspect", tmp_path / "missing.onnx", "--verbose")
    assert code == 1
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("idap-onnx: error:")


def test_usage_errors_exit_2(capsys, model_path):
    code, _, err = _run(capsys, "prune", model_path, "-o", "x.onnx", "--ratio", "abc")
    assert code == 2 and "invalid float value" in err


def test_keyboard_interrupt_exits_130(capsys, model_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "inspect", interrupted)
    code, _, err = _run(capsys, "inspect", model_path)
    assert code == 130
    assert err.strip() == "idap-onnx: interrupted; no output written"


# -- help and version --------------------------------------------------------------------------

FLAGS = {
    "inspect": ["MODEL", "--input-shape", "--json", "--verbose"],
    "prune": ["MODEL", "--input-shape", "-o", "--output", "--json", "--ratio", "--score",
              "--round-to", "--seed", "--ignore", "--max-group-ratio", "--no-verify",
              "--verbose"],
    "remove-blocks": ["MODEL", "--input-shape", "-o", "--output", "--json", "--blocks",
                      "--no-verify", "--verbose"],
}


@pytest.mark.parametrize("command", sorted(FLAGS))
def test_help_mentions_every_flag_default_and_example(capsys, command):
    code, out, _ = _run(capsys, command, "--help")
    assert code == 0
    for flag in FLAGS[command]:
        assert flag in out, flag
    assert "default" in out.lower() and "examples:" in out


def test_version(capsys):
    code, out, _ = _run(capsys, "--version")
    assert code == 0 and out.startswith("idap-onnx ")


def test_console_script_is_installed(model_path):
    script = shutil.which("idap-onnx", path=str(pathlib.Path(sys.executable).parent))
    assert script, "console script missing: pip install -e . --no-deps"
    done = subprocess.run([script, "inspect", str(model_path), "--json", "-"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["schema_version"] == 1


def test_closed_stdout_pipe_stops_quietly(model_path, tmp_path):
    script = shutil.which("idap-onnx", path=str(pathlib.Path(sys.executable).parent))
    report = tmp_path / "inspect.json"
    done = subprocess.run(
        f"'{script}' inspect '{model_path}' --json '{report}' | head -n 1",
        shell=True, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.stdout.startswith("Model: ")
    assert "Traceback" not in done.stderr and "error" not in done.stderr
    assert json.loads(report.read_text())["schema_version"] == 1


def test_latency_times_the_models_in_turns_and_writes_json(tmp_path, capsys):
    """``idap-onnx latency A --compare B``: one table, the speed-up over A, the same as JSON."""
    from tools_loader import load_tool

    d = load_tool("digits").build().model_path.parent
    pruned = tmp_path / "p.onnx"
    assert main(["prune", str(d / "digits.onnx"), "-o", str(pruned), "--ratio", "0.5"]) == 0
    capsys.readouterr()
    argv = ["latency", str(d / "digits.onnx"), "--compare", str(pruned), "--data",
            str(d / "x_train.npz"), "--rounds", "2", "--runs", "3", "--warmup", "1"]
    assert main([*argv, "--json", str(tmp_path / "lat.json")]) == 0
    text = capsys.readouterr().out
    assert "digits.onnx" in text and "p.onnx" in text and "1.00x" in text
    report = json.loads((tmp_path / "lat.json").read_text())
    assert report["command"] == "latency" and report["backend"] == "onnxruntime"
    assert report["timings"]["p.onnx"]["runs"] == 6 and report["inputs"] == {"x": [1, 1, 8, 8]}


def test_latency_of_a_missing_model_is_one_line(tmp_path, capsys):
    from tools_loader import load_tool

    d = load_tool("digits").build().model_path.parent
    code = main(["latency", str(d / "digits.onnx"), "--compare", str(tmp_path / "no.onnx")])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("idap-onnx: error:") and "no.onnx" in err[0]


def test_a_library_warning_is_one_line_on_stderr(tmp_path):
    """Synthetic data warns as ``idap-onnx: warning: ...`` on one line, no Python source line."""
    from tools_loader import load_tool

    d = load_tool("digits").build().model_path.parent
    exe = pathlib.Path(sys.executable).with_name("idap-onnx")
    done = subprocess.run(
        [str(exe), "score", str(d / "digits.onnx"), "--calib", "random", "--num-random", "16",
         "--top", "1", "--json", str(tmp_path / "s.json")],
        capture_output=True, text=True, check=False,
    )
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if "synthetic" in line]
    assert warned == [
        "idap-onnx: warning: random calibration data is synthetic: use it for smoke tests only"
    ]
    assert "load_data(" not in done.stderr
