"""``idap_onnx.api`` on real exported graphs: inspect, prune, remove_blocks.

The models are a torchvision ResNet-18 at 1x3x64x64 and a tiny CNN, exported once per module
with the legacy (TorchScript) exporter at opset 17.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from idap_onnx import api
from idap_onnx.errors import ModelLoadError, UsageError
from idap_onnx.graph import GraphIndex

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")


def _export(module, shape, path):
    """Export ``module`` in eval mode with the legacy exporter (its deprecation warning muted)."""
    torch.manual_seed(0)
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, torch.randn(*shape), str(path), dynamo=False, opset_version=17,
            input_names=["input"], output_names=["logits"],
        )
    return path


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
def resnet18(tmp_path_factory):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    return _export(model, (1, 3, 64, 64), tmp_path_factory.mktemp("r18") / "resnet18.onnx")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    return _export(TinyCNN(), (1, 3, 16, 16), tmp_path_factory.mktemp("tiny") / "tiny.onnx")


@pytest.fixture(scope="module")
def resnet18_report(resnet18):
    return api.inspect(resnet18)


# -- inspect -----------------------------------------------------------------------------------


def test_inspect_finds_groups_blocks_and_costs(resnet18_report):
    report = resnet18_report
    assert report.cost.flops == 2 * report.cost.macs > 0
    assert report.cost.params > 11_000_000
    assert report.prunable_share > 0.8
    assert dict(report.op_histogram)["Conv"] == 20
    # The stem conv produces the first residual stage's channels, sliced on its weight rows.
    stem = next(g for g in report.groups if any(p.node == "/conv1/Conv" for p in g.producers))
    assert not stem.frozen and stem.exact and stem.units == 64 and stem.macs > 0
    ref = next(p for p in stem.producers if p.node == "/conv1/Conv")
    assert (ref.op_type, ref.input, ref.axis) == ("Conv", 1, 0)
    assert all(c.axis == 1 for c in stem.consumers)
    # The classifier's outputs are the graph output: frozen, and the report says why.
    (frozen,) = report.frozen_groups
    assert any("graph output" in reason for reason in frozen.frozen_reasons)
    names = [b.name for b in report.blocks]
    assert "res:/layer1/layer1.1/Add" in names
    assert all(b.macs > 0 and b.nodes >= 1 for b in report.blocks)


def test_inspect_json_form_is_versioned_and_serializable(resnet18_report):
    data = json.loads(json.dumps(resnet18_report.to_dict(), sort_keys=True))
    assert data["schema_version"] == api.SCHEMA_VERSION == 1
    assert data["command"] == "inspect"
    assert data["summary"]["groups"] == len(data["groups"])
    assert data["input_shapes"] == {"input": [1, 3, 64, 64]}
    assert data["groups"][0]["id"] == "g0"


def test_inspect_of_a_proto_matches_the_file(tiny):
    from_file = api.inspect(tiny)
    from_proto = api.inspect(onnx.load(str(tiny)))
    assert from_proto.model.path is None
    assert [g.to_dict() for g in from_proto.groups] == [g.to_dict() for g in from_file.groups]


def test_inspect_rejects_unknown_input_name(tiny):
    with pytest.raises(UsageError, match="has no input 'image'"):
        api.inspect(tiny, {"image": [1, 3, 16, 16]})


def test_inspect_reports_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        api.inspect(tmp_path / "missing.onnx")


# -- prune -------------------------------------------------------------------------------------


def test_prune_half_reduces_macs_and_keeps_the_interface(resnet18):
    original = onnx.load(str(resnet18))
    pruned, report = api.prune(resnet18, 0.5)
    assert report.after.macs < report.before.macs
    assert report.after.params < report.before.params
    assert report.predicted_macs == report.after.macs
    assert report.removed_units == round(0.5 * report.prunable_units)
    assert [i.name for i in pruned.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in pruned.graph.output] == [o.name for o in original.graph.output]
    assert math.isfinite(report.verification.max_rel_err)
    assert report.verification.output_shapes == ((1, 1000),)
    for change in report.groups:
        assert change.kept == change.units - len(change.removed) >= 1


def test_l1_removes_a_zeroed_unit_first(resnet18, resnet18_report, tmp_path):
    """Zero unit 7 of the stem group in every producer: l1 scores it 0, so a one-unit plan
    removes exactly it, and every producer keeps its other rows unchanged."""
    stem = next(g for g in resnet18_report.groups if g.id == "g0")
    unit = 7
    model = onnx.load(str(resnet18))
    index = GraphIndex(model)
    inits = {t.name: t for t in model.graph.initializer}
    originals = {}
    for ref in stem.producers:
        init = inits[index.initializer_name(index.node(ref.node).input[ref.input])]
        weight = numpy_helper.to_array(init).copy()
        originals[ref.node] = weight.copy()
        np.moveaxis(weight, ref.axis, 0)[unit] = 0.0
        init.CopyFrom(numpy_helper.from_array(weight, init.name))
    path = tmp_path / "zeroed.onnx"
    onnx.save(model, str(path))

    pruned, report = api.prune(path, 1.0 / resnet18_report.to_dict()["summary"]["prunable_units"],
                               score="l1", round_to=1)
    assert report.plan == {stem.id: [unit]}
    after = GraphIndex(pruned)
    for ref in stem.producers:
        kept = after.constant(after.node(ref.node).input[ref.input])
        original = originals[ref.node]
        np.moveaxis(original, ref.axis, 0)[unit] = 0.0
        np.testing.assert_array_equal(kept, np.delete(original, unit, axis=ref.axis))


def test_same_seed_gives_byte_identical_models(tiny):
    first, _ = api.prune(tiny, 0.4, score="random", seed=3, verify=False)
    second, _ = api.prune(tiny, 0.4, score="random", seed=3, verify=False)
    other, _ = api.prune(tiny, 0.4, score="random", seed=4, verify=False)
    assert first.SerializeToString() == second.SerializeToString()
    assert first.SerializeToString() != other.SerializeToString()


def test_prune_respects_ignore_round_to_and_max_group_ratio(tiny):
    info = api.inspect(tiny)
    conv2_group = next(
        g.id for g in info.groups if any(p.node == "/conv2/Conv" for p in g.producers)
    )
    _, report = api.prune(tiny, 0.5, ignore=["/conv2/Conv"], round_to=4, max_group_ratio=0.5,
                          verify=False)
    assert report.plan and conv2_group not in report.plan
    for change in report.groups:
        if change.removed:
            assert change.kept % 4 == 0
            assert len(change.removed) <= change.units // 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": 1.5}, "ratio"),
        ({"ratio": 0.2, "round_to": 0}, "round_to"),
        ({"ratio": 0.2, "max_group_ratio": 0.0}, "max_group_ratio"),
        ({"ratio": 0.2, "score": "taylor"}, "unknown score"),
        ({"ratio": 0.2, "ignore": ["/nope/Conv"]}, "not in the model"),
    ],
)
def test_prune_rejects_bad_arguments(tiny, kwargs, message):
    with pytest.raises(UsageError, match=message):
        api.prune(tiny, **kwargs)


def test_prune_does_not_modify_the_given_proto(tiny):
    model = onnx.load(str(tiny))
    before = model.SerializeToString()
    api.prune(model, 0.5, verify=False)
    assert model.SerializeToString() == before


# -- remove_blocks -----------------------------------------------------------------------------


def test_remove_a_residual_block(resnet18, resnet18_report):
    name = "res:/layer1/layer1.1/Add"
    block = next(b for b in resnet18_report.blocks if b.name == name)
    model, report = api.remove_blocks(resnet18, [name])
    assert [b.name for b in report.blocks] == [name]
    assert report.after.macs == report.before.macs - block.macs
    assert report.after.params == report.before.params - block.params
    assert "/layer1/layer1.1/Add" not in {n.name for n in model.graph.node}
    assert [o.name for o in model.graph.output] == ["logits"]
    assert 0.0 < report.verification.max_rel_err < math.inf
    assert report.to_dict()["command"] == "remove-blocks"


def test_remove_blocks_rejects_unknown_and_empty(tiny):
    with pytest.raises(UsageError, match="not a removable block"):
        api.remove_blocks(tiny, ["res:/nope"])
    with pytest.raises(UsageError, match="no block given"):
        api.remove_blocks(tiny, [])
