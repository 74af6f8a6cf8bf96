"""A real trained model and real data: a small CNN on scikit-learn's handwritten digits.

``sklearn.datasets.load_digits()`` holds 1797 real 8x8 grey-scale handwritten digits (values
0..16). They are scaled to [0, 1], shaped ``[N, 1, 8, 8]`` (float32) and split 60/20/20 into
train/val/test, stratified by class with seed 0. A small residual CNN is trained on the train
split on CPU (fixed seed, ``torch.use_deterministic_algorithms(True)``), exported to ONNX (legacy
TorchScript exporter, opset 17, input ``x`` ``[N, 1, 8, 8]`` with a dynamic batch, output
``logits`` ``[N, 10]``) and cached with its data, so budget tests and benchmarks prune a model
whose accuracy means something.

Network (BatchNorm is folded into the convolutions by the exporter)::

    x -> conv 1->32 3x3 p1, BN, ReLU -> conv 32->64 3x3 s2 p1, BN, ReLU (8x8 -> 4x4)  (stem)
      -> [conv 64->64 3x3 p1, BN, ReLU, conv 64->64 3x3 p1, BN] + identity, ReLU (residual block)
      -> global average pool -> linear 64->10 -> logits

Files in the cache folder (default ``<repo>/.cache/digits``, env ``IDAP_DIGITS_CACHE``, or
``--out``), each written atomically (temp file, then rename) and reused when present:

* ``digits.onnx`` - the trained model;
* ``digits.npz`` - ``x_train, y_train, x_val, y_val, x_test, y_test``;
* ``calib.npz`` - ``{"x": x_train}``, keyed by the model's input name (``--calib calib.npz``);
* ``x_train.npz`` / ``x_val.npz`` / ``x_test.npz`` - ``{"x": ...}`` per split;
* ``labels_train.npy`` / ``labels_val.npy`` / ``labels_test.npy`` - int64 class ids;
* ``meta.json`` - the accuracies measured with ONNX Runtime and the build settings.

Use as a module::

    from tools.digits import build
    asset = build()
    asset.model_path, asset.val  # (x_val, y_val)

or as a script: ``python tools/digits.py [--out DIR]`` (prints the accuracies).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO_ROOT / ".cache" / "digits"
CACHE_ENV = "IDAP_DIGITS_CACHE"

# Bump when the data, network or training changes; the cache key also hashes this file's source.
FORMAT_VERSION = 1
SEED = 0
OPSET = 17
EPOCHS = 30
BATCH = 64
LR = 1e-2
WEIGHT_DECAY = 1e-4
THREADS = 1  # one thread: deterministic reductions, and threads fight on tiny convs
MIN_TEST_ACC = 0.95

INPUT_NAME = "x"
OUTPUT_NAME = "logits"
SPLITS = ("train", "val", "test")
FILES = (
    "digits.onnx",
    "digits.npz",
    "calib.npz",
    *(f"x_{s}.npz" for s in SPLITS),
    *(f"labels_{s}.npy" for s in SPLITS),
    "meta.json",
)


@dataclass(frozen=True)
class DigitsAsset:
    """The cached digits model and its data splits (``x`` float32 ``[N,1,8,8]``, ``y`` int64)."""

    model_path: Path
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    cache_dir: Path
    meta: dict

    @property
    def calib_npz(self) -> Path:
        """``{"x": x_train}``: usable as ``--calib``."""
        return self.cache_dir / "calib.npz"

    def split_npz(self, split: str) -> Path:
        """``x_<split>.npz`` (``{"x": ...}``)."""
        return self.cache_dir / f"x_{split}.npz"

    def labels_npy(self, split: str) -> Path:
        """``labels_<split>.npy``."""
        return self.cache_dir / f"labels_{split}.npy"


# ---------------------------------------------------------------------------------------- data


def load_splits(seed: int = SEED) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The digits split 60/20/20 (stratified, ``seed``): ``{"train"|"val"|"test": (x, y)}``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = data.target.astype(np.int64)
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, test_size=0.4, stratify=y, random_state=seed
    )
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=seed
    )
    return {
        "train": (np.ascontiguousarray(x_train), y_train),
        "val": (np.ascontiguousarray(x_val), y_val),
        "test": (np.ascontiguousarray(x_test), y_test),
    }


# ----------------------------------------------------------------------------------------- net


def _make_net():
    import torch
    from torch import nn

    def conv_bn(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
        conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        return [conv, nn.BatchNorm2d(cout)]

    class Residual(nn.Module):
        def __init__(self, ch: int) -> None:
            super().__init__()
            self.body = nn.Sequential(*conv_bn(ch, ch), nn.ReLU(), *conv_bn(ch, ch))
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(x + self.body(x))

    class DigitsNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(*conv_bn(1, 32), nn.ReLU(), *conv_bn(32, 64, 2), nn.ReLU())
            self.block = Residual(64)
            self.head = nn.Linear(64, 10)

        def forward(self, x):
            x = self.block(self.stem(x))
            return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    return DigitsNet()


@contextlib.contextmanager
def _deterministic_torch(seed: int = SEED) -> Iterator[None]:
    """Fixed seed, deterministic algorithms and thread count; restores the caller's settings."""
    import torch

    was_det = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(THREADS)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was_det, warn_only=was_warn)
            torch.set_num_threads(threads)


def train(
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    log: Callable[[str], None] | None = None,
    seed: int = SEED,
):
    """Trains the CNN on ``splits["train"]`` (initialization and batch order from ``seed``);
    returns the torch module in eval mode."""
    import torch

    with _deterministic_torch(seed):
        net = _make_net()
        x = torch.from_numpy(splits["train"][0])
        y = torch.from_numpy(splits["train"][1])
        opt = torch.optim.Adam(net.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        steps = EPOCHS * ((len(x) + BATCH - 1) // BATCH)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps)
        gen = torch.Generator().manual_seed(seed)
        loss_fn = torch.nn.CrossEntropyLoss()
        net.train()
        for epoch in range(EPOCHS):
            order = torch.randperm(len(x), generator=gen)
            total = 0.0
            for i in range(0, len(x), BATCH):
                idx = order[i : i + BATCH]
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(net(x[idx]), y[idx])
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
            if log is not None and (epoch + 1) % 10 == 0:
                log(f"epoch {epoch + 1}/{EPOCHS}: train loss {total / len(x):.4f}")
        net.eval()
    return net


def export(net, path: Path, sample_shape: tuple[int, ...] = (1, 8, 8)) -> None:
    """Legacy TorchScript export at opset 17: ``x [N,1,8,8] -> logits [N,10]``, dynamic batch
    (``sample_shape``: another image size, for ``mnist_se.py``)."""
    import torch

    dummy = torch.zeros(2, *sample_shape)
    buf = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (dummy,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )


def onnx_logits(model_path: Path, x: np.ndarray, batch: int = 512) -> np.ndarray:
    """Logits of the exported model (ONNX Runtime, CPU)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    outs = [sess.run(None, {INPUT_NAME: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outs, axis=0)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=1) == labels))


# --------------------------------------------------------------------------------------- cache


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None, env_var: str = CACHE_ENV,
                      default: Path = DEFAULT_CACHE) -> Path:
    """``cache_dir``, else ``$IDAP_DIGITS_CACHE``, else ``<repo>/.cache/digits`` (another
    asset passes its own variable and folder: ``mnist_se.py``)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(env_var)
    return Path(env).expanduser() if env else default


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Runs ``write(tmp)`` on a temp file beside ``path`` then renames it over ``path``."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    import fcntl

    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _source_hash() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def build(
    cache_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
    seed: int = SEED,
) -> DigitsAsset:
    """The digits asset: built (trained, exported, checked) into the cache unless present.

    ``seed`` sets the split and the training; a seed other than the default is cached in
    the sub-folder ``seed<N>`` (benchmarks repeat a comparison over several trained models).

    Raises:
        RuntimeError: the trained model's test accuracy is below 95 %.
    """
    return cached_asset(resolve_cache_dir(cache_dir), seed, "digits", FILES, _source_hash(),
                        lambda folder: _build_into(folder, log, seed))


def cached_asset(folder: Path, seed: int, stem: str, files, source: str, build_into,
                 kind: type | None = None, version: int = FORMAT_VERSION):
    """The asset in ``folder`` (``folder/seed<N>`` for a seed other than the default), built
    by ``build_into(folder)`` under a file lock unless every one of ``files`` is there and
    ``meta.json`` names this format ``version``, ``source`` hash and seed; read as ``kind`` (default
    ``DigitsAsset``) from ``<stem>.npz`` and ``<stem>.onnx``. Shared with ``mnist_se.py``."""
    if seed != SEED:
        folder = folder / f"seed{seed}"

    def complete() -> bool:
        if not all((folder / f).exists() for f in files):
            return False
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError):
            return False
        return (meta.get("format_version") == version and meta.get("source") == source
                and meta.get("seed") == seed)

    if not complete():
        folder.mkdir(parents=True, exist_ok=True)
        with _lock(folder / ".lock"):
            if not complete():
                build_into(folder)
    with np.load(folder / f"{stem}.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return (kind or DigitsAsset)(
        model_path=folder / f"{stem}.onnx",
        train=(arrays["x_train"], arrays["y_train"]),
        val=(arrays["x_val"], arrays["y_val"]),
        test=(arrays["x_test"], arrays["y_test"]),
        cache_dir=folder,
        meta=json.loads((folder / "meta.json").read_text()),
    )


def _build_into(folder: Path, log: Callable[[str], None] | None, seed: int = SEED) -> None:
    t0 = time.perf_counter()
    splits = load_splits(seed)
    net = train(splits, log, seed)
    train_s = time.perf_counter() - t0
    meta = {"format_version": FORMAT_VERSION, "source": _source_hash(), "epochs": EPOCHS,
            "batch": BATCH, "lr": LR, "seed": seed, "opset": OPSET,
            "train_seconds": round(train_s, 2)}
    store_asset(folder, "digits", splits, lambda path: export(net, path), meta, MIN_TEST_ACC)


def store_asset(folder: Path, stem: str, splits, export_to, meta: dict, min_test: float,
                check: Callable[[dict], dict] | None = None) -> None:
    """Write a trained image asset into ``folder``: the model exported by ``export_to(path)``
    to a temp file, each split's accuracy measured on it in ONNX Runtime (``check(logits per
    split)`` may add fields to ``meta`` or raise), then the data files, the model and
    ``meta.json`` (``meta`` plus ``accuracy`` and ``samples``), each written atomically.
    Shared with ``mnist_se.py``.

    Raises:
        RuntimeError: the exported model's test accuracy is below ``min_test``.
    """
    model_path = folder / f"{stem}.onnx"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{stem}.", suffix=".onnx", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        export_to(tmp)
        logits = {s: onnx_logits(tmp, splits[s][0]) for s in SPLITS}
        acc = {s: accuracy(logits[s], splits[s][1]) for s in SPLITS}
        extra = check(logits) if check is not None else {}
        if acc["test"] < min_test:
            raise RuntimeError(
                f"{stem} reached only {acc['test']:.4f} test accuracy (< {min_test})"
            )
        _write_data(folder, splits, stem)
        os.chmod(tmp, 0o644)
        os.replace(tmp, model_path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    meta = {**meta, "accuracy": acc, "samples": {s: len(splits[s][1]) for s in SPLITS}, **extra}
    _atomic(folder / "meta.json", lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))


def _write_data(folder: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]],
                stem: str = "digits") -> None:
    def savez(path: Path, **arrays: np.ndarray) -> None:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)

        _atomic(path, write)

    def save(path: Path, array: np.ndarray) -> None:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.save(fh, array)

        _atomic(path, write)

    everything = {}
    for s in SPLITS:
        x, y = splits[s]
        everything[f"x_{s}"], everything[f"y_{s}"] = x, y
        savez(folder / f"x_{s}.npz", **{INPUT_NAME: x})
        save(folder / f"labels_{s}.npy", y)
    savez(folder / "calib.npz", **{INPUT_NAME: splits["train"][0]})
    savez(folder / f"{stem}.npz", **everything)


# ----------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    return asset_main(argv, __doc__.split("\n\n")[0], build, [1, 1, 8, 8])


def asset_main(argv, description: str, build_asset, input_shape: list[int],
               cache_env: str = CACHE_ENV) -> int:
    """The command line of a cached image asset (this module's, ``tools/mnist_se.py``'s):
    ``--out DIR``, ``--print-dir``; builds it and prints each split's accuracy and its cost."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--out", type=Path, default=None, help=f"cache folder (default ${cache_env} or .cache)"
    )
    parser.add_argument(
        "--print-dir", action="store_true",
        help="build quietly (if needed) and print only the folder holding the files",
    )
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    if args.print_dir:
        print(build_asset(args.out).model_path.parent)
        return 0
    asset = build_asset(args.out, log=lambda m: print(m, flush=True))
    elapsed = time.perf_counter() - t0
    print(f"model: {asset.model_path}")
    for s in SPLITS:
        x, y = getattr(asset, s)
        acc = accuracy(onnx_logits(asset.model_path, x), y)
        print(f"{s:5s} accuracy: {acc:.4f} ({len(y)} samples)")
    with contextlib.suppress(Exception):  # the accounting module is optional here
        import onnx

        from idap_onnx.accounting import model_cost

        cost = model_cost(onnx.load(str(asset.model_path)), {INPUT_NAME: input_shape})
        print(f"params: {cost.params:,}  MACs per sample: {cost.macs:,}")
    print(f"done in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
