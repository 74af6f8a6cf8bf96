"""The GPU check of the fine-tuning round trip (issue 5), as one prepared script.

On a machine with CUDA it reports, for the record in ``docs/BENCHMARKS.md``:

* **parity on CUDA**: each zoo model as an ``OnnxModule`` on the GPU (float32, TF32 off)
  against ONNX Runtime on the CPU: relative L2 error of every output (the bar is 1e-5);
* **training throughput**: samples/s of one distillation-style training step (forward,
  MSE to a fixed target, backward, AdamW) of ResNet-50 as an ``OnnxModule`` and of
  torchvision's hand-written ResNet-50 with the same weights, measured side by side, and
  the same for inference;
* **latency of original and pruned** (issue 15): each ``--latency-models`` model and its
  pruned form (``idap_onnx.api.prune``, ``--latency-ratio`` of the units by weight norm,
  widths rounded to 8) as ``OnnxModule`` s on CUDA, fp32 (TF32 off) and fp16
  (``module.half()``), batch 1 and 32 (``--latency-batches``), each forward captured once in
  a CUDA graph and its replays timed with CUDA events (median and p90 of ``--replays``);
  original and pruned replayed in turns, so their ratio is the figure to compare. Eager
  timings at small batches are launch-bound and say little (docs/BENCHMARKS.md).

Without CUDA the script prints why it skips and exits 0 (``--device cpu`` runs a dry run of
parity and throughput; the CUDA-graph latency needs CUDA and is skipped there too).

It needs torch, torchvision, onnx and onnxruntime (the device image has them; it does not
need idap-onnx installed: run it from the repository root with ``PYTHONPATH=.``)::

    PYTHONPATH=. python3 tools/gpu_check.py --out $OUT/gpu_check.json
    PYTHONPATH=. python3 tools/gpu_check.py --sections latency --out $OUT/latency.json
    .venv/bin/python tools/gpu_check.py --device cpu --models resnet18 bert_tiny \\
        --batch 2 --steps 2 --warmup 1        # a dry run of the script without a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "tools"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import zoo  # noqa: E402

from idap_onnx.model_io import load_model  # noqa: E402
from idap_onnx.torch_graph import OnnxModule  # noqa: E402

PARITY_MODELS = ("resnet50", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny",
                 "bert_tiny", "gpt2_tiny")
PARITY_TOL = 1e-5
SECTIONS = ("parity", "throughput", "latency")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def parity(name: str, device: str) -> dict:
    """Relative L2 error of every output, OnnxModule on ``device`` vs ORT on the CPU."""
    import onnxruntime as ort

    path = zoo.build(name)
    feeds = zoo.make_inputs(name)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    want = sess.run(None, feeds)
    module = OnnxModule(load_model(path)).to(device).eval()
    with torch.no_grad():
        got = module({k: torch.from_numpy(v).to(device) for k, v in feeds.items()})
    got = got if isinstance(got, tuple) else (got,)
    errors = []
    for g, w in zip(got, want, strict=True):
        g64 = g.detach().cpu().double().numpy()
        w64 = np.asarray(w, dtype=np.float64)
        errors.append(float(np.linalg.norm(g64 - w64) / max(np.linalg.norm(w64), 1e-30)))
    return {"model": name, "max_rel_l2": max(errors), "ok": max(errors) <= PARITY_TOL}


def _step_rate(net, x: torch.Tensor, device: str, steps: int, warmup: int, train: bool) -> float:
    """Samples/s of ``steps`` training steps (MSE to a fixed target, AdamW) or forwards."""
    target = None
    opt = None
    if train:
        net.train()
        with torch.no_grad():
            target = net(x).detach() * 0.5
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    else:
        net.eval()
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        if train:
            loss = torch.nn.functional.mse_loss(net(x), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        else:
            with torch.no_grad():
                net(x)
    _sync(device)
    return steps * len(x) / (time.perf_counter() - t0)


def throughput(device: str, batch: int, steps: int, warmup: int) -> dict:
    """ResNet-50: OnnxModule vs torchvision's model with the same weights, side by side."""
    import torchvision

    path = zoo.build("resnet50")
    model = load_model(path)
    module = OnnxModule(model).to(device)
    hand = torchvision.models.resnet50().eval()
    # The zoo exports torchvision's ResNet-50 with BN folded into the convolutions, so copy
    # the folded weights: each Conv's weight and bias, in graph order, into conv + BN (BN
    # set to identity).
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    pairs = [(m, bn) for m, bn in _conv_bn_pairs(hand)]
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    if len(convs) != len(pairs):
        raise SystemExit(f"resnet50: {len(convs)} ONNX convs vs {len(pairs)} torch convs")
    with torch.no_grad():
        for node, (conv, bn) in zip(convs, pairs, strict=True):
            conv.weight.copy_(torch.from_numpy(np.array(numpy_helper.to_array(inits[node.input[1]]))))
            bn.weight.fill_(1.0)
            bn.running_var.fill_(1.0 - bn.eps)
            bn.running_mean.zero_()
            bn.bias.copy_(torch.from_numpy(np.array(numpy_helper.to_array(inits[node.input[2]]))))
        gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
        hand.fc.weight.copy_(torch.from_numpy(np.array(numpy_helper.to_array(inits[gemm.input[1]]))))
        hand.fc.bias.copy_(torch.from_numpy(np.array(numpy_helper.to_array(inits[gemm.input[2]]))))
    hand = hand.to(device)
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        a, b = module.eval()(x), hand.eval()(x)
        agree = float((a - b).abs().max() / b.abs().max())
    rates = {}
    for train in (False, True):
        key = "train" if train else "infer"
        rates[f"{key}_onnx_sps"] = _step_rate(module, x, device, steps, warmup, train)
        rates[f"{key}_torch_sps"] = _step_rate(hand, x, device, steps, warmup, train)
        rates[f"{key}_ratio"] = rates[f"{key}_torch_sps"] / rates[f"{key}_onnx_sps"]
    return {"batch": batch, "steps": steps, "max_diff_rel_eval": agree, **rates}


def _conv_bn_pairs(net):
    """(conv, bn) in forward order for torchvision's ResNet-50 (stem, then each bottleneck's
    conv1..3 and its downsample)."""
    yield net.conv1, net.bn1
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        for block in layer:
            yield block.conv1, block.bn1
            yield block.conv2, block.bn2
            yield block.conv3, block.bn3
            if block.downsample is not None:
                yield block.downsample[0], block.downsample[1]


def _graph_replay_ms(module, feed: dict, replays: int) -> list[float]:
    """Times (ms) of ``replays`` replays of one CUDA graph of ``module`` on ``feed``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.inference_mode(), torch.cuda.stream(stream):
        for _ in range(3):  # warm-up on a side stream before the capture (torch's recipe)
            module(feed)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        module(feed)
    times = []
    for _ in range(replays):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def latency(name: str, ratio: float, batches: list[int], replays: int, rounds: int) -> list[dict]:
    """Original and pruned ``name`` as CUDA-graph replays, fp32 and fp16, per batch."""
    from idap_onnx.accounting import model_cost
    from idap_onnx.api import prune

    original = load_model(zoo.build(name))
    pruned, _ = prune(original, ratio, score="l1", round_to=8, verify=False)
    macs = {"original": model_cost(original).macs, "pruned": model_cost(pruned).macs}
    feeds = zoo.make_inputs(name)
    rows = []
    for dtype in (torch.float32, torch.float16):
        modules = {k: OnnxModule(m, trainable=False).eval().to("cuda", dtype=dtype)
                   for k, m in (("original", original), ("pruned", pruned))}
        for batch in batches:
            feed = {}
            for k, v in feeds.items():
                t = torch.from_numpy(np.repeat(v[:1], batch, axis=0)).cuda()
                feed[k] = t.to(dtype) if t.is_floating_point() else t
            try:
                samples = {k: [] for k in modules}
                for _ in range(rounds):  # in turns: a drift of the GPU reaches both alike
                    for k, module in modules.items():
                        samples[k] += _graph_replay_ms(module, feed, replays // rounds)
            except RuntimeError as exc:  # a fixed batch size, an op without an fp16 kernel
                rows.append({"model": name, "dtype": str(dtype).split(".")[-1], "batch": batch,
                             "skipped": str(exc).splitlines()[0][:200]})
                continue
            med = {k: float(np.median(v)) for k, v in samples.items()}
            rows.append({
                "model": name, "dtype": str(dtype).split(".")[-1], "batch": batch,
                "ratio": ratio, "macs_kept": macs["pruned"] / macs["original"],
                **{f"{k}_median_ms": med[k] for k in med},
                **{f"{k}_p90_ms": float(np.percentile(samples[k], 90)) for k in samples},
                "speedup": med["original"] / med["pruned"],
            })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--models", nargs="+", default=list(PARITY_MODELS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--latency-models", nargs="+", default=["resnet50", "mobilenet_v2"])
    parser.add_argument("--latency-ratio", type=float, default=0.5)
    parser.add_argument("--latency-batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--replays", type=int, default=200, help="CUDA-graph replays per case")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: SKIPPED: torch sees no CUDA device here (torch "
              f"{torch.__version__}); --device cpu runs a dry run of parity and throughput")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False  # parity is checked in true float32
    torch.backends.cudnn.allow_tf32 = False
    result = {
        "device": (torch.cuda.get_device_name(0) if args.device == "cuda"
                   else f"cpu ({platform.machine()})"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "parity": [],
    }
    for name in args.models if "parity" in args.sections else ():
        row = parity(name, args.device)
        result["parity"].append(row)
        print(f"parity {name:22s} max rel L2 {row['max_rel_l2']:.2e} "
              f"{'ok' if row['ok'] else 'OVER ' + str(PARITY_TOL)}", flush=True)
    if "throughput" in args.sections:
        result["resnet50"] = throughput(args.device, args.batch, args.steps, args.warmup)
        r = result["resnet50"]
        print(f"ResNet-50 batch {r['batch']} on {result['device']}: "
              f"infer {r['infer_onnx_sps']:.0f} vs {r['infer_torch_sps']:.0f} samples/s "
              f"(torch/onnx {r['infer_ratio']:.2f}x), train {r['train_onnx_sps']:.0f} vs "
              f"{r['train_torch_sps']:.0f} samples/s ({r['train_ratio']:.2f}x); outputs agree "
              f"to {r['max_diff_rel_eval']:.1e} of the largest logit", flush=True)
    if "latency" in args.sections and args.device != "cuda":
        print("latency: SKIPPED: CUDA-graph replays need a CUDA device (--device cuda)")
    elif "latency" in args.sections:
        result["latency"] = []
        for name in args.latency_models:
            for row in latency(name, args.latency_ratio, args.latency_batches, args.replays, 4):
                result["latency"].append(row)
                head = f"latency {name:14s} {row['dtype']:8s} batch {row['batch']:3d}"
                if "skipped" in row:
                    print(f"{head} skipped: {row['skipped']}", flush=True)
                    continue
                print(f"{head} original {row['original_median_ms']:.3f} ms, pruned "
                      f"{row['pruned_median_ms']:.3f} ms ({100 * row['macs_kept']:.0f} % of "
                      f"MACs): {row['speedup']:.2f}x", flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))
    return 0 if all(row["ok"] for row in result["parity"]) else 1


if __name__ == "__main__":
    sys.exit(main())
