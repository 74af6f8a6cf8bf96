"""Tests of idap_onnx.model_io and idap_onnx.shapes: loading, saving, folding, shapes."""

from __future__ import annotations

import os
import pathlib
import stat
import warnings

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest

from idap_onnx import model_io, shapes
from idap_onnx.errors import ModelLoadError, UnsupportedModelError, UsageError
from idap_onnx.model_io import load_model, model_opset, save_model
from idap_onnx.shapes import infer_shapes, parse_input_shapes, tensor_dtypes, tensor_shapes

torch = pytest.importorskip("torch")

# A Conv whose weight is an initializer, then an Add of a Constant node.
CONV_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
conv (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y) <float[4, 3, 3, 3] w = {WEIGHTS_}> {
    c = Conv <pads = [1, 1, 1, 1]> (x, w)
    y = Add (c, c)
}
"""


def _parse(text: str) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model)
    return model


def _conv_model() -> onnx.ModelProto:
    weights = ", ".join(f"{v:.4f}" for v in np.linspace(-1, 1, 4 * 3 * 3 * 3))
    return _parse(CONV_TEXT.replace("WEIGHTS_", weights))


def _run(model: onnx.ModelProto | str | os.PathLike, feeds: dict[str, np.ndarray]) -> list:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _temp_files(directory: pathlib.Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


class SmallCnn(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(16)
        self.conv2 = torch.nn.Conv2d(16, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        return self.fc(self.conv2(x).mean((2, 3)))


@pytest.fixture(scope="module")
def legacy_export(tmp_path_factory) -> pathlib.Path:
    """A small CNN from the legacy TorchScript exporter, with a dynamic batch."""
    path = tmp_path_factory.mktemp("legacy") / "cnn.onnx"
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is deprecated
        torch.onnx.export(
            SmallCnn().eval(),
            (torch.randn(1, 3, 16, 16),),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    return path


@pytest.fixture(scope="module")
def dynamo_export(tmp_path_factory) -> pathlib.Path:
    """The same CNN from the dynamo exporter, which writes weights to ``cnn.onnx.data``."""
    path = tmp_path_factory.mktemp("dynamo") / "cnn.onnx"
    torch.manual_seed(0)
    try:
        torch.onnx.export(
            SmallCnn().eval(),
            (torch.randn(1, 3, 16, 16),),
            str(path),
            dynamo=True,
            external_data=True,
            verbose=False,
        )
    except Exception as exc:  # the dynamo exporter needs onnxscript and torch.export
        pytest.skip(f"torch dynamo ONNX export is unavailable here: {exc}")
    if not (path.parent / "cnn.onnx.data").exists():
        pytest.skip("this torch version's dynamo exporter wrote no external data file")
    return path


@pytest.fixture()
def image() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)


# ---------------------------------------------------------------------------- round trips


def test_round_trip_keeps_outputs_and_input_file(legacy_export, image, tmp_path):
    before_bytes = legacy_export.read_bytes()
    before_mtime = os.stat(legacy_export).st_mtime_ns

    model = load_model(legacy_export)
    written = save_model(model, tmp_path / "out.onnx", input_path=legacy_export)

    assert written == tmp_path / "out.onnx"
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~umask  # not the temp file's 0o600
    expected = _run(legacy_export, {"input": image})[0]
    np.testing.assert_allclose(_run(written, {"input": image})[0], expected, rtol=0, atol=0)
    assert load_model(written) == model
    assert legacy_export.read_bytes() == before_bytes
    assert os.stat(legacy_export).st_mtime_ns == before_mtime
    assert _temp_files(tmp_path) == []


def test_load_reads_external_data_into_memory(dynamo_export, image):
    image = image[:1]  # the dynamo export has a static batch of 1
    model = load_model(dynamo_export)

    for tensor in model_io.iter_tensors(model):
        assert tensor.data_location == onnx.TensorProto.DEFAULT
    input_name = model.graph.input[0].name
    np.testing.assert_allclose(
        _run(model, {input_name: image})[0], _run(dynamo_export, {input_name: image})[0]
    )


def test_forced_external_data_save_reloads_equal(legacy_export, image, tmp_path):
    model = load_model(legacy_export)
    original = onnx.ModelProto()
    original.CopyFrom(model)

    written = save_model(model, tmp_path / "ext.onnx", external_data=True)

    assert model == original  # the caller's model is not converted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data"]
    on_disk = onnx.load(str(written), load_external_data=False)
    external = [t for t in on_disk.graph.initializer if t.data_location == 1]
    assert external and all(not t.raw_data for t in external)
    assert load_model(written) == model
    np.testing.assert_allclose(
        _run(written, {"input": image})[0], _run(legacy_export, {"input": image})[0]
    )


def test_write_variant_streams_weights_and_leaves_the_model_alone(legacy_export, image, tmp_path):
    """A session file with an extra output: the weights go to ``.data`` one tensor at a time,
    the caller's model is unchanged and ORT computes the same outputs."""
    model = load_model(legacy_export)
    original = onnx.ModelProto()
    original.CopyFrom(model)
    probe = onnx.helper.make_node("ReduceSumSquare", ["logits"], ["energy"], keepdims=0)

    path = model_io.write_variant(
        model, tmp_path / "v.onnx", nodes=[*model.graph.node, probe], outputs=["energy"]
    )

    assert model == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.onnx", "v.onnx.data"]
    on_disk = onnx.load(str(path), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in on_disk.graph.initializer)
    y, energy = _run(path, {"input": image})
    np.testing.assert_array_equal(y, _run(legacy_export, {"input": image})[0])
    assert float(energy) == pytest.approx(float((y.astype(np.float64) ** 2).sum()), rel=1e-5)


def test_an_offloaded_copy_keeps_its_weights_on_disk_until_the_block_ends(
    legacy_export, image, tmp_path
):
    """``offloaded``: the copy's large float weights are stubs whose bytes wait in a temp
    file; ``tensor_array`` reads them back equal, ``write_variant`` copies them file to file
    (ORT computes the same outputs), and the file is gone after the block."""
    model = load_model(legacy_export)
    big = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer
           if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) > 1024}
    assert big

    with model_io.offloaded(model) as light:
        stubs = {t.name: t for t in light.graph.initializer if t.name in big}
        assert all(not t.HasField("raw_data") for t in stubs.values())
        assert light.ByteSize() < model.ByteSize() - 0.9 * sum(a.nbytes for a in big.values())
        for name, want in big.items():
            np.testing.assert_array_equal(model_io.tensor_array(stubs[name]), want)
        path = model_io.write_variant(light, tmp_path / "v.onnx", nodes=light.graph.node)
        np.testing.assert_array_equal(_run(path, {"input": image})[0],
                                      _run(legacy_export, {"input": image})[0])
        files = list(model_io._OFFLOADED.values())

    assert len(files) == 1 and not files[0].exists()  # the weights' folder is gone
    assert not model_io._OFFLOADED
    for t in model.graph.initializer:  # the model it was made from is untouched
        if t.name in big:
            np.testing.assert_array_equal(onnx.numpy_helper.to_array(t), big[t.name])


def test_a_one_file_model_loads_with_its_weights_left_in_the_file(legacy_export, image):
    """``load_offloaded``: the same graph as ``load_model`` (checked, folded, named), its
    large float weights read from the model file itself only when asked for, and a session
    file written from it computes the same outputs."""
    full = load_model(legacy_export)
    with model_io.load_offloaded(legacy_export) as light:
        assert list(light.graph.node) == list(full.graph.node)
        left = [t for t in light.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert left and all(not t.HasField("raw_data") for t in left)
        (folder,) = model_io._OFFLOADED.values()
        assert all((folder / e.value).resolve() == legacy_export.resolve()
                   for t in left for e in t.external_data if e.key == "location")
        for t, want in zip(light.graph.initializer, full.graph.initializer, strict=True):
            np.testing.assert_array_equal(model_io.tensor_array(t),
                                          onnx.numpy_helper.to_array(want))
        path = model_io.write_variant(light, folder / "v.onnx", nodes=light.graph.node)
        np.testing.assert_array_equal(_run(path, {"input": image})[0],
                                      _run(legacy_export, {"input": image})[0])
    assert not model_io._OFFLOADED


def test_half_precision_weights_are_left_in_the_file_too(tmp_path):
    """float16 weights of over 1024 elements are read back exactly; a small one stays inline."""
    big = np.linspace(-2, 2, 2048).astype(np.float16)
    small = np.arange(4, dtype=np.float16)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["x", "big"], ["y"]),
         onnx.helper.make_node("Add", ["s", "small"], ["z"])], "half",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT16, [2048]),
         onnx.helper.make_tensor_value_info("s", onnx.TensorProto.FLOAT16, [4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT16, [2048]),
         onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT16, [4])],
        [onnx.numpy_helper.from_array(big, "big"), onnx.numpy_helper.from_array(small, "small")],
    )
    path = tmp_path / "half.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]),
              str(path))
    with model_io.load_offloaded(path) as light:
        stub, inline = light.graph.initializer
        assert stub.data_location == onnx.TensorProto.EXTERNAL and inline.HasField("raw_data")
        np.testing.assert_array_equal(model_io.tensor_array(stub), big)
        np.testing.assert_array_equal(model_io.tensor_array(inline), small)


def test_a_model_with_external_data_is_offloaded_after_a_full_load(dynamo_export, image):
    with model_io.load_offloaded(dynamo_export) as light:
        assert list(light.graph.node) == list(load_model(dynamo_export).graph.node)
        (folder,) = model_io._OFFLOADED.values()
        path = model_io.write_variant(light, folder / "v.onnx", nodes=light.graph.node)
        feed = {light.graph.input[0].name: image[:1]}  # the dynamo export has batch 1
        np.testing.assert_array_equal(_run(path, feed)[0], _run(dynamo_export, feed)[0])


def test_bad_files_give_load_models_errors_when_loaded_offloaded(legacy_export, tmp_path):
    data = legacy_export.read_bytes()
    cases = {"half.onnx": data[: len(data) // 2], "text.onnx": b"hello\n", "empty.onnx": b""}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    for path in [*(tmp_path / n for n in cases), tmp_path, tmp_path / "nope.onnx"]:
        with pytest.raises(ModelLoadError) as want:
            load_model(path)
        with pytest.raises(ModelLoadError) as got, model_io.load_offloaded(path):
            pass
        assert str(got.value) == str(want.value)


def test_small_models_are_saved_as_one_file(tmp_path):
    save_model(_conv_model(), tmp_path / "small.onnx")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.onnx"]


# ---------------------------------------------------------------------------- load errors


def test_missing_external_data_names_the_data_file(dynamo_export, tmp_path):
    lonely = tmp_path / "cnn.onnx"
    lonely.write_bytes(dynamo_export.read_bytes())

    with pytest.raises(ModelLoadError, match=r"cnn\.onnx\.data.*missing"):
        load_model(lonely)


def test_short_external_data_file_is_a_load_error(dynamo_export, tmp_path):
    (tmp_path / "cnn.onnx").write_bytes(dynamo_export.read_bytes())
    data = (dynamo_export.parent / "cnn.onnx.data").read_bytes()
    (tmp_path / "cnn.onnx.data").write_bytes(data[: len(data) // 2])

    with pytest.raises(ModelLoadError, match=r"cnn\.onnx\.data"):
        load_model(tmp_path / "cnn.onnx")


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"hello, this is a text file\n", "not an ONNX model"),
        (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "not an ONNX model"),
        (b"", "not an ONNX model"),
    ],
    ids=["text", "png", "empty"],
)
def test_non_onnx_files_are_load_errors(tmp_path, content, reason):
    path = tmp_path / "model.onnx"
    path.write_bytes(content)

    with pytest.raises(ModelLoadError, match=reason) as info:
        load_model(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_truncated_model_is_a_clear_load_error(legacy_export, tmp_path):
    data = legacy_export.read_bytes()
    half = tmp_path / "half.onnx"
    half.write_bytes(data[: len(data) // 2])

    with pytest.raises(ModelLoadError, match="truncated") as info:
        load_model(half)
    assert "half.onnx" in str(info.value)


def test_directory_and_missing_path_are_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="is a directory"):
        load_model(tmp_path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope.onnx")


def test_unknown_domain_is_unsupported(tmp_path):
    model = _parse("""
        <ir_version: 8, opset_import: ["" : 17, "com.example.custom" : 1]>
        g (float[2] x) => (float[2] y) { y = com.example.custom.Frobnicate (x) }
    """)
    onnx.save(model, tmp_path / "custom.onnx")

    with pytest.raises(UnsupportedModelError, match="com.example.custom"):
        load_model(tmp_path / "custom.onnx")


def test_microsoft_domain_is_accepted(tmp_path):
    model = _parse("""
        <ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
        g (float[2, 4] x) => (float[2, 4] y) { y = com.microsoft.Gelu (x) }
    """)
    onnx.save(model, tmp_path / "ms.onnx")

    assert load_model(tmp_path / "ms.onnx").graph.node[0].op_type == "Gelu"


def test_opset_outside_range_is_unsupported(tmp_path):
    model = _parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] y) { y = Relu (x) }
    """)
    model.opset_import[0].version = 99
    onnx.save(model, tmp_path / "future.onnx")

    with pytest.raises(UnsupportedModelError, match="opset 99"):
        load_model(tmp_path / "future.onnx")


def test_checker_failure_is_a_load_error(tmp_path):
    model = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Relu", ["undefined"], ["y"])],
            "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
        ),
        opset_imports=[onnx.helper.make_opsetid("", 17)],
    )
    onnx.save(model, tmp_path / "broken.onnx")

    with pytest.raises(ModelLoadError, match="checker") as info:
        load_model(tmp_path / "broken.onnx")
    assert "\n" not in str(info.value)


def test_model_opset_reads_default_domain():
    assert model_opset(_conv_model()) == 17


# ---------------------------------------------------------------------------- save errors


def test_saving_over_the_input_is_refused(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_conv_model(), path)

    with pytest.raises(UsageError, match="input"):
        save_model(load_model(path), path, input_path=path)
    with pytest.raises(UsageError, match="input"):
        save_model(load_model(path), tmp_path / "." / "m.onnx", input_path=str(path))


def test_saving_into_missing_directory_is_refused(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        save_model(_conv_model(), tmp_path / "no" / "such" / "m.onnx")


def test_failed_serialization_leaves_no_temp_file(tmp_path):
    with pytest.raises(AttributeError):
        save_model(object(), tmp_path / "m.onnx", external_data=False)  # type: ignore[arg-type]

    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old contents")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_io.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_model(_conv_model(), path)

    assert path.read_bytes() == b"old contents"
    assert _temp_files(tmp_path) == []


# ---------------------------------------------------------------------------- normalization


def test_constant_weights_are_folded_into_initializers(tmp_path):
    # Paddle-style: the Conv weight comes from a Constant node, plus value_float/value_ints ones.
    weight = onnx.numpy_helper.from_array(
        np.random.default_rng(1).standard_normal((4, 3, 3, 3)).astype(np.float32)
    )
    nodes = [
        onnx.helper.make_node("Constant", [], ["w"], value=weight),
        onnx.helper.make_node("Constant", [], ["two"], value_float=2.0),
        onnx.helper.make_node("Constant", [], ["shape"], value_ints=[0, -1]),
        onnx.helper.make_node("Constant", [], ["label"], value_strings=["a", "b"]),
        onnx.helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        onnx.helper.make_node("Mul", ["c", "two"], ["m"]),
        onnx.helper.make_node("Reshape", ["m", "shape"], ["y"]),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "paddle_like",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [
            onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 256]),
            onnx.helper.make_tensor_value_info("label", onnx.TensorProto.STRING, [2]),
        ],
    )
    path = tmp_path / "paddle_like.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)]), path)

    folded = load_model(path)

    assert [node.op_type for node in folded.graph.node] == ["Constant", "Conv", "Mul", "Reshape"]
    initializers = {tensor.name: tensor for tensor in folded.graph.initializer}
    assert set(initializers) == {"w", "two", "shape"}
    np.testing.assert_array_equal(
        onnx.numpy_helper.to_array(initializers["w"]), onnx.numpy_helper.to_array(weight)
    )
    feeds = {"x": np.random.default_rng(2).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_array_equal(_run(folded, feeds)[0], _run(path, feeds)[0])
    assert len(load_model(path, fold_constants=False).graph.node) == 7


def test_unnamed_and_duplicate_nodes_get_unique_names(tmp_path):
    model = _parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] y) {
            a = Relu (x)
            b = Relu (a)
            c = Neg (b)
            y = Abs (c)
        }
    """)
    model.graph.node[2].name = "Relu_1"  # collides with the generated name of node 1
    model.graph.node[3].name = "Relu_1"  # duplicate
    onnx.save(model, tmp_path / "names.onnx")

    names = [node.name for node in load_model(tmp_path / "names.onnx").graph.node]

    assert names[0] == "Relu_0"
    assert names[2] == "Relu_1"
    assert all(names) and len(set(names)) == 4


# ---------------------------------------------------------------------------- shapes


def test_parse_input_shapes():
    assert parse_input_shapes(["input:1x3x224x224", "ns:ids:2X7"]) == {
        "input": [1, 3, 224, 224],
        "ns:ids": [2, 7],
    }


@pytest.mark.parametrize("spec", ["input", "input:", ":1x3", "input:1x-3", "input:1,3", "x:0"])
def test_parse_input_shapes_rejects_bad_specs(spec):
    with pytest.raises(UsageError, match="expected NAME:D1xD2"):
        parse_input_shapes([spec])


def test_infer_shapes_resolves_symbolic_batch(legacy_export):
    model = load_model(legacy_export)
    model.graph.value_info.add().name = "stale"  # dropped by infer_shapes

    inferred = infer_shapes(model, {"input": [1, 3, 16, 16]})

    found = tensor_shapes(inferred)
    assert found["input"] == (1, 3, 16, 16)
    assert found["logits"] == (1, 5)
    assert "stale" not in found
    assert tensor_dtypes(inferred)["logits"] == onnx.TensorProto.FLOAT
    assert [value.name for value in inferred.graph.output] == ["logits"]
    assert tensor_shapes(model)["input"] == ("batch", 3, 16, 16)  # the input is untouched


def test_infer_shapes_keeps_symbolic_dims_without_override():
    found = tensor_shapes(infer_shapes(_conv_model()))

    assert found["c"] == ("N", 4, 8, 8)
    assert found["w"] == (4, 3, 3, 3)


def test_infer_shapes_rejects_unknown_input_and_wrong_rank():
    with pytest.raises(UsageError, match="no input 'image'.*'x'"):
        infer_shapes(_conv_model(), {"image": [1, 3, 8, 8]})
    with pytest.raises(UsageError, match="rank 4"):
        infer_shapes(_conv_model(), {"x": [1, 3, 8]})


def test_infer_shapes_on_a_skeleton_for_huge_models(monkeypatch):
    # Pretend the 400-byte model is over 2 GB: inference runs with large tensors set aside.
    model = _conv_model()
    monkeypatch.setattr(shapes, "EXTERNAL_DATA_THRESHOLD", 64)

    inferred = infer_shapes(model, {"x": [2, 3, 8, 8]})

    assert tensor_shapes(inferred)["y"] == (2, 4, 8, 8)
    assert inferred.graph.initializer[0] == model.graph.initializer[0]


def _sliced_shape_model() -> onnx.ModelProto:
    """t = x @ W (W over 1024 floats); n = Shape(t)[1:e] with e computed at run time: the
    shape vector's length is what ViT's legacy attention leaves to a run."""
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 5, 12] x) => (int64[N] n) {
            t = MatMul (x, w)
            s = Shape (t)
            r = Shape (s)
            e = Sub (r, one)
            n = Slice (s, one, e)
        }
    """)
    rng = np.random.default_rng(0)
    model.graph.initializer.extend([
        onnx.numpy_helper.from_array(rng.standard_normal((12, 96)).astype(np.float32), "w"),
        onnx.numpy_helper.from_array(np.array([1], np.int64), "one"),
    ])
    return model


def test_probe_runs_only_the_shape_subgraph_where_known_shapes_cut_it():
    model = _sliced_shape_model()
    known = {"x": (1, 5, 12), "t": (1, 5, 96)}

    nodes = shapes.shape_subgraph(model, known, ["n"])

    assert [n.op_type for n in nodes] == ["Constant", "Shape", "Sub", "Slice"]  # no MatMul
    assert shapes.probe_shapes(model, {"x": [1, 5, 12]}, ["n"], known=known) == {"n": (1,)}
    # without the shape of t, the cut reaches the weight: the whole model runs, same answer
    assert shapes.shape_subgraph(model, {"x": (1, 5, 12)}, ["n"]) is None
    assert shapes.probe_shapes(model, {"x": [1, 5, 12]}, ["n"]) == {"n": (1,)}


def test_the_result_records_shapes_only_where_the_input_did():
    original = _conv_model()
    inferred = infer_shapes(original)  # records c
    assert inferred.graph.value_info
    assert not shapes.shapes_as_input(inferred, original).graph.value_info
    again = infer_shapes(original)
    assert shapes.shapes_as_input(again, infer_shapes(original)).graph.value_info
