"""`idap-onnx optimize model.onnx` with nothing else (issue 18): generated calibration
inputs, the default budget (--max-error 0.05), MODEL.opt.onnx beside MODEL, one warning.

Each zoo model below is copied into a temporary folder and optimized with the user's default
settings (nothing cut for speed); the run must write a valid model and its report beside the
input, leave the input's bytes alone and warn exactly once, and the result must pass
``onnx.checker`` and run in ONNX Runtime with the input's input and output names.

Every light-zoo model runs (issue 18 asks it of each): fixed-size images (the torchvision
nets, legacy and dynamo exports), token ids bounded by the embedding's rows plus an attention
mask of ones (bert_tiny, gpt2_tiny), and third-party graphs whose batch dim is -1 and whose H
and W are symbolic, so taken from --seq-len (rapidocr_det, rapidocr_cls). Measured on the
2-core CI machine: squeezenet1_1 16 s, mobilenet_v3_small 19 s, bert_tiny 19 s, mobilenet_v2
25 s, rapidocr_cls 30 s, gpt2_tiny 36 s, rapidocr_det 38 s, resnet18@dynamo 52 s, resnet18
53 s, shufflenet_v2_x1_0 84 s: about 6 min for the file.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from tools_loader import load_tool

from idap_onnx.calib.data import RANDOM_WARNING, token_bounds
from idap_onnx.cli.main import main

zoo = load_tool("zoo")

ONE_LINER_MODELS = zoo.light_names()
WARNING = "idap-onnx: warning: no --calib"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _names(session: ort.InferenceSession) -> tuple[list[str], list[str]]:
    return [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]


@pytest.mark.zoo
@pytest.mark.parametrize("name", ONE_LINER_MODELS)
def test_optimize_with_the_model_alone(name: str, tmp_path: Path, capsys) -> None:
    pytest.importorskip("torch")
    model = tmp_path / f"{name}.onnx"
    shutil.copyfile(zoo.build(name), model)
    before = _sha(model)
    assert main(["optimize", str(model)]) == 0
    captured = capsys.readouterr()
    # the assumptions' warning, once (a result timed slower than the original adds its own
    # warning, a measurement that can go either way on a loaded machine)
    warnings = [line for line in captured.err.splitlines() if line.startswith(WARNING)]
    assert len(warnings) == 1, captured.err
    for part in ("synthetic inputs", "relative output error", "0.05", "--calib DATA",
                 "--labels", "--max-drop"):
        assert part in warnings[0], part
    assert RANDOM_WARNING not in captured.err
    assert _sha(model) == before
    out = tmp_path / f"{name}.opt.onnx"
    assert out.is_file()
    assert (tmp_path / f"{name}.opt.report.json").is_file()
    assert (tmp_path / f"{name}.opt.report.md").is_file()
    onnx.checker.check_model(str(out))
    original = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    optimized = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert _names(optimized) == _names(original)
    outputs = optimized.run(None, zoo.make_inputs(name))
    assert all(np.all(np.isfinite(o)) for o in outputs)


def _write(path: Path, inputs: list[onnx.ValueInfoProto]) -> Path:
    """A one-node model (Identity of the first input) with the given inputs."""
    out = onnx.ValueInfoProto(name="y", type=inputs[0].type)
    graph = helper.make_graph(
        [helper.make_node("Identity", [inputs[0].name], ["y"])], "g", inputs, [out]
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize(
    ("value", "flag"),
    [
        (helper.make_tensor_value_info("text", TensorProto.STRING, ["n", 4]), "--calib DATA"),
        (helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, -1]), "--input-shape x:"),
    ],
)
def test_inputs_that_cannot_be_generated_are_one_error_line(
    value: onnx.ValueInfoProto, flag: str, tmp_path: Path, capsys
) -> None:
    model = _write(tmp_path / "m.onnx", [value])
    assert main(["optimize", str(model)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("idap-onnx: error:")]
    assert len(errors) == 1 and repr(value.name) in errors[0] and flag in errors[0], err
    assert not (tmp_path / "m.opt.onnx").exists()


def test_a_default_output_that_is_the_input_is_refused(tmp_path: Path, capsys) -> None:
    real = _write(tmp_path / "m.opt.onnx", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])])
    before = _sha(real)
    (tmp_path / "m.onnx").symlink_to(real.name)
    assert main(["optimize", str(tmp_path / "m.onnx")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("idap-onnx: error:"), err
    assert "is the input model itself" in err[0] and "-o OUT" in err[0]
    assert _sha(real) == before


def test_labels_without_calib_are_refused(tmp_path: Path, capsys) -> None:
    model = _write(tmp_path / "m.onnx", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])])
    np.save(tmp_path / "l.npy", np.zeros(4, dtype=np.int64))
    assert main(["optimize", str(model), "--labels", str(tmp_path / "l.npy")]) == 1
    assert "--labels FILE needs --calib DATA" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["score", "{m}"],
        ["prune", "{m}", "--ratio", "0.3"],
        ["export", "{m}", "--precision", "fp16"],
    ],
)
def test_other_commands_still_require_calib_and_output(argv, tmp_path: Path, capsys) -> None:
    model = _write(tmp_path / "m.onnx", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])])
    args = [a.replace("{m}", str(model)) for a in argv]
    assert main(args) == 2
    assert "required" in capsys.readouterr().err


def test_token_ids_stay_below_the_embedding_rows() -> None:
    """An int input read by a Gather of a 10-row table (through a Cast) is bounded by 10."""
    table = helper.make_tensor("emb", TensorProto.FLOAT, [10, 2], np.zeros(20).tolist())
    graph = helper.make_graph(
        [helper.make_node("Cast", ["ids"], ["ids64"], to=TensorProto.INT64),
         helper.make_node("Gather", ["emb", "ids64"], ["y"])],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT32, ["n", "s"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert token_bounds(model) == {"ids": 10}
    from idap_onnx.calib.data import load_data

    ds = load_data("random", model, seq_len=7, num_random=4, warn_random=False)
    ids = np.stack([ds[i]["ids"] for i in range(len(ds))])
    assert ids.shape == (4, 7) and ids.min() >= 0 and ids.max() < 10


def test_input_shape_chooses_a_dim_the_model_leaves_open() -> None:
    """A declared dim of -1 cannot be chosen by default; --input-shape's dims are used."""
    from idap_onnx.calib.data import load_data

    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, -1])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g", [value],
        [onnx.ValueInfoProto(name="y", type=value.type)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    ds = load_data("random", model, num_random=2, input_shapes={"x": [1, 3, 5]}, warn_random=False)
    assert ds[0]["x"].shape == (3, 5)
