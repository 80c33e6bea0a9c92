"""Reading local copies of datasets: layout detection, raw rows, images, bad rows.

Three storage layouts are understood, tried in this order:

``save_to_disk``
    A directory written by ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (it holds
    ``state.json`` or ``dataset_dict.json``), or a directory whose sub-directories are such copies (one per
    subject / config, as MMMU is published).
``parquet``
    Parquet files as published on the Hugging Face hub (``data/testmini-00000-of-00001-*.parquet``,
    ``testmini.parquet``, ``<Subject>/validation-*.parquet``, ``default/<split>/0000.parquet``). Image columns
    are ``{bytes, path}`` structs.
``json``
    The official JSON / JSONL annotation files plus an image folder (image columns hold relative paths).

Rows are read as plain dicts (images are *not* decoded by ``datasets``), so that one undecodable or missing
image becomes one bad row instead of an exception. Images are decoded by :func:`open_image`, which resolves
relative paths against the annotation file's folder, the dataset root and their ``images/`` sub-folders; a
path found nowhere there is a missing image (a bad row), never another file of the same name.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageOps

from acrl.problem import Problem

__all__ = [
    "BadRow",
    "BadRowError",
    "ImageResolver",
    "Layout",
    "LoadResult",
    "Record",
    "compose_images",
    "detect_layout",
    "iter_records",
    "open_image",
    "split_token",
    "to_rgb",
]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
# JSON files that describe a dataset rather than hold its rows.
_META_JSON = {"dataset_info.json", "state.json", "dataset_dict.json", "knowledge_structure_nodes.json",
              "config.json", "metadata.json", "source.json"}
_SHARD_RE = re.compile(r"-\d{5}-of-\d{5}(?:-[0-9a-f]+)?$")
_MAX_SCAN_DEPTH = 4


class BadRowError(Exception):
    """Raised by a row converter: the row is unusable (missing image / answer / column ...)."""


@dataclass
class BadRow:
    """A row that could not be turned into a :class:`~acrl.problem.Problem`."""

    id: str
    reason: str


@dataclass
class LoadResult:
    """What a loader returns: the usable problems and the rows it had to skip."""

    problems: list[Problem]
    bad: list[BadRow] = field(default_factory=list)
    layout: str = ""
    path: str = ""
    files: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.problems)

    def __iter__(self):
        return iter(self.problems)

    def describe(self) -> str:
        """One line for logs: counts, layout and the first bad rows."""
        text = f"{len(self.problems)} problems, {len(self.bad)} bad rows ({self.layout} at {self.path})"
        if self.bad:
            text += "; e.g. " + "; ".join(f"{b.id}: {b.reason}" for b in self.bad[:3])
        return text


@dataclass
class Record:
    """One raw row and where it came from."""

    row: dict[str, Any]
    source: str
    index: int
    split: str | None = None          # split token of the file / directory it came from
    group: str | None = None          # sub-directory (subject config, variant folder) it came from
    base_dirs: tuple[Path, ...] = ()  # where relative image paths are looked up first


@dataclass
class Layout:
    """A detected storage layout."""

    kind: str                    # "save_to_disk" | "parquet" | "json"
    root: Path
    items: list[Path]            # dataset directories or data files
    note: str = ""


# ------------------------------------------------------------------------------------------------------------
# Split names
# ------------------------------------------------------------------------------------------------------------


def split_token(path: Path) -> str:
    """The split a data file belongs to, from its name: ``testmini-00000-of-00001-ab12.parquet`` ->
    ``testmini``, ``annot_testmini.json`` -> ``testmini``, ``default/test/0000.parquet`` -> ``test``."""
    stem = path.name
    for suffix in (".parquet", ".jsonl", ".json", ".arrow"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    stem = _SHARD_RE.sub("", stem)
    stem = stem.removeprefix("annot_")
    if re.fullmatch(r"\d+", stem) and path.parent.name:
        return path.parent.name
    return stem


# ------------------------------------------------------------------------------------------------------------
# Layout detection
# ------------------------------------------------------------------------------------------------------------


def _walk(root: Path, max_depth: int = _MAX_SCAN_DEPTH) -> Iterator[Path]:
    """Files under ``root`` (hidden folders such as ``.cache`` skipped), at most ``max_depth`` levels down."""
    root_depth = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root):
        depth = len(Path(dirpath).parts) - root_depth
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        if depth >= max_depth:
            dirnames[:] = []
        for name in sorted(filenames):
            yield Path(dirpath) / name


def _is_saved_dataset(d: Path) -> bool:
    if (d / "dataset_dict.json").is_file():
        return True
    return (d / "state.json").is_file() and (d / "dataset_info.json").is_file()


def _listing(root: Path, limit: int = 12) -> str:
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    except OSError:
        return "(unreadable)"
    if not names:
        return "(empty directory)"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def detect_layout(path: str | os.PathLike, what: str = "dataset", expected_json: str = "") -> Layout:
    """Find the storage layout of ``path``; raises FileNotFoundError / ValueError with a message naming the
    path and the layouts that were expected."""
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"{what}: {root} does not exist")
    if root.is_file():
        suffix = root.suffix.lower()
        if suffix == ".parquet":
            return Layout("parquet", root.parent, [root], note="single file")
        if suffix in (".json", ".jsonl"):
            return Layout("json", root.parent, [root], note="single file")
        if suffix == ".arrow" and _is_saved_dataset(root.parent):
            return Layout("save_to_disk", root.parent, [root.parent])
        raise ValueError(f"{what}: {root} is a file but not .parquet, .json or .jsonl")
    if _is_saved_dataset(root):
        return Layout("save_to_disk", root, [root])
    saved: list[Path] = []
    parquet: list[Path] = []
    jsons: list[Path] = []
    for f in _walk(root):
        if f.name in ("dataset_dict.json", "state.json") and _is_saved_dataset(f.parent):
            # a DatasetDict's split folders hold state.json too: keep only the outermost saved copy
            if not any(s == f.parent or s in f.parent.parents for s in saved):
                saved.append(f.parent)
        elif f.suffix.lower() == ".parquet":
            parquet.append(f)
        elif f.suffix.lower() in (".json", ".jsonl") and f.name not in _META_JSON:
            jsons.append(f)
    if saved:
        return Layout("save_to_disk", root, sorted(saved))
    if parquet:
        return Layout("parquet", root, parquet)
    if jsons:
        return Layout("json", root, jsons)
    expected = (
        "a directory written by datasets' save_to_disk (with dataset_dict.json or state.json), parquet files "
        "as published on the hub (e.g. data/<split>-00000-of-00001.parquet)"
        + (f", or {expected_json}" if expected_json else ", or JSON/JSONL annotations with an image folder")
    )
    raise ValueError(f"{what}: no dataset found at {root}: expected {expected}; found: {_listing(root)}")


# ------------------------------------------------------------------------------------------------------------
# Raw rows
# ------------------------------------------------------------------------------------------------------------


def _json_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON / JSONL annotation file: a list of objects, an ``{id: object}`` mapping (the key is kept
    as ``__key__``), or an object holding such a list under ``data`` / ``rows`` / ``annotations``."""
    raw = path.read_bytes()
    if path.suffix.lower() == ".jsonl":   # a bad line is a bad row; the other lines of the file still count
        rows = []
        for n, bline in enumerate(raw.splitlines(), 1):
            try:
                line = bline.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                rows.append({"__error__": f"line {n}: not valid UTF-8 (byte 0x{bline[e.start]:02x} at column "
                                          f"{e.start + 1})"})
                continue
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                rows.append({"__error__": f"line {n}: invalid JSON ({e.msg})"})
                continue
            rows.append(obj if isinstance(obj, dict) else {"__error__": f"line {n}: not an object"})
        return rows
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    data = json.loads(text)
    if isinstance(data, dict):
        for key in ("data", "rows", "annotations", "questions"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
    if isinstance(data, list):
        return [r if isinstance(r, dict) else {"__error__": "not an object"} for r in data]
    if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        return [{"__key__": str(k), **v} for k, v in data.items()]
    raise ValueError(f"{path}: JSON is neither a list of rows nor an {{id: row}} mapping")


def _columns(rows: list[dict[str, Any]], n: int = 50) -> dict[str, Any]:
    """The columns of a file's first ``n`` readable rows (one row may lack a column the others have), as a row;
    the first row when none is readable."""
    good = [r for r in rows[:n] if "__error__" not in r]
    if not good:
        return rows[0]
    merged: dict[str, Any] = {}
    for r in reversed(good):
        merged.update(r)
    return merged


def _parquet_rows(path: Path, batch_size: int = 64) -> Iterator[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(str(path))
        for batch in pf.iter_batches(batch_size=batch_size):
            yield from batch.to_pylist()
    except (pa.ArrowException, OSError) as e:   # a truncated or corrupt file: name it
        raise ValueError(f"{path}: cannot read the parquet file ({e})") from None


def _saved_splits(d: Path) -> list[tuple[str | None, Any]]:
    """``(split, arrow-format Dataset)`` pairs of a ``save_to_disk`` copy (images left undecoded)."""
    from datasets import DatasetDict, load_from_disk

    obj = load_from_disk(str(d))
    if isinstance(obj, DatasetDict):
        return [(name, ds) for name, ds in obj.items()]
    split = str(obj.split) if getattr(obj, "split", None) is not None else None
    return [(split, obj)]


def _arrow_rows(ds, batch_size: int = 64) -> Iterator[dict[str, Any]]:
    arrow = ds.with_format("arrow")
    for start in range(0, len(arrow), batch_size):
        yield from arrow[start:start + batch_size].to_pylist()


def iter_records(layout: Layout, accept_split: Callable[[str | None, list[str | None]], bool] | None = None,
                 json_filter: Callable[[Path, dict[str, Any]], bool] | None = None) -> Iterator[Record]:
    """Rows of every data item in ``layout`` whose split ``accept_split(token, all_tokens)`` accepts (every
    item when ``accept_split`` is None).

    For the JSON layout ``json_filter(path, first_row)`` can reject files that are not annotation files."""
    root = layout.root
    if layout.kind == "save_to_disk":
        parts: list[tuple[Path, str | None, Any]] = []
        for d in layout.items:
            for split, ds in _saved_splits(d):
                parts.append((d, split, ds))
        tokens = [s for _, s, _ in parts]
        for d, split, ds in parts:
            if accept_split is not None and not accept_split(split, tokens):
                continue
            group = d.name if d != root else None
            for i, row in enumerate(_arrow_rows(ds)):
                yield Record(row, str(d), i, split, group, (d, root))
        return
    files = list(layout.items)
    tokens = [split_token(f) for f in files]
    single = layout.note == "single file"
    for f, tok in zip(files, tokens):
        if not single and accept_split is not None and not accept_split(tok, tokens):
            continue
        group = f.parent.name if f.parent != root else None
        base = (f.parent, f.parent.parent, root)
        if layout.kind == "parquet":
            for i, row in enumerate(_parquet_rows(f)):
                yield Record(row, str(f), i, tok, group, base)
        else:
            try:
                rows = _json_rows(f)
            except (ValueError, UnicodeDecodeError, OSError) as e:
                if single:
                    raise ValueError(f"{f}: cannot read annotations: {e}") from e
                # an unreadable file is reported as a bad row that names it, never dropped without a word
                yield Record({"__error__": f"cannot read the file: {e}"}, str(f), 0, tok, group, base)
                continue
            if not rows or (json_filter is not None and not json_filter(f, _columns(rows))):
                continue
            for i, row in enumerate(rows):
                yield Record(row, str(f), i, tok, group, base)


# ------------------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------------------


class ImageResolver:
    """Finds image files named by relative paths in annotation files.

    A path is looked up, as written, under the annotation file's folder, its parent, the dataset root, and the
    ``images/`` / ``image/`` sub-folders of each. Nothing else: a file that merely has the same name somewhere
    else under the root is a different image (MathVerse keeps ``image_1.png`` in every
    ``images_version_*`` folder, We-Math ``1-1.png`` in both ``2steps/image`` and ``3steps/image``), so a path
    that is not found is a missing image (a bad row), never a guess.
    """

    def __init__(self, root: Path):
        self.root = Path(root)

    def find(self, rel: str, base_dirs: Sequence[Path] = ()) -> Path:
        """The file ``rel`` refers to; raises BadRowError when it is missing."""
        rel = rel.strip().replace("\\", "/")
        p = Path(rel)
        if p.is_absolute():
            if p.is_file():
                return p
            raise BadRowError(f"missing image file {rel!r}")
        seen: set[Path] = set()
        for base in (*base_dirs, self.root):
            if base in seen:
                continue
            seen.add(base)
            for cand in (base / p, base / "images" / p, base / "image" / p):
                if cand.is_file():
                    return cand
        raise BadRowError(f"missing image file {rel!r}")


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB copy of ``img``; transparent areas become white (diagrams are often black on transparency)."""
    img = ImageOps.exif_transpose(img) if img.format in ("JPEG", "MPO", "TIFF") else img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


def _decode(data: bytes, what: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:
        raise BadRowError(f"undecodable image {what}: {type(e).__name__}: {e}") from e
    if img.width <= 0 or img.height <= 0:
        raise BadRowError(f"undecodable image {what}: empty image")
    return to_rgb(img)


def _open_path(path: Path) -> Image.Image:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadRowError(f"unreadable image file {str(path)!r}: {e}") from e
    return _decode(data, repr(str(path)))


def is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):  # NaN from pandas-written files
        return True
    if isinstance(value, str) and not value.strip():
        return True
    return isinstance(value, dict) and not value.get("bytes") and not value.get("path")


def open_image(value: Any, resolver: ImageResolver, base_dirs: Sequence[Path] = ()) -> Image.Image:
    """Decode an image cell: a PIL image, ``{bytes, path}`` struct, raw bytes or a (relative) file path.

    Raises BadRowError (missing / undecodable image)."""
    if is_missing(value):
        raise BadRowError("missing image")
    if isinstance(value, Image.Image):
        return to_rgb(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _decode(bytes(value), "bytes")
    if isinstance(value, dict):
        data = value.get("bytes")
        if data:
            return _decode(bytes(data), repr(value.get("path") or "bytes"))
        return _open_path(resolver.find(str(value["path"]), base_dirs))
    if isinstance(value, str):
        return _open_path(resolver.find(value, base_dirs))
    raise BadRowError(f"image cell of unexpected type {type(value).__name__}")


def compose_images(images: Sequence[Image.Image], labels: Sequence[str] | None = None, gap: int = 12,
                   max_height: int = 768) -> Image.Image:
    """Place several images side by side on a white canvas, scaled to a common height, each with an optional
    label (``image 1``, ...) above it. A single unlabelled image is returned as is."""
    if not images:
        raise ValueError("compose_images: no images")
    if len(images) == 1 and not labels:
        return images[0]
    height = min(max(im.height for im in images), max_height)
    scaled = [im.resize((max(1, round(im.width * height / im.height)), height)) if im.height != height else im
              for im in images]
    band = 22 if labels else 0
    width = sum(im.width for im in scaled) + gap * (len(scaled) + 1)
    canvas = Image.new("RGB", (width, height + band + 2 * gap), "white")
    draw = ImageDraw.Draw(canvas)
    x = gap
    for i, im in enumerate(scaled):
        if labels:
            draw.text((x, gap // 2), str(labels[i]), fill="black")
        canvas.paste(im, (x, gap + band))
        x += im.width + gap
    return canvas
