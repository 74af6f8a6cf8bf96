"""The OCR case (issue 18): rapidocr's PP-OCRv4 detector and recognizer on text rendered with PIL.

Data. Text lines are drawn from a fixed word list by a seeded generator (:func:`strings`); the
calibration, validation and test strings are disjoint (no string in two splits). Each string is
rendered with Pillow's bundled font (``ImageFont.load_default(size)``: the same glyphs on every
machine), dark text on a light background at a seeded size and shade, blurred and noised as
a scan (:func:`_degrade`):

* recognizer samples (:func:`render_line`): one line per image, with a margin, as the pipeline's
  crops look;
* detector pages (:func:`render_page`): ``PAGE_LINES`` lines placed on a ``PAGE_H x PAGE_W``
  page, the size at which RapidOCR's detector runs without resizing (its shorter side at the
  ``limit_side_len`` 736, the longer a multiple of 32).

Metrics, in percentage points so that ``--max-drop 1`` is one point:

* :func:`char_accuracy`: ``1 - ED(pred, gt) / max(|pred|, |gt|)`` (1 minus the normalized edit
  distance, PaddleOCR's ``norm_edit_dis``), spaces ignored as PaddleOCR's ``RecMetric`` does,
  case kept; a page's text is its lines top to bottom, concatenated.
* :func:`rec_char_accuracy` (an ``optimize`` metric, ``f(outputs, ref_outputs, labels)``): the
  recognizer's CTC output decoded greedily with the model's own character list (its
  ``character`` metadata), against the rendered strings given as labels.
* :func:`det_box_agreement` (an ``optimize`` metric): the boxes RapidOCR's own ``DBPostProcess``
  finds in the candidate's probability map scored against those it finds in the original's,
  as text detection is scored (PaddleOCR's ``DetMetric``): one-to-one matches at IoU >= 0.5,
  the hmean of precision and recall (IoU of the boxes' bounding rectangles; the rendered
  lines are horizontal).
* :func:`pipeline_accuracy`: the whole RapidOCR pipeline (detector, angle classifier,
  recognizer) on test pages, :func:`char_accuracy` against the rendered page text.

``python tools/ocr.py make-data DIR`` writes the arrays the CLI reads, ``python tools/ocr.py
path rec`` prints where rapidocr installed a model, ``python tools/ocr.py check`` gives the
original pipeline's accuracy on the test pages (docs/OCR.md).
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: Split sizes (strings): calibration, validation, test.
SPLITS = {"calib": 256, "val": 96, "test": 96}
SEED = 2026
PAGE_H, PAGE_W, PAGE_LINES = 736, 992, 6
#: Width of the recognizer's inputs: rapidocr's ``rec_img_shape`` (3, 48, 320).
REC_H, REC_W = 48, 320
#: IoU at which two text boxes match (PaddleOCR's ``DetMetric``, ICDAR's protocol).
IOU_MATCH = 0.5

WORDS = """
able about above across after again against air all almost along also always among and
animal answer any apple area around ask away back ball bank base bear beautiful became
because become bed been before began begin behind being below best better between big bird
black blue boat body book both box boy bread bring brother brown build built busy call came
can car care carry case cat cause center change check child city class clear close cloud
cold color come common cook corn correct could country course cover cross cut dark day deep
did direct distant does dog done door down draw dream dress drive dry during each early earth
east easy eat edge egg end enough even ever every example eye face fact fair fall family far
farm fast father feel feet few field figure fill final find fine fire first fish five floor
fly follow food foot force forest form found four free friend front full game garden gave
girl give glass gold good govern great green ground group grow half hand happy hard head hear
heart heat heavy help here high hill history hold home horse hot hour house hundred idea inch
island just keep kind king know lake land large last late laugh lead learn leave left letter
light line list little live long look made main make man many map mark market measure meet
might mile milk mind minute miss money moon morning mother mountain move music name near need
never new next night north note number ocean office often old only open order other outside
page paper part pass people picture piece place plain plan plant play point power press price
print problem product pull question quick quiet rain reach read ready record red remember rest
right river road rock room round rule run safe same school science sea season second seed
seven shape ship short show side simple since sing sister size sleep slow small snow soft soil
song sound south space special spring square stand star start station stay step stone stop
store story street strong study summer sun table tail take talk teach tell test than thank
their thing think three through time today together told took top total town train travel
tree true try turn under unit until upon usual valley very voice wait walk warm watch water
wave way weather week weight west wheel while white whole wide wind window winter wish wood
word work world write yard year yellow young
""".split()  # noqa: SIM905 (a word list reads better as text)


# --------------------------------------------------------------------------------------- data


@functools.cache
def strings() -> dict[str, list[str]]:
    """The fixed text lines of each split (disjoint): 2-4 words, Capitalized or lower case,
    sometimes with a number; the same on every call and machine."""
    rng = np.random.default_rng(SEED)
    seen: set[str] = set()
    lines: list[str] = []
    total = sum(SPLITS.values())
    while len(lines) < total:
        words = [WORDS[i] for i in rng.integers(0, len(WORDS), int(rng.integers(2, 5)))]
        if rng.random() < 0.4:
            words[0] = words[0].capitalize()
        if rng.random() < 0.3:
            words.insert(int(rng.integers(0, len(words) + 1)), str(int(rng.integers(1, 2000))))
        line = " ".join(words)
        if line not in seen and len(line) <= 26:
            seen.add(line)
            lines.append(line)
    out, start = {}, 0
    for name, n in SPLITS.items():
        out[name] = lines[start:start + n]
        start += n
    return out


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def render_line(text: str, rng: np.random.Generator) -> np.ndarray:
    """One text line as an ``H x W x 3`` uint8 image (dark on light, seeded size and shade)."""
    from PIL import Image, ImageDraw

    size = int(rng.integers(18, 37))
    font = _font(size)
    left, top, right, bottom = font.getbbox(text)
    mx, my = int(rng.integers(4, 12)), int(rng.integers(4, 10))
    bg, fg = int(rng.integers(200, 256)), int(rng.integers(0, 70))
    img = Image.new("L", (right - left + 2 * mx, bottom - top + 2 * my), bg)
    ImageDraw.Draw(img).text((mx - left, my - top), text, fill=fg, font=font)
    return _degrade(img, rng)


def render_page(texts: Sequence[str], rng: np.random.Generator) -> np.ndarray:
    """``texts`` as lines of a ``PAGE_H x PAGE_W x 3`` uint8 page, top to bottom."""
    from PIL import Image, ImageDraw

    bg = int(rng.integers(215, 256))
    img = Image.new("L", (PAGE_W, PAGE_H), bg)
    draw = ImageDraw.Draw(img)
    pitch = (PAGE_H - 60) // max(len(texts), 1)
    for i, text in enumerate(texts):
        font = _font(int(rng.integers(22, 43)))
        width = font.getbbox(text)[2]
        x = int(rng.integers(30, max(31, PAGE_W - width - 30)))
        y = 30 + i * pitch + int(rng.integers(0, max(1, pitch - 50)))
        draw.text((x, y), text, fill=int(rng.integers(0, 70)), font=font)
    return _degrade(img, rng)


def _degrade(img, rng: np.random.Generator) -> np.ndarray:
    """A scan's blur (Gaussian, radius 0-1.2 px) and noise (sigma 0-12 grey levels), as an
    ``H x W x 3`` uint8 array."""
    from PIL import ImageFilter

    img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.0, 1.2))))
    x = np.asarray(img, np.float32) + rng.normal(0, rng.uniform(0, 12), (img.height, img.width))
    return np.repeat(np.clip(np.rint(x), 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


def line_images(split: str) -> list[np.ndarray]:
    rng = np.random.default_rng([SEED, list(SPLITS).index(split), 1])
    return [render_line(t, rng) for t in strings()[split]]


def pages(split: str) -> tuple[list[np.ndarray], list[list[str]]]:
    """The split's strings, ``PAGE_LINES`` to a page, as page images and their lines."""
    rng = np.random.default_rng([SEED, list(SPLITS).index(split), 2])
    texts = strings()[split]
    groups = [texts[i:i + PAGE_LINES] for i in range(0, len(texts), PAGE_LINES)]
    return [render_page(g, rng) for g in groups], groups


# ------------------------------------------------------------------------------ model inputs


def rapidocr_models() -> dict[str, Path]:
    """The ONNX files shipped in ``rapidocr_onnxruntime`` (``det``, ``rec``, ``cls``)."""
    import rapidocr_onnxruntime

    root = Path(rapidocr_onnxruntime.__file__).parent / "models"
    found = {k: sorted(root.glob(f"*_{k}_*.onnx")) for k in ("det", "rec", "cls")}
    return {k: v[0] for k, v in found.items() if v}


def rec_inputs(images: Sequence[np.ndarray]) -> np.ndarray:
    """Recognizer inputs ``[N, 3, 48, 320]``: rapidocr's ``resize_norm_img`` at its default
    width (height 48, width by aspect ratio up to 320, zero padding, ``(x/255 - 0.5)/0.5``)."""
    import cv2

    out = np.zeros((len(images), 3, REC_H, REC_W), np.float32)
    for i, img in enumerate(images):
        h, w = img.shape[:2]
        rw = min(REC_W, int(np.ceil(REC_H * w / h)))
        x = cv2.resize(img, (rw, REC_H)).astype(np.float32).transpose(2, 0, 1) / 255
        out[i, :, :, :rw] = (x - 0.5) / 0.5
    return out


def det_inputs(images: Sequence[np.ndarray]) -> np.ndarray:
    """Detector inputs ``[N, 3, 736, 992]``: rapidocr's ``DetPreProcess`` (pages are drawn
    at the size it keeps)."""
    mean = std = 0.5
    x = np.stack(images).astype(np.float32) / 255
    return ((x - mean) / std).transpose(0, 3, 1, 2).copy()


# ------------------------------------------------------------------------------------ metrics


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insert, delete, substitute: 1 each); a few dozen characters, so
    the plain dynamic programme (no extra package for it)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def char_accuracy(pred: str, gt: str) -> float:
    """``1 - ED / max(|pred|, |gt|)`` with spaces removed; 1 for two empty strings."""
    p, g = pred.replace(" ", ""), gt.replace(" ", "")
    n = max(len(p), len(g))
    return 1.0 if n == 0 else 1.0 - edit_distance(p, g) / n


@functools.cache
def characters() -> tuple[str, ...]:
    """The recognizer's CTC classes: blank, its ``character`` metadata, then the space (as
    rapidocr's ``CTCLabelDecode`` builds them)."""
    import onnx

    model = onnx.load(str(rapidocr_models()["rec"]), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    return ("",) + tuple(meta["character"].splitlines()) + (" ",)


def ctc_decode(probs: np.ndarray) -> list[str]:
    """Greedy CTC: arg-max per time step, repeats collapsed, blanks dropped."""
    chars = characters()
    out = []
    for seq in np.asarray(probs).argmax(-1):
        keep = np.ones(len(seq), bool)
        keep[1:] = seq[1:] != seq[:-1]
        out.append("".join(chars[c] for c in seq[keep] if c != 0 and c < len(chars)))
    return out


def rec_char_accuracy(outputs, ref_outputs, labels) -> float:
    """Mean :func:`char_accuracy` (points) of the decoded recognizer outputs against the
    rendered strings in ``labels``."""
    texts = ctc_decode(outputs[0])
    pairs = zip(texts, labels, strict=True)
    return 100.0 * float(np.mean([char_accuracy(p, str(g)) for p, g in pairs]))


@functools.cache
def _db_postprocess():
    from rapidocr_onnxruntime.ch_ppocr_det.utils import DBPostProcess

    # rapidocr's config.yaml defaults
    return DBPostProcess(thresh=0.3, box_thresh=0.5, max_candidates=1000, unclip_ratio=1.6,
                         score_mode="fast", use_dilation=True)


def boxes(prob_map: np.ndarray) -> np.ndarray:
    """Axis-aligned ``[K, 4]`` boxes (x0, y0, x1, y1) of one ``[1, H, W]`` probability map."""
    h, w = prob_map.shape[-2:]
    quads, _ = _db_postprocess()(prob_map.reshape(1, 1, h, w), (h, w))
    quads = np.asarray(quads, np.float64).reshape(-1, 4, 2)
    return np.concatenate([quads.min(1), quads.max(1)], axis=1) if len(quads) else np.zeros((0, 4))


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def box_agreement(cand: np.ndarray, ref: np.ndarray) -> float:
    """Detection hmean of ``cand`` against ``ref`` taken as the truth: boxes match one to one
    at IoU >= :data:`IOU_MATCH` (greedily, best IoU first), ``P = matches / |cand|``,
    ``R = matches / |ref|``, ``2PR / (P + R)``; 1 when both are empty."""
    if len(cand) == 0 and len(ref) == 0:
        return 1.0
    if len(cand) == 0 or len(ref) == 0:
        return 0.0
    iou = _iou(ref, cand)
    used_r, used_c, matches = set(), set(), 0
    for flat in np.argsort(-iou, axis=None, kind="stable"):
        r, c = divmod(int(flat), iou.shape[1])
        if iou[r, c] < IOU_MATCH:
            break
        if r not in used_r and c not in used_c:
            used_r.add(r)
            used_c.add(c)
            matches += 1
    p, r = matches / len(cand), matches / len(ref)
    return 0.0 if matches == 0 else 2 * p * r / (p + r)


def det_box_agreement(outputs, ref_outputs, labels) -> float:
    """Mean :func:`box_agreement` (points): the detector's boxes scored against the
    original's as the truth, page by page."""
    y, y0 = outputs[0], ref_outputs[0]
    pairs = zip(y, y0, strict=True)
    return 100.0 * float(np.mean([box_agreement(boxes(a), boxes(b)) for a, b in pairs]))


# ----------------------------------------------------------------------------------- pipeline


def pipeline(det: str | Path | None = None, rec: str | Path | None = None):
    """RapidOCR with its own config, the detector / recognizer swapped where given."""
    from rapidocr_onnxruntime import RapidOCR

    kw = {}
    if det is not None:
        kw["det_model_path"] = str(det)
    if rec is not None:
        kw["rec_model_path"] = str(rec)
    return RapidOCR(**kw)


def page_text(result) -> str:
    """The pipeline's lines top to bottom (by box centre), concatenated."""
    if not result:
        return ""
    rows = sorted(result, key=lambda r: (np.mean([p[1] for p in r[0]]), r[0][0][0]))
    return "".join(r[1] for r in rows)


def pipeline_accuracy(ocr, images: Sequence[np.ndarray], texts: Sequence[Sequence[str]]):
    """Mean page :func:`char_accuracy` (points) of the pipeline ``ocr`` on ``images``."""
    scores = []
    for img, lines in zip(images, texts, strict=True):
        result, _ = ocr(img)
        scores.append(char_accuracy(page_text(result), "".join(lines)))
    return 100.0 * float(np.mean(scores))


# ------------------------------------------------------------------------------------ main


def make_data(out: Path) -> list[Path]:
    """Writes ``rec.npz`` (``x``: calibration then validation lines) with ``rec_labels.npy``
    (their strings), and ``det.npz`` (``x``: calibration then validation pages)."""
    out.mkdir(parents=True, exist_ok=True)
    lines = line_images("calib") + line_images("val")
    labels = np.array(strings()["calib"] + strings()["val"])
    det_pages = pages("calib")[0] + pages("val")[0]
    written = [out / "rec.npz", out / "rec_labels.npy", out / "det.npz"]
    np.savez(written[0], x=rec_inputs(lines))
    np.save(written[1], labels)
    np.savez(written[2], x=det_inputs(det_pages))
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make-data", help="write rec.npz, rec_labels.npy and det.npz to DIR")
    mk.add_argument("dir", type=Path)
    sub.add_parser("check", help="the original pipeline's accuracy on the test pages")
    path = sub.add_parser("path", help="where rapidocr's det / rec / cls model is installed")
    path.add_argument("part", choices=("det", "rec", "cls"))
    args = ap.parse_args(argv)
    if args.cmd == "make-data":
        for p in make_data(args.dir):
            print(p)
    elif args.cmd == "path":
        print(rapidocr_models()[args.part])
    else:
        imgs, texts = pages("test")
        print(f"pipeline char accuracy on {len(imgs)} test pages: "
              f"{pipeline_accuracy(pipeline(), imgs, texts):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
