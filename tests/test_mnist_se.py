"""The MNIST MobileNetV3-style asset (``tools/mnist_se.py``): real data, a trained model with
depthwise convolutions, squeeze-excitation gates and residual adds.

The asset is built once into its cache (``<repo>/.cache/mnist_se``; about a minute of CPU
training on a fresh clone) and reused by every test here.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from tools_loader import load_tool

mnist_se = load_tool("mnist_se")
digits = load_tool("digits")


@pytest.fixture(scope="module")
def asset():
    return mnist_se.build()


@pytest.fixture(scope="module")
def graph(asset) -> onnx.GraphProto:
    return onnx.load(str(asset.model_path)).graph


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def test_files_and_splits(asset):
    for name in mnist_se.FILES:
        assert (asset.cache_dir / name).is_file(), name
    sizes = [len(asset.train[1]), len(asset.val[1]), len(asset.test[1])]
    assert sizes == [3500, 750, 750]
    for x, y in (asset.train, asset.val, asset.test):
        assert x.dtype == np.float32 and x.shape[1:] == (1, 28, 28)
        assert y.dtype == np.int64 and len(x) == len(y)
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert np.array_equal(np.bincount(y), np.full(10, len(y) // 10))  # stratified
    # the per-split files hold the same arrays, as for the digits asset
    with np.load(asset.calib_npz) as npz:
        assert npz.files == ["x"] and np.array_equal(npz["x"], asset.train[0])
    for split in mnist_se.SPLITS:
        x, y = getattr(asset, split)
        with np.load(asset.split_npz(split)) as npz:
            assert np.array_equal(npz["x"], x)
        assert np.array_equal(np.load(asset.labels_npy(split)), y)


def test_same_interface_as_the_digits_asset(asset):
    """Code written for ``digits.build()`` runs on ``mnist_se.build()``: same fields, same
    properties and methods."""
    assert [f.name for f in fields(asset)] == [f.name for f in fields(digits.DigitsAsset)]
    public = [name for name in dir(digits.DigitsAsset) if not name.startswith("_")]
    assert public and all(hasattr(asset, name) for name in public)
    assert asset.calib_npz == asset.cache_dir / "calib.npz"
    assert asset.split_npz("val").name == "x_val.npz"
    assert asset.labels_npy("test").name == "labels_test.npy"


def test_graph_has_depthwise_convs_se_gates_and_residual_adds(graph):
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}

    # depthwise: group == channels, one input channel per group (3x3 and 5x5 kernels)
    depthwise_kernels = []
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        w = inits[node.input[1]]
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if group > 1:
            assert group == w.shape[0] and w.shape[1] == 1
            depthwise_kernels.append(w.shape[2])
    assert len(depthwise_kernels) == len(mnist_se.BLOCKS)
    assert set(depthwise_kernels) == {3, 5}

    # SE gate: features * HardSigmoid(1x1 conv(ReLU(1x1 conv(GlobalAveragePool(features)))))
    gates = [
        node for node in graph.node
        if node.op_type == "Mul" and any(
            i in producer and producer[i].op_type == "HardSigmoid" for i in node.input
        )
    ]
    assert len(gates) == sum(row[4] for row in mnist_se.BLOCKS) >= 3
    for mul in gates:
        gate = next(producer[i] for i in mul.input if producer[i].op_type == "HardSigmoid")
        expand = producer[gate.input[0]]
        relu = producer[expand.input[0]]
        reduce = producer[relu.input[0]]
        pool = producer[reduce.input[0]]
        assert [expand.op_type, relu.op_type, reduce.op_type, pool.op_type] == [
            "Conv", "Relu", "Conv", "GlobalAveragePool"
        ]
        gated = next(i for i in mul.input if producer[i].op_type != "HardSigmoid")
        assert pool.input[0] == gated  # the gate scales the tensor it was computed from

    # residual adds: two computed tensors (no constants), one per stride-1 block with cin == cout
    residual = [
        node for node in graph.node
        if node.op_type == "Add" and all(i in producer for i in node.input)
    ]
    expected = sum(row[6] == 1 and row[0] == row[3] for row in mnist_se.BLOCKS)
    assert len(residual) == expected >= 3
    assert {"HardSwish", "Relu"} <= {node.op_type for node in graph.node}
    assert "BatchNormalization" not in {node.op_type for node in graph.node}  # folded


def test_accuracy_measured_with_onnx_runtime(asset):
    sess = _session(asset.model_path)
    assert [i.name for i in sess.get_inputs()] == ["x"]
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    acc = {}
    for split in mnist_se.SPLITS:
        x, y = getattr(asset, split)
        logits = sess.run(None, {"x": x})[0]
        assert logits.shape == (len(x), 10)
        acc[split] = float(np.mean(np.argmax(logits, 1) == y))
    assert acc == pytest.approx(asset.meta["accuracy"])
    assert asset.meta["accuracy"]["test"] >= 0.97, acc
    assert asset.meta["accuracy"]["val"] >= 0.96, acc  # the bar is on test; val is 0.976


def test_onnx_runtime_matches_torch(asset, tmp_path):
    """The export (BatchNorm folding, hardswish, hardsigmoid gates, residual adds) computes
    what the torch module computes. The build compared the trained module with its export on
    the test split (``meta.json``); here a freshly initialized network with random BatchNorm
    statistics, in eval mode, is exported and compared on real test digits."""
    import torch

    assert asset.meta["onnx_vs_torch_max_abs_diff"] <= mnist_se.MAX_EXPORT_DIFF

    torch.manual_seed(0)
    net = mnist_se.make_net()
    with torch.no_grad():  # nonzero biases and BatchNorm statistics (no two alike)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            elif isinstance(m, torch.nn.Conv2d | torch.nn.Linear) and m.bias is not None:
                m.bias.uniform_(-0.1, 0.1)
    net.eval()
    path = tmp_path / "fresh.onnx"
    mnist_se.export(net, path)
    x = asset.test[0][:64]
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    got = _session(path).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # same graph as the cached model: same operators in the same order
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops == [n.op_type for n in onnx.load(str(asset.model_path)).graph.node]
