"""The architecture zoo: real architectures no one here wrote, exported to ONNX.

The exactness suite and the coverage tool prune these graphs. Every model is built from
random weights (``torch.manual_seed(0)``, eval mode, BatchNorm statistics and affine
parameters randomised so deep nets do not collapse to ~1e-15), so nothing is downloaded.

Families:

* ``torchvision``: classification nets, legacy TorchScript exporter at opset 17; ``NAME@dynamo``
  entries use the ``torch.export``-based exporter at opset 18.
* ``transformers``: tiny BERT / GPT-2 from small configs (eager attention unless the name says
  ``sdpa``), legacy exporter at opset 17 or dynamo at opset 18.
* ``timm``: vision transformers and hybrid CNN-transformers from ``timm`` (``pretrained=False``:
  nothing downloaded), legacy exporter at opset 17 or dynamo at opset 18: packed QKV
  projections, class tokens, attention biases, patch unfold/fold, split attention.
* ``rapidocr``: the three ONNX files shipped in ``rapidocr_onnxruntime`` (copied, never modified).

Use as a module::

    from tools.zoo import ZOO, build, make_inputs
    path = build("resnet18")
    feeds = make_inputs("resnet18")

or as a script::

    python tools/zoo.py --list
    python tools/zoo.py --build resnet18 bert_tiny
    python tools/zoo.py --build --light        # or --all; --cache DIR overrides the cache
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO_ROOT / ".cache" / "zoo"

# Bump when the way entries are built changes, so stale cache files are not reused. The cache
# key also hashes this file's source, so any edit here rebuilds (cheap next to a stale model).
ZOO_FORMAT_VERSION = 2

LEGACY_OPSET = 17
DYNAMO_OPSET = 18
SEED = 0


class ZooBuildError(RuntimeError):
    """An entry could not be built (export failed, or the exported model does not run)."""


@dataclass(frozen=True)
class ZooEntry:
    name: str  # e.g. "resnet50", "resnet50@dynamo", "bert_tiny", "rapidocr_det"
    family: str  # "torchvision" | "transformers" | "rapidocr"
    light: bool  # part of the light subset that CI runs
    input_shapes: dict[str, list[int]]  # concrete shapes used to build inputs
    # Extra description (defaults keep the four fields above the public contract).
    exporter: str = "legacy"  # "legacy" | "dynamo" | "copy"
    opset: int | None = LEGACY_OPSET  # requested opset (None for copied files)
    arch: str = ""  # constructor / variant name inside the family
    vocab_size: int | None = None  # for token-id inputs
    notes: str = field(default="", compare=False)


# --------------------------------------------------------------------------- registry

_TV_FULL = 224
_TV_LIGHT = 96

# (arch, light)
_TORCHVISION: list[tuple[str, bool]] = [
    ("resnet18", True),
    ("resnet50", False),
    ("resnext50_32x4d", False),
    ("wide_resnet50_2", False),
    ("mobilenet_v2", True),
    ("mobilenet_v3_small", True),
    ("mobilenet_v3_large", False),
    ("efficientnet_b0", False),
    ("regnet_y_400mf", False),
    ("densenet121", False),
    ("shufflenet_v2_x1_0", True),
    ("squeezenet1_1", True),
    ("vgg11_bn", False),
    ("googlenet", False),
    ("mnasnet0_5", False),
    ("convnext_tiny", False),
    ("vit_b_16", False),
    ("swin_t", False),
]
# Architectures that also get a dynamo-exported variant: (arch, light).
_TORCHVISION_DYNAMO: list[tuple[str, bool]] = [
    ("resnet18", True),
    ("mobilenet_v2", False),
    ("efficientnet_b0", False),
    ("convnext_tiny", False),
    ("vit_b_16", False),
    ("resnet50", False),
    ("mobilenet_v3_small", False),
    ("swin_t", False),
]
_TV_KWARGS: dict[str, dict] = {"googlenet": {"aux_logits": False, "init_weights": True}}

_VOCAB = 1000
_SEQ = 16

# name -> (arch, exporter, light)
_TRANSFORMERS: list[tuple[str, str, str, bool]] = [
    ("bert_tiny", "bert_eager", "legacy", True),
    ("bert_tiny_cls", "bert_cls_eager", "legacy", False),
    ("bert_tiny_sdpa", "bert_sdpa", "legacy", False),
    ("gpt2_tiny", "gpt2_eager", "legacy", True),
    ("bert_tiny@dynamo", "bert_eager", "dynamo", False),
    ("bert_tiny_cls@dynamo", "bert_cls_eager", "dynamo", False),
    ("bert_tiny_sdpa@dynamo", "bert_sdpa", "dynamo", False),
    ("gpt2_tiny@dynamo", "gpt2_eager", "dynamo", False),
]

# name -> (timm model name, image size, create_model kwargs, exporter, light)
_TIMM: list[tuple[str, str, int, dict, str, bool]] = [
    ("deit_tiny", "deit_tiny_patch16_224", 64, {"img_size": 64}, "legacy", True),
    ("deit_tiny@dynamo", "deit_tiny_patch16_224", 64, {"img_size": 64}, "dynamo", False),
    ("vit_small", "vit_small_patch16_224", 224, {}, "legacy", False),
    ("mobilevit_xxs", "mobilevit_xxs", 256, {}, "legacy", False),
    ("levit_128s", "levit_128s", 224, {}, "legacy", False),
    ("efficientformer_l1", "efficientformer_l1", 224, {}, "legacy", False),
    ("pvt_v2_b0", "pvt_v2_b0", 224, {}, "legacy", False),
    ("resnest14d", "resnest14d", 224, {}, "legacy", False),
    ("poolformer_s12", "poolformer_s12", 224, {}, "legacy", False),
    ("efficientvit_b0", "efficientvit_b0", 224, {}, "legacy", False),
]

# name -> (file glob inside rapidocr_onnxruntime/models, input shapes, light)
_RAPIDOCR: list[tuple[str, str, dict[str, list[int]], bool]] = [
    ("rapidocr_det", "*_det_*.onnx", {"x": [1, 3, 160, 160]}, True),
    ("rapidocr_rec", "*_rec_*.onnx", {"x": [1, 3, 48, 160]}, False),
    ("rapidocr_cls", "*_cls_*.onnx", {"x": [1, 3, 48, 192]}, True),
]


def _make_registry() -> dict[str, ZooEntry]:
    zoo: dict[str, ZooEntry] = {}
    for arch, light in _TORCHVISION:
        s = _TV_LIGHT if light else _TV_FULL
        zoo[arch] = ZooEntry(arch, "torchvision", light, {"input": [1, 3, s, s]}, arch=arch)
    for arch, light in _TORCHVISION_DYNAMO:
        s = _TV_LIGHT if light else _TV_FULL
        name = f"{arch}@dynamo"
        zoo[name] = ZooEntry(
            name,
            "torchvision",
            light,
            {"input": [1, 3, s, s]},
            exporter="dynamo",
            opset=DYNAMO_OPSET,
            arch=arch,
        )
    for name, arch, exporter, light in _TRANSFORMERS:
        shapes = {"input_ids": [1, _SEQ]}
        if arch.startswith("bert"):
            shapes["attention_mask"] = [1, _SEQ]
        zoo[name] = ZooEntry(
            name,
            "transformers",
            light,
            shapes,
            exporter=exporter,
            opset=DYNAMO_OPSET if exporter == "dynamo" else LEGACY_OPSET,
            arch=arch,
            vocab_size=_VOCAB,
        )
    for name, arch, size, _kwargs, exporter, light in _TIMM:
        zoo[name] = ZooEntry(
            name,
            "timm",
            light,
            {"input": [1, 3, size, size]},
            exporter=exporter,
            opset=DYNAMO_OPSET if exporter == "dynamo" else LEGACY_OPSET,
            arch=arch,
        )
    for name, pattern, shapes, light in _RAPIDOCR:
        zoo[name] = ZooEntry(
            name, "rapidocr", light, shapes, exporter="copy", opset=None, arch=pattern
        )
    return zoo


ZOO: dict[str, ZooEntry] = _make_registry()


def light_names() -> list[str]:
    return [n for n, e in ZOO.items() if e.light]


# --------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    env = os.environ.get("IDAP_ZOO_CACHE")
    return Path(env) if env else DEFAULT_CACHE


def _entry(name: str) -> ZooEntry:
    try:
        return ZOO[name]
    except KeyError:
        raise KeyError(f"unknown zoo entry {name!r}; known: {', '.join(ZOO)}") from None


def _pkg_version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "absent"


@functools.lru_cache(maxsize=1)
def _source_hash() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def _cache_key(entry: ZooEntry) -> str:
    """Hash of everything that decides the exported bytes (so a stale file is never reused)."""
    deps = {
        "torchvision": ["torch", "torchvision"],
        "transformers": ["torch", "transformers"],
        "timm": ["torch", "timm"],
        "rapidocr": ["rapidocr_onnxruntime"],
    }[entry.family]
    blob = {
        "format": ZOO_FORMAT_VERSION,
        "source": _source_hash(),
        "name": entry.name,
        "family": entry.family,
        "exporter": entry.exporter,
        "opset": entry.opset,
        "arch": entry.arch,
        "shapes": entry.input_shapes,
        "vocab": entry.vocab_size,
        "seed": SEED,
        "deps": {d: _pkg_version(d) for d in deps},
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


def cached_path(name: str, cache_dir: Path | None = None) -> Path:
    """Where ``build(name)`` puts (or finds) the model; the file may not exist yet."""
    entry = _entry(name)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    stem = entry.name.replace("@", "_at_")
    return cache_dir / f"{stem}-{_cache_key(entry)}.onnx"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialise builders of one entry across processes (best effort where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build(name: str, cache_dir: Path | None = None) -> Path:
    """Return the path of ``name``'s .onnx, exporting (and verifying) it if not cached.

    Written atomically (temp file in the cache dir, then rename); concurrent builders of the
    same entry wait on a lock file and reuse the first one's result.
    """
    entry = _entry(name)
    out = cached_path(name, cache_dir)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(out.with_suffix(".lock")):
        if out.exists():
            return out
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".tmp.onnx", dir=out.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            _BUILDERS[entry.family](entry, tmp)
            _verify(entry, tmp)
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600
            os.replace(tmp, out)
        except ZooBuildError:
            raise
        except Exception as exc:
            raise ZooBuildError(
                f"zoo entry {name!r} ({entry.family}, {entry.exporter} exporter"
                f"{'' if entry.opset is None else f', opset {entry.opset}'}) failed to build: "
                f"{type(exc).__name__}: {_short(exc)}"
            ) from exc
        finally:
            for p in (tmp, Path(str(tmp) + ".data")):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
    return out


def _short(exc: BaseException, limit: int = 600) -> str:
    msg = " ".join(str(exc).split())
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


# --------------------------------------------------------------------------- inputs


@functools.lru_cache(maxsize=64)
def _input_signature(path: str, mtime_ns: int) -> tuple[tuple[str, int, int], ...]:
    """(name, onnx elem type, rank) of each real graph input (initializers excluded)."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    sig = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        sig.append((vi.name, tt.elem_type, len(tt.shape.dim)))
    return tuple(sig)


def _inputs_for(entry: ZooEntry, path: Path, seed: int) -> dict[str, np.ndarray]:
    from onnx.helper import tensor_dtype_to_np_dtype

    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for name, elem_type, rank in _input_signature(str(path), path.stat().st_mtime_ns):
        if name not in entry.input_shapes:
            raise ZooBuildError(
                f"zoo entry {entry.name!r}: graph input {name!r} has no shape in input_shapes "
                f"({sorted(entry.input_shapes)})"
            )
        shape = list(entry.input_shapes[name])
        if len(shape) != rank:
            raise ZooBuildError(
                f"zoo entry {entry.name!r}: input {name!r} has rank {rank} in the graph but "
                f"shape {shape} in input_shapes"
            )
        dtype = np.dtype(tensor_dtype_to_np_dtype(elem_type))
        if entry.family == "rapidocr" and rank == 4:
            feeds[name] = text_image(shape, seed).astype(dtype)
        elif np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        elif "mask" in name:
            feeds[name] = np.ones(shape, dtype=dtype)
        elif "token_type" in name:
            feeds[name] = np.zeros(shape, dtype=dtype)
        elif dtype == np.bool_:
            feeds[name] = np.ones(shape, dtype=dtype)
        else:
            high = entry.vocab_size or 2
            feeds[name] = rng.integers(0, high, size=shape).astype(dtype)
    return feeds


def text_image(shape: list[int], seed: int = 0) -> np.ndarray:
    """A rendered line of English text, normalised like RapidOCR ((x / 255 - 0.5) / 0.5).

    The OCR models see real input (noise drives the detector's output map to ~1e-5, where
    float rounding alone changes it by 2 % relative).
    """
    from PIL import Image, ImageDraw, ImageFont

    n, c, h, w = shape
    words = ["pruning", "ONNX", "graphs", "flow", "divergence", "layers", "channels", "text"]
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=max(10, h // 3))
    y = 2
    while y < h - 8:
        line = " ".join(rng.choice(words, size=3))
        draw.text((4, y), line, fill="black", font=font)
        y += max(12, h // 3 + 4)
    arr = (np.asarray(img, dtype=np.float32) / 255.0 - 0.5) / 0.5
    return np.broadcast_to(arr.transpose(2, 0, 1)[None, :c], (n, c, h, w)).copy()


def make_inputs(name: str, seed: int = 0, cache_dir: Path | None = None) -> dict[str, np.ndarray]:
    """ORT feeds for ``name``: names/dtypes from the built graph, shapes from ``input_shapes``.

    Float inputs ~ N(0, 1); ``input_ids`` uniform in [0, vocab); ``attention_mask`` ones;
    ``token_type_ids`` zeros. Builds the model if it is not cached.
    """
    entry = _entry(name)
    return _inputs_for(entry, build(name, cache_dir), seed)


# --------------------------------------------------------------------------- verify


def _verify(entry: ZooEntry, path: Path) -> None:
    """ORT must run the model on make_inputs; outputs finite and not all ~0."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        outs = sess.run(None, _inputs_for(entry, path, seed=0))
    except ZooBuildError:
        raise
    except Exception as exc:
        raise ZooBuildError(
            f"zoo entry {entry.name!r}: exported model does not run in onnxruntime: "
            f"{type(exc).__name__}: {_short(exc)}"
        ) from exc
    names = [o.name for o in sess.get_outputs()]
    biggest = 0.0
    for oname, arr in zip(names, outs, strict=True):
        arr = np.asarray(arr)
        if arr.dtype.kind == "f":
            if not np.all(np.isfinite(arr)):
                raise ZooBuildError(f"zoo entry {entry.name!r}: output {oname!r} is not finite")
            if arr.size:
                biggest = max(biggest, float(np.max(np.abs(arr))))
    if biggest <= 1e-6:
        raise ZooBuildError(
            f"zoo entry {entry.name!r}: outputs collapse to ~0 (max |y| = {biggest:.3g}); "
            "check the random initialisation"
        )


# --------------------------------------------------------------------------- exporters


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence exporter chatter (warnings, dynamo's progress prints) but keep it on failure."""
    buf = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with contextlib.redirect_stdout(buf):
                yield
        except Exception:
            sys.stderr.write(buf.getvalue()[-4000:])
            raise


def _randomise_params(model, seed: int = SEED) -> None:
    """Make a randomly initialised net look like a trained one, deterministically.

    * BatchNorm: running_mean ~ N(0, 0.1), running_var ~ U(0.5, 1.5), weight ~ U(0.5, 1.5),
      bias ~ N(0, 0.1) (default stats make deep nets' outputs collapse to ~1e-15).
    * LayerNorm / GroupNorm affine: weight ~ U(0.5, 1.5), bias ~ N(0, 0.1).
    * Any other parameter that is all zeros (zero-initialised biases, ViT's zero head and class
      token, ...) ~ N(0, 0.02): an all-zero head makes the output exactly 0, and zero biases are
      deduplicated by the legacy exporter and hide bias-handling bugs from exactness tests.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    norm_types = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm)
    done: set[int] = set()
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, norm_types):
                continue
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.normal_(0.0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
            if getattr(m, "weight", None) is not None:
                m.weight.uniform_(0.5, 1.5, generator=g)
                done.add(id(m.weight))
            if getattr(m, "bias", None) is not None:
                m.bias.normal_(0.0, 0.1, generator=g)
                done.add(id(m.bias))
        for _, prm in model.named_parameters():
            if id(prm) in done or not prm.dtype.is_floating_point:
                continue
            if not torch.any(prm):
                prm.normal_(0.0, 0.02, generator=g)


def _export(
    entry: ZooEntry,
    model,
    args: tuple,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict,
    out: Path,
) -> None:
    import torch

    # The fused nn.MultiheadAttention fast path (taken in eval mode without grad) exports as
    # aten::_native_multi_head_attention, which the legacy exporter cannot translate.
    mha_fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        _export_inner(entry, model, args, input_names, output_names, dynamic_axes, out)
    finally:
        torch.backends.mha.set_fastpath_enabled(mha_fast)
    if Path(str(out) + ".data").exists():
        raise ZooBuildError(f"zoo entry {entry.name!r}: exporter wrote external data")


def _export_inner(
    entry: ZooEntry,
    model,
    args: tuple,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict,
    out: Path,
) -> None:
    import torch

    with _quiet(), torch.no_grad():
        if entry.exporter == "legacy":
            torch.onnx.export(
                model,
                args,
                str(out),
                dynamo=False,
                opset_version=entry.opset,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
            )
        elif entry.exporter == "dynamo":
            torch.onnx.export(
                model,
                args,
                str(out),
                dynamo=True,
                external_data=False,
                opset_version=entry.opset,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                verbose=False,
            )
        else:  # pragma: no cover - registry bug
            raise ValueError(f"unknown exporter {entry.exporter!r}")


def torchvision_module(arch: str):
    """The torch module a ``torchvision`` entry is exported from (seeded random weights, eval
    mode): the twin a PyTorch-only peer prunes (``tools/bench_peers.py``)."""
    import torch
    import torchvision

    torch.manual_seed(SEED)
    model = torchvision.models.get_model(arch, weights=None, **_TV_KWARGS.get(arch, {}))
    _randomise_params(model)
    return model.eval()


def _build_torchvision(entry: ZooEntry, out: Path) -> None:
    _export_classifier(entry, torchvision_module(entry.arch), out)


def _export_classifier(entry: ZooEntry, model, out: Path) -> None:
    """Export an image classifier: ``input`` (seeded N(0, 1) at the entry's shape, batch
    dynamic) -> ``logits``."""
    import torch

    shape = entry.input_shapes["input"]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(SEED))
    _export(
        entry,
        model,
        (x,),
        ["input"],
        ["logits"],
        {"input": {0: "batch"}, "logits": {0: "batch"}},
        out,
    )


def timm_module(name: str):
    """The torch module a ``timm`` entry is exported from (seeded random weights, eval mode)."""
    import timm
    import torch

    _, arch, _, kwargs, _, _ = next(t for t in _TIMM if t[0] == name)
    torch.manual_seed(SEED)
    model = timm.create_model(arch, pretrained=False, **kwargs)
    _randomise_params(model)
    return model.eval()


def _build_timm(entry: ZooEntry, out: Path) -> None:
    _export_classifier(entry, timm_module(entry.name), out)


def _transformers_model(arch: str):
    import torch
    import transformers as tf

    class _Output(torch.nn.Module):
        """Calls the HF model with keyword inputs and returns a single named output."""

        def __init__(self, inner, key: str, implicit_mask: bool = False):
            super().__init__()
            self.inner = inner
            self.key = key
            self.implicit_mask = implicit_mask

        def forward(self, input_ids, attention_mask=None):
            if attention_mask is None and self.implicit_mask:
                # An explicit all-ones mask keeps transformers from taking its packed-sequence
                # path (aten::diff, which the legacy exporter cannot export).
                attention_mask = torch.ones_like(input_ids)
            kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
            return getattr(self.inner(input_ids=input_ids, **kwargs), self.key)

    torch.manual_seed(SEED)
    if arch.startswith("bert"):
        attn = "sdpa" if arch.endswith("sdpa") else "eager"
        cfg = tf.BertConfig(
            vocab_size=_VOCAB,
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=512,
            max_position_embeddings=128,
            attn_implementation=attn,
        )
        if arch.startswith("bert_cls"):
            cfg.num_labels = 3
            return _Output(tf.BertForSequenceClassification(cfg), "logits"), ["logits"]
        return _Output(tf.BertModel(cfg), "last_hidden_state"), ["last_hidden_state"]
    if arch.startswith("gpt2"):
        cfg = tf.GPT2Config(
            vocab_size=_VOCAB,
            n_embd=128,
            n_layer=2,
            n_head=4,
            n_positions=128,
            use_cache=False,
            attn_implementation="eager",
            bos_token_id=0,
            eos_token_id=0,
        )
        return _Output(tf.GPT2LMHeadModel(cfg), "logits", implicit_mask=True), ["logits"]
    raise ValueError(f"unknown transformers arch {arch!r}")


def _build_transformers(entry: ZooEntry, out: Path) -> None:
    import torch

    model, output_names = _transformers_model(entry.arch)
    _randomise_params(model)
    model.eval()
    g = torch.Generator().manual_seed(SEED)
    args = []
    input_names = []
    for name, shape in entry.input_shapes.items():
        input_names.append(name)
        if name == "input_ids":
            args.append(torch.randint(0, entry.vocab_size or _VOCAB, shape, generator=g))
        else:
            args.append(torch.ones(shape, dtype=torch.long))
    axes = {0: "batch", 1: "sequence"}
    dynamic_axes = {n: axes for n in input_names + output_names}
    if output_names == ["logits"] and entry.arch.startswith("bert_cls"):
        dynamic_axes["logits"] = {0: "batch"}
    _export(entry, model, tuple(args), input_names, output_names, dynamic_axes, out)


def rapidocr_models_dir() -> Path:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or spec.origin is None:
        raise ZooBuildError(
            "rapidocr_onnxruntime is not installed (pip install rapidocr-onnxruntime)"
        )
    return Path(spec.origin).parent / "models"


def _build_rapidocr(entry: ZooEntry, out: Path) -> None:
    models = rapidocr_models_dir()
    found = sorted(models.glob(entry.arch))
    if len(found) != 1:
        raise ZooBuildError(
            f"zoo entry {entry.name!r}: expected one file matching {entry.arch!r} in {models}, "
            f"found {[p.name for p in found]}"
        )
    shutil.copyfile(found[0], out)


_BUILDERS = {
    "torchvision": _build_torchvision,
    "transformers": _build_transformers,
    "timm": _build_timm,
    "rapidocr": _build_rapidocr,
}


# --------------------------------------------------------------------------- script


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--list", action="store_true", help="list entries: name, family, light")
    p.add_argument("--build", nargs="*", metavar="NAME", help="build these entries")
    p.add_argument("--all", action="store_true", help="with --build: every entry")
    p.add_argument("--light", action="store_true", help="with --build: the light (CI) subset")
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help=f"cache dir (default $IDAP_ZOO_CACHE or {DEFAULT_CACHE})",
    )
    a = p.parse_args(argv)

    if a.list:
        for e in ZOO.values():
            print(f"{e.name:24s} {e.family:13s} {'light' if e.light else 'full'}")
        return 0
    if a.build is None and not (a.all or a.light):
        p.print_help()
        return 2
    names = list(a.build or [])
    if a.all:
        names += list(ZOO)
    elif a.light:
        names += light_names()
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in ZOO]
    if unknown:
        p.error(f"unknown entries: {', '.join(unknown)}")
    if not names:
        p.error("nothing to build: give names, --all or --light")

    from tqdm import tqdm

    failed: list[str] = []
    total = time.perf_counter()
    bar = tqdm(names, desc="zoo", unit="model", file=sys.stderr)
    for name in bar:
        bar.set_postfix_str(name)
        cached = cached_path(name, a.cache).exists()
        t0 = time.perf_counter()
        try:
            path = build(name, a.cache)
        except Exception as exc:
            failed.append(name)
            tqdm.write(f"FAIL  {name:24s} {time.perf_counter() - t0:7.1f}s  {exc}")
            continue
        size = path.stat().st_size / 2**20
        tag = "cached" if cached else "built "
        tqdm.write(f"{tag} {name:24s} {time.perf_counter() - t0:7.1f}s {size:9.2f} MiB  {path}")
    summary = f"{len(names) - len(failed)}/{len(names)} entries ok in "
    summary += f"{time.perf_counter() - total:.1f}s"
    if failed:
        summary += f"; failed: {', '.join(failed)}"
    print(summary)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(_main())
