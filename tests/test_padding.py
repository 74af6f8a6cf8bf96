"""Cutting token padding (``idap_onnx.padding.trim_padding``): done only where the model's
output is shown not to read the padding."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from idap_onnx.padding import trim_padding


def _encoder(masked: bool) -> onnx.ModelProto:
    """ids, mask [B, L] -> embedding -> MatMul -> Tanh -> mean over L -> out [B, 8]; the mean
    is masked (padding ignored, like a sentence embedder) or over every position."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(50, 8)).astype(np.float32), "emb"),
        numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array([1], np.int64), "axes"),
        numpy_helper.from_array(np.array([2], np.int64), "last"),
    ]
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["e"]),
        helper.make_node("MatMul", ["e", "w"], ["h"]),
        helper.make_node("Tanh", ["h"], ["t"]),
    ]
    if masked:
        nodes += [
            helper.make_node("Cast", ["mask"], ["m"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["m", "last"], ["m3"]),
            helper.make_node("Mul", ["t", "m3"], ["tm"]),
            helper.make_node("ReduceSum", ["tm", "axes"], ["s"], keepdims=0),
            helper.make_node("ReduceSum", ["m3", "axes"], ["n"], keepdims=0),
            helper.make_node("Div", ["s", "n"], ["out"]),
        ]
    else:
        nodes += [
            helper.make_node("Cast", ["mask"], ["unused"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMean", ["t", "axes"], ["mean"], keepdims=0),
            helper.make_node("Identity", ["mean"], ["out"]),
        ]
    graph = helper.make_graph(
        nodes,
        "encoder",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
         for n in ("ids", "mask")],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _sentences(lengths, width: int = 32) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    out = []
    for n in lengths:
        ids = np.zeros(width, np.int64)
        ids[:n] = rng.integers(1, 50, size=n)
        out.append({"ids": ids, "mask": (np.arange(width) < n).astype(np.int64)})
    return out


def test_a_masked_encoder_trains_on_sentences_cut_to_their_length():
    samples = _sentences([3, 9, 17, 32])
    cut, note = trim_padding(samples, _encoder(masked=True))
    assert [len(s["ids"]) for s in cut] == [8, 16, 24, 32]  # token count rounded up to 8
    assert [len(s["mask"]) for s in cut] == [8, 16, 24, 32]
    for s, c in zip(samples, cut, strict=True):
        np.testing.assert_array_equal(c["ids"], s["ids"][: len(c["ids"])])
    assert note.startswith("padding cut: 20.0 positions per sample")


def test_a_model_that_reads_the_padding_keeps_it():
    samples = _sentences([3, 9, 17, 32])
    kept, note = trim_padding(samples, _encoder(masked=False))
    assert kept == samples
    assert note.startswith("padding kept: the outputs change")


def test_without_a_mask_or_padding_nothing_is_cut():
    full = _sentences([32, 32])
    assert trim_padding(full, _encoder(masked=True)) == (full, "no padding to cut")
    images = [{"x": np.zeros((1, 8, 8), np.float32)}]
    kept, note = trim_padding(images, _encoder(masked=True))
    assert kept == images and note.startswith("no 0/1 attention mask")
