"""Parity of the trainable torch module (``idap_onnx.torch_graph.OnnxModule``) with ONNX
Runtime over the zoo: the relative L2 error of every float output.

Usage::

    python tools/zoo_parity.py                  # the whole zoo (about 4 minutes on 2 cores)
    python tools/zoo_parity.py resnet18 bert_tiny

ONNX Runtime runs with basic graph optimizations (the reference of
``tests/test_torch_graph.py``, which checks the light zoo at 1e-5 in CI). Exits 1 when a
model is unsupported, fails, or is over the tolerance.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import zoo  # noqa: E402

from idap_onnx.model_io import load_model  # noqa: E402
from idap_onnx.torch_graph import OnnxModule, unsupported_ops  # noqa: E402
from idap_onnx.verify import rel_l2  # noqa: E402

TOLERANCE = 1e-5


def parity(name: str) -> float:
    """The worst relative L2 error of the module's float outputs against ONNX Runtime."""
    model, feeds = load_model(zoo.build(name)), zoo.make_inputs(name)
    bad = unsupported_ops(model)
    if bad:
        raise RuntimeError(f"unsupported ops {bad}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    want = session.run(None, feeds)
    with torch.no_grad():
        got = OnnxModule(model)(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    got = (got,) if isinstance(got, torch.Tensor) else got
    return max(
        rel_l2(g.numpy(), w) for g, w in zip(got, want, strict=True) if w.dtype.kind == "f"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="zoo entries (default: all)")
    names = parser.parse_args(argv).names or list(zoo.ZOO)
    failed = 0
    for name in names:
        try:
            err = parity(name)
            verdict = "ok" if err <= TOLERANCE else "OVER"
            print(f"{name:28s} {err:.1e} {verdict}", flush=True)
            failed += err > TOLERANCE
        except Exception as exc:  # one broken entry must not hide the others
            print(f"{name:28s} FAILED: {str(exc)[:120]}", flush=True)
            failed += 1
    print(f"{len(names) - failed} of {len(names)} within {TOLERANCE:g}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
