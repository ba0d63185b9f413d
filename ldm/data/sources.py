"""Where images and captions come from, and the audit that keeps bad data from crashing a run.

Sources: the built-in `shapes`, a local imagefolder (`metadata.jsonl` / `metadata.csv` with a
`file_name` column and a caption column) and Hugging Face Hub datasets (`datasets.load_dataset`).
A local folder's metadata is read line by line rather than through Arrow, because Arrow's typed
columns reject the very rows an audit must count (a number where a caption should be, a broken line).

The audit decodes every sample once before training. Each problem is either *converted* (image mode
→ RGB, EXIF rotation, first frame of an animation, a non-string caption → text, an over-long caption
→ truncated) or *skipped*, and every kind is counted with examples. If more than
`data.max_bad_fraction` of the samples would be skipped, training stops before it starts and lists
the offending files.
"""

from __future__ import annotations

import codecs
import csv
import errno
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

from PIL import Image

from ldm.config.data import DataConfig
from ldm.data.decode import BadSample, Caption, decode_image, normalise_caption
from ldm.errors import ConfigError
from ldm.shapes import ShapesDataset, parse_holdout


class Source(Protocol):
    def __len__(self) -> int: ...
    def get(self, index: int) -> tuple[Image.Image, Caption]: ...
    def caption(self, index: int) -> Caption: ...  # without decoding the image
    def fingerprint(self, index: int) -> str: ...  # sha256 of the image's bytes


class ShapesSource:
    def __init__(self, cfg: DataConfig):
        self.dataset = ShapesDataset(cfg.shapes.num_images, cfg.resolution, seed=cfg.shapes.seed,
                                     exclude=parse_holdout(cfg.shapes.holdout),
                                     colour_only_captions=cfg.shapes.colour_only_captions,
                                     styles=cfg.shapes.styles, focus=parse_holdout(cfg.shapes.focus),
                                     focus_fraction=cfg.shapes.focus_fraction)

    def __len__(self) -> int:
        return len(self.dataset)

    def get(self, index: int) -> tuple[Image.Image, Caption]:
        item = self.dataset[index]
        return item["image"], item["text"]

    def caption(self, index: int) -> Caption:
        return self.dataset.caption(index)

    def reference(self, index: int) -> Image.Image:
        """A style reference for item `index`: same background, other content."""
        return self.dataset.reference(index)

    def fingerprint(self, index: int) -> str:
        image = self.get(index)[0]
        return hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()


@dataclass
class FolderRow:
    file_name: object
    caption: object
    line: int


class FolderSource:
    """A local imagefolder; every file path is checked to stay inside the folder (no `../`, absolute
    paths or symlinks out)."""

    def __init__(self, folder: Path, caption_column: str, encoding: str = "utf-8"):
        self.folder = folder.resolve()
        self.rows, self.unreadable = _read_metadata(folder, caption_column, encoding)

    def __len__(self) -> int:
        return len(self.rows)

    def name(self, index: int) -> str:
        return str(self.rows[index].file_name)

    def resolve(self, index: int) -> Path:
        row = self.rows[index]
        name = str(row.file_name)
        if not isinstance(row.file_name, str) or not name.strip():
            raise BadSample("missing file_name", f"metadata line {row.line}")
        if "\0" in name:
            raise BadSample("NUL byte in file_name", repr(name)[:80])
        try:
            if Path(name).is_absolute():
                raise BadSample("absolute path in file_name", name)
            path = (self.folder / name).resolve()  # follows symlinks
            if not path.is_relative_to(self.folder):
                raise BadSample("path escapes the dataset folder", name)
            if not path.is_file():
                raise BadSample("missing file", name)
        except RuntimeError as err:  # Python 3.11: a symlink loop
            raise BadSample("symlink loop", name) from err
        except OSError as err:
            kind = {errno.ELOOP: "symlink loop", errno.ENAMETOOLONG: "file_name too long"}.get(err.errno,
                                                                                              "unreadable file")
            raise BadSample(kind, name[:80], err.strerror or "") from err
        return path

    def fingerprint(self, index: int) -> str:
        path = self.resolve(index)
        try:
            return hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as err:
            raise BadSample("unreadable file", self.name(index), err.strerror or "") from err

    def caption(self, index: int) -> Caption:
        return normalise_caption(self.rows[index].caption, self.name(index), [])

    def get(self, index: int, notes: Optional[list[str]] = None) -> tuple[Image.Image, Caption]:
        notes = notes if notes is not None else []
        path = self.resolve(index)
        caption = normalise_caption(self.rows[index].caption, str(self.rows[index].file_name), notes)
        return decode_image(path, str(self.rows[index].file_name), notes), caption


def _metadata_text(meta: Path, encoding: str) -> str:
    """The metadata file as text: a UTF-8 byte-order mark (Excel's "CSV UTF-8") is dropped, and bytes that
    are not `encoding` stop the run naming the line, instead of training on replacement characters."""
    data = meta.read_bytes()
    try:
        return data.decode("utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding)
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ConfigError(
            f"data.dataset: {meta} is not {encoding} text (line {line}: byte {data[err.start]:#04x}); save it as "
            "UTF-8 (Excel: 'CSV UTF-8'), or set data.metadata_encoding to its encoding (e.g. cp1252 or latin-1)"
        ) from err


def _read_metadata(folder: Path, caption_column: str, encoding: str = "utf-8") -> tuple[list[FolderRow], list]:
    """The rows of metadata.jsonl or metadata.csv, and the (line, reason) of every line that cannot be read."""
    rows: list[FolderRow] = []
    unreadable: list[tuple[int, str]] = []
    jsonl, csv_file = folder / "metadata.jsonl", folder / "metadata.csv"
    if jsonl.is_file() and csv_file.is_file():
        raise ConfigError(f"data.dataset: {folder} holds both metadata.jsonl and metadata.csv; keep one (ldm, like "
                          "the Hugging Face imagefolder loader, would read only one and ignore the other)")
    if not jsonl.is_file() and not csv_file.is_file():
        rows, unreadable = _read_caption_files(folder)
        if not rows:
            raise ConfigError(
                f"data.dataset: folder {str(folder)!r} has no metadata.jsonl or metadata.csv and no caption files; "
                "add a metadata file with a 'file_name' column and a caption column, or a same-named .txt (or "
                ".caption) beside each image (see docs/guides/your-data.md)"
            )
        return rows, unreadable
    meta = jsonl if jsonl.is_file() else csv_file
    text = _metadata_text(meta, encoding)
    columns: set[str] = set()
    if meta is jsonl:
        if text.lstrip().startswith("["):
            raise ConfigError(
                f"data.dataset: {meta} holds a JSON array; JSON Lines has one object per line. Convert it with "
                f"python -c \"import json,sys; [print(json.dumps(r)) for r in json.load(open(sys.argv[1]))]\" "
                f"{meta} > metadata.jsonl.new, then replace the file"
            )
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                unreadable.append((n, "unreadable metadata line (not JSON)"))
                continue
            if not isinstance(row, dict):
                unreadable.append((n, "unreadable metadata line (not a JSON object)"))
                continue
            columns |= row.keys()
            rows.append(FolderRow(row.get("file_name"), row.get(caption_column), n))
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""), restkey=_EXTRA)
        columns = set(reader.fieldnames or [])
        for row in reader:
            n = reader.line_num
            if row.get(_EXTRA):
                unreadable.append((n, "CSV row has more fields than the header (quote captions that contain "
                                      "commas)"))
            elif None in row.values():
                unreadable.append((n, "CSV row has fewer fields than the header"))
            else:
                rows.append(FolderRow(row.get("file_name"), row.get(caption_column), n))
    if "file_name" not in columns:
        raise ConfigError(f"data.dataset: {meta} needs a 'file_name' column; its columns are "
                          f"{', '.join(map(repr, sorted(columns)))}")
    if caption_column not in columns:
        raise ConfigError(f"config key 'data.caption_column': {meta} has no column {caption_column!r}; its columns "
                          f"are {', '.join(map(repr, sorted(columns)))}")
    return rows, unreadable


_EXTRA = "\0extra fields"


CAPTION_SUFFIXES = (".txt", ".caption")  # kohya-ss's convention: the caption file beside its image


def _read_caption_files(folder: Path) -> tuple[list[FolderRow], list]:
    """Rows of a folder captioned by side files: every image (any depth, sorted by path) with the text of the
    same-named .txt or .caption. Each non-empty line of that file is one caption (several lines: alternatives,
    one chosen per use). An image without one is counted as missing its caption, never silently dropped."""
    extensions = set(Image.registered_extensions())
    rows: list[FolderRow] = []
    unreadable: list[tuple[int, str]] = []
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in extensions and p.is_file())
    if not any(p.with_suffix(s).is_file() for p in images for s in CAPTION_SUFFIXES):
        return [], []
    for n, path in enumerate(images, start=1):
        name = path.relative_to(folder).as_posix()
        side = next((path.with_suffix(s) for s in CAPTION_SUFFIXES if path.with_suffix(s).is_file()), None)
        caption: object = None
        if side is not None:
            try:
                lines = [ln.strip() for ln in side.read_bytes().decode("utf-8-sig").splitlines() if ln.strip()]
            except UnicodeDecodeError:
                caption = BadSample("caption file is not UTF-8 text", name, side.name)
            else:
                caption = lines[0] if len(lines) == 1 else (lines or "")
        rows.append(FolderRow(name, caption, n))
    return rows, unreadable


class HubSource:
    """A `datasets.Dataset` (Hub); images decoded here so a bad one is counted, not fatal."""

    def __init__(self, dataset, image_column: str, caption_column: str, origin: str):
        from datasets import Image as ImageFeature

        self.dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
        self.image_column, self.caption_column, self.origin = image_column, caption_column, origin

    def __len__(self) -> int:
        return len(self.dataset)

    def _ref(self, row: dict) -> dict:
        """The image's {bytes, path} reference in a row ({} when missing)."""
        return row[self.image_column] or {}

    def _raw_caption(self, row: dict) -> object:
        return row[self.caption_column]

    def name(self, index: int) -> str:
        return self._ref(self.dataset[index]).get("path") or f"{self.origin}[{index}]"

    def caption(self, index: int) -> Caption:
        return normalise_caption(self._raw_caption(self.dataset[index]), self.name(index), [])

    def fingerprint(self, index: int) -> str:
        ref = self._ref(self.dataset[index])
        data = ref.get("bytes") or (Path(ref["path"]).read_bytes() if ref.get("path") else b"")
        return hashlib.sha256(data).hexdigest()

    def get(self, index: int, notes: Optional[list[str]] = None) -> tuple[Image.Image, Caption]:
        notes = notes if notes is not None else []
        row = self.dataset[index]
        ref, name = self._ref(row), self.name(index)
        data = ref.get("bytes") or (Path(ref["path"]) if ref.get("path") else None)
        if data is None:
            raise BadSample("missing image", name)
        caption = normalise_caption(self._raw_caption(row), name, notes)
        return decode_image(data, name, notes), caption


SHARD_BUILDERS = {".tar": "webdataset", ".parquet": "parquet"}  # file suffix → the datasets builder that reads it


def shard_files(dataset: str) -> Optional[tuple[str, list[str] | str]]:
    """(builder, data_files) when `dataset` names shards: a local folder holding *.tar or *.parquet files (and
    no metadata file), or a path, glob or fsspec URL (hf://, s3://, https://…) ending in .tar or .parquet."""
    folder = Path(dataset).expanduser()
    if folder.is_dir():
        if (folder / "metadata.jsonl").is_file() or (folder / "metadata.csv").is_file():
            return None
        for suffix, builder in SHARD_BUILDERS.items():
            files = sorted(str(p) for p in folder.glob(f"*{suffix}"))
            if files:
                return builder, files
        return None
    for suffix, builder in SHARD_BUILDERS.items():
        if dataset.endswith(suffix):
            return builder, dataset
    return None


class ShardSource(HubSource):
    """Webdataset tars or parquet files (ldm.data.shards writes both), read map-style by the `datasets` library: one
    Arrow table, memory-mapped, so index i is the same sample on every rank and after a resume. The image is
    whichever image column a row fills (webdataset names a column per file extension); the caption is the
    `txt` member (webdataset) or data.caption_column (parquet), one line per alternative, like a caption file."""

    def __init__(self, dataset, caption_column: str, origin: str):
        from datasets import Image as ImageFeature

        self.image_columns = [c for c, f in dataset.features.items() if isinstance(f, ImageFeature)]
        if not self.image_columns:
            raise ConfigError(f"data.dataset: the shards of {origin!r} hold no image files (columns "
                              f"{', '.join(dataset.column_names)}); write them with scripts/make_shards.py")
        caption_column = next((c for c in (caption_column, "txt", "text") if c in dataset.column_names),
                              caption_column)
        if caption_column not in dataset.column_names:
            raise ConfigError(f"config key 'data.caption_column': the shards of {origin!r} have no column "
                              f"{caption_column!r} (nor a .txt member); columns: {', '.join(dataset.column_names)}")
        for column in self.image_columns:
            dataset = dataset.cast_column(column, ImageFeature(decode=False))
        self.dataset, self.caption_column, self.origin = dataset, caption_column, origin
        self.image_column = self.image_columns[0]

    def _ref(self, row: dict) -> dict:
        return next((row[c] for c in self.image_columns if row[c]), {})

    def _raw_caption(self, row: dict) -> object:
        text = row[self.caption_column]
        if isinstance(text, str) and "\n" in text.strip():
            return [line for line in text.splitlines() if line.strip()]
        return text

    def name(self, index: int) -> str:
        row = self.dataset[index]
        key = row.get("__key__") or str(index)
        return f"{Path(row['__url__']).name}:{key}" if row.get("__url__") else f"{self.origin}[{key}]"


def open_shards(cfg: DataConfig, builder: str, files: list[str] | str) -> ShardSource:
    from datasets import load_dataset

    try:
        dataset = load_dataset(builder, data_files={"train": files}, split="train")
    except Exception as err:
        raise ConfigError(
            f"data.dataset: could not read the {builder} shards {cfg.dataset!r} ({type(err).__name__}: {err})"[:400]
            + "; check the path or URL (remote URLs need the network and, for s3:// or gs://, the fsspec package "
            "for that store)") from err
    return ShardSource(dataset, cfg.caption_column, cfg.dataset)


def open_source(cfg: DataConfig) -> Source:
    """The configured dataset, with its columns checked before any model is built."""
    if cfg.dataset == "shapes":
        return ShapesSource(cfg)
    shards = shard_files(cfg.dataset)
    if shards is not None:
        return open_shards(cfg, *shards)
    folder = Path(cfg.dataset).expanduser()
    if folder.is_dir():
        return FolderSource(folder, cfg.caption_column, cfg.metadata_encoding)
    if cfg.dataset.startswith((".", "/", "~")):
        raise ConfigError(f"data.dataset: folder {cfg.dataset!r} does not exist")
    from datasets import load_dataset

    try:
        dataset = load_dataset(cfg.dataset, split=cfg.split)
    except Exception as err:
        raise ConfigError(
            f"data.dataset: could not load {cfg.dataset!r} (split {cfg.split!r}): it is not a local folder, and "
            f"the Hub dataset is not cached or cannot be reached (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE). "
            f"({type(err).__name__}: {err})"
        ) from err
    for key, col in (("data.image_column", cfg.image_column), ("data.caption_column", cfg.caption_column)):
        if col not in dataset.column_names:
            raise ConfigError(f"config key '{key}': dataset {cfg.dataset!r} has no column {col!r}; "
                              f"its columns are {', '.join(dataset.column_names)}")
    return HubSource(dataset, cfg.image_column, cfg.caption_column, cfg.dataset)
