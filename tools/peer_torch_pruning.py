"""The peer at matched MACs: Torch-Pruning's group magnitude on the torch twin of a model here.

Torch-Pruning (DepGraph, ``pip install torch-pruning``, PyTorch only) cannot read ONNX, so it
runs on the torch module the ONNX file was exported from: the digits CNN and the SE/depthwise
CNN are retrained here from their fixed seeds (``tools/digits.py``, ``tools/mnist_se.py``
train deterministically; the twin's logits are checked against the cached ONNX file's). The
pruner is Torch-Pruning's recommended baseline: ``MetaPruner`` with
``GroupMagnitudeImportance(p=2)`` (group-summed squared weight norms, mean-normalized per
group), global ranking, one shot, the classifier ignored, every other setting at its default.
Its channel ratio is bisected until the exported model's MACs (``idap_onnx.accounting``, the
count ``optimize`` uses) land on the target. The pruned module is exported to ONNX and judged
by the same ``Evaluator`` as ``tools/bench_quality.py``'s rows: validation and test top-1 and
the per-sample hits (for paired intervals). No fine-tuning, no BatchNorm recalibration.

Usage::

    python tools/peer_torch_pruning.py --models digits mnist_se --targets 0.5 0.3 --json tp.json

MiniLM is not covered: its torch twin (the sentence-transformers checkpoint) is not on this
offline machine, only the exported ONNX file.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def twin(name: str):
    """(torch module in eval mode, bench_quality Task) for ``digits`` or ``mnist_se``."""
    import onnxruntime as ort
    import torch

    from tools import bench_quality as bq

    if name == "digits":
        from tools import digits as mod

        task = bq.digits_task(16)
    else:
        from tools import mnist_se as mod

        task = bq.mnist_se_task(16)
    net = mod.train(mod.load_splits())
    x = task.test[0]["x"]
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    sess = ort.InferenceSession(task.model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x})[0]
    diff = float(np.max(np.abs(got - want)))
    if diff > 1e-3:
        raise SystemExit(f"{name}: the retrained twin differs from the cached ONNX by {diff}")
    return net, task


def _export(net, shape, input_name: str = "x") -> object:
    import onnx
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        torch.onnx.export(net, torch.zeros(1, *shape), str(path), input_names=[input_name],
                          output_names=["logits"], dynamic_axes={input_name: {0: "n"}},
                          opset_version=17, dynamo=False)
        return onnx.load(str(path))


def pruned(net, shape, ratio: float, round_to: int | None = None):
    """``net`` deep-copied and pruned by Torch-Pruning at channel ratio ``ratio`` (widths
    rounded to multiples of ``round_to`` where given, Torch-Pruning's own option)."""
    import torch
    import torch_pruning as tp

    net = copy.deepcopy(net)
    last = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
    pruner = tp.pruner.MetaPruner(
        net, torch.zeros(1, *shape), importance=tp.importance.GroupMagnitudeImportance(p=2),
        global_pruning=True, pruning_ratio=ratio, ignored_layers=[last], round_to=round_to,
    )
    pruner.step()
    return net.eval()


def run(name: str, targets, log) -> list[dict]:
    import torch_pruning as tp

    from idap_onnx.accounting import model_cost

    net, task = twin(name)
    shape = tuple(task.shapes["x"][1:])
    val_ev, test_ev = task.evaluators()
    macs0 = model_cost(task.model, task.shapes).macs
    rows = []
    for target in targets:
        t0 = time.perf_counter()
        lo, hi, best = 0.0, 0.95, None
        for _ in range(14):  # bisect the channel ratio onto the MACs target
            mid = (lo + hi) / 2
            model = _export(pruned(net, shape, mid), shape)
            macs = model_cost(model, task.shapes).macs
            if macs <= target * macs0:
                hi, best = mid, (mid, model, macs)
            else:
                lo = mid
        ratio, model, macs = best
        val = val_ev.evaluate(model)
        test, samples = test_ev.evaluate_per_sample(model)
        row = {
            "model": task.name, "target": target, "score": "torch-pruning", "mc": False,
            "seed": 0, "schedule": "one-shot", "macs0": macs0, "macs": macs,
            "val": val.metric, "test": test.metric,
            "test_samples": [round(float(v), 6) for v in samples],
            "ratio": ratio, "seconds": time.perf_counter() - t0,
            "kept": task.kept(_widths(task.model, model)), "version": tp.__version__,
        }
        log(f"{name} {target}: MACs {macs / macs0:.3f}, val {val.metric:.4f}, "
            f"test {test.metric:.4f}")
        rows.append(row)
    return rows


def _widths(original, pruned_model) -> dict:
    """Conv output widths before and after, keyed by the original node names (same order)."""
    from onnx import numpy_helper

    def convs(m):
        init = {i.name: i for i in m.graph.initializer}
        return [(n.name, numpy_helper.to_array(init[n.input[1]]).shape[0])
                for n in m.graph.node if n.op_type == "Conv" and n.input[1] in init]

    return {name: {"before": b, "after": a}
            for (name, b), (_, a) in zip(convs(original), convs(pruned_model), strict=False)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["digits", "mnist_se"],
                        choices=["digits", "mnist_se"])
    parser.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.3])
    parser.add_argument("--json", help="write the rows here (bench_quality --peer-json reads it)")
    args = parser.parse_args(argv)

    def log(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)

    rows = [r for name in args.models for r in run(name, args.targets, log)]
    for r in rows:
        print(f"{r['model']} {r['target']}: MACs {r['macs'] / r['macs0']:.3f} "
              f"test {r['test']:.4f}  kept {r['kept']}")
    if args.json:
        command = "python tools/peer_torch_pruning.py " + shlex.join(
            argv if argv is not None else sys.argv[1:])
        Path(args.json).write_text(json.dumps({"rows": rows, "command": command}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
