"""Calibration and validation data: one interface over every source.

Every reader returns a :class:`Dataset`: ``len(ds)`` samples, ``ds[i]`` one sample as
``{input_name: array}`` *without* the batch dim, already cast to the model input's dtype and
checked against its declared shape. :func:`batches` stacks samples into model-ready batches,
:func:`split` cuts a dataset into disjoint calibration and validation parts.

Invariants:
  * the same source, options and seed give the same samples, splits and batches;
  * images are decoded and sentences tokenized in ``__getitem__``, one sample at a time;
  * every problem the user can fix raises :class:`DataError` in one line naming the file or
    input, the reason and the fix.

Sources (see ``docs/DATA.md``): a ``.npz``/``.npy`` file or a folder of them, a folder of
images, a ``.txt`` file of sentences with a HuggingFace tokenizer, an in-memory iterable of
samples, or ``"random"`` (synthetic, for smoke tests only).
"""

from __future__ import annotations

import bisect
import os
import pathlib
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import onnx

from idap_onnx.errors import IdapError, UnsupportedModelError, UsageError

Sample = dict[str, np.ndarray]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
ARRAY_SUFFIXES = (".npz", ".npy")
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
RANDOM_WARNING = "random calibration data is synthetic: use it for smoke tests only"


class DataError(IdapError):
    """Calibration or validation data that cannot be used with the model."""


@dataclass(frozen=True)
class InputSpec:
    """One graph input: its name, numpy dtype and declared shape (batch dim first).

    A dim is an ``int`` (static), a ``str`` (symbolic) or ``None`` (unknown).
    """

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]

    @property
    def sample_shape(self) -> tuple[int | str | None, ...]:
        """The declared shape of one sample: ``shape`` without the batch dim."""
        return self.shape[1:]


@dataclass(frozen=True)
class ImageSpec:
    """How a folder of images becomes the model's image input.

    Resize (shorter side to ``size``, or exactly ``(h, w)``), center-crop to ``crop``, scale
    pixels by ``scale``, optionally reorder RGB to BGR, normalize ``(x - mean) / std`` per
    channel (in the model's channel order), then lay out as NCHW or NHWC. Integer image inputs
    (e.g. uint8) get the raw 0-255 pixels: scale, mean and std are not applied.

    Attributes:
        size: Shorter side after resizing, or ``(h, w)``; default ``round(max(crop) * 256/224)``.
        crop: Center crop ``(h, w)``; default the model input's H and W.
        mean: Per-channel mean (1 or 3 values; a 1-channel model uses the average of 3).
        std: Per-channel standard deviation (same length as ``mean``).
        scale: Pixel multiplier applied before normalizing.
        bgr: Feed channels in BGR order.
        layout: ``"NCHW"`` or ``"NHWC"``; default inferred from where the model input has a
            channel dim of 1 or 3 (axis 1 first, then the last axis).
    """

    size: int | tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    scale: float = 1 / 255
    bgr: bool = False
    layout: Literal["NCHW", "NHWC"] | None = None

    def __post_init__(self) -> None:
        if self.layout not in (None, "NCHW", "NHWC"):
            raise UsageError(f"image layout {self.layout!r} is not NCHW or NHWC; pick one")
        if len(self.mean) not in (1, 3) or len(self.std) != len(self.mean):
            raise UsageError(
                f"image mean {self.mean} and std {self.std} need 1 or 3 values each, "
                "the same number; give e.g. --image-mean 0.5,0.5,0.5 --image-std 0.5,0.5,0.5"
            )
        if any(s == 0 for s in self.std):
            raise UsageError(f"image std {self.std} has a zero; give nonzero values")
        sizes = [self.size] if isinstance(self.size, int) else list(self.size or ())
        if any(int(v) < 1 for v in [*sizes, *(self.crop or ())]):
            raise UsageError(f"image size {self.size} / crop {self.crop} must be positive")


@runtime_checkable
class Dataset(Protocol):
    """What every reader returns: indexable samples plus a human description."""

    description: str
    synthetic: bool

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> Sample: ...


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs the data must feed: graph inputs that are not initializers, in graph order.

    Raises:
        UnsupportedModelError: An input is not a tensor, has no numpy dtype or no shape.
    """
    initializers = {tensor.name for tensor in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if value.type.WhichOneof("value") != "tensor_type":
            raise UnsupportedModelError(
                f"model input {value.name!r} is not a tensor; only tensor inputs can be fed"
            )
        tensor_type = value.type.tensor_type
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        except (KeyError, TypeError, ValueError) as err:
            raise UnsupportedModelError(
                f"model input {value.name!r} has element type {tensor_type.elem_type}, which "
                "has no numpy dtype; export the model with a float or integer input"
            ) from err
        if not tensor_type.HasField("shape"):
            raise UnsupportedModelError(
                f"model input {value.name!r} declares no shape; give it one "
                "(onnx.tools.update_model_dims) so data can be checked against it"
            )
        dims = tuple(_dim(d) for d in tensor_type.shape.dim)
        specs.append(InputSpec(value.name, dtype, dims))
    return specs


def _dim(dim: onnx.TensorShapeProto.Dimension) -> int | str | None:
    if dim.HasField("dim_value"):
        return int(dim.dim_value)
    if dim.HasField("dim_param"):
        return dim.dim_param
    return None


def _fmt_shape(shape: Sequence[int | str | None]) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


# --- checks and casts ------------------------------------------------------------------------


def _check_names(names: Iterable[str], specs: Sequence[InputSpec], where: str) -> None:
    wanted = [s.name for s in specs]
    given = set(names)
    unknown = sorted(given - set(wanted))
    if unknown:
        raise DataError(
            f"{where} has arrays {unknown} that are not model inputs; the model's inputs are "
            f"{wanted}: rename or drop them"
        )
    missing = [n for n in wanted if n not in given]
    if missing:
        raise DataError(f"{where} lacks model inputs {missing}; the model needs {wanted}: add them")


def _check_array(array: Any, spec: InputSpec, where: str, *, batched: bool) -> np.ndarray:
    """Checks one input's array against ``spec`` and casts it to the model's dtype.

    ``batched`` arrays have a leading sample axis that the declared batch dim does not constrain.
    """
    array = np.asarray(array)
    got = array.shape[1:] if batched else array.shape
    want = spec.sample_shape
    mismatch = len(got) != len(want) or any(
        isinstance(w, int) and g != w for g, w in zip(got, want, strict=False)
    )
    if mismatch:
        given = f"{array.shape}" + (" (samples first)" if batched else " (one sample)")
        raise DataError(
            f"{where}: input {spec.name!r} has shape {given} but the model declares "
            f"{_fmt_shape(spec.shape)} (batch first), so "
            f"{_fmt_shape(('samples', *want) if batched else want)} here; reshape the data"
        )
    return _cast(array, spec, where)


def _cast(array: np.ndarray, spec: InputSpec, where: str) -> np.ndarray:
    src, dst = array.dtype, spec.dtype
    bad = f"{where}: input {spec.name!r} is {src} but the model takes {dst}"
    if _is_float(dst):
        if src.kind not in "fiub":
            raise DataError(f"{bad}; give numeric data")
    elif dst.kind in "iu":
        if src.kind not in "iub":
            raise DataError(f"{bad}; floats do not cast safely to integers: give integer data")
        if array.size and src.kind in "iu":
            info = np.iinfo(dst)
            low, high = array.min(), array.max()
            if low < info.min or high > info.max:
                raise DataError(
                    f"{bad}; values [{low}, {high}] do not fit {dst}: give values in range"
                )
    elif dst.kind == "b":
        if src.kind != "b":
            raise DataError(f"{bad}; give boolean data")
    else:
        raise DataError(f"{bad}; idap-onnx feeds only numeric and boolean inputs")
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(array, dtype=dst)
    if _is_float(dst):
        wide = out if out.dtype.kind == "f" else out.astype(np.float32)
        finite = np.isfinite(wide)
        if not finite.all():
            first = np.argwhere(~finite)[0]
            what = "NaN" if np.isnan(wide[tuple(first)]) else "Inf"
            raise DataError(
                f"{where}: input {spec.name!r} contains {what} at index {tuple(first.tolist())} "
                f"(after casting to {dst}); clean the data"
            )
    return out


def _is_float(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or dtype.name == "bfloat16"


# --- readers ---------------------------------------------------------------------------------


class _ArrayDataset:
    """Samples held in memory as chunks of ``{name: array}`` with samples on axis 0."""

    def __init__(self, chunks: list[Sample], description: str, synthetic: bool = False):
        self._chunks = chunks
        sizes = [len(next(iter(c.values()))) for c in chunks]
        self._starts = np.cumsum([0, *sizes]).tolist()
        self.description = description
        self.synthetic = synthetic

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, i: int) -> Sample:
        i = _index(i, len(self))
        k = bisect.bisect_right(self._starts, i) - 1
        return {name: a[i - self._starts[k]] for name, a in self._chunks[k].items()}


class _RandomDataset:
    """Synthetic samples, each drawn from its own ``(seed, index)`` stream.

    Floats ~ N(0, 1); booleans and ``*mask*`` inputs ones; ``token_type``/``segment`` inputs
    zeros; other integers uniform below ``min(100, rows)``, where ``rows`` is the row count of
    the smallest embedding table an input indexes (``token_bounds``).
    """

    def __init__(
        self,
        specs: list[InputSpec],
        n: int,
        seed: int,
        seq_len: int,
        *,
        shapes: Mapping[str, tuple[int, ...]] | None = None,
        bounds: Mapping[str, int] | None = None,
    ):
        self._specs = specs
        self._n = n
        self._seed = seed
        self._shapes = dict(shapes or random_shapes(specs, seq_len))
        self._bounds = {s.name: min(RANDOM_INT_BOUND, (bounds or {}).get(s.name, RANDOM_INT_BOUND))
                        for s in specs}
        self.description = f"random ({n} samples, seed {seed}) (SYNTHETIC)"
        self.synthetic = True

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> Sample:
        i = _index(i, self._n)
        rng = np.random.default_rng([self._seed, i])
        sample = {}
        for spec in self._specs:
            shape, name = self._shapes[spec.name], spec.name.lower()
            if spec.dtype.kind == "b" or "mask" in name:
                value = np.ones(shape)
            elif "token_type" in name or "segment" in name:
                value = np.zeros(shape)
            elif spec.dtype.kind in "iu":
                value = rng.integers(0, self._bounds[spec.name], size=shape)
            else:
                value = rng.standard_normal(shape)
            sample[spec.name] = np.ascontiguousarray(value, dtype=spec.dtype)
        return sample


#: Integer inputs of random data are drawn below this (or below the embedding's row count).
RANDOM_INT_BOUND = 100
# ops an index tensor may pass through on its way to an embedding Gather
_INDEX_PASSTHROUGH = ("Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten")


def random_shapes(
    specs: Sequence[InputSpec],
    seq_len: int,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, tuple[int, ...]]:
    """The per-sample shape random data gives each input: ``input_shapes[name][1:]`` where
    given, else the declared dims with every symbolic or unknown dim as ``seq_len``.

    Raises:
        DataError: A given shape contradicts the declared one, or a declared dim cannot be
            chosen (zero or negative); the message names the input and ``--input-shape``.
    """
    given = dict(input_shapes or {})
    unknown = sorted(set(given) - {s.name for s in specs})
    if unknown:
        raise DataError(
            f"--input-shape names {unknown}, which are not model inputs; the model's inputs "
            f"are {[s.name for s in specs]}"
        )
    shapes = {}
    for spec in specs:
        flag = f"--input-shape {spec.name}:{'x'.join(['N'] * max(len(spec.shape), 1))}"
        if not spec.shape:
            raise DataError(
                f"model input {spec.name!r} is a scalar (no batch axis), so samples cannot be "
                "generated for it; give real data with --calib DATA"
            )
        if spec.name in given:
            dims = tuple(int(d) for d in given[spec.name])
            declared = spec.shape
            if len(dims) != len(declared) or any(
                isinstance(w, int) and w > 0 and g != w
                for g, w in zip(dims[1:], declared[1:], strict=False)
            ):
                raise DataError(
                    f"--input-shape {spec.name}:{'x'.join(map(str, dims))} does not fit the "
                    f"declared shape {_fmt_shape(declared)}; give {flag} with the static dims"
                )
            shapes[spec.name] = dims[1:]
            continue
        dims = []
        for d in spec.sample_shape:
            if isinstance(d, int) and d <= 0:
                raise DataError(
                    f"model input {spec.name!r} declares dim {d} in {_fmt_shape(spec.shape)}, "
                    f"which cannot be chosen for generated data; give its shape with {flag}"
                )
            dims.append(d if isinstance(d, int) else seq_len)
        shapes[spec.name] = tuple(dims)
    return shapes


def check_generatable(specs: Sequence[InputSpec]) -> None:
    """Raises DataError naming the input and ``--calib DATA`` when random data cannot be drawn
    for one of ``specs`` (a dtype other than float, integer or boolean)."""
    for spec in specs:
        if not (_is_float(spec.dtype) or spec.dtype.kind in "iub"):
            raise DataError(
                f"model input {spec.name!r} has dtype {spec.dtype}, for which inputs cannot be "
                "generated; give real data with --calib DATA"
            )


def token_bounds(model: onnx.ModelProto) -> dict[str, int]:
    """Integer graph inputs that index an embedding: input name -> the fewest rows of the
    initializers a ``Gather`` reads with it (through Cast/Reshape/Unsqueeze-like ops)."""
    rows = {t.name: int(t.dims[0]) for t in model.graph.initializer if len(t.dims) >= 1}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    bounds: dict[str, int] = {}
    for value in model.graph.input:
        if value.name in rows:
            continue
        todo, seen = [value.name], {value.name}
        while todo:
            tensor = todo.pop()
            for node in consumers.get(tensor, []):
                if node.op_type == "Gather" and node.input[1] == tensor:
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    if axis == 0 and node.input[0] in rows:
                        n = rows[node.input[0]]
                        bounds[value.name] = min(bounds.get(value.name, n), n)
                elif node.op_type in _INDEX_PASSTHROUGH and node.input[0] == tensor:
                    for out in node.output:
                        if out not in seen:
                            seen.add(out)
                            todo.append(out)
    return bounds


class _ImageDataset:
    """Image files decoded and preprocessed one at a time into the model's image input."""

    def __init__(self, files: list[pathlib.Path], spec: InputSpec, image: ImageSpec, root: str):
        self._files = files
        self._spec = spec
        self._layout, self._channels = _image_layout(spec, image)
        self._crop = _image_crop(spec, image, self._layout)
        self._size = image.size if image.size is not None else round(max(self._crop) * 256 / 224)
        self._check_size()
        self._image = image
        shape = _image_shape(self._crop, self._channels, self._layout)
        _check_array(np.zeros((1, *shape), dtype=spec.dtype), spec, root, batched=True)
        mode = "BGR" if image.bgr else "RGB" if self._channels == 3 else "grayscale"
        h, w = self._crop
        self.description = (
            f"images from {root} ({len(files)} files, {h}x{w}, {mode}, {self._layout})"
        )
        self.synthetic = False

    def _check_size(self) -> None:
        size, crop = self._size, self._crop
        if isinstance(size, int):
            small = size < max(crop)
        else:
            small = size[0] < crop[0] or size[1] < crop[1]
        if small:
            raise UsageError(
                f"image size {size} is smaller than the crop {crop}; give a size >= the crop"
            )

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, i: int) -> Sample:
        path = self._files[_index(i, len(self._files))]
        pixels = _preprocess(path, self._image, self._size, self._crop, self._channels)
        if _is_float(self._spec.dtype):
            pixels = pixels * np.float32(self._image.scale)
            if self._image.bgr:
                pixels = pixels[..., ::-1]
            mean, std = _channel_stats(self._image, self._channels)
            pixels = (pixels - mean) / std
        elif self._image.bgr:
            pixels = pixels[..., ::-1]
        if self._layout == "NCHW":
            pixels = pixels.transpose(2, 0, 1)
        return {self._spec.name: np.ascontiguousarray(pixels, dtype=self._spec.dtype)}


def _image_layout(spec: InputSpec, image: ImageSpec) -> tuple[str, int]:
    if len(spec.shape) != 4:
        raise DataError(
            f"model input {spec.name!r} has shape {_fmt_shape(spec.shape)}, not 4-D; "
            "images feed NCHW or NHWC inputs only: use a .npz"
        )
    layout = image.layout
    if layout is None:
        if spec.shape[1] in (1, 3):
            layout = "NCHW"
        elif spec.shape[3] in (1, 3):
            layout = "NHWC"
        else:
            raise DataError(
                f"model input {spec.name!r} {_fmt_shape(spec.shape)} has no channel dim of 1 or "
                "3 at axis 1 or 3; give the layout (--image-layout NCHW or NHWC)"
            )
    channels = spec.shape[1] if layout == "NCHW" else spec.shape[3]
    if not isinstance(channels, int):
        channels = 3
    if channels not in (1, 3):
        raise DataError(
            f"model input {spec.name!r} {_fmt_shape(spec.shape)} has {channels} channels in "
            f"{layout}; images give 1 or 3: use a .npz"
        )
    return layout, channels


def _image_crop(spec: InputSpec, image: ImageSpec, layout: str) -> tuple[int, int]:
    if image.crop is not None:
        return int(image.crop[0]), int(image.crop[1])
    h, w = spec.shape[2:4] if layout == "NCHW" else spec.shape[1:3]
    if not (isinstance(h, int) and isinstance(w, int)):
        raise DataError(
            f"model input {spec.name!r} {_fmt_shape(spec.shape)} has no static height and "
            "width; give the crop (--image-crop HxW)"
        )
    return h, w


def _image_shape(crop: tuple[int, int], channels: int, layout: str) -> tuple[int, ...]:
    return (channels, *crop) if layout == "NCHW" else (*crop, channels)


def _channel_stats(image: ImageSpec, channels: int) -> tuple[np.ndarray, np.ndarray]:
    mean = np.asarray(image.mean, dtype=np.float32)
    std = np.asarray(image.std, dtype=np.float32)
    if channels == 1:
        mean, std = mean.mean(keepdims=True), std.mean(keepdims=True)
    return mean, std


def _preprocess(
    path: pathlib.Path,
    image: ImageSpec,
    size: int | tuple[int, int],
    crop: tuple[int, int],
    channels: int,
) -> np.ndarray:
    """Decodes, resizes and center-crops one image to an HWC float32 array of raw pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB" if channels == 3 else "L")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"image {path} cannot be read ({err}); remove or replace the file") from err
    w, h = img.size
    if isinstance(size, int):
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)
        new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    else:
        new_h, new_w = size
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    ch, cw = crop
    top, left = int(round((new_h - ch) / 2.0)), int(round((new_w - cw) / 2.0))
    img = img.crop((left, top, left + cw, top + ch))
    pixels = np.asarray(img, dtype=np.float32)
    return pixels[..., None] if pixels.ndim == 2 else pixels


class _TextDataset:
    """Sentences tokenized one at a time into the model's token inputs."""

    def __init__(
        self,
        sentences: list[str],
        tokenizer: Any,
        specs: list[InputSpec],
        seq_len: int,
        description: str,
    ):
        self._sentences = sentences
        self._tokenizer = tokenizer
        self._specs = specs
        self._seq_len = seq_len
        self.description = description
        self.synthetic = False

    def __len__(self) -> int:
        return len(self._sentences)

    def __getitem__(self, i: int) -> Sample:
        text = self._sentences[_index(i, len(self._sentences))]
        names = {s.name for s in self._specs}
        encoded = self._tokenizer(
            text,
            padding="max_length",
            truncation=True,
            max_length=self._seq_len,
            return_attention_mask=True,
            return_token_type_ids="token_type_ids" in names,
        )
        sample = {}
        for spec in self._specs:
            values = encoded.get(spec.name)
            if values is None:  # tokenizers without segment ids: one segment
                values = np.zeros(self._seq_len, dtype=np.int64)
            where = f"sentence {i + 1} of the text file"
            sample[spec.name] = _cast(np.asarray(values, dtype=np.int64), spec, where)
        return sample


def _index(i: int, n: int) -> int:
    i = int(i)
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"sample index {i} out of range for {n} samples")
    return i


# --- load_data -------------------------------------------------------------------------------


def load_data(
    source: str | os.PathLike | Iterable[Mapping[str, np.ndarray]],
    model: onnx.ModelProto,
    *,
    image: ImageSpec | None = None,
    tokenizer: str | os.PathLike | None = None,
    seq_len: int = 128,
    num_random: int = 64,
    seed: int = 0,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    warn_random: bool = True,
) -> Dataset:
    """Reads calibration data from ``source`` into a :class:`Dataset` checked against ``model``.

    Args:
        source: ``"random"``; a ``.npz``/``.npy`` file or a folder of them; a folder of images
            (searched recursively) or one image; a ``.txt`` of sentences (needs ``tokenizer``);
            an iterable of samples ``{input_name: array}`` without the batch dim; or a mapping
            ``{input_name: array}`` with samples on axis 0, like a ``.npz``.
        model: The model the data feeds; its graph inputs fix names, dtypes and static dims.
        image: Image preprocessing; ``ImageSpec()`` when None. Used only for images.
        tokenizer: A HuggingFace tokenizer folder, loaded offline. Used only for ``.txt``.
        seq_len: Token sequence length, unless the model's sequence dim is static. Random data
            also uses it for every symbolic non-batch dim.
        num_random: Number of samples of ``"random"``.
        seed: Seed of ``"random"``.
        input_shapes: Full shapes (batch first) of some inputs for ``"random"``; the batch dim
            is ignored (samples are stacked on it).
        warn_random: Warn that ``"random"`` data is synthetic (off where the caller says so
            in its own words).

    Raises:
        DataError: The data does not fit the model, or cannot be read.
        UsageError: A bad option (``seq_len``/``num_random`` < 1, bad ``ImageSpec``).
    """
    specs = model_inputs(model)
    if not specs:
        raise DataError("the model has no graph inputs to feed; it needs no calibration data")
    if seq_len < 1:
        raise UsageError(f"seq_len {seq_len} must be >= 1")
    if isinstance(source, str) and source == "random":
        if num_random < 1:
            raise UsageError(f"num_random {num_random} must be >= 1")
        check_generatable(specs)
        shapes = random_shapes(specs, seq_len, input_shapes)
        if warn_random:
            warnings.warn(RANDOM_WARNING, UserWarning, stacklevel=2)
        return _RandomDataset(
            specs, num_random, seed, seq_len, shapes=shapes, bounds=token_bounds(model)
        )
    if isinstance(source, Mapping):
        return _from_arrays([(dict(source), "in-memory arrays")], specs, "in-memory arrays")
    if isinstance(source, (str, os.PathLike)):
        return _from_path(pathlib.Path(source).expanduser(), specs, image, tokenizer, seq_len)
    if isinstance(source, Iterable):
        return _from_samples(source, specs)
    raise UsageError(
        f"calibration source of type {type(source).__name__} is not a path, 'random' or an "
        "iterable of {input_name: array} samples"
    )


def _from_path(
    path: pathlib.Path,
    specs: list[InputSpec],
    image: ImageSpec | None,
    tokenizer: str | os.PathLike | None,
    seq_len: int,
) -> Dataset:
    if not path.exists():
        raise DataError(f"calibration data {path} does not exist; check the path")
    if path.is_dir():
        files = sorted(
            (p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        arrays = [p for p in files if p.suffix.lower() in ARRAY_SUFFIXES]
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        if arrays and images:
            raise DataError(
                f"folder {path} mixes arrays ({arrays[0].name}) and images ({images[0].name}); "
                "keep one kind per folder"
            )
        if arrays:
            loaded = [(_read_array_file(p, specs), str(p)) for p in arrays]
            return _from_arrays(loaded, specs, f"arrays from {path} ({len(arrays)} files)")
        if images:
            return _ImageDataset(images, _image_input(specs, path), image or ImageSpec(), str(path))
        raise DataError(
            f"folder {path} holds no .npz, .npy or image ({', '.join(IMAGE_SUFFIXES)}) files; "
            "point --calib at a folder of data"
        )
    suffix = path.suffix.lower()
    if suffix in ARRAY_SUFFIXES:
        return _from_arrays(
            [(_read_array_file(path, specs), str(path))], specs, f"arrays from {path}"
        )
    if suffix in IMAGE_SUFFIXES:
        return _ImageDataset([path], _image_input(specs, path), image or ImageSpec(), str(path))
    if suffix == ".txt":
        return _from_text(path, specs, tokenizer, seq_len)
    raise DataError(
        f"calibration data {path} has unsupported type {suffix or '(no suffix)'!r}; give a .npz, "
        f".npy, .txt, an image ({', '.join(IMAGE_SUFFIXES)}) or a folder of them"
    )


def _read_array_file(path: pathlib.Path, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    try:
        if path.suffix.lower() == ".npy":
            if len(specs) != 1:
                raise DataError(
                    f"{path} is a .npy (one array) but the model has inputs "
                    f"{[s.name for s in specs]}; save a .npz keyed by input name"
                )
            return {specs[0].name: np.load(path, allow_pickle=False)}
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except DataError:
        raise
    except (OSError, ValueError, EOFError) as err:
        raise DataError(
            f"{path} cannot be read as {path.suffix} ({err}); re-save it with "
            "numpy.savez / numpy.save (no pickled objects)"
        ) from err


def _from_arrays(
    loaded: list[tuple[dict[str, np.ndarray], str]], specs: list[InputSpec], description: str
) -> Dataset:
    chunks = []
    by_name = {s.name: s for s in specs}
    for arrays, where in loaded:
        _check_names(arrays, specs, where)
        scalars = [name for name, a in arrays.items() if np.ndim(a) == 0]
        if scalars:
            raise DataError(
                f"{where}: arrays {scalars} are scalars; axis 0 must be the sample axis"
            )
        counts = {name: np.shape(a)[0] for name, a in arrays.items()}
        if len(set(counts.values())) > 1:
            raise DataError(
                f"{where} has different sample counts per input {counts}; axis 0 is the "
                "sample axis and must match"
            )
        if not next(iter(counts.values())):
            raise DataError(f"{where} has 0 samples; give at least one sample per input")
        chunks.append(
            {
                s.name: _check_array(arrays[s.name], by_name[s.name], where, batched=True)
                for s in specs
            }
        )
    total = sum(len(next(iter(c.values()))) for c in chunks)
    return _ArrayDataset(chunks, f"{description}, {total} samples")


def _from_samples(samples: Iterable[Mapping[str, np.ndarray]], specs: list[InputSpec]) -> Dataset:
    chunks = []
    for i, sample in enumerate(samples):
        where = f"in-memory sample {i}"
        if not isinstance(sample, Mapping):
            raise DataError(
                f"{where} is a {type(sample).__name__}, not a {{input_name: array}} mapping; "
                "give one dict per sample"
            )
        _check_names(sample, specs, where)
        chunks.append(
            {s.name: _check_array(sample[s.name], s, where, batched=False)[None] for s in specs}
        )
    if not chunks:
        raise DataError("in-memory calibration data has 0 samples; give at least one sample")
    return _ArrayDataset(chunks, f"in-memory samples ({len(chunks)})")


def _image_input(specs: list[InputSpec], path: pathlib.Path) -> InputSpec:
    if len(specs) != 1:
        raise DataError(
            f"images in {path} feed one input but the model has inputs "
            f"{[s.name for s in specs]}; give a .npz with every input"
        )
    return specs[0]


def _from_text(
    path: pathlib.Path, specs: list[InputSpec], tokenizer: str | os.PathLike | None, seq_len: int
) -> Dataset:
    names = [s.name for s in specs]
    other = [n for n in names if n not in TEXT_INPUTS]
    if other or "input_ids" not in names:
        raise DataError(
            f"text {path} gives {list(TEXT_INPUTS)} but the model has inputs {names}; "
            "give a .npz with every input"
        )
    if tokenizer is None:
        raise DataError(f"text {path} needs a tokenizer; give its folder (--tokenizer DIR)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"text {path} cannot be read as UTF-8 ({err}); re-save it") from err
    sentences = [line.strip() for line in lines if line.strip()]
    if not sentences:
        raise DataError(f"text {path} has 0 sentences (all lines blank); add one per line")
    static = [s.shape[1] for s in specs if len(s.shape) == 2 and isinstance(s.shape[1], int)]
    for spec in specs:
        if len(spec.shape) != 2:
            raise DataError(
                f"model input {spec.name!r} {_fmt_shape(spec.shape)} is not [batch, sequence]; "
                "give a .npz"
            )
    length = static[0] if static else seq_len
    tok = _load_tokenizer(tokenizer)
    description = (
        f"sentences from {path} ({len(sentences)} lines, seq_len {length}, tokenizer {tokenizer})"
    )
    return _TextDataset(sentences, tok, specs, length, description)


def _load_tokenizer(folder: str | os.PathLike) -> Any:
    folder = pathlib.Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(
            f"tokenizer folder {folder} does not exist; give a HuggingFace "
            "tokenizer folder (save_pretrained)"
        )
    try:
        import transformers
    except ImportError as err:
        raise DataError(
            "text calibration data needs the transformers package; install "
            "it (pip install transformers)"
        ) from err
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(
            f"tokenizer {folder} cannot be loaded ({err}); give a folder written "
            "by tokenizer.save_pretrained"
        ) from err


# --- using a dataset -------------------------------------------------------------------------


class _Subset:
    """A view of some samples of another dataset, by index."""

    def __init__(self, base: Dataset, indices: Sequence[int], description: str):
        self._base = base
        self._indices = list(indices)
        self.description = description
        self.synthetic = base.synthetic

    def __len__(self) -> int:
        return len(self._indices)

    @property
    def indices(self) -> list[int]:
        """Positions of these samples in the base dataset (to split labels alike)."""
        return list(self._indices)

    def __getitem__(self, i: int) -> Sample:
        return self._base[self._indices[_index(i, len(self._indices))]]


def split(ds: Dataset, val_fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Splits ``ds`` into disjoint (calibration, validation) parts by a seeded permutation.

    ``round(len * val_fraction)`` samples go to validation, at least 1 and at most ``len - 1``
    when ``val_fraction > 0``; each part keeps the original sample order.

    Raises:
        UsageError: ``val_fraction`` is outside [0, 1).
        DataError: ``val_fraction > 0`` but the data has fewer than 2 samples.
    """
    if not 0 <= val_fraction < 1:
        raise UsageError(f"val_fraction {val_fraction} must be in [0, 1); e.g. 0.1")
    n = len(ds)
    n_val = 0
    if val_fraction > 0:
        if n < 2:
            raise DataError(
                f"calibration data has {n} sample(s), too few to split off validation; give "
                "more samples or --val-fraction 0"
            )
        n_val = min(max(round(n * val_fraction), 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    val_idx, cal_idx = sorted(order[:n_val].tolist()), sorted(order[n_val:].tolist())
    tag = f"of {n}, seed {seed}"
    return (
        _Subset(ds, cal_idx, f"{ds.description} [calibration {len(cal_idx)} {tag}]"),
        _Subset(ds, val_idx, f"{ds.description} [validation {len(val_idx)} {tag}]"),
    )


def batches(ds: Dataset, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Yields ``{name: array}`` batches of ``batch_size`` samples (the last may be smaller).

    Arrays are C-contiguous and keep the samples' dtype (the model input's).

    Raises:
        UsageError: ``batch_size`` < 1.
        DataError: Samples of one batch differ in shape (symbolic dims of varying size).
    """
    if batch_size < 1:
        raise UsageError(f"batch size {batch_size} must be >= 1")
    for start in range(0, len(ds), batch_size):
        samples = [ds[i] for i in range(start, min(start + batch_size, len(ds)))]
        batch = {}
        for name in samples[0]:
            shapes = {s[name].shape for s in samples}
            if len(shapes) > 1:
                raise DataError(
                    f"input {name!r} of samples {start}..{start + len(samples) - 1} has shapes "
                    f"{sorted(shapes)}; one batch needs equal shapes: pad the data or "
                    "use --batch-size 1"
                )
            batch[name] = np.ascontiguousarray(np.stack([s[name] for s in samples]))
        yield batch


def require(
    ds: Dataset,
    at_least: int,
    what: str,
    *,
    label: str = "calibration data",
    fix: str | None = None,
) -> None:
    """Raises DataError unless ``ds`` has at least ``at_least`` samples.

    Example: ``require(ds, 8, "one batch", fix="--batch-size 3")`` raises
    ``calibration data has 3 samples, fewer than one batch (8); give more samples or
    --batch-size 3``.
    """
    n = len(ds)
    if n < at_least:
        tail = f" or {fix}" if fix else ""
        raise DataError(
            f"{label} has {n} samples, fewer than {what} ({at_least}); give more samples{tail}"
        )
