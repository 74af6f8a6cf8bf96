"""The light zoo subset builds, and onnxruntime runs every entry on make_inputs."""

from __future__ import annotations

import numpy as np
import pytest
from tools_loader import load_tool

zoo = load_tool("zoo")
LIGHT = [name for name, entry in zoo.ZOO.items() if entry.light]


@pytest.mark.zoo
@pytest.mark.parametrize("name", LIGHT)
def test_light_entry_builds_and_runs(name):
    pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    path = zoo.build(name)
    assert path.exists() and path.suffix == ".onnx"
    feeds = zoo.make_inputs(name)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert sorted(feeds) == sorted(i.name for i in sess.get_inputs())
    outs = sess.run(None, feeds)
    assert outs
    for out in outs:
        assert np.all(np.isfinite(out))
    assert max(float(np.max(np.abs(o))) for o in outs) > 1e-6
