"""Distillation fine-tuning by round trip through PyTorch (METHOD.md section 6).

The digits CNN pruned to ~20 % of its MACs loses accuracy; fine-tuning on the unlabelled
training images against the original recovers most of it, and only initializer values change.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("sklearn")

from idap_onnx.cli.main import main  # noqa: E402
from idap_onnx.errors import UnsupportedModelError, UsageError  # noqa: E402
from idap_onnx.finetune import FinetuneConfig, finetune, recalibrate_bn  # noqa: E402
from idap_onnx.metrics import Evaluator  # noqa: E402
from idap_onnx.model_io import load_model, save_model  # noqa: E402
from idap_onnx.optimize import OptimizeConfig, optimize  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tools_loader import load_tool  # noqa: E402


def _acc(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return float((sess.run(None, {"x": x})[0].argmax(1) == y).mean())


@pytest.fixture(scope="module")
def digits():
    return load_tool("digits").build()


@pytest.fixture(scope="module")
def pruned(digits):
    """The digits CNN pruned to 20 % of its MACs (stage 1 only, no budget): enough damage
    (24 points of test top-1 on the Intel machine these tests were written on, 74 on an AMD
    EPYC: the CNN is trained where the tests run) for distillation to have something to
    recover. Six epochs of fine-tuning brought it within 3 points on the Intel machine, not on
    the AMD one (0.956 against 0.959); sixteen do there (0.978)."""
    model = load_model(digits.model_path)
    x = digits.train[0]
    calib = [{"x": x[i : i + 64]} for i in range(0, 512, 64)]
    ev = Evaluator(model, [{"x": digits.val[0]}], metric="rel-l2")
    # the refit alone would recover most of it; the additive score (no coherence) damages
    # more at this size, as these tests were written for
    cfg = OptimizeConfig(target_flops=0.2, max_error=1e9, metric="rel-l2", stages=(1,),
                         refit=False, coherence=False)
    result = optimize(model, calib, ev, cfg)
    assert result.final["macs"] <= 0.21 * result.original["macs"]
    return model, result.model


@pytest.fixture(scope="module")
def tuned(digits, pruned):
    teacher, student = pruned
    data = [{"x": x} for x in digits.train[0]]
    val = [{"x": x} for x in digits.val[0]]
    return finetune(student, teacher, data, val=val, config=FinetuneConfig(epochs=16))


def test_distillation_recovers_most_accuracy(digits, pruned, tuned):
    teacher, student = pruned
    x, y = digits.test
    before, after_prune, after_ft = (
        _acc(teacher, x, y),
        _acc(student, x, y),
        _acc(tuned.model, x, y),
    )
    print(f"test top-1: original {before:.4f}, pruned {after_prune:.4f}, fine-tuned {after_ft:.4f}")
    assert after_prune < before - 0.05  # pruning hurt
    assert after_ft > after_prune
    assert after_ft >= before - 0.03  # within a few points of the original
    assert [row["epoch"] for row in tuned.history][0] == 0
    assert tuned.history[0]["val_metric"] < tuned.history[tuned.best_epoch]["val_metric"]
    assert tuned.val_metric_name == "neg_distill_loss"


def test_only_initializer_values_change(pruned, tuned):
    _, student = pruned
    out = tuned.model

    def strip(m: onnx.ModelProto) -> onnx.ModelProto:
        c = onnx.ModelProto()
        c.CopyFrom(m)
        for t in c.graph.initializer:
            t.ClearField("raw_data")
            t.ClearField("float_data")
        return c

    assert strip(out).SerializeToString() == strip(student).SerializeToString()
    before = {t.name: numpy_helper.to_array(t) for t in student.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert before.keys() == after.keys()
    assert all(before[k].shape == after[k].shape for k in before)
    assert any(not np.array_equal(before[k], after[k]) for k in before)


def test_deterministic_with_labels(digits, pruned):
    teacher, student = pruned
    data = [{"x": x} for x in digits.train[0][:256]]
    labels = digits.train[1][:256]
    val = [{"x": x} for x in digits.val[0][:64]]
    cfg = FinetuneConfig(epochs=1, steps=4, seed=3)
    runs = [
        finetune(
            student,
            teacher,
            data,
            labels=labels,
            val=val,
            val_labels=digits.val[1][:64],
            config=cfg,
        )
        for _ in range(2)
    ]
    assert runs[0].val_metric_name == "top1"
    a, b = (r.model.SerializeToString() for r in runs)
    assert a == b


def test_bad_labels_rejected(digits, pruned):
    teacher, student = pruned
    data = [{"x": x} for x in digits.train[0][:8]]
    with pytest.raises(UsageError, match="labels"):
        finetune(student, teacher, data, labels=np.zeros(3, np.int64))


# ------------------------------------------------------------------------------- BatchNorm


def _bn_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(4, 2, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(np.ones(4, np.float32), "g"),
        numpy_helper.from_array(np.zeros(4, np.float32), "b"),
        numpy_helper.from_array(np.full(4, 5.0, np.float32), "mean"),
        numpy_helper.from_array(np.full(4, 9.0, np.float32), "var"),
        numpy_helper.from_array(rng.normal(size=(3, 4)).astype(np.float32), "fw"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "mean", "var"], ["n"]),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fw"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_recalibrate_bn_matches_data_statistics():
    from idap_onnx.torch_graph import OnnxModule

    model = _bn_model()
    x = np.random.default_rng(1).normal(2.0, 3.0, size=(40, 2, 6, 6)).astype(np.float32)
    module = OnnxModule(model)
    assert recalibrate_bn(module, [{"x": s} for s in x], 10, ["x"], torch.device("cpu"))
    w = torch.from_numpy(numpy_helper.to_array(model.graph.initializer[0]).copy())
    c = torch.nn.functional.conv2d(torch.from_numpy(x), w, padding=1)
    attrs = {v: k for k, v in module.bn_stat_names.items()}
    got_mean = getattr(module, attrs["mean"]).numpy()
    np.testing.assert_allclose(got_mean, c.mean(dim=(0, 2, 3)).numpy(), rtol=1e-4, atol=1e-4)
    assert not module.training  # mode restored
    # finetune on a BN graph: writes back the recalibrated statistics
    res = finetune(model, model, [{"x": s} for s in x], config=FinetuneConfig(epochs=1))
    mean = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}["mean"]
    assert not np.allclose(mean, 5.0)


def test_unsupported_op_is_one_line(tmp_path, capsys):
    nodes = [helper.make_node("Unique", ["x"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "u",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedModelError, match="Unique"):
        finetune(model, model, [{"x": np.zeros(4, np.float32)}])
    path = tmp_path / "u.onnx"
    save_model(model, path)
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 4), np.float32))
    code = main(
        [
            "finetune",
            str(path),
            "--teacher",
            str(path),
            "--data",
            str(tmp_path / "d.npz"),
            "-o",
            str(tmp_path / "o.onnx"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len([line for line in err if "error" in line]) == 1
    assert "Unique" in err[-1]
    assert not (tmp_path / "o.onnx").exists()


# ------------------------------------------------------------------------------------ CLI


def test_cli_end_to_end(digits, pruned, tmp_path, capsys):
    _, student = pruned
    spath = tmp_path / "pruned.onnx"
    save_model(student, spath)
    out = tmp_path / "ft.onnx"
    d = digits.model_path.parent
    code = main(
        [
            "finetune",
            str(spath),
            "--teacher",
            str(digits.model_path),
            "--data",
            str(d / "x_train.npz"),
            "--labels",
            str(d / "labels_train.npy"),
            "--epochs",
            "1",
            "--val-fraction",
            "0.2",
            "--json",
            str(tmp_path / "r.json"),
            "-o",
            str(out),
        ]
    )
    text = capsys.readouterr()
    assert code == 0, text.err
    assert "val top1" in text.out
    assert (tmp_path / "r.json").exists()
    tuned = load_model(out)
    x, y = digits.test
    assert _acc(tuned, x, y) > _acc(student, x, y)


def test_cli_help_lists_flags(capsys):
    assert main(["finetune", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--teacher", "--data", "--epochs", "--lr", "--labels", "--val-fraction"):
        assert flag in text


# ------------------------------------------------------------------------- optimize hook


def test_optimize_finetune_hook_lowers_error(digits, pruned):
    teacher, plain = pruned
    x = digits.train[0]
    calib = [{"x": x[i : i + 64]} for i in range(0, 512, 64)]
    ev = Evaluator(teacher, [{"x": digits.val[0]}], metric="rel-l2")
    cfg = OptimizeConfig(
        target_flops=0.2,
        max_error=1e9,
        metric="rel-l2",
        stages=(1,),
        finetune=True,
        finetune_epochs=2,
        refit=False,  # as ``pruned``: the fine-tuning alone against the plain pruning
    )
    lines: list[str] = []
    result = optimize(teacher, calib, ev, cfg, progress=lines.append)
    assert result.final["macs"] <= 0.21 * result.original["macs"]
    assert any("fine-tuned" in line for line in lines)
    plain_error = ev.evaluate(plain).rel_error
    print(
        f"rel-l2 at 20 % MACs: plain {plain_error:.4f}, with --finetune {result.final['error']:.4f}"
    )
    assert result.final["error"] < plain_error


def test_auto_loss_tells_logits_from_embeddings():
    """``loss="auto"``: KL for class scores; MSE for a normalized embedding or an output
    named as an embedding (softmax over embedding features would be meaningless)."""
    from idap_onnx.finetune import _is_logits

    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(4, 10, generator=gen)
    unit = torch.nn.functional.normalize(torch.randn(4, 384, generator=gen), dim=1)

    assert _is_logits(logits, "auto", "logits")
    assert not _is_logits(unit, "auto", "output")
    assert not _is_logits(logits, "auto", "sentence_embedding")
    assert _is_logits(unit, "kl", "output") and not _is_logits(logits, "mse", "logits")
    assert not _is_logits(torch.randn(4, 3, 8, 8, generator=gen), "auto", "map")
    with pytest.raises(UsageError, match="finetune loss"):
        FinetuneConfig(loss="cosine").check()
    with pytest.raises(UsageError, match="feature_weight"):
        FinetuneConfig(feature_weight=-1.0).check()


def _token_model(seed: int) -> onnx.ModelProto:
    """ids [B, L] -> Gather(embedding) -> MatMul -> Relu -> ReduceMean over L -> out [B, 8]:
    a model with a dynamic sequence axis, like exported text encoders."""
    rng = np.random.default_rng(seed)
    emb = numpy_helper.from_array(rng.normal(size=(20, 8)).astype(np.float32), "emb")
    w = numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32) / 3, "w")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["emb", "ids"], ["e"], name="embed"),
            helper.make_node("MatMul", ["e", "w"], ["h"], name="proj"),
            helper.make_node("Relu", ["h"], ["r"], name="act"),
            helper.make_node("ReduceMean", ["r", "axes"], ["out"], name="pool", keepdims=0),
        ],
        "tokens",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 8])],
        [emb, w, axes],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_samples_of_different_lengths_train_in_equal_shape_batches():
    """Text of different lengths needs no padding: each batch stacks samples of one shape, and
    distillation still pulls the student to the teacher on every length."""
    from idap_onnx.finetune import _batches
    from idap_onnx.padding import shape_groups

    teacher, student = _token_model(0), _token_model(1)
    rng = np.random.default_rng(0)
    data = [{"ids": rng.integers(0, 20, size=int(n))} for n in rng.choice([3, 5, 8], size=60)]
    val = [{"ids": rng.integers(0, 20, size=n)} for n in (4, 6, 4, 9)]

    groups = shape_groups(data, ["ids"])
    assert sorted(len(g) for g in groups) == sorted(
        np.unique([len(s["ids"]) for s in data], return_counts=True)[1]
    )
    for idx in _batches(groups, 16, np.random.default_rng(0)):
        assert len({len(data[i]["ids"]) for i in idx}) == 1

    cfg = FinetuneConfig(epochs=10, lr=3e-2, batch_size=16, patience=10)
    result = finetune(student, teacher, data, val=val, config=cfg)
    before, after = result.history[0]["val_metric"], max(h["val_metric"] for h in result.history)
    assert after > 0.25 * before  # negative losses: the distance to the teacher falls 4-fold
    assert result.best_epoch > 0
