"""Untrusted files never run code, servers we launch listen on localhost only, and secrets are not logged.

Each crafted file holds a real payload: a control shows that a plain ``pickle.load`` / ``torch.load``
with ``weights_only=False`` runs it (creates the marker file); through DeepSports' command line the
same file is refused with a message naming it, and the marker provably does not exist.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from deepsports.data.synth import generate_synthetic_dataset
from deepsports.tracking.runs import RunTracker
from deepsports.tune.study import storage_label
from tests.e2e_helpers import REPO, as_args, deepsports_cmd, subprocess_env, tiny_overrides

SECRET = "hunter2-not-for-logs"


class _Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _assert_payload_is_live(tmp_path: Path) -> None:
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(_Payload(control)))
    assert control.exists()  # the payload really executes under a plain unpickler


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(deepsports_cmd(*args), env=subprocess_env(f"sqlite:///{tmp_path / 'mlflow.db'}",
                                                                    OMP_NUM_THREADS="1"),
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate_synthetic_dataset(tmp_path_factory.mktemp("sec") / "synth", n_clips=12, seed=0, progress=False)


def test_a_crafted_annotation_pickle_is_refused_by_the_cli_and_runs_nothing(tmp_path, dataset):
    _assert_payload_is_live(tmp_path)
    root = tmp_path / "data"
    shutil.copytree(dataset.root, root)
    marker = tmp_path / "pwned-annotations"
    evil = root / "final_annotations_dict.pkl"
    evil.write_bytes(pickle.dumps({(1, 1): _Payload(marker)}))
    proc = _run(tmp_path, "prepare", "--quiet", "dataset=mtl_aqa", f"root_dir={root}", f"annotation_path={evil}",
                f"train_path={root / 'train_split_0.pkl'}", f"test_path={root / 'test_split_0.pkl'}",
                f"cache_dir={tmp_path / 'cache'}", "spatial_size=32", "frame_num=4")
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr
    assert str(evil) in proc.stderr and "system" in proc.stderr, proc.stderr  # names the file and the refused global
    assert not marker.exists()


@pytest.mark.slow
def test_crafted_pretrained_and_resume_checkpoints_are_refused_by_the_cli_and_run_nothing(tmp_path, tiny_cache_dir,
                                                                                           store_uri):
    _assert_payload_is_live(tmp_path)
    pretrained_marker, resume_marker = tmp_path / "pwned-pretrained", tmp_path / "pwned-resume"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(2)}, "extra": _Payload(pretrained_marker)}, evil)
    proc = _run(tmp_path, "train", *as_args(tiny_overrides(tmp_path, epochs=1, evaluate="false", cache_dir=tiny_cache_dir,
                                                           pretrained_model=str(evil))))
    assert proc.returncode == 4 and "Traceback" not in proc.stderr, proc.stderr
    assert f"checkpoint '{evil}' refused" in proc.stderr and "GLOBAL posix.system" in proc.stderr, proc.stderr
    assert not pretrained_marker.exists()

    # A poisoned resume checkpoint: skipped as unusable (never unpickled), training starts afresh.
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"model": {}, "epoch": 2, "extra": _Payload(resume_marker)}, ckpt / "epoch-0001.pt")
    proc = _run(tmp_path, "train", *as_args(tiny_overrides(tmp_path, epochs=1, evaluate="false", cache_dir=tiny_cache_dir,
                                                           checkpoint_dir=str(ckpt), experiment_name="resume")))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "skipping unusable checkpoint" in proc.stderr and "was refused" in proc.stderr
    assert not resume_marker.exists()
    client = MlflowClient(store_uri)  # the store _run names
    [run] = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["deepsports.resumes"] == "0"


def test_mlflow_ui_and_server_launched_by_our_scripts_listen_on_localhost_only():
    # `make ui`, as make would run it.
    dry = subprocess.run(["make", "-n", "-W", ".venv/.installed", "ui"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    launches = [line for line in dry.stdout.splitlines() if "deepsports ui" in line]
    assert launches and all("--host 127.0.0.1" in line for line in launches), dry.stdout
    # ... and `deepsports ui` starts mlflow ui on its --host, 127.0.0.1 by default.
    from deepsports.tracking.ui import DEFAULT_HOST, ui_command

    assert DEFAULT_HOST == "127.0.0.1" and ui_command("sqlite:///x.db")[-6:-3] == ["--host", "127.0.0.1", "--port"]
    # deploy/mlflow-server.sh: the host defaults to 127.0.0.1 and is what `mlflow server` gets.
    script = (REPO / "deploy" / "mlflow-server.sh").read_text()
    assert 'HOST="${DEEPSPORTS_MLFLOW_HOST:-127.0.0.1}"' in script
    assert '--host "$HOST"' in script
    # The command `deepsports submit` prints for users: mlflow ui's own default host is 127.0.0.1.
    from deepsports.slurm.jobs import watch_hints
    from deepsports.slurm.profile import load_profile

    hints = [h for h in watch_hints("1", load_profile("local"), "sqlite:///x.db") if "deepsports ui" in h]
    assert hints and not [h for h in hints if "--host" in h and "--host 127.0.0.1" not in h], hints


def test_credentials_in_urls_are_redacted_in_params_tags_and_storage_labels(tmp_path):
    url = f"postgresql://deepsports:{SECRET}@db.lab.org:5432/optuna"
    assert storage_label(url) == "postgresql://deepsports:***@db.lab.org:5432/optuna"
    assert SECRET not in storage_label(f"mysql://u:{SECRET}@h/db?password={SECRET}")

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = RunTracker(uri)
    run_id = tracker.start(experiment_name="secrets", tags={"optuna.storage": storage_label(url),
                                                           "raw_url": url})
    tracker.log_params({"storage": url, "dsn": f"host=db user=u password={SECRET}",
                        "query": f"https://x.org/a?token={SECRET}&x=1"})
    tracker.set_tags({"deepsports.failure_reason": f"StorageError: cannot open {url}"})
    tracker.end("FINISHED")
    run = MlflowClient(uri).get_run(run_id)
    logged = {**run.data.params, **run.data.tags}
    assert not [k for k, v in logged.items() if SECRET in v], logged
    assert run.data.params["storage"] == "postgresql://deepsports:***@db.lab.org:5432/optuna"
    assert run.data.tags["optuna.storage"] == run.data.tags["raw_url"] == run.data.params["storage"]
