"""Calibration statistics and IDAP++ scores, checked against numpy and the paper's claims."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from activations import pull
from tools_loader import load_tool
from torch import nn

from idap_onnx.blocks import find_blocks, residual_flows
from idap_onnx.calib.scores import block_divergence, unit_scores
from idap_onnx.calib.stats import collect, plan_probes
from idap_onnx.dependency import analyze_model
from idap_onnx.model_io import load_model


class TinyResNet(nn.Module):
    """conv -> relu -> [conv -> relu -> conv] + skip -> relu -> pool -> linear."""

    def __init__(self, width: int = 8, inner: int = 6) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.a = nn.Conv2d(width, inner, 3, padding=1)
        self.b = nn.Conv2d(inner, width, 1)
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(h + self.b(torch.relu(self.a(h))))
        return self.head(h.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> onnx.ModelProto:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    torch.onnx.export(
        TinyResNet().eval(),
        torch.randn(1, 3, 12, 12),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
    )
    return load_model(path)


def _batches(n_batches: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((4, 3, 12, 12)).astype(np.float32)} for _ in range(n_batches)]


def _measure(model):
    graph = analyze_model(model)
    blocks = find_blocks(model, graph.index)
    plan = plan_probes(graph, blocks)
    return graph, plan, collect(model, plan, _batches())


def _rel_error(got: np.ndarray, want: np.ndarray) -> float:
    """||got - want|| / ||want||: the relative error of a statistic vector (per element it
    would be ill-posed where a channel's mean is near 0)."""
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _assert_stats_match_numpy(model, plan, stats, feeds) -> None:
    """Every in-graph statistic equals numpy in float64 on the full activations (relative
    error < 1e-6), though the graph sums within a sample in float32."""
    names = list(plan.channels) + sorted(plan.energies)
    full = [pull(model, names, feed) for feed in feeds]
    for t, probe in plan.channels.items():
        acts = np.concatenate(
            [np.moveaxis(f[t], probe.axis, 0).reshape(f[t].shape[probe.axis], -1) for f in full],
            axis=1,
        ).astype(np.float64)
        assert _rel_error(stats.mean(t), acts.mean(axis=1)) < 1e-6
        assert _rel_error(stats.second_moment(t), (acts**2).mean(axis=1)) < 1e-6
    for y in plan.energies:
        want = sum(float((f[y].astype(np.float64) ** 2).sum()) for f in full)
        assert stats.energy[y] == pytest.approx(want, rel=1e-6)


def test_in_graph_statistics_equal_numpy_on_full_activations(tiny):
    _, plan, stats = _measure(tiny)
    _assert_stats_match_numpy(tiny, plan, stats, _batches())
    assert stats.samples == 12


def test_pooled_probes_run_in_the_nchwc_layout_and_still_equal_numpy(tmp_path):
    """With static image sizes the probes pool each image (``GlobalAveragePool``), so the
    convolutions keep ONNX Runtime's NCHWc layout (the fast one of plain inference); the
    statistics still equal numpy on the full activations."""
    torch.manual_seed(0)
    path = tmp_path / "wide.onnx"
    wide = TinyResNet(width=32, inner=16)  # widths ONNX Runtime runs in its NCHWc layout
    torch.onnx.export(wide.eval(), torch.randn(1, 3, 12, 12), str(path), dynamo=False,
                      opset_version=17, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    wide = load_model(path)
    _, plan, stats = _measure(wide)
    assert plan.pooled and stats.nchwc_nodes > 0
    _assert_stats_match_numpy(wide, plan, stats, _batches())
    assert stats.samples == 12


def test_symbolic_image_sizes_keep_the_unpooled_probes(tiny):
    """Without static H x W the pooled sums could not be scaled back: the probes reduce the
    tensors themselves, at the extended level (no NCHWc)."""
    dynamic = onnx.ModelProto()
    dynamic.CopyFrom(tiny)
    dims = dynamic.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "h", "w"
    _, plan, stats = _measure(dynamic)
    assert not plan.pooled and stats.nchwc_nodes == 0
    _assert_stats_match_numpy(dynamic, plan, stats, _batches())


def _rescaled(model: onnx.ModelProto, s: float) -> onnx.ModelProto:
    """Multiply conv 'a' (weights and bias) by s and divide its consumer 'b' by s: with the
    ReLU between them the function is unchanged."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    nodes = {n.name: n for n in out.graph.node}
    a = next(n for name, n in nodes.items() if name.endswith("a/Conv"))
    b = next(n for name, n in nodes.items() if name.endswith("b/Conv"))
    for name, factor in ((a.input[1], s), (a.input[2], s), (b.input[1], 1 / s)):
        arr = onnx.numpy_helper.to_array(inits[name]) * np.float32(factor)
        inits[name].CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), name))
    return out


@pytest.mark.parametrize("s", [0.01, 10.0])
def test_idap_scores_are_scale_invariant_and_weight_norms_are_not(tiny, s):
    graph, _, stats = _measure(tiny)
    scaled = _rescaled(tiny, s)
    graph2, _, stats2 = _measure(scaled)
    idap, idap2 = unit_scores(graph, stats, "idap"), unit_scores(graph2, stats2, "idap")
    for gid in idap:
        np.testing.assert_allclose(idap2[gid], idap[gid], rtol=1e-5, atol=1e-12)
    dl, dl2 = block_divergence(stats), block_divergence(stats2)
    for name in dl:
        assert dl2[name] == pytest.approx(dl[name], rel=1e-5)
    a_group = next(g.id for g in graph.groups if any(p.endswith("a/Conv") for p in g.producers))
    for kind in ("l1", "wanda"):
        before = unit_scores(graph, stats, kind)[a_group]
        after = unit_scores(graph2, stats2, kind)[a_group]
        assert not np.allclose(before, after, rtol=1e-3), kind


def _edit_unit(model, node_suffix, unit, weight=0.0, bias=0.0):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    node = next(n for n in out.graph.node if n.name.endswith(node_suffix))
    for name, value in ((node.input[1], weight), (node.input[2], bias)):
        arr = onnx.numpy_helper.to_array(inits[name]).copy()
        arr[unit] = value
        inits[name].CopyFrom(onnx.numpy_helper.from_array(arr, name))
    return out


def test_a_dead_unit_scores_exactly_zero(tiny):
    dead = _edit_unit(tiny, "a/Conv", unit=2)
    graph, _, stats = _measure(dead)
    gid = next(g.id for g in graph.groups if any(p.endswith("a/Conv") for p in g.producers))
    for mc in (True, False):
        assert unit_scores(graph, stats, "idap", mean_compensation=mc)[gid][2] == 0.0


def test_a_constant_unit_is_free_only_with_mean_compensation(tiny):
    constant = _edit_unit(tiny, "a/Conv", unit=3, weight=0.0, bias=0.7)
    graph, _, stats = _measure(constant)
    gid = next(g.id for g in graph.groups if any(p.endswith("a/Conv") for p in g.producers))
    assert unit_scores(graph, stats, "idap", mean_compensation=True)[gid][3] == 0.0
    assert unit_scores(graph, stats, "idap", mean_compensation=False)[gid][3] > 0.0


def test_in_graph_statistics_equal_numpy_on_a_transformer():
    zoo = load_tool("zoo")
    model = load_model(zoo.build("bert_tiny"))
    feeds = [zoo.make_inputs("bert_tiny", seed=s) for s in range(3)]
    shapes = {k: list(v.shape) for k, v in feeds[0].items()}
    graph = analyze_model(model, shapes)
    plan = plan_probes(graph, find_blocks(model, graph.index))
    stats = collect(model, plan, feeds)
    assert any(p.rank == 3 for p in plan.channels.values())  # token tensors [B, S, D]
    _assert_stats_match_numpy(model, plan, stats, feeds)
    heads = unit_scores(graph, stats, "idap")
    head_groups = [g for g in graph.groups if g.size == 4 and not g.frozen]
    assert head_groups and all(heads[g.id].shape == (4,) for g in head_groups)


def test_probing_only_what_idap_reads_gives_the_same_scores(tiny):
    """``plan_probes(scores=("idap",))`` drops the ReLU norms (``paper``) and the producers'
    input channels (``wanda``) without changing a single ``idap`` score or D_l."""
    graph, full_plan, full = _measure(tiny)
    blocks = find_blocks(tiny, graph.index)
    lean_plan = plan_probes(graph, blocks, scores=("idap",))
    lean = collect(tiny, lean_plan, _batches())

    assert full_plan.relu_norms and not lean_plan.relu_norms
    assert "x" in full_plan.channels and "x" not in lean_plan.channels
    for mc in (True, False):
        want = unit_scores(graph, full, "idap", mean_compensation=mc)
        got = unit_scores(graph, lean, "idap", mean_compensation=mc)
        for gid in want:
            np.testing.assert_array_equal(got[gid], want[gid])
    assert block_divergence(lean) == block_divergence(full)


def test_a_branch_unit_is_measured_against_the_block_output(tiny):
    """Units of conv ``a`` feed ``b``, the last conv of the residual branch: the next flow
    tensor is the block output y = h + b(...), so E_c = e_c / E||y||^2, and
    D_f(c) = sqrt(E_c (1 + 2 (kappa - 1) rank(c) / 6)) with b's coherence
    kappa = max(1, E||Y_b - mean_c(Y_b)||^2 / sum_c e_c) from its output Y_b."""
    graph, _, stats = _measure(tiny)
    blocks = find_blocks(graph.model, graph.index)
    (block,) = [b for b in blocks if b.kind == "residual"]
    b_conv = next(n for n in graph.index.nodes if n.name.endswith("b/Conv"))
    assert residual_flows(graph.index, blocks) == {b_conv.output[0]: block.output}

    x_b = b_conv.input[0]
    y_b = b_conv.output[0]
    full = [pull(tiny, [x_b, y_b, block.output], feed) for feed in _batches()]
    acts = np.concatenate([f[x_b] for f in full]).astype(np.float64)  # [N, 6, H, W]
    y = np.concatenate([f[block.output] for f in full]).astype(np.float64)
    out = np.concatenate([f[y_b] for f in full]).astype(np.float64)  # [N, 8, H, W]
    w = graph.index.constant(b_conv.input[1]).astype(np.float64)  # [8, 6, 1, 1]
    positions = y.shape[2] * y.shape[3]
    var = acts.transpose(1, 0, 2, 3).reshape(6, -1).var(axis=1)
    e = (w**2).sum(axis=(0, 2, 3)) * var * positions
    centered = out - out.mean(axis=(0, 2, 3), keepdims=True)
    kappa = max((centered**2).sum() / len(out) / e.sum(), 1.0)
    rank = np.argsort(np.argsort(e, kind="stable"), kind="stable")
    want = np.sqrt(e / (y**2).sum(axis=(1, 2, 3)).mean() * (1 + 2 * (kappa - 1) * rank / 6))

    gid = next(g.id for g in graph.groups if any(p.endswith("a/Conv") for p in g.producers))
    np.testing.assert_allclose(unit_scores(graph, stats, "idap")[gid], want, rtol=1e-5)


def test_layer_divergence_equals_numpy_on_full_activations(tiny):
    """D_l = sum_b ||y_b - x_b|| / sum_b ||y_b||. For a residual block the graph measures
    y - x as its branch f(x) (no Sub); that equals numpy's float64 y - x on the pulled
    activations."""
    _, plan, stats = _measure(tiny)
    assert [b.kind for b in plan.blocks.values()] == ["residual"]
    d_l = block_divergence(stats)
    for name, block in plan.blocks.items():
        full = [pull(tiny, [block.input, block.output], feed) for feed in _batches()]

        def norms(a: np.ndarray) -> float:
            return float(np.linalg.norm(a.reshape(len(a), -1), axis=1).sum())

        diff = sum(norms(f[block.output].astype(np.float64) - f[block.input]) for f in full)
        out = sum(norms(f[block.output].astype(np.float64)) for f in full)
        assert d_l[name] == pytest.approx(diff / out, rel=1e-6)


def _two_matmuls(w1: np.ndarray, w2: np.ndarray) -> onnx.ModelProto:
    """``y = (x @ w1) @ w2``: the hidden units of ``w1`` are one group, read by ``w2``."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
         helper.make_node("MatMul", ["h", "w2"], ["y"], name="down")],
        "two_matmuls",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", w1.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", w2.shape[1]])],
        [numpy_helper.from_array(w1.astype(np.float32), "w1"),
         numpy_helper.from_array(w2.astype(np.float32), "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("coherent", [True, False])
def test_channels_that_add_up_coherently_score_by_what_they_carry_together(coherent):
    """Eight hidden channels read by one MatMul. When they are copies of one signal, removing
    all of them changes ``y`` by 8^2 = 64 times one channel's energy, not 8 times: the
    consumer's coherence is kappa = 8, and each unit's D_f^2 is its additive energy times its
    marginal factor ``1 + 2 (kappa - 1) r / 8`` (r: its rank in the group), so a global
    ranking pays more for each further unit of the layer. Independent channels have kappa ~ 1
    and keep the additive score."""
    from idap_onnx.calib.scores import coherence

    rng = np.random.default_rng(0)
    w1 = np.ones((1, 8)) if coherent else np.eye(8)
    model = _two_matmuls(w1, np.ones((8, 4)))
    feeds = [{"x": rng.standard_normal((512, w1.shape[0])).astype(np.float32)} for _ in range(4)]
    graph = analyze_model(model, {"x": [1, w1.shape[0]]})
    stats = collect(model, plan_probes(graph, scores=("idap",)), feeds)
    (group,) = [g for g in graph.groups if not g.frozen]
    (kappa, _additive), = coherence(graph, stats).values()
    with_kappa = unit_scores(graph, stats, "idap")[group.id]
    additive = unit_scores(graph, stats, "idap", coherence=False)[group.id]
    if coherent:
        assert kappa == pytest.approx(8.0, rel=1e-4)
        rank = np.argsort(np.argsort(additive, kind="stable"), kind="stable")
        np.testing.assert_allclose(with_kappa**2, additive**2 * (1 + 2 * 7 * rank / 8),
                                   rtol=1e-4)
    else:
        assert kappa == pytest.approx(1.0, abs=0.1)
        np.testing.assert_allclose(with_kappa, additive, rtol=0.1)
