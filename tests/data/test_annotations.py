"""MTL-AQA importer: the real annotation files, the restricted unpickler, validation and our plain formats."""

from __future__ import annotations

import builtins
import hashlib
import io
import os
import pickle

import numpy as np
import pytest

from deepsports.data.annotations import (
    ClipAnnotation,
    annotation_fingerprint,
    load_annotations,
    load_split,
    save_annotations,
    save_split,
    video_filename,
)
from deepsports.data.safe_pickle import restricted_load
from deepsports.errors import DataError, UnsafePickleError

MTL_FIELDS = {"start_frame", "end_frame", "difficulty", "final_score", "position", "armstand", "rotation_type",
              "ss_no", "tw_no", "primary_view"}


@pytest.fixture(scope="module")
def real(mtl_aqa_dir):
    annotations = load_annotations(mtl_aqa_dir / "final_annotations_dict.pkl")
    return (annotations, load_split(mtl_aqa_dir / "train_split_0.pkl", annotations),
            load_split(mtl_aqa_dir / "test_split_0.pkl", annotations))


_DROP = object()


def _record(**changes):
    record = {"primary_view": 0, "start_frame": 10, "end_frame": 99, "position": 2, "difficulty": 3.2, "armstand": 0,
              "rotation_type": 1, "ss_no": 7, "tw_no": 0, "final_score": 81.6}
    record.update(changes)
    return {key: value for key, value in record.items() if value is not _DROP}


def _write_pickle(path, obj, protocol=3):
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


# --- the real MTL-AQA files --------------------------------------------------------------------

def test_real_files_counts_and_splits(real):
    annotations, train, test = real
    assert len(annotations) == 1412
    assert len(train) == 1059 and len(test) == 353
    assert not set(train) & set(test)
    assert set(train) | set(test) <= set(annotations)
    assert all(isinstance(v, int) and isinstance(c, int) for v, c in train + test)


def test_real_files_field_types(real):
    annotations, _, _ = real
    for key, clip in annotations.items():
        assert clip.key == key
        assert type(clip.start_frame) is int and type(clip.end_frame) is int
        assert 0 <= clip.start_frame <= clip.end_frame
        assert type(clip.difficulty) is float and clip.difficulty > 0
        assert type(clip.final_score) is float and clip.final_score >= 0
        assert set(clip.extra) | {"start_frame", "end_frame", "difficulty", "final_score"} == MTL_FIELDS
        assert all(type(value) is int for value in clip.extra.values())
    first = annotations[(1, 1)]  # the first record of the file, as its raw opcodes show
    assert (first.start_frame, first.end_frame, first.difficulty, first.final_score) == (7377, 7462, 3.2, 88.0)
    assert first.num_frames == 86


def test_fingerprint_is_the_sha256_prefix(mtl_aqa_dir):
    path = mtl_aqa_dir / "final_annotations_dict.pkl"
    assert annotation_fingerprint(path) == hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    with pytest.raises(DataError, match="missing.pkl"):
        annotation_fingerprint(mtl_aqa_dir / "missing.pkl")


# --- the restricted unpickler ---------------------------------------------------------------------

class _Exploit:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    marker, control = tmp_path / "pwned", tmp_path / "control"
    # The payload is real: an ordinary pickle.loads runs the command.
    pickle.loads(pickle.dumps(_Exploit(f"touch {control}")))
    assert control.exists()

    path = _write_pickle(tmp_path / "final_annotations_dict.pkl", {(1, 1): _Exploit(f"touch {marker}")})
    with pytest.raises(UnsafePickleError) as info:
        load_annotations(path)
    message = str(info.value)
    assert f"{os.system.__module__}.system" in message and str(path) in message
    assert not marker.exists()


@pytest.mark.parametrize("payload,refused", [
    (b"cbuiltins\neval\n(S'__import__(\"os\").system(\"touch {m}\")'\ntR.", "builtins.eval"),
    (b"cbuiltins\nexec\n(S'open(\"{m}\", \"w\")'\ntR.", "builtins.exec"),
    (b"cbuiltins\ngetattr\n(cbuiltins\nobject\nS'__subclasses__'\ntR.", "builtins.getattr"),
    (b"c__builtin__\n__import__\n(S'os'\ntR.", "__builtin__.__import__"),
    (b"csubprocess\ncall\n((S'touch'\nS'{m}'\nltR.", "subprocess.call"),
    (b"cposix\nsystem\n(S'touch {m}'\ntR.", "posix.system"),
    (b"cnumpy\nload\n(S'{m}'\ntR.", "numpy.load"),
    (b"c_codecs\nencode\n(S'x'\nS'zlib'\ntR.", "codec 'zlib'"),
])
def test_dangerous_globals_are_refused(tmp_path, payload, refused):
    marker = tmp_path / "marker"
    path = tmp_path / "split.pkl"
    path.write_bytes(payload.replace(b"{m}", str(marker).encode()))
    with pytest.raises(UnsafePickleError) as info:
        load_split(path)
    assert refused in str(info.value) and str(path) in str(info.value)
    assert not marker.exists()


def test_stack_global_and_streams_are_checked_too():
    data = pickle.dumps(builtins.getattr, protocol=5)  # STACK_GLOBAL opcode
    with pytest.raises(UnsafePickleError, match=r"builtins\.getattr"):
        restricted_load(io.BytesIO(data))


def test_allowed_builtins_and_numpy_scalars_load(tmp_path):
    values = {"set": {1, 2}, "frozen": frozenset({3}), "complex": 1 + 2j, "bytes": b"x", "none": None}
    assert restricted_load(io.BytesIO(pickle.dumps(values, protocol=2))) == values
    record = _record(start_frame=np.int64(5), end_frame=np.int32(9), difficulty=np.float64(2.5),
                     final_score=np.float32(60.0), ss_no=np.int64(3))
    path = _write_pickle(tmp_path / "ann.pkl", {(np.int64(4), 2): record}, protocol=2)
    clip = load_annotations(path)[(4, 2)]
    assert (clip.start_frame, clip.end_frame, clip.difficulty, clip.final_score) == (5, 9, 2.5, 60.0)
    assert type(clip.start_frame) is int and type(clip.difficulty) is float and type(clip.extra["ss_no"]) is int


@pytest.mark.parametrize("data", [b"", b"not a pickle at all", pickle.dumps({(1, 1): _record()})[:-7]])
def test_broken_pickles_are_data_errors(tmp_path, data):
    path = tmp_path / "broken.pkl"
    path.write_bytes(data)
    with pytest.raises(DataError, match="broken.pkl"):
        load_annotations(path)


# --- validation of records ---------------------------------------------------------------------

@pytest.mark.parametrize("changes,field,expected", [
    ({"final_score": _DROP}, "final_score", "missing"),
    ({"start_frame": _DROP, "end_frame": _DROP}, "start_frame, end_frame", "missing"),
    ({"start_frame": "10"}, "start_frame", "non-negative integer"),
    ({"start_frame": 10.0}, "start_frame", "non-negative integer"),
    ({"end_frame": True}, "end_frame", "non-negative integer"),
    ({"start_frame": -1}, "start_frame", "non-negative integer"),
    ({"end_frame": 5}, "end_frame", ">= start_frame"),
    ({"difficulty": 0.0}, "difficulty", "> 0"),
    ({"difficulty": "3.2"}, "difficulty", "finite number"),
    ({"final_score": float("nan")}, "final_score", "finite number"),
    ({"final_score": -1.0}, "final_score", ">= 0"),
    ({"position": "pike"}, "position", "non-negative integer"),
    ({"tw_no": 1.5}, "tw_no", "non-negative integer"),
])
def test_bad_fields_name_file_clip_and_field(tmp_path, changes, field, expected):
    path = _write_pickle(tmp_path / "final_annotations_dict.pkl", {(1, 1): _record(), (2, 7): _record(**changes)})
    with pytest.raises(DataError) as info:
        load_annotations(path)
    message = str(info.value)
    assert str(path) in message and "(2, 7)" in message and field in message and expected in message


@pytest.mark.parametrize("data,needle", [
    ([(1, 1)], "expected a dict"),
    ({}, "holds no clips"),
    ({(1,): _record()}, r"not a \(video, clip\) pair"),
    ({("01", 1): _record()}, r"not a \(video, clip\) pair"),
    ({(1, 1): [1, 2]}, "expected a dict of fields"),
])
def test_bad_layouts(tmp_path, data, needle):
    path = _write_pickle(tmp_path / "ann.pkl", data)
    with pytest.raises(DataError, match=needle):
        load_annotations(path)


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(DataError, match="nope.pkl"):
        load_annotations(tmp_path / "nope.pkl")
    with pytest.raises(DataError, match=r"unsupported extension '\.yaml'"):
        load_annotations(tmp_path / "ann.yaml")


# --- splits -------------------------------------------------------------------------------------

def test_split_errors(tmp_path, real):
    annotations, train, _ = real
    unknown = _write_pickle(tmp_path / "unknown.pkl", train[:3] + [(99, 1), (1, 999)])
    with pytest.raises(DataError) as info:
        load_split(unknown, annotations)
    assert "2 clip(s) are not in the annotations" in str(info.value) and "(99, 1)" in str(info.value)
    assert "(1, 999)" in str(info.value) and "unknown.pkl" in str(info.value)
    assert load_split(unknown)[-1] == (1, 999)  # without annotations only the shape is checked
    for data, needle in [([], "empty"), ({(1, 1): 0}, "list of"), (["1,1"], "entry 0"), ([(1, 1, 2)], "entry 0"),
                         ([(1, 1), (1, 1)], "more than once")]:
        with pytest.raises(DataError, match=needle):
            load_split(_write_pickle(tmp_path / "bad.pkl", data))


# --- our plain formats --------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".json", ".csv", ".pkl"])
def test_round_trip_equals_the_pickle_import(tmp_path, mtl_aqa_dir, real, suffix):
    annotations, train, test = real
    path = save_annotations(annotations, tmp_path / f"annotations{suffix}")
    again = load_annotations(path)
    assert again == annotations
    assert all(type(a.difficulty) is float and type(a.start_frame) is int for a in again.values())
    for split in (train, test):
        assert load_split(save_split(split, tmp_path / f"split{suffix}"), again) == split
    if suffix == ".pkl":  # our pickle keeps MTL-AQA's exact layout
        assert pickle.loads(path.read_bytes()) == restricted_load(mtl_aqa_dir / "final_annotations_dict.pkl")


def test_plain_formats_are_validated_too(tmp_path):
    csv_path = tmp_path / "ann.csv"
    csv_path.write_text("video,clip,start_frame,end_frame,difficulty,final_score\n1,1,10,5,3.0,50.0\n")
    with pytest.raises(DataError, match=r"ann\.csv: clip \(1, 1\): field 'end_frame'=5"):
        load_annotations(csv_path)
    csv_path.write_text("video,clip,start_frame,difficulty\n1,1,10,3.0\n")
    with pytest.raises(DataError, match="lacks column"):
        load_annotations(csv_path)
    json_path = tmp_path / "ann.json"
    json_path.write_text('{"clips": []}')
    with pytest.raises(DataError, match="deepsports-annotations"):
        load_annotations(json_path)
    json_path.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_annotations(json_path)


# --- small helpers ------------------------------------------------------------------------------

def test_clip_annotation_is_frozen_hashable_and_picklable():
    clip = ClipAnnotation(video=3, clip=4, start_frame=1, end_frame=30, difficulty=2.0, final_score=50.0,
                          extra={"position": 1})
    assert pickle.loads(pickle.dumps(clip)) == clip and hash(clip) == hash(pickle.loads(pickle.dumps(clip)))
    assert clip.key == (3, 4) and clip.num_frames == 30
    with pytest.raises(TypeError):
        clip.extra["position"] = 2  # type: ignore[index]


def test_video_filename():
    assert [video_filename(v) for v in (1, 9, 26, 123)] == ["01.mp4", "09.mp4", "26.mp4", "123.mp4"]
    for bad in (-1, "01", 1.0, True):
        with pytest.raises(DataError, match="video id"):
            video_filename(bad)


def test_mtl_aqa_needs_only_the_videos(tmp_path, real):
    """``dataset=mtl_aqa`` with only ``root_dir`` reads the annotations and splits shipped in the package."""
    from deepsports.config import build_config
    from deepsports.data.annotations import shipped_annotation_files
    from deepsports.data.prepare import select_clips

    selection = select_clips(build_config({"dataset": "mtl_aqa", "root_dir": str(tmp_path)}), progress=False)
    shipped = shipped_annotation_files()
    assert (selection.source.annotation_path, selection.source.train_path, selection.source.test_path) == \
        (shipped.annotations, shipped.train, shipped.test)
    assert selection.source.root == tmp_path.resolve()
    annotations, train, test = real
    assert (selection.train_keys, selection.test_keys) == (train, test) and len(selection.annotations) == len(annotations)


def test_a_given_path_still_wins_over_the_shipped_file(tmp_path, real):
    from deepsports.config import build_config
    from deepsports.data.prepare import select_clips

    annotations, train, test = real
    save_split(test[:5], tmp_path / "mine.json")
    selection = select_clips(build_config({"dataset": "mtl_aqa", "root_dir": str(tmp_path),
                                           "test_path": str(tmp_path / "mine.json")}), progress=False)
    assert selection.test_keys == test[:5] and selection.train_keys == train
