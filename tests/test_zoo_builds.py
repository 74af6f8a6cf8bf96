"""The light zoo subset builds, and onnxruntime runs every entry on make_inputs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

_ZOO_PY = Path(__file__).resolve().parent.parent / "tools" / "zoo.py"


def _load_zoo():
    if "idap_zoo" in sys.modules:
        return sys.modules["idap_zoo"]
    spec = importlib.util.spec_from_file_location("idap_zoo", _ZOO_PY)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["idap_zoo"] = mod  # dataclasses resolve the module through sys.modules
    spec.loader.exec_module(mod)
    return mod


zoo = _load_zoo()
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
