"""MTL-AQA annotations and splits: a restricted pickle importer and the project's own plain formats.

MTL-AQA ships three pickles (layout kept exactly by :func:`save_annotations` / :func:`save_split`):

* ``final_annotations_dict.pkl``: ``{(video, clip): {"start_frame": int, "end_frame": int,
  "difficulty": float, "final_score": float, "position": int, "armstand": int, "rotation_type": int,
  "ss_no": int, "tw_no": int, "primary_view": int}}``; ``start_frame..end_frame`` is inclusive.
* ``train_split_0.pkl`` / ``test_split_0.pkl``: ``[(video, clip), ...]``.

A pickle can run arbitrary code when loaded, so these files are only ever read by
:func:`restricted_load`, which refuses every global except the handful of builtin containers and
numpy scalar constructors such files may contain. Users who would rather avoid pickle entirely can
convert once to JSON or CSV (``.json`` / ``.csv`` paths are accepted everywhere a ``.pkl`` is).
:func:`restricted_load` lives in :mod:`deepsports.data.safe_pickle`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import numbers
import os
import pickle
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepsports.data.safe_pickle import restricted_load
from deepsports.errors import DataError
from deepsports.fileio import atomic_write

__all__ = ["ClipAnnotation", "MtlAqaFiles", "shipped_annotation_files", "load_annotations", "load_split",
           "save_annotations", "save_split", "video_filename", "annotation_fingerprint",
           "REQUIRED_FIELDS", "INT_FIELDS"]

#: Fields every annotation record must have.
REQUIRED_FIELDS = ("start_frame", "end_frame", "difficulty", "final_score")
#: Fields that are integers wherever they appear (the MTL-AQA extras are class labels and counts).
INT_FIELDS = ("start_frame", "end_frame", "position", "armstand", "rotation_type", "ss_no", "tw_no", "primary_view")
#: Field order of the original ``final_annotations_dict.pkl`` (kept when writing a pickle).
_MTL_FIELD_ORDER = ("primary_view", "start_frame", "end_frame", "position", "difficulty", "armstand",
                    "rotation_type", "ss_no", "tw_no", "final_score")
_JSON_ANNOTATIONS = "deepsports-annotations"
_JSON_SPLIT = "deepsports-split"
_FORMAT_VERSION = 1
# Protocol 3 is what MTL-AQA's own files use; any Python 3 reader accepts it.
_PICKLE_PROTOCOL = 3


# --------------------------------------------------------------------------------------------
# The MTL-AQA annotation and split files shipped with the package
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MtlAqaFiles:
    """Paths of MTL-AQA's annotation pickle and its split-0 train/test pickles."""

    annotations: Path
    train: Path
    test: Path


def shipped_annotation_files() -> MtlAqaFiles:
    """The MTL-AQA pickles shipped inside the package (package data ``deepsports/data/mtl_aqa``).

    They are MTL-AQA's own files, as its repository distributes them, so ``dataset=mtl_aqa`` needs
    only the videos. They are read by :func:`restricted_load` like any user-given pickle.
    """
    from importlib.resources import files

    # A regular (non-zipped) install: the resource is a real file on disk.
    folder = Path(str(files("deepsports.data") / "mtl_aqa"))
    return MtlAqaFiles(folder / "final_annotations_dict.pkl", folder / "train_split_0.pkl", folder / "test_split_0.pkl")


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------

class _FrozenMapping(Mapping):
    """A read-only, hashable, picklable mapping (a frozen dataclass must not hold a mutable dict)."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, int | float] = ()) -> None:
        self._data = dict(data)

    def __getitem__(self, key: str) -> int | float:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __repr__(self) -> str:
        return repr(self._data)

    def __reduce__(self) -> tuple:
        return (_FrozenMapping, (self._data,))


@dataclass(frozen=True)
class ClipAnnotation:
    """One dive: frames ``start_frame..end_frame`` (inclusive) of ``whole_videos/<video:02d>.mp4``.

    ``extra`` holds the remaining MTL-AQA fields (position, armstand, rotation_type, ss_no, tw_no,
    primary_view, ...) as ints/floats.
    """

    video: int
    clip: int
    start_frame: int
    end_frame: int
    difficulty: float
    final_score: float
    extra: Mapping[str, int | float] = _FrozenMapping()

    def __post_init__(self) -> None:
        if not isinstance(self.extra, _FrozenMapping):
            object.__setattr__(self, "extra", _FrozenMapping(self.extra))

    @property
    def key(self) -> tuple[int, int]:
        return (self.video, self.clip)

    @property
    def num_frames(self) -> int:
        return self.end_frame - self.start_frame + 1

    def to_record(self) -> dict[str, int | float]:
        """The MTL-AQA dict of this clip (original field order first)."""
        fields = {"start_frame": self.start_frame, "end_frame": self.end_frame, "difficulty": self.difficulty,
                  "final_score": self.final_score, **self.extra}
        ordered = {name: fields[name] for name in _MTL_FIELD_ORDER if name in fields}
        ordered.update((name, value) for name, value in fields.items() if name not in ordered)
        return ordered


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_key(key: Any, source: str, what: str) -> tuple[int, int]:
    if (not isinstance(key, (tuple, list)) or len(key) != 2 or not all(_is_int(part) for part in key)
            or any(int(part) < 0 for part in key)):
        raise DataError(f"{source}: {what} {key!r} is not a (video, clip) pair of non-negative integers")
    return int(key[0]), int(key[1])


def _field_error(source: str, key: tuple[int, int], name: str, value: Any, expected: str) -> DataError:
    return DataError(f"{source}: clip {key}: field {name!r}={value!r} is invalid: expected {expected}")


def _validate_record(key: tuple[int, int], record: Any, source: str) -> ClipAnnotation:
    if not isinstance(record, Mapping):
        raise DataError(f"{source}: clip {key}: record is a {type(record).__name__}, expected a dict of fields")
    missing = [name for name in REQUIRED_FIELDS if name not in record]
    if missing:
        raise DataError(f"{source}: clip {key}: missing field(s) {', '.join(missing)} "
                        f"(required: {', '.join(REQUIRED_FIELDS)})")
    values: dict[str, int | float] = {}
    for name, value in record.items():
        if not isinstance(name, str):
            raise DataError(f"{source}: clip {key}: field name {name!r} is not a string")
        if name in INT_FIELDS:
            if not _is_int(value) or int(value) < 0:
                raise _field_error(source, key, name, value, "a non-negative integer")
            values[name] = int(value)
        elif _is_real(value) and math.isfinite(float(value)):
            # Real MTL-AQA stores difficulty/final_score as floats; an int there is the same number.
            values[name] = float(value) if name in ("difficulty", "final_score") or not _is_int(value) else int(value)
        else:
            raise _field_error(source, key, name, value, "a finite number")
    if values["end_frame"] < values["start_frame"]:
        raise _field_error(source, key, "end_frame", values["end_frame"],
                           f">= start_frame ({values['start_frame']})")
    if values["difficulty"] <= 0:
        raise _field_error(source, key, "difficulty", values["difficulty"], "a number > 0")
    if values["final_score"] < 0:
        raise _field_error(source, key, "final_score", values["final_score"], "a number >= 0")
    extra = {name: value for name, value in values.items() if name not in REQUIRED_FIELDS}
    return ClipAnnotation(video=key[0], clip=key[1], start_frame=values["start_frame"], end_frame=values["end_frame"],
                          difficulty=values["difficulty"], final_score=values["final_score"], extra=extra)


def _validate_annotations(data: Any, source: str) -> dict[tuple[int, int], ClipAnnotation]:
    if not isinstance(data, Mapping):
        raise DataError(f"{source}: expected a dict of (video, clip) -> fields, got {type(data).__name__}")
    if not data:
        raise DataError(f"{source}: holds no clips")
    out: dict[tuple[int, int], ClipAnnotation] = {}
    for raw_key, record in data.items():
        key = _check_key(raw_key, source, "key")
        if key in out:
            raise DataError(f"{source}: clip {key} appears twice")
        out[key] = _validate_record(key, record, source)
    return out


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def _suffix(path: Path, what: str) -> str:
    suffix = path.suffix.lower()
    if suffix == ".pickle":
        return ".pkl"
    if suffix not in (".pkl", ".json", ".csv"):
        raise DataError(f"{what} {str(path)!r} has an unsupported extension {path.suffix!r}: expected .pkl, .json or .csv")
    return suffix


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from exc


def _read_json(path: Path, expected_format: str) -> Any:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != expected_format or "clips" not in data:
        raise DataError(f"{path}: expected a JSON object with \"format\": \"{expected_format}\" and \"clips\"")
    if data.get("version") != _FORMAT_VERSION:
        raise DataError(f"{path}: unsupported {expected_format} version {data.get('version')!r} "
                        f"(this DeepSports reads version {_FORMAT_VERSION})")
    if not isinstance(data["clips"], list):
        raise DataError(f"{path}: \"clips\" must be a list")
    return data["clips"]


def _parse_csv_number(text: str, name: str, source: str, line: int) -> int | float:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise DataError(f"{source}: line {line}: field {name!r}={text!r} is not a number") from None


def _read_csv(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, int | float]]]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    header = reader.fieldnames or []
    missing = [name for name in required if name not in header]
    if missing:
        raise DataError(f"{path}: CSV header lacks column(s) {', '.join(missing)} (header: {', '.join(header)})")
    for row in reader:
        line = reader.line_num
        if None in row:
            raise DataError(f"{path}: line {line} has more cells than the header")
        yield line, {name: _parse_csv_number(text.strip(), name, str(path), line)
                     for name, text in row.items() if text is not None and text.strip() != ""}


def load_annotations(path: str | os.PathLike) -> dict[tuple[int, int], ClipAnnotation]:
    """Read ``final_annotations_dict.pkl`` (restricted unpickler) or the project's ``.json`` / ``.csv``.

    Returns ``{(video, clip): ClipAnnotation}``. Every record is validated; a bad one raises
    :class:`DataError` naming the file, the clip and the field.
    """
    path = Path(path)
    suffix = _suffix(path, "annotation file")
    if suffix == ".pkl":
        return _validate_annotations(restricted_load(path), str(path))
    if suffix == ".json":
        data: dict[Any, Any] = {}
        for index, item in enumerate(_read_json(path, _JSON_ANNOTATIONS)):
            if not isinstance(item, dict):
                raise DataError(f"{path}: clips[{index}] is not an object")
            record = dict(item)
            key = _check_key((record.pop("video", None), record.pop("clip", None)), str(path), f"clips[{index}] key")
            if key in data:
                raise DataError(f"{path}: clip {key} appears twice")
            data[key] = record
        return _validate_annotations(data, str(path))
    data = {}
    for line, record in _read_csv(path, ("video", "clip", *REQUIRED_FIELDS)):
        key = _check_key((record.pop("video", None), record.pop("clip", None)), str(path), f"line {line} key")
        if key in data:
            raise DataError(f"{path}: clip {key} appears twice")
        data[key] = record
    return _validate_annotations(data, str(path))


def _validate_split(items: Any, source: str) -> list[tuple[int, int]]:
    if not isinstance(items, (list, tuple)):
        raise DataError(f"{source}: expected a list of (video, clip) pairs, got {type(items).__name__}")
    keys = [_check_key(item, source, f"entry {index}") for index, item in enumerate(items)]
    if not keys:
        raise DataError(f"{source}: the split is empty")
    seen: set[tuple[int, int]] = set()
    repeated = [key for key in keys if key in seen or seen.add(key)]
    if repeated:
        raise DataError(f"{source}: clip(s) listed more than once: {_preview(repeated)}")
    return keys


def _preview(keys: list[tuple[int, int]], limit: int = 10) -> str:
    shown = ", ".join(str(key) for key in keys[:limit])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_split(path: str | os.PathLike, annotations: Mapping[tuple[int, int], Any] | None = None) -> list[tuple[int, int]]:
    """Read a split (``train_split_0.pkl``-style list of (video, clip), or our ``.json`` / ``.csv``).

    With ``annotations``, every key must be one of its clips; unknown keys raise :class:`DataError`
    naming them. An empty split, a repeated key or a malformed entry is an error too.
    """
    path = Path(path)
    suffix = _suffix(path, "split file")
    if suffix == ".pkl":
        items = restricted_load(path)
    elif suffix == ".json":
        items = _read_json(path, _JSON_SPLIT)
    else:
        items = [(row.get("video"), row.get("clip")) for _, row in _read_csv(path, ("video", "clip"))]
    keys = _validate_split(items, str(path))
    if annotations is not None:
        unknown = [key for key in keys if key not in annotations]
        if unknown:
            raise DataError(f"{path}: {len(unknown)} clip(s) are not in the annotations: {_preview(unknown)}")
    return keys


def _atomic_write(path: Path, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def _as_annotations(annotations: Mapping[tuple[int, int], ClipAnnotation] | Iterable[ClipAnnotation]) -> list[ClipAnnotation]:
    items = list(annotations.values()) if isinstance(annotations, Mapping) else list(annotations)
    for item in items:
        if not isinstance(item, ClipAnnotation):
            raise DataError(f"cannot save {item!r}: expected ClipAnnotation values")
    return items


def save_annotations(annotations: Mapping[tuple[int, int], ClipAnnotation] | Iterable[ClipAnnotation],
                     path: str | os.PathLike) -> Path:
    """Write annotations as ``.json`` / ``.csv`` (our formats) or ``.pkl`` (MTL-AQA's layout), atomically."""
    path = Path(path)
    suffix = _suffix(path, "annotation file")
    items = _as_annotations(annotations)
    if suffix == ".pkl":
        payload = pickle.dumps({item.key: item.to_record() for item in items}, protocol=_PICKLE_PROTOCOL)
    elif suffix == ".json":
        clips = [{"video": item.video, "clip": item.clip, **item.to_record()} for item in items]
        payload = (json.dumps({"format": _JSON_ANNOTATIONS, "version": _FORMAT_VERSION, "clips": clips}, indent=1)
                   + "\n").encode()
    else:
        columns = ["video", "clip", *(name for name in _MTL_FIELD_ORDER if name in REQUIRED_FIELDS)]
        for item in items:
            columns += [name for name in item.to_record() if name not in columns]
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for item in items:
            # repr() of a float round-trips exactly; csv would write str(), which does too in Python 3.
            writer.writerow({"video": item.video, "clip": item.clip,
                             **{name: repr(value) for name, value in item.to_record().items()}})
        payload = buffer.getvalue().encode()
    _atomic_write(path, payload)
    return path


def save_split(keys: Iterable[tuple[int, int]], path: str | os.PathLike) -> Path:
    """Write a split as ``.pkl`` (MTL-AQA's list of tuples), ``.json`` or ``.csv``, atomically."""
    path = Path(path)
    suffix = _suffix(path, "split file")
    pairs = _validate_split(list(keys), f"split for {path}")
    if suffix == ".pkl":
        payload = pickle.dumps(pairs, protocol=_PICKLE_PROTOCOL)
    elif suffix == ".json":
        payload = (json.dumps({"format": _JSON_SPLIT, "version": _FORMAT_VERSION, "clips": [list(p) for p in pairs]})
                   + "\n").encode()
    else:
        payload = ("video,clip\n" + "".join(f"{video},{clip}\n" for video, clip in pairs)).encode()
    _atomic_write(path, payload)
    return path


def video_filename(video: int) -> str:
    """``1 -> "01.mp4"``: the name of a whole video under ``<root>/whole_videos/``."""
    if not _is_int(video) or video < 0:
        raise DataError(f"video id {video!r} is not a non-negative integer")
    return f"{int(video):02d}.mp4"


def annotation_fingerprint(path: str | os.PathLike) -> str:
    """First 16 hex digits of the SHA-256 of the file's bytes (recorded with runs and caches)."""
    path = Path(path)
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise DataError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from exc
    return digest.hexdigest()[:16]
