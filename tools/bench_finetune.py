"""Fine-tuning recovery benchmark (METHOD.md section 6).

* ``digits``: the digits CNN pruned to 30 % of its MACs (stage 1, no budget): test top-1 of
  the original, the pruned and the fine-tuned model (distillation from the original on the
  unlabelled training images, best epoch on the validation images); and one training epoch of
  the digits CNN as an ``OnnxModule`` against the same architecture written by hand in torch
  (weights copied), measured side by side.
* ``minilm``: the pretrained all-MiniLM-L6-v2 (``tools/minilm.py``) pruned to 50 % of its MACs
  (stage 1, ``idap`` with mean compensation, no budget, as in ``tools/bench_quality.py``):
  mean cosine similarity of the sentence embeddings to the original's on the 256 held-out test
  sentences, before and after distillation (MSE to the original's embeddings) on the 512
  unlabelled calibration sentences (plus ``--minilm-extra`` docstring sentences), their padding
  cut (``minilm.trim``), best epoch on the 256 validation sentences.

    .venv/bin/python tools/bench_finetune.py [--models digits minilm] [--epochs 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits as digits_tool  # noqa: E402
from machine import line  # noqa: E402

from idap_onnx.finetune import FinetuneConfig, finetune  # noqa: E402
from idap_onnx.metrics import Evaluator  # noqa: E402
from idap_onnx.model_io import load_model  # noqa: E402
from idap_onnx.optimize import OptimizeConfig, optimize  # noqa: E402
from idap_onnx.torch_graph import OnnxModule  # noqa: E402


def _acc(model, x, y) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return float((sess.run(None, {"x": x})[0].argmax(1) == y).mean())


def _machine() -> str:
    return line(f"torch {torch.__version__}", "1 torch thread")


def _epoch(net, x, bs=32, seed=0) -> float:
    """One epoch of plain CE training (AdamW); returns seconds."""
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=gen)
    xt = torch.from_numpy(x)
    net.train()
    t0 = time.perf_counter()
    for i in range(0, len(x), bs):
        xb = xt[order[i : i + bs]]
        out = net(xb)
        loss = out.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def speed(asset) -> dict:
    """OnnxModule vs the hand-written DigitsNet (BN folded at export: convs with bias)."""
    from torch import nn

    model = load_model(asset.model_path)
    mod = OnnxModule(model)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    inits = {t.name: t for t in model.graph.initializer}
    from onnx import numpy_helper

    def conv(node):
        w = numpy_helper.to_array(inits[node.input[1]])
        stride = next((a.ints[0] for a in node.attribute if a.name == "strides"), 1)
        c = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], stride=stride, padding=w.shape[2] // 2)
        with torch.no_grad():
            c.weight.copy_(torch.from_numpy(w.copy()))
            c.bias.copy_(torch.from_numpy(numpy_helper.to_array(inits[node.input[2]]).copy()))
        return c

    c = [conv(n) for n in convs]

    class Hand(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.ModuleList(c)
            gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
            w = numpy_helper.to_array(inits[gemm.input[1]])
            self.fc = nn.Linear(w.shape[1], w.shape[0])
            with torch.no_grad():
                self.fc.weight.copy_(torch.from_numpy(w.copy()))
                self.fc.bias.copy_(
                    torch.from_numpy(numpy_helper.to_array(inits[gemm.input[2]]).copy())
                )

        def forward(self, x):
            x = torch.relu(self.c[0](x))
            x = torch.relu(self.c[1](x))
            x = torch.relu(x + self.c[3](torch.relu(self.c[2](x))))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    hand = Hand().eval()
    x = asset.train[0]
    with torch.no_grad():
        diff = float((hand(torch.from_numpy(x[:64])) - mod(x[:64])).abs().max())
    t_hand, t_onnx = [], []
    for _ in range(3):  # interleaved, best of 3
        t_hand.append(_epoch(hand, x))
        t_onnx.append(_epoch(mod, x))
    return {
        "max_abs_diff_before": diff,
        "hand_s": min(t_hand),
        "onnx_s": min(t_onnx),
        "ratio": min(t_onnx) / min(t_hand),
    }


def _rows(arrays: dict, size: int | None = None) -> list[dict]:
    """Per-sample dicts (``size`` None) or batches of ``size`` samples."""
    n = len(next(iter(arrays.values())))
    if size is None:
        return [{k: v[i] for k, v in arrays.items()} for i in range(n)]
    return [{k: v[i : i + size] for k, v in arrays.items()} for i in range(0, n, size)]


def minilm(epochs: int, lr: float, calib_n: int, feature_weight: float, extra: int = 0,
           padded: bool = False, refit: bool = False) -> None:
    import minilm as minilm_tool
    import numpy as np

    asset = minilm_tool.build()
    model = load_model(asset.model_path)
    arrays = {}
    for split, path in (("calib", asset.calib_npz), ("val", asset.val_npz),
                        ("test", asset.test_npz)):
        with np.load(path) as npz:
            arrays[split] = {k: npz[k] for k in npz.files}
    seq = next(iter(arrays["calib"].values())).shape[1]
    val_ev = Evaluator(model, _rows(arrays["val"], 16), metric="cosine")
    test_ev = Evaluator(model, _rows(arrays["test"], 16), metric="cosine")
    calib = _rows({k: v[:calib_n] for k, v in arrays["calib"].items()}, 16)
    cfg = OptimizeConfig(target_flops=0.5, max_drop=1e9, metric="cosine", stages=(1,), p0=0.1,
                         round_to=1, max_group_ratio=0.9, refit=refit)
    t0 = time.perf_counter()
    pruned = optimize(model, calib, val_ev, cfg, input_shapes={k: [1, seq] for k in arrays["val"]})
    prune_s = time.perf_counter() - t0
    ft_cfg = FinetuneConfig(epochs=epochs, lr=lr, batch_size=16, patience=max(epochs, 1), threads=2,
                            feature_weight=feature_weight)
    cut = _rows if padded else minilm_tool.trim  # trim: no work on padding, same embeddings
    train = cut(arrays["calib"])
    n_extra = 0
    if extra:  # more unlabelled text: standard-library docstrings (never val or test)
        tokenizer = minilm_tool.load_tokenizer(asset.tokenizer_dir)
        more = minilm_tool.tokenize(tokenizer, minilm_tool.docstring_sentences()[:extra],
                                    list(arrays["calib"]))
        train += cut({k: np.asarray(v, dtype=np.int64) for k, v in more.items()})
        n_extra = len(more["input_ids"])
    ft = finetune(pruned.model, model, train, val=_rows(arrays["val"]),
                  config=ft_cfg, progress=True)
    macs = pruned.final["macs"] / pruned.original["macs"]
    before, after = test_ev.evaluate(pruned.model), test_ev.evaluate(ft.model)
    print(f"machine: {_machine().replace('1 torch thread', '2 torch threads')}")
    tokens = sum(len(s["input_ids"]) for s in train) / len(train)
    print(f"all-MiniLM-L6-v2, MACs kept {100 * macs:.1f} % (pruned in {prune_s:.0f} s, "
          f"{calib_n} calibration sentences{', refit' if refit else ''}), sequence {seq}; "
          f"training sentences {'padded' if padded else 'trimmed'} to {tokens:.1f} tokens "
          "on average")
    print(f"test cosine to the original: pruned {before.metric:.4f}, fine-tuned "
          f"{after.metric:.4f} ({epochs} epochs max, lr {lr:g}, best epoch {ft.best_epoch}, "
          f"{ft.seconds:.0f} s, {len(train)} unlabelled sentences ({n_extra} of them "
          f"standard-library docstrings), "
          f"feature weight {feature_weight:g})")
    for h in ft.history:
        print(f"  epoch {h['epoch']}: train loss {h['loss']}, val metric {h['val_metric']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["digits", "minilm"],
                    choices=["digits", "minilm"])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--minilm-lr", type=float, default=1e-4)
    ap.add_argument("--minilm-feature-weight", type=float, default=0.0,
                    help="weight of the residual-sum feature term (FinetuneConfig)")
    ap.add_argument("--minilm-extra", type=int, default=0,
                    help="also distill on this many standard-library docstring sentences "
                    "(tools/minilm.py docstring_sentences)")
    ap.add_argument("--minilm-calib", type=int, default=128,
                    help="calibration sentences for the pruning (of 512)")
    ap.add_argument("--minilm-padded", action="store_true",
                    help="train on sentences padded to the full sequence (the rows before "
                    "trimming); default: padding cut to a multiple of 8 tokens (minilm.trim)")
    ap.add_argument("--minilm-refit", action="store_true",
                    help="least-squares refit of the pruned consumers (OptimizeConfig.refit)")
    args = ap.parse_args()
    if "minilm" in args.models:
        minilm(args.epochs, args.minilm_lr, args.minilm_calib, args.minilm_feature_weight,
               args.minilm_extra, args.minilm_padded, args.minilm_refit)
    if "digits" not in args.models:
        return
    torch.set_num_threads(1)
    asset = digits_tool.build()
    model = load_model(asset.model_path)
    x = asset.train[0]
    calib = [{"x": x[i : i + 64]} for i in range(0, 512, 64)]
    ev = Evaluator(model, [{"x": asset.val[0]}], metric="rel-l2")
    cfg = OptimizeConfig(target_flops=0.3, max_error=1e9, metric="rel-l2", stages=(1,))
    pruned = optimize(model, calib, ev, cfg)
    data = [{"x": s} for s in x]
    val = [{"x": s} for s in asset.val[0]]
    ft = finetune(pruned.model, model, data, val=val, config=FinetuneConfig(epochs=args.epochs))
    xt, yt = asset.test
    macs = pruned.final["macs"] / pruned.original["macs"]
    print(f"machine: {_machine()}")
    print(f"digits CNN, MACs kept {100 * macs:.1f} %, {len(data)} unlabelled training images")
    print(f"test top-1 original  : {100 * _acc(model, xt, yt):.2f} %")
    print(f"test top-1 pruned    : {100 * _acc(pruned.model, xt, yt):.2f} %")
    print(
        f"test top-1 fine-tuned: {100 * _acc(ft.model, xt, yt):.2f} % "
        f"({args.epochs} epochs max, best epoch {ft.best_epoch}, {ft.seconds:.1f} s)"
    )
    s = speed(asset)
    print(
        f"one epoch ({len(x)} images, batch 32): hand-written torch {s['hand_s']:.3f} s, "
        f"OnnxModule {s['onnx_s']:.3f} s, ratio {s['ratio']:.2f}x "
        f"(outputs agree to {s['max_abs_diff_before']:.1e})"
    )


if __name__ == "__main__":
    main()
