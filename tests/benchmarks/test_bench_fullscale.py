"""Smoke run of ``benchmarks/bench_fullscale.py --quick``: every stage on a shortened rehearsal subset.

Checks what each stage records (counts, completeness after ``kill -9``, exact cache bytes, a trained
run), never a speed: timings of a smoke run on a shared machine mean nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys

from deepsports.data.annotations import load_annotations, load_split
from tests.e2e_helpers import REPO, subprocess_env


def test_quick_run_records_every_stage(tmp_path, mtl_aqa_dir) -> None:
    work = tmp_path / "work"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_fullscale.py"), "--quick",
                             "--workdir", str(work), "--mtl-aqa-dir", str(mtl_aqa_dir)],
                            env=subprocess_env("sqlite:///unused.db"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((work / "results.json").read_text())
    assert list(results) == ["gen", "prepare", "resume", "footprint", "loader", "epoch", "learn"]
    root = work / "rehearsal"
    annotations = load_annotations(root / "final_annotations_dict.pkl")
    keys = load_split(root / "train_split_0.pkl") + load_split(root / "test_split_0.pkl")
    frames = sum(annotations[k].num_frames for k in keys)
    assert results["gen"]["figures"]["videos"] == 2 and len(annotations) == 6
    prepare = results["prepare"]["figures"]
    assert prepare["full"]["returncode"] == 0 and prepare["full"]["clip_frames"] == frames
    assert prepare["full"]["peak_pss_mb"] > 0 and prepare["subset"]["jpeg_bytes"] > 0
    resume = results["resume"]["figures"]
    assert resume["rerun_ok"] and resume["clips_after"] == resume["clips"] == len(keys)
    assert resume["temp_files_left"] == []
    footprint = results["footprint"]["figures"]["geometries"]
    for entry in footprint.values():
        height, width = (int(v) for v in entry["frame_size"].split("x"))
        assert entry["exact_gb"] * 1e9 == 128 * len(keys) + frames * height * width * 3
    measured = [e for e in footprint.values() if "measured_gb" in e]
    assert measured and all(e["measured_gb"] >= e["exact_gb"] for e in measured)  # + manifest and lock
    rows = results["loader"]["figures"]["rows"]
    assert {(r["setting"], r["num_workers"]) for r in rows} == {(s, w) for s in ("4x32", "4x32 data_aug") for w in (0, 2)}
    assert all(r["cached_uint8"] > 0 and r["original"] > 0 for r in rows)
    epoch = results["epoch"]["figures"]["4x32"]
    assert epoch["returncode"] == 0 and len(epoch["history"]["clips_per_s"]) == 1
    learn = results["learn"]["figures"]
    assert learn["returncode"] == 0 and "test_spearman" in learn["summary"]
