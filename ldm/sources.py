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
import unicodedata
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol, Union

from PIL import Image, ImageOps, UnidentifiedImageError

from ldm.config import ConfigError, DataConfig

Caption = Union[str, tuple[str, ...]]  # a tuple: alternatives, one chosen per use (ldm.data.caption_for)


class Source(Protocol):
    def __len__(self) -> int: ...
    def get(self, index: int) -> tuple[Image.Image, Caption]: ...
    def caption(self, index: int) -> Caption: ...  # without decoding the image
    def fingerprint(self, index: int) -> str: ...  # sha256 of the image's bytes


class BadSample(ValueError):
    """One sample cannot be used; `reason` is the counted kind."""

    def __init__(self, reason: str, name: str, detail: str = ""):
        super().__init__(f"{name}: {reason}{' (' + detail + ')' if detail else ''}")
        self.reason, self.name = reason, name


def decode_image(data: bytes | Path, name: str, notes: Optional[list[str]] = None) -> Image.Image:
    """Open and fully decode an image; raise BadSample naming the kind of failure.

    A damaged file can make a decoder raise almost anything (struct.error, IndexError, ZeroDivisionError,
    EOFError…), so every exception from decoding is this sample's problem, named and counted, never the run's."""
    notes = notes if notes is not None else []
    try:
        if isinstance(data, Path) and data.stat().st_size == 0 or isinstance(data, bytes) and not data:
            raise BadSample("empty file", name)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)  # e.g. "Corrupt EXIF data": handled below
            image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
            if getattr(image, "n_frames", 1) > 1:
                notes.append("animated image: first frame used")
                image.seek(0)
            image.load()
    except BadSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadSample("decompression bomb (too many pixels)", name, str(err)[:80]) from err
    except UnidentifiedImageError as err:
        raise BadSample("not an image or corrupt", name) from err
    except MemoryError as err:
        raise BadSample("too large to decode", name) from err
    except Exception as err:  # noqa: BLE001 (see the docstring)
        kind = "truncated image" if "truncated" in str(err) else "corrupt image data"
        raise BadSample(kind, name, f"{type(err).__name__}: {err}"[:80]) from err
    try:
        orientation = image.getexif().get(0x0112, 1)
        transposed = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 (corrupt EXIF: the pixels are fine, the rotation is unknown)
        notes.append("unreadable EXIF: orientation not applied")
        return image
    if transposed is not image and orientation != 1:
        notes.append("EXIF orientation applied")
    return transposed


_INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff"  # zero-width characters and BOMs that str.strip keeps


def normalise_caption(caption: object, name: str, notes: list[str]) -> Caption:
    """A usable caption (stripped text), or a tuple of them when the column holds a list of alternatives."""
    if isinstance(caption, BadSample):  # found unusable while reading (e.g. a caption file that is not UTF-8)
        raise caption
    if isinstance(caption, (list, tuple)):
        entries = [c for c in caption if isinstance(c, str) and c.strip(" \t\n\r" + _INVISIBLE)]
        if not entries:
            raise BadSample("caption list has no usable entry", name, repr(caption)[:60])
        if len(entries) < len(caption):
            notes.append("caption list: unusable entries dropped")
        texts = tuple(dict.fromkeys(_caption_text(c, name) for c in entries))
        if len(texts) == 1:
            return texts[0]
        notes.append("caption list: one entry chosen per use")
        return texts
    if caption is None:
        raise BadSample("missing caption", name)
    if not isinstance(caption, str):
        if isinstance(caption, (int, float, bool)):
            notes.append("non-string caption converted to text")
            caption = str(caption)
        else:
            raise BadSample("unusable caption type", name, type(caption).__name__)
    return _caption_text(caption, name)


def _caption_text(caption: str, name: str) -> str:
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError as err:
        raise BadSample("caption is not valid Unicode (a lone surrogate)", name, repr(caption)[:60]) from err
    if not caption.strip():
        raise BadSample("empty caption", name)
    if not any(unicodedata.category(ch)[0] not in "CZ" for ch in caption):
        raise BadSample("caption has no visible characters", name, repr(caption)[:60])
    return caption.strip().strip(_INVISIBLE).strip()


def caption_variants(caption: Caption) -> tuple[str, ...]:
    """Every text a caption can be used as (one, or each alternative of a list)."""
    return caption if isinstance(caption, tuple) else (caption,)


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


class ShapesSource:
    def __init__(self, cfg: DataConfig):
        from ldm.shapes import ShapesDataset, parse_holdout

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
                ".caption) beside each image (see README, 'Your own images')"
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
    """Webdataset tars or parquet files (ldm.shards writes both), read map-style by the `datasets` library: one
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


# --------------------------------------------------------------------------------------------
# The audit
# --------------------------------------------------------------------------------------------


@dataclass
class DataReport:
    total: int = 0
    kept: list[int] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    converted: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) of each kept image, upright

    def note(self, kind: str, name: str, counter: Counter) -> None:
        counter[kind] += 1
        self.examples.setdefault(kind, [])
        if len(self.examples[kind]) < 3:
            self.examples[kind].append(name)

    @property
    def bad_fraction(self) -> float:
        return sum(self.skipped.values()) / max(self.total, 1)

    def to_dict(self) -> dict:
        return {"total": self.total, "usable": len(self.kept), "skipped": dict(self.skipped),
                "converted": dict(self.converted), "examples": self.examples}

    def summary(self) -> str:
        lines = [f"data audit: {len(self.kept)} of {self.total} samples usable"]
        for title, counter in (("skipped", self.skipped), ("converted", self.converted)):
            for kind, n in counter.most_common():
                lines.append(f"  {title:9s} {n:6d} × {kind}  e.g. {', '.join(self.examples[kind])}")
        return "\n".join(lines)


AFTER_AUDIT = "went_bad_after_audit"


def record_after_audit(audit_file: Optional[Path], bad: BadSample, where: str) -> None:
    """Count a sample that passed the audit but no longer decodes in `audit_file` (data_audit.json), under
    `went_bad_after_audit`: {name: {"reason", "where"}}, one entry per file however often it is met. Ranks and
    data-loader workers may meet bad files at once, so the update holds an exclusive lock on a sibling file."""
    if audit_file is None or not audit_file.is_file():
        return
    import fcntl

    with open(audit_file.with_name(audit_file.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        report = json.loads(audit_file.read_text())
        seen = report.setdefault(AFTER_AUDIT, {})
        if bad.name in seen:
            return
        seen[bad.name] = {"reason": bad.reason, "where": where}
        tmp = audit_file.with_name(audit_file.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(audit_file)


def audit(source: Source, cfg: DataConfig, tokenizer=None) -> DataReport:
    """Decode every sample once; count what is converted and what is skipped."""
    from ldm.data import to_rgb

    report = DataReport(total=len(source) + len(getattr(source, "unreadable", [])))
    for line, reason in getattr(source, "unreadable", []):
        report.note(reason, f"line {line}", report.skipped)
    if isinstance(source, ShapesSource):  # procedural: nothing to check
        report.kept = list(range(len(source)))
        return report
    limit = tokenizer.model_max_length if tokenizer is not None else None
    min_side = cfg.min_image_size if cfg.min_image_size is not None else max(cfg.resolution // 4, 1)
    for index in range(len(source)):
        notes: list[str] = []
        try:
            image, caption = source.get(index, notes)
            w, h = image.size
            if min(w, h) < min_side:
                raise BadSample(f"image smaller than {min_side} px", source.name(index), f"{w}×{h}")
            if max(w, h) / min(w, h) > cfg.max_aspect_ratio:
                raise BadSample(f"aspect ratio above {cfg.max_aspect_ratio:g}", source.name(index), f"{w}×{h}")
            to_rgb(image, source.name(index), notes)
        except BadSample as bad:
            report.note(bad.reason, bad.name, report.skipped)
            continue
        if limit is not None and any(len(tokenizer(c, truncation=False).input_ids) > limit
                                     for c in caption_variants(caption)):
            notes.append(f"caption longer than {limit} tokens: truncated")
        for kind in notes:
            report.note(kind, source.name(index), report.converted)
        report.kept.append(index)
        report.sizes.append((w, h))
    if report.bad_fraction > cfg.max_bad_fraction or not report.kept:
        offenders = [n for kind in report.skipped for n in report.examples[kind]]
        raise ConfigError(
            f"{report.summary()}\n{100 * report.bad_fraction:.1f} % of the samples are unusable, more than "
            f"data.max_bad_fraction={cfg.max_bad_fraction:g}; fix or remove them (e.g. {', '.join(offenders[:10])}) "
            "or raise data.max_bad_fraction"
        )
    return report


class AuditedSource:
    """Only the samples an audit kept, renumbered 0..n-1."""

    def __init__(self, source: Source, report: DataReport):
        self.source, self.report, self.kept = source, report, report.kept

    def __len__(self) -> int:
        return len(self.kept)

    def get(self, index: int) -> tuple[Image.Image, Caption]:
        return self.source.get(self.kept[index])

    def caption(self, index: int) -> Caption:
        return self.source.caption(self.kept[index])

    def fingerprint(self, index: int) -> str:
        return self.source.fingerprint(self.kept[index])

    def size(self, index: int) -> tuple[int, int]:
        """(width, height) as the audit decoded it (after EXIF rotation): bucketing reads no image again."""
        return self.report.sizes[index]


def open_audited(cfg: DataConfig, tokenizer=None, accelerator=None) -> Source:
    """`open_source` + `audit` (on the main process; the verdict is shared with the others)."""
    source = open_source(cfg)
    if not cfg.audit or isinstance(source, ShapesSource):
        return source
    main = accelerator is None or accelerator.is_main_process
    outcome: object = None
    if main:
        try:
            outcome = audit(source, cfg, tokenizer)
            print(outcome.summary())
        except ConfigError as err:
            outcome = err
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        outcome = broadcast_object_list([outcome])[0]
    if isinstance(outcome, ConfigError):
        raise outcome
    return AuditedSource(source, outcome)
