"""Recovery without training: mean compensation and the least-squares refit, on real exports.

Models (legacy exporter, opset 17): a small CNN (3x3 stem -> 1x1 conv without bias -> mean ->
Linear: a Conv and a Gemm consumer) and two MLPs on ``[n, tokens, features]`` inputs
(MatMul + Add layers; without biases, bare MatMuls).
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from activations import pull
from onnx import numpy_helper

from idap_onnx.calib.refit import LayerRefit, refit
from idap_onnx.calib.scores import unit_scores
from idap_onnx.calib.stats import collect, plan_probes
from idap_onnx.dependency import analyze_model
from idap_onnx.errors import UsageError
from idap_onnx.model_io import load_model, write_variant
from idap_onnx.passes.compensate import (
    compensate_means,
    group_signature,
    means_from_stats,
    prune_with_compensation,
)
from idap_onnx.passes.prune_channels import prune_channels
from idap_onnx.verify import rel_l2, run_model

torch = pytest.importorskip("torch")
nn = torch.nn

STEM, MIX, HEAD = "/stem/Conv", "/mix/Conv", "/head/Gemm"


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mix = nn.Conv2d(8, 12, 1, bias=False)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(self.mix(h))
        return self.head(h.mean(dim=(2, 3)))


class MLP(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.a = nn.Linear(10, 32, bias=bias)
        self.b = nn.Linear(32, 16, bias=bias)
        self.c = nn.Linear(16, 3)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _export(module: nn.Module, shape: tuple[int, ...], path) -> onnx.ModelProto:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            torch.randn(*shape),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
        )
    return load_model(path)


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    torch.manual_seed(1)
    return _export(SmallCNN(), (2, 3, 16, 16), tmp_path_factory.mktemp("cnn") / "cnn.onnx")


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    torch.manual_seed(2)
    return _export(MLP(), (2, 4, 10), tmp_path_factory.mktemp("mlp") / "mlp.onnx")


@pytest.fixture(scope="module")
def mlp_nobias(tmp_path_factory):
    torch.manual_seed(3)
    return _export(MLP(bias=False), (2, 4, 10), tmp_path_factory.mktemp("mlpnb") / "mlp.onnx")


def _data(shape, n_batches: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(n_batches)]


def _images(shape, n_batches: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Image-like batches: 4x4 blocks of noise plus a little pixel noise (neighbouring pixels
    correlate, so the channels a 3x3 conv makes of them do too)."""
    rng = np.random.default_rng(seed)
    n, c, h, w = shape
    out = []
    for _ in range(n_batches):
        coarse = np.kron(rng.standard_normal((n, c, h // 4, w // 4)), np.ones((4, 4)))
        out.append({"x": (coarse + 0.3 * rng.standard_normal(shape)).astype(np.float32)})
    return out


def _means(model, data):
    graph = analyze_model(model)
    return graph, means_from_stats(collect(model, plan_probes(graph), data, device="cpu"))


def _err(model, reference, data) -> float:
    """Relative L2 error of ``model``'s output against ``reference``'s over all batches."""
    got = np.concatenate([run_model(model, f)[0] for f in data])
    want = np.concatenate([run_model(reference, f)[0] for f in data])
    return rel_l2(got, want)


def _group_of(graph, producer: str) -> str:
    return next(g.id for g in graph.groups if producer in g.producers)


def _set_init(model, name: str, value: np.ndarray) -> None:
    for t in model.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
            return
    raise KeyError(name)


def _node(model, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _init(model, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def _constant_unit(model, weight: str, bias: str, unit: int, value: float, axis: int = 0):
    """A copy of ``model`` whose producer row ``unit`` has zero weights and bias ``value``:
    after ReLU its activation is the constant ``value``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    w, b = _init(out, weight).copy(), _init(out, bias).copy()
    index = [slice(None)] * w.ndim
    index[axis] = unit
    w[tuple(index)] = 0.0
    b[unit] = value
    _set_init(out, weight, w)
    _set_init(out, bias, b)
    return out


# -- (a) constant units are removed exactly ------------------------------------------------------


@pytest.mark.parametrize(
    ("producer", "weight", "bias", "unit"),
    [(STEM, "stem.weight", "stem.bias", 3), (MIX, None, None, 5)],
)
def test_constant_unit_removed_exactly(cnn, producer, weight, bias, unit):
    model = cnn
    if weight is None:  # mix has no bias: give its unit a constant via the weights' zero row
        model = _give_mix_bias(cnn)
        weight, bias = "mix.weight", "mix.bias"
    model = _constant_unit(model, weight, bias, unit, 0.7)
    data = _images((8, 3, 16, 16), 2, seed=0)
    graph, means = _means(model, data)
    removal = {_group_of(graph, producer): [unit]}
    plain = prune_channels(model, removal, graph=graph)
    comp = prune_with_compensation(model, removal, means)
    assert _err(comp, model, data) < 1e-5
    assert _err(plain, model, data) > 1e-3


def _give_mix_bias(model):
    """``mix`` with a bias input (the export has none)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.initializer.append(numpy_helper.from_array(np.zeros(12, np.float32), "mix.bias"))
    _node(out, MIX).input.append("mix.bias")
    return out


def test_matmul_add_constant_unit_exact(mlp):
    weight = _node(mlp, "/a/MatMul").input[1]
    model = _constant_unit(mlp, weight, "a.bias", 7, 0.5, axis=1)
    data = _data((16, 4, 10), 2, seed=1)
    graph, means = _means(model, data)
    gid = _group_of(graph, "/a/MatMul")
    comp = prune_with_compensation(model, {gid: [7]}, means)
    assert _err(comp, model, data) < 1e-5
    assert _err(prune_channels(model, {gid: [7]}, graph=graph), model, data) > 1e-3


class RadixRows(nn.Module):
    """ResNeSt's radix rows: a 1x1 stem, a 1x1 conv with one conv group per row, the two rows
    summed (``x.reshape(b, radix, c // radix, h, w).sum(1)``), mean, Linear."""

    def __init__(self, groups: int = 2) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.rows = nn.Conv2d(8, 12, 1, groups=groups)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        r = torch.relu(self.rows(torch.relu(self.stem(x))))
        b, c, h, w = r.shape
        return self.head(r.reshape(b, 2, c // 2, h, w).sum(1).mean(dim=(2, 3)))


def test_a_constant_unit_read_by_a_conv_grouped_by_rows_is_removed_exactly(tmp_path):
    # stem channels i and i + 4 (input i of each conv group) are one unit; made constant, the
    # grouped conv folds their means into its bias as the group-1 conv it equals would
    torch.manual_seed(4)
    model = _export(RadixRows(), (2, 3, 8, 8), tmp_path / "radix.onnx")
    for unit in (1, 5):
        model = _constant_unit(model, "stem.weight", "stem.bias", unit, 0.7)
    data = _images((8, 3, 8, 8), 2, seed=0)
    graph, means = _means(model, data)
    gid = _group_of(graph, "/stem/Conv")
    group = next(g for g in graph.groups if g.id == gid)
    assert sorted(group.units[1][group.spaces[0]].tolist()) == [1, 5]
    comp = prune_with_compensation(model, {gid: [1]}, means)
    assert _err(comp, model, data) < 1e-5
    assert _err(prune_channels(model, {gid: [1]}, graph=graph), model, data) > 1e-3


def test_a_conv_grouped_by_rows_scores_its_inputs_as_the_group_1_conv_it_equals(tmp_path):
    torch.manual_seed(4)
    grouped, dense = RadixRows(), RadixRows(groups=1)
    dense.load_state_dict({**grouped.state_dict(), "rows.weight": torch.block_diag(
        *grouped.rows.weight[:, :, 0, 0].detach().split(6)).reshape(12, 8, 1, 1)})
    data = _images((8, 3, 8, 8), 2, seed=0)
    scores = []
    for name, module in (("grouped", grouped), ("dense", dense)):
        model = _export(module, (2, 3, 8, 8), tmp_path / f"{name}.onnx")
        graph = analyze_model(model)
        stats = collect(model, plan_probes(graph), data, device="cpu")
        scores.append(unit_scores(graph, stats, "idap", coherence=False)[
            _group_of(graph, "/stem/Conv")])
    by_rows, by_channel = scores
    assert len(by_rows) == 4 and len(by_channel) == 8  # channels i and i + 4 are one unit
    # additive: a unit's score^2 is the sum of its channels' (stem channel i feeds conv group
    # i // 4 only, so the rows' consumer counts it once, as the dense conv does)
    np.testing.assert_allclose(by_rows**2, by_channel[:4] ** 2 + by_channel[4:] ** 2, rtol=1e-4)


class PaddedCNN(nn.Module):
    """3x3 stem -> 3x3 conv with padding 1 (the consumer) on an 8x8 map -> mean -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        h = torch.relu(self.body(torch.relu(self.stem(x))))
        return self.head(h.mean(dim=(2, 3)))


def test_a_padded_conv_keeps_exactly_the_border_spread_that_the_score_counts(tmp_path):
    """A constant stem unit (0.7 everywhere) read by a 3x3 conv with padding 1: each output p
    receives 0.7 * m_p, the sum of the taps that read the image. The compensating bias is the
    average over the positions, so what removal changes is exactly the spread of m_p about it,
    ``0.7^2 * mean_spread`` per sample; the ``idap`` score of the unit predicts that, and the
    whole-kernel bias (right for interior outputs only) would leave more."""
    from idap_onnx.calib.scores import unit_scores
    from idap_onnx.conv_taps import mean_spread, tap_patterns

    torch.manual_seed(4)
    model = _export(PaddedCNN(), (2, 3, 8, 8), tmp_path / "padded.onnx")
    model = _constant_unit(model, "stem.weight", "stem.bias", 3, 0.7)
    data = _images((8, 3, 8, 8), 2, seed=9)
    graph = analyze_model(model, {"x": [1, 3, 8, 8]})
    stats = collect(model, plan_probes(graph), data, device="cpu")
    gid = _group_of(graph, STEM)
    pruned = prune_with_compensation(model, {gid: [3]}, means_from_stats(stats),
                                     input_shapes={"x": [1, 3, 8, 8]})

    body = _node(model, "/body/Conv")
    y = body.output[0]
    before = np.concatenate([pull(model, [y], f)[y] for f in data]).astype(np.float64)
    after = np.concatenate([pull(pruned, [y], f)[y] for f in data]).astype(np.float64)
    changed = float(((after - before) ** 2).sum()) / len(before)

    w = _init(model, "body.weight")[:, 3:4]
    taps = tap_patterns(body, [1, 8, 8, 8], _init(model, "body.weight").shape)
    assert taps.padded
    predicted = 0.7**2 * float(mean_spread(w, taps)[0])
    assert changed == pytest.approx(predicted, rel=1e-4)

    # the additive term e_kc is what removing this one unit changes (the coherence factor,
    # on by default, scales every unit of the consumer alike for removals of many units)
    score = unit_scores(graph, stats, "idap", coherence=False)[gid][3]
    assert score**2 * float((before**2).sum()) / len(before) == pytest.approx(predicted, rel=1e-3)

    m_p = w.reshape(6, -1).astype(np.float64) @ taps.masks.T  # [O, patterns]
    whole_kernel = w.reshape(6, -1).sum(axis=1, keepdims=True)
    left_by_whole_kernel = 0.7**2 * float((((m_p - whole_kernel) ** 2) @ taps.counts).sum())
    assert left_by_whole_kernel > 1.1 * changed


# -- (b) compensation lowers the error of random removals ---------------------------------------


def test_compensation_reduces_error_on_1x1_consumer(cnn, record_property):
    data = _images((8, 3, 16, 16), 4, seed=2)
    graph, means = _means(cnn, data)
    gid = _group_of(graph, STEM)
    rng = np.random.default_rng(0)
    ratios = []
    for _ in range(4):
        removal = {gid: sorted(rng.choice(8, 3, replace=False).tolist())}
        plain = _err(prune_channels(cnn, removal, graph=graph), cnn, data)
        comp = _err(prune_with_compensation(cnn, removal, means), cnn, data)
        assert comp < plain
        ratios.append(comp / plain)
    record_property("cnn_comp_over_plain", ratios)
    print("cnn 1x1 consumer: compensated / plain error", np.round(ratios, 3))


def test_compensation_reduces_error_on_gemm_and_matmul(cnn, mlp):
    data = _images((8, 3, 16, 16), 4, seed=3)
    graph, means = _means(cnn, data)
    removal = {_group_of(graph, MIX): [0, 4, 7, 10]}
    plain = _err(prune_channels(cnn, removal, graph=graph), cnn, data)
    comp = _err(prune_with_compensation(cnn, removal, means), cnn, data)
    print(f"cnn Gemm consumer: plain {plain:.4f} compensated {comp:.4f}")
    assert comp < plain
    data = _data((32, 4, 10), 4, seed=4)
    graph, means = _means(mlp, data)
    removal = {_group_of(graph, "/a/MatMul"): list(range(0, 32, 3))}
    plain = _err(prune_channels(mlp, removal, graph=graph), mlp, data)
    comp = _err(prune_with_compensation(mlp, removal, means), mlp, data)
    print(f"mlp MatMul+Add consumer: plain {plain:.4f} compensated {comp:.4f}")
    assert comp < plain


# -- (c) compensation keeps the channel groups ---------------------------------------------------


@pytest.mark.parametrize("which", ["cnn", "mlp", "mlp_nobias"])
def test_groups_unchanged_by_compensation(which, request):
    model = request.getfixturevalue(which)
    data = _images((4, 3, 16, 16), 1, 5) if which == "cnn" else _data((4, 4, 10), 1, 5)
    graph, means = _means(model, data)
    removal = {g.id: g.prunable_units[:2] for g in graph.groups if not g.frozen and g.size > 2}
    assert removal
    comp = compensate_means(model, graph, removal, means)
    after = analyze_model(comp)
    assert group_signature(after) == group_signature(graph)
    for a, b in zip(graph.groups, after.groups, strict=True):
        assert (a.id, a.producers, a.consumers, a.fixed) == (
            b.id,
            b.producers,
            b.consumers,
            b.fixed,
        )
        for ua, ub in zip(a.units, b.units, strict=True):
            assert ua.keys() == ub.keys()
            assert all(np.array_equal(ua[s], ub[s]) for s in ua)
    onnx.checker.check_model(comp)
    # the original is untouched and the same removal applies to the compensated model
    assert len(model.graph.node) == len(onnx.load_from_string(model.SerializeToString()).graph.node)
    prune_channels(comp, removal, graph=after)


def test_compensation_needs_means(cnn):
    graph = analyze_model(cnn)
    with pytest.raises(UsageError, match="no calibration mean"):
        compensate_means(cnn, graph, {_group_of(graph, STEM): [1]}, {})


# -- (d) MatMul without a bias Add gets one --------------------------------------------------------


def test_matmul_without_add_gets_inserted_add(mlp_nobias):
    model = _zero_column(mlp_nobias, "/a/MatMul", 4)
    data = _data((16, 4, 10), 2, seed=6)
    graph, means = _means(model, data)
    gid = _group_of(graph, "/a/MatMul")
    comp = compensate_means(model, graph, {gid: [4]}, means)
    consumer = _node(comp, "/b/MatMul")
    adds = [n for n in comp.graph.node if n.op_type == "Add" and consumer.output[0] in n.input]
    assert len(adds) == 1  # the inserted bias Add, reading the MatMul's renamed output
    assert adds[0].output[0] == "/b/MatMul_output_0"
    assert len(comp.graph.node) == len(model.graph.node) + 1
    pruned = prune_with_compensation(model, {gid: [4]}, means)
    assert _err(pruned, model, data) < 1e-5
    assert _err(prune_channels(model, {gid: [4]}, graph=graph), model, data) > 1e-3


def _zero_column(model, matmul: str, unit: int):
    """A copy where output ``unit`` of bias-free ``matmul`` is the constant 0.8 before the
    ReLU: its weight column is zero and an ``Add`` of ``0.8 * e_unit`` follows the MatMul."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    node = _node(out, matmul)
    w = _init(out, node.input[1]).copy()
    w[:, unit] = 0.0
    _set_init(out, node.input[1], w)
    offset = np.zeros(w.shape[1], np.float32)
    offset[unit] = 0.8
    out.graph.initializer.append(numpy_helper.from_array(offset, "unit_offset"))
    old = node.output[0]
    node.output[0] = old + "_raw"
    add = onnx.helper.make_node("Add", [old + "_raw", "unit_offset"], [old], name="unit_offset")
    out.graph.node.insert(list(out.graph.node).index(node) + 1, add)
    return out


# -- (e) the least-squares refit -------------------------------------------------------------------


def _recoveries(model, calib, held, producer: str, units: list[int], **refit_args):
    """Units of ``producer``'s group removed four ways: their held-out errors (plain,
    compensated, refitted, compensated then refitted), the refit's details and the refitted
    plain model."""
    graph, means = _means(model, calib)
    removal = {_group_of(graph, producer): units}
    plain = prune_channels(model, removal, graph=graph)
    comp = prune_with_compensation(model, removal, means)
    details: list[LayerRefit] = []
    refitted = refit(model, plain, calib, details=details, **refit_args)
    errors = {
        "plain": _err(plain, model, held),
        "compensated": _err(comp, model, held),
        "refit": _err(refitted, model, held),
        "compensated+refit": _err(refit(model, comp, calib, **refit_args), model, held),
    }
    return errors, details, refitted


def test_refit_reduces_error_mlp(mlp):
    calib = _data((64, 4, 10), 4, seed=7)
    held = _data((64, 4, 10), 2, seed=8)
    e, details, _ = _recoveries(mlp, calib, held, "/a/MatMul", list(range(0, 32, 2)))
    print("mlp held-out errors", {k: round(v, 4) for k, v in e.items()})
    assert [d.node for d in details if d.applied] == ["/b/MatMul"]
    assert details[0].err_after < details[0].err_before
    assert e["refit"] < e["plain"]
    assert e["compensated+refit"] < e["compensated"]


def test_refit_reduces_error_cnn(cnn):
    calib = _images((16, 3, 16, 16), 4, seed=9)
    held = _images((16, 3, 16, 16), 2, seed=10)
    e, details, refitted = _recoveries(cnn, calib, held, STEM, [1, 2, 5], max_rows=4000)
    print("cnn held-out errors", {k: round(v, 4) for k, v in e.items()})
    (info,) = details
    assert info.node == MIX and info.applied and info.rows == 4000
    assert e["refit"] < e["plain"]
    assert e["compensated+refit"] < e["compensated"]
    # a bias was added to the 1x1 conv (it had none)
    node = _node(refitted, MIX)
    assert len(node.input) == 3 and node.input[2]


@pytest.fixture(scope="module")
def padded(tmp_path_factory):
    torch.manual_seed(5)
    return _export(PaddedCNN(), (2, 3, 8, 8), tmp_path_factory.mktemp("pad") / "padded.onnx")


def test_refit_of_a_3x3_consumer_solves_on_the_patches_under_its_kernel(padded):
    """``body`` is a 3x3 conv with padding 1: its rows are the 8 x 3 x 3 patches (zeros where
    the kernel reads padding). Refitted on them, the held-out error drops, with and without
    mean compensation; a patch wider than ``max_width`` skips the layer with the reason."""
    calib = _images((32, 3, 8, 8), 4, seed=14)
    held = _images((32, 3, 8, 8), 2, seed=15)
    e, details, refitted = _recoveries(padded, calib, held, STEM, [1, 2, 5], max_rows=4000)
    print("3x3 consumer, held-out errors", {k: round(v, 4) for k, v in e.items()})
    (info,) = details
    assert info.node == "/body/Conv" and info.applied and info.rows == 4000
    assert info.err_after < info.err_before
    assert e["refit"] < e["plain"] and e["compensated+refit"] < e["compensated"]
    assert _init(refitted, _node(refitted, "/body/Conv").input[1]).shape == (6, 5, 3, 3)
    narrow: list[LayerRefit] = []
    refit(padded, refitted, calib, max_width=40, details=narrow)  # 5 x 3 x 3 = 45 wide
    assert [(d.node, d.applied) for d in narrow] == [("/body/Conv", False)]
    assert "too wide" in narrow[0].skipped


def test_a_layer_with_too_few_rows_per_input_keeps_its_pruned_weights(padded, monkeypatch):
    """The 3x3 consumer has 45 inputs (5 x 3 x 3 patches). Fitted on 50 rows it matches them
    and little else: its error on held-out data is worse than plain pruning's. With two rows
    per input required (``ROWS_PER_UNKNOWN``) it is skipped, with the reason, and keeps its
    pruned weights."""
    import idap_onnx.calib.refit as refit_module

    calib = _images((32, 3, 8, 8), 4, seed=14)
    held = _images((32, 3, 8, 8), 2, seed=15)
    graph, _ = _means(padded, calib)
    plain = prune_channels(padded, {_group_of(graph, STEM): [1, 2, 5]}, graph=graph)
    details: list[LayerRefit] = []
    kept = refit(padded, plain, calib, max_rows=50, details=details)
    (info,) = details
    assert not info.applied and info.rows == 50
    assert info.skipped.startswith("too few rows: 50 for 45 inputs")
    assert _err(kept, padded, held) == _err(plain, padded, held)
    monkeypatch.setattr(refit_module, "ROWS_PER_UNKNOWN", 1)
    overfit = refit(padded, plain, calib, max_rows=50)
    print("held-out error: plain", _err(plain, padded, held), "fitted on 50 rows",
          _err(overfit, padded, held))
    assert _err(overfit, padded, held) > _err(plain, padded, held)


@pytest.mark.parametrize(("k", "stride", "dilation", "pad"), [(3, 1, 1, 1), (3, 2, 1, 1),
                                                              (5, 2, 2, 2), (1, 2, 1, 1)])
def test_patches_times_the_weight_give_the_conv_output(k, stride, dilation, pad):
    from onnx import TensorProto, helper

    from idap_onnx.calib.refit import _patches

    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[k, k],
                            strides=[stride] * 2, dilations=[dilation] * 2, pads=[pad] * 4)
    rng = np.random.default_rng(k + stride)
    a = rng.standard_normal((3, 4, 11, 9)).astype(np.float32)
    w = rng.standard_normal((5, 4, k, k)).astype(np.float32)
    graph = helper.make_graph(
        [node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, a.shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    y = run_model(model, {"x": a})[0]
    rows = np.moveaxis(y, 1, -1).reshape(-1, 5)
    pick = np.sort(rng.choice(len(rows), 25, replace=False))
    x = _patches(node, (k, k), a, y.shape, pick).astype(np.float64)
    np.testing.assert_allclose(x @ w.reshape(5, -1).T, rows[pick], rtol=1e-4, atol=1e-4)


def _stem_and_mix_pruned(cnn):
    """Calibration and held-out images, the removal of units of STEM's and MIX's groups, and
    the plainly pruned model."""
    calib = _images((16, 3, 16, 16), 4, seed=11)
    held = _images((16, 3, 16, 16), 2, seed=12)
    graph = analyze_model(cnn)
    removal = {_group_of(graph, STEM): [0, 6], _group_of(graph, MIX): [2, 3, 8]}
    return calib, held, removal, prune_channels(cnn, removal, graph=graph)


def test_refit_maps_pruned_outputs_with_removal(cnn):
    calib, held, removal, plain = _stem_and_mix_pruned(cnn)
    skipped: list[LayerRefit] = []
    refit(cnn, plain, calib, details=skipped)
    assert [(d.node, d.applied) for d in skipped] == [(MIX, False), (HEAD, True)]
    assert "output width" in skipped[0].skipped
    details: list[LayerRefit] = []
    mapped = refit(cnn, plain, calib, removal=removal, details=details)
    assert [(d.node, d.applied) for d in details] == [(MIX, True), (HEAD, True)]
    before, after = _err(plain, cnn, held), _err(mapped, cnn, held)
    print(f"cnn both groups pruned, held-out: plain {before:.4f} refit {after:.4f}")
    assert after < before


def test_refit_in_sequence_sees_the_refits_before_it(cnn):
    """Refitted one after another, HEAD is fitted on the inputs that MIX's refit produces: it
    starts from a smaller error than when both are fitted at once, and ends lower too."""
    calib, held, removal, plain = _stem_and_mix_pruned(cnn)
    seq: list[LayerRefit] = []
    once: list[LayerRefit] = []
    in_sequence = refit(cnn, plain, calib, removal=removal, details=seq)
    at_once = refit(cnn, plain, calib, removal=removal, details=once, sequential=False)
    assert [d.node for d in seq] == [d.node for d in once] == [MIX, HEAD]
    # MIX sees the same inputs either way (run in torch in sequence, in ONNX Runtime at once)
    assert seq[0].err_after == pytest.approx(once[0].err_after, rel=1e-6)
    assert seq[1].err_before < once[1].err_before
    e_seq, e_once = _err(in_sequence, cnn, held), _err(at_once, cnn, held)
    print(f"held-out: in sequence {e_seq:.4f}, at once {e_once:.4f}")
    assert e_seq < e_once


def test_refit_draws_the_same_targets_whether_or_not_it_keeps_them(cnn):
    """In sequence the original's sampled targets are drawn in one pass and kept (when they
    fit in ``cache_bytes``); drawn again per layer instead, the model is byte-identical."""
    calib, _, removal, plain = _stem_and_mix_pruned(cnn)
    kept = refit(cnn, plain, calib, removal=removal, max_rows=3000, frontier_bytes=0)
    redrawn = refit(cnn, plain, calib, removal=removal, max_rows=3000, cache_bytes=0)
    assert kept.SerializeToString() == redrawn.SerializeToString()


def test_refit_in_one_torch_pass_matches_one_onnx_runtime_pass_per_layer(cnn):
    """The pruned graph run once node by node in torch, the batches held between layers
    (``refit_stream``), gives the refit of one ONNX Runtime pass per layer: the same layers,
    rows and errors, and weights equal to float32 rounding."""
    calib, held, removal, plain = _stem_and_mix_pruned(cnn)
    streamed, passes = [], []
    one = refit(cnn, plain, calib, removal=removal, details=streamed)
    many = refit(cnn, plain, calib, removal=removal, details=passes, frontier_bytes=0)
    assert [(d.node, d.rows, d.applied) for d in streamed] == [
        (d.node, d.rows, d.applied) for d in passes]
    for a, b in zip(streamed, passes, strict=True):
        assert a.err_after == pytest.approx(b.err_after, rel=1e-4)
    weights = {t.name for t in many.graph.initializer}
    for t in one.graph.initializer:
        assert t.name in weights
        np.testing.assert_allclose(_init(one, t.name), _init(many, t.name), rtol=1e-4, atol=1e-5)
    assert _err(one, cnn, held) == pytest.approx(_err(many, cnn, held), rel=1e-4)


def test_refit_takes_the_next_targets_from_the_cache_its_last_result_filled(cnn, monkeypatch):
    """Two steps as ``optimize`` runs them: the first refit's result is the second's
    original, and the second reads its targets from what the first drew on the way (no pass
    over the first result), with the same outcome as drawing them from that model anew."""
    from idap_onnx.calib.refit import TargetCache

    calib, held, removal, plain = _stem_and_mix_pruned(cnn)
    cache = TargetCache()
    first = refit(cnn, plain, calib, removal=removal, cache=cache)
    assert cache.get(first) is not None and cache.get(cnn) is None
    graph = analyze_model(first)
    again = {_group_of(graph, MIX): [0, 1]}
    second = prune_channels(first, again, graph=graph)
    cached, fresh = [], []
    anew = refit(first, second, calib, removal=again, details=fresh)

    def no_pass(*args, **kwargs):
        raise AssertionError("the targets were drawn by a pass, not read from the cache")

    monkeypatch.setattr("idap_onnx.calib.refit._targets", no_pass)
    from_cache = refit(first, second, calib, removal=again, cache=cache, details=cached)
    assert [(d.node, d.rows, d.applied) for d in cached] == [
        (d.node, d.rows, d.applied) for d in fresh] and cached
    for t in anew.graph.initializer:
        np.testing.assert_allclose(_init(from_cache, t.name), _init(anew, t.name), rtol=1e-4,
                                   atol=1e-5)
    assert cache.get(from_cache) is not None and cache.get(first) is not None


def test_a_node_torch_fails_on_sends_the_refit_back_to_onnx_runtime(cnn, monkeypatch):
    """A torch kernel that fails at run time (past the executor's own checks), halfway through
    the one-pass refit: nothing it wrote is kept, and the result is the per-layer passes'."""
    from idap_onnx.torch_graph import OnnxModule

    calib, _, removal, plain = _stem_and_mix_pruned(cnn)
    # torch's targets, then the per-layer passes (the stream declined: too little memory)
    passes = refit(cnn, plain, calib, removal=removal, frontier_bytes=1024)
    real, failed = OnnxModule.run_nodes, []

    def fails_after_the_first_layer(self, env, start, stop, *args, **kwargs):
        if start > 0 and stop - start > 1:  # the stream's second advance: MIX already written
            failed.append(start)
            raise RuntimeError("Conv node 'x' failed on inputs [...]: no kernel")
        return real(self, env, start, stop, *args, **kwargs)

    monkeypatch.setattr(OnnxModule, "run_nodes", fails_after_the_first_layer)
    details: list[LayerRefit] = []
    fallen = refit(cnn, plain, calib, removal=removal, details=details)
    assert failed
    assert fallen.SerializeToString() == passes.SerializeToString()
    assert [d.node for d in details] == [MIX, HEAD]


def test_refit_falls_back_to_passes_when_the_batches_do_not_fit(cnn):
    """``frontier_bytes`` below one batch's live tensors: the per-layer passes, the same result
    to float32 rounding."""
    from idap_onnx.calib.refit_stream import Stream

    calib, _, removal, plain = _stem_and_mix_pruned(cnn)
    assert Stream.open(plain, calib, "cpu", max_bytes=1024) is None
    assert Stream.open(plain, calib, "cpu", max_bytes=2**30) is not None
    small = refit(cnn, plain, calib, removal=removal, frontier_bytes=1024)
    passes = refit(cnn, plain, calib, removal=removal, frontier_bytes=0)
    for t in passes.graph.initializer:  # the targets came from torch, not ONNX Runtime
        np.testing.assert_allclose(_init(small, t.name), _init(passes, t.name), rtol=1e-4,
                                   atol=1e-5)


def test_refit_session_runs_only_what_the_pulled_tensors_need(cnn, tmp_path):
    """A refit pass pulls a few tensors: its session computes their ancestors, nothing after
    them, and returns exactly those tensors."""
    from idap_onnx.calib.refit import _session
    from idap_onnx.graph import needed_indices

    pulled = _node(cnn, MIX).input[0]
    nodes = [cnn.graph.node[i] for i in needed_indices(cnn.graph, [pulled])]
    names = [n.name for n in cnn.graph.node]
    assert [n.name for n in nodes] == names[: len(nodes)] and len(nodes) < len(names)
    assert pulled in nodes[-1].output
    sess = _session(cnn, [pulled], "cpu")
    assert [o.name for o in sess.get_outputs()] == [pulled]
    feed = _images((16, 3, 16, 16), 1, seed=1)[0]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as refit's
    path = write_variant(cnn, tmp_path / "full.onnx", nodes=cnn.graph.node, outputs=[pulled])
    full = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, feed)[0], full.run([pulled], feed)[0])


def test_refit_leaves_unpruned_model_alone(mlp):
    calib = _data((8, 4, 10), 1, seed=13)
    details: list[LayerRefit] = []
    out = refit(mlp, mlp, calib, details=details)
    assert details == []
    assert _err(out, mlp, calib) == 0.0


# -- hand-built graphs: Gemm variants, a shared bias, ConvTranspose ------------------------------


def _graph_model(nodes, inits, inputs, outputs, out_rank: int) -> onnx.ModelProto:
    graph = onnx.helper.make_graph(
        nodes,
        "g",
        [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, s) for n, s in inputs],
        [
            onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [None] * out_rank)
            for n in outputs
        ],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_gemm_variants_and_shared_bias_exact():
    """Gemm consumers with transB 0/1, no C, scalar C, alpha/beta, beta = 0, and a C shared by
    two Gemms: a constant unit is removed exactly and the shared C is copied, not edited."""
    rng = np.random.default_rng(0)
    b1, c1 = rng.standard_normal((8, 6)), rng.standard_normal(8)
    b1[2], c1[2] = 0.0, 0.6
    make = onnx.helper.make_node
    nodes = [
        make("Gemm", ["x", "B1", "C1"], ["h"], name="g1", transB=1),
        make("Relu", ["h"], ["r"], name="relu"),
        make("Gemm", ["r", "B2"], ["y2"], name="g2", alpha=2.0),
        make("Gemm", ["r", "B3", "shared"], ["y3"], name="g3", transB=1, beta=0.5),
        make("Gemm", ["r", "B4", "shared"], ["y4"], name="g4"),
        make("Gemm", ["r", "B5", "scalar"], ["y5"], name="g5"),
        make("Gemm", ["r", "B6", "C6"], ["y6"], name="g6", beta=0.0),
    ]
    inits = {
        "B1": b1,
        "C1": c1,
        "B2": rng.standard_normal((8, 4)),
        "B3": rng.standard_normal((4, 8)),
        "B4": rng.standard_normal((8, 4)),
        "shared": rng.standard_normal(4),
        "B5": rng.standard_normal((8, 4)),
        "scalar": np.array(0.3),
        "B6": rng.standard_normal((8, 4)),
        "C6": rng.standard_normal(4),
    }
    outputs = ["y2", "y3", "y4", "y5", "y6"]
    model = _graph_model(nodes, inits, [("x", [5, 6])], outputs, 2)
    data = _data((5, 6), 3, seed=14)
    graph, means = _means(model, data)
    gid = _group_of(graph, "g1")
    comp = compensate_means(model, graph, {gid: [2]}, means)
    assert group_signature(analyze_model(comp)) == group_signature(graph)
    assert np.array_equal(_init(comp, "shared"), inits["shared"].astype(np.float32))
    g3, g4 = _node(comp, "g3"), _node(comp, "g4")
    assert "shared" not in (g3.input[2], g4.input[2]) and g3.input[2] != g4.input[2]
    assert len(_node(comp, "g2").input) == 3  # a C was added
    assert [n.op_type for n in comp.graph.node].count("Add") == 1  # after g6 (beta = 0)
    pruned = prune_with_compensation(model, {gid: [2]}, means)
    plain = prune_channels(model, {gid: [2]}, graph=graph)
    for k in range(len(outputs)):
        got = np.concatenate([run_model(pruned, f)[k] for f in data])
        bad = np.concatenate([run_model(plain, f)[k] for f in data])
        want = np.concatenate([run_model(model, f)[k] for f in data])
        assert rel_l2(got, want) < 1e-5, outputs[k]
        assert rel_l2(bad, want) > 1e-3, outputs[k]


def test_conv_transpose_1x1_exact():
    rng = np.random.default_rng(1)
    w1, b1 = rng.standard_normal((6, 3, 3, 3)), rng.standard_normal(6)
    w1[4], b1[4] = 0.0, 0.9
    make = onnx.helper.make_node
    nodes = [
        make("Conv", ["x", "W1", "B1"], ["h"], name="conv", pads=[1, 1, 1, 1]),
        make("Relu", ["h"], ["r"], name="relu"),
        make("ConvTranspose", ["r", "W2"], ["y"], name="deconv"),
    ]
    inits = {"W1": w1, "B1": b1, "W2": rng.standard_normal((6, 4, 1, 1))}
    model = _graph_model(nodes, inits, [("x", [2, 3, 8, 8])], ["y"], 4)
    data = _data((2, 3, 8, 8), 2, seed=15)
    graph, means = _means(model, data)
    removal = {_group_of(graph, "conv"): [4]}
    assert _err(prune_with_compensation(model, removal, means), model, data) < 1e-5
    assert _err(prune_channels(model, removal, graph=graph), model, data) > 1e-3
