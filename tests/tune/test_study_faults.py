"""Field faults of studies that need no SLURM (docs/study-faults.md; issue 26): a journal line that is not a
record, ``submit`` refusing what would fail on the node and never printing a password, the compute a dead
worker lost, an epoch that ends just before a stop, a paused trial whose checkpoint folder vanished, and
distinct worker identities. The dead-workers-only study and ``submit tune --missing`` on the real cluster:
tests/slurm/test_slurm_study_faults.py."""

from __future__ import annotations

import json
import textwrap

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from deepsports.cli.main import main
from deepsports.errors import JournalRecordError
from deepsports.tune.study import open_storage
from tests.e2e_helpers import TUNE_SPACE

optuna.logging.set_verbosity(optuna.logging.WARNING)


# --------------------------------------------------------------------------------------------
# A journal line that is valid JSON but not a record (and one that is not JSON)
# --------------------------------------------------------------------------------------------

def _renamed(record: dict, old: str, new: str) -> dict:
    return {(new if key == old else key): value for key, value in record.items()}


#: kind -> how the third line of the journal is replaced (from the record that was there, a trial's
#: user attribute); every one of them broke ``status``, ``tune`` and ``best`` with a traceback.
_DAMAGE = {
    "not JSON": lambda r: '{"op_code": 8, "worker_id": "x", oops',
    "an empty object": lambda r: "{}",
    "a JSON list": lambda r: "[8, 0]",
    "a changed key": lambda r: json.dumps(_renamed(r, "trial_id", "trial")),
    "an unknown op code": lambda r: json.dumps({**r, "op_code": 42}),
    "an op code as text": lambda r: json.dumps({**r, "op_code": "8"}),
    "an attribute of two keys": lambda r: json.dumps({**r, "user_attr": {"a": 1, "b": 2}}),
    "a state name for its number": lambda r: json.dumps({"op_code": 6, "worker_id": r["worker_id"], "trial_id": 0,
                                                         "state": "COMPLETE", "values": [0.5],
                                                         "datetime_complete": "2026-01-01T00:00:00"}),
    "a finished state without its time": lambda r: json.dumps({"op_code": 6, "worker_id": r["worker_id"],
                                                                "trial_id": 0, "state": 1, "values": [0.5]}),
    "a start time that is a number": lambda r: json.dumps({"op_code": 4, "worker_id": r["worker_id"], "study_id": 0,
                                                           "datetime_start": 5}),
    "a direction that is not one": lambda r: json.dumps({"op_code": 0, "worker_id": r["worker_id"],
                                                         "study_name": "t", "directions": ["up"]}),
    "a category index out of range": lambda r: json.dumps({
        "op_code": 5, "worker_id": r["worker_id"], "trial_id": 0, "param_name": "activation",
        "param_value_internal": 7, "distribution": json.dumps(
            {"name": "CategoricalDistribution", "attributes": {"choices": ["none", "relu", "gelu"]}})}),
}


@pytest.fixture(scope="module")
def journal_lines(tmp_path_factory):
    """The lines of a study journal: a study, then a trial with a user attribute (line 3), params, a value."""
    path = tmp_path_factory.mktemp("records") / "study.journal"
    study = optuna.create_study(study_name="s", storage=open_storage(str(path)), direction="maximize")
    trial = study.ask()
    trial.set_user_attr("note", "x")
    trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True)
    trial.suggest_categorical("activation", ["none", "relu", "gelu"])
    study.tell(trial, 0.5)
    lines = path.read_text().splitlines(keepends=True)
    assert json.loads(lines[2])["op_code"] == 8  # the user attribute: the line the damage replaces
    return lines


@pytest.mark.parametrize("kind", list(_DAMAGE))
def test_a_line_that_is_not_a_record_is_one_storage_error_line_naming_it_in_status_tune_and_best(
        kind, journal_lines, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    path = tmp_path / "study.journal"
    damaged = "".join([*journal_lines[:2], _DAMAGE[kind](json.loads(journal_lines[2])) + "\n", *journal_lines[3:]])
    path.write_text(damaged)
    with pytest.raises(Exception) as plain:  # what Optuna alone makes of it: the field's traceback
        JournalStorage(JournalFileBackend(str(path))).get_all_studies()
    assert not isinstance(plain.value, JournalRecordError)
    (tmp_path / "space.yaml").write_text(TUNE_SPACE)
    for argv in (["status", "s", "--storage", str(path)],
                 ["tune", str(tmp_path / "space.yaml"), "--study", "s", "--storage", str(path), "--max-trials", "1"],
                 ["best", "s", "--storage", str(path), "--out", str(tmp_path / "best.yaml")]):
        assert main(argv) == 6, (argv, capsys.readouterr())
        out, err = capsys.readouterr()
        assert out == "" and len(err.splitlines()) == 1, (argv, err)
        assert err.startswith("deepsports: error: study journal") and "line 3 (byte " in err, (argv, err)
        assert "is not a journal record" in err, (argv, err)
    assert path.read_text() == damaged  # left as it is
    assert list(tmp_path.glob("study.journal.torn-*")) == []


def test_a_record_another_process_appends_after_the_open_is_checked_on_the_next_read(journal_lines, tmp_path):
    path = tmp_path / "study.journal"
    path.write_text("".join(journal_lines))
    study = optuna.load_study(study_name="s", storage=open_storage(str(path)))
    assert len(study.trials) == 1
    with open(path, "a") as handle:  # another writer, not through this storage
        handle.write(json.dumps({"op_code": 8, "worker_id": "w", "trial": 0, "user_attr": {"a": 1}}) + "\n")
    with pytest.raises(JournalRecordError, match=rf"line {len(journal_lines) + 1} is not a journal record "
                                                 r"\(op_code 8 .*'trial_id' missing"):
        study.get_trials()


# --------------------------------------------------------------------------------------------
# submit: no password in any output; folders the job could not create are refused before submitting
# --------------------------------------------------------------------------------------------

def _profile(tmp_path, workdir: str | None = None, **env: str) -> str:
    path = tmp_path / ("profile.yaml" if workdir is None else "profile-workdir.yaml")
    lines = [f"logdir: {tmp_path / 'logs'}", "time: '10'"] + ([f"workdir: {workdir}"] if workdir else [])
    if env:
        lines.append("env:")
        lines += [f"  {key}: {value!r}" for key, value in env.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_submit_shows_no_password_of_a_study_or_tracking_url(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "space.yaml").write_text(TUNE_SPACE)
    secret = "s3cr3t-pw"
    storage = f"postgresql://alice:{secret}@db.example:5432/studies"
    tracking = f"postgresql://alice:{secret}@db.example:5432/mlflow"
    args = ["submit", "tune", "--dry-run", "--profile", _profile(tmp_path), "--storage", storage,
            "--tracking-uri", tracking, "--", str(tmp_path / "space.yaml"), "--study", "s",
            "--set", f"cache_dir={tmp_path / 'cache'}"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert secret not in out + err and "postgresql://alice:***@db.example:5432/studies" in out
    assert "passwords shown as ***" in out
    # Refusals print the URL too: never its password.
    for bad in (f"postgresql://alice:{secret}@db.example:notaport/studies", f"mongodb://alice:{secret}@db/x"):
        assert main([*args[:6], bad, *args[7:]]) == 2
        out, err = capsys.readouterr()
        assert secret not in out + err and len(err.splitlines()) == 1 and "alice:***@" in err, err
    assert main(["status", "s", "--storage", f"postgresql://alice:{secret}@db.example:notaport/none"]) == 2
    out, err = capsys.readouterr()
    assert secret not in out + err, err


@pytest.mark.parametrize("what", ["journal", "cache_dir", "cache_dir of a train job", "cache_dir of the profile"])
def test_submit_refuses_a_journal_folder_or_cache_dir_the_job_could_not_create(what, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DEEPSPORTS_CACHE_DIR", raising=False)
    (tmp_path / "space.yaml").write_text(textwrap.dedent(TUNE_SPACE))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    good_cache, bad = f"cache_dir={tmp_path / 'cache'}", blocker / "sub" / "x"
    profile = _profile(tmp_path, DEEPSPORTS_CACHE_DIR=str(bad)) if what.endswith("profile") else _profile(tmp_path)
    tune = ["submit", "tune", "--dry-run", "--profile", profile, "--", str(tmp_path / "space.yaml"), "--study", "s"]
    # The journal relative to the job's workdir: the folders of the nodes' working directory (a journal
    # folder that does not exist here is refused by resolve_storage already).
    in_workdir = ["submit", "tune", "--dry-run", "--profile", _profile(tmp_path, workdir=str(tmp_path)), "--",
                  str(tmp_path / "space.yaml"), "--study", "s"]
    argv = {"journal": [*in_workdir, "--storage", "a-file/sub/study.journal", "--set", good_cache],
            "cache_dir": [*tune, "--set", f"cache_dir={bad}"],
            "cache_dir of a train job": ["submit", "train", "--dry-run", "--profile", profile, "--",
                                         f"cache_dir={bad}"],
            "cache_dir of the profile": tune}[what]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1, err
    assert f"{blocker} exists and is not a directory" in err and "is not writable" in err, err
    assert ("study storage" if what == "journal" else "cache_dir") in err
    assert not (tmp_path / "cache").exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "a-file", "profile-workdir.yaml", "profile.yaml", "space.yaml"]  # nothing made



# --------------------------------------------------------------------------------------------
# A stop right after an epoch, then the paused trial's checkpoint folder vanishes (scratch purge)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def purged_study(tmp_path_factory, tiny_cache_dir, migrated_store):
    """A real study of one 2-epoch trial: stopped just after epoch 1 finished (between its checkpoint and its
    callback), its checkpoint folder deleted while it waits, then resumed by a second worker."""
    import logging
    import shutil

    from deepsports.errors import PreemptedError
    from deepsports.tune.settings import TuneSettings
    from deepsports.tune.status import study_status
    from deepsports.tune.worker import tune
    from tests.e2e_helpers import TINY, copy_store

    path = tmp_path_factory.mktemp("purged")
    uri = copy_store(migrated_store, path)
    (path / "space.yaml").write_text("fixed: {epochs: 2}\n" + TUNE_SPACE)
    overrides = {k: v for k, v in {**TINY, "cache_dir": str(tiny_cache_dir), "evaluate": False}.items()
                 if k != "learning_rate"}
    settings = TuneSettings(search_space=str(path / "space.yaml"), study_name="p", storage=str(path / "study.journal"),
                            max_trials=1, seed=0, pruner="none", checkpoint_root=str(path / "ckpt"),
                            overrides=overrides, parent_wait_s=5.0)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("deepsports")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    logger.addHandler(handler)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(path)
            mp.setenv("MLFLOW_TRACKING_URI", uri)
            mp.delenv("MLFLOW_RUN_ID", raising=False)

            def epoch_1_on_disk() -> bool:  # polled every step and once after the epoch's checkpoint
                return any((path / "ckpt").glob("p-*/trial-0000/epoch-0001.pt"))

            with pytest.raises(PreemptedError, match="after epoch 1"):
                tune(settings, stop_requested=epoch_1_on_disk)
            study = optuna.load_study(study_name="p", storage=open_storage(settings.storage))
            paused = study_status(study)
            (folder,) = (path / "ckpt").glob("p-*/trial-0000")
            shutil.rmtree(folder)  # the scratch purge
            tune(settings)  # the next worker
    finally:  # the logger as it was (train's setup_logging configures it once per process)
        logger.handlers[:], logger.propagate, logger.level = saved[0], saved[1], saved[2]
    study = optuna.load_study(study_name="p", storage=open_storage(settings.storage))
    return study, paused, uri, folder, [r.getMessage() for r in records]


def test_an_epoch_that_ends_just_before_a_stop_is_counted_once(purged_study):
    study, paused, uri, folder, messages = purged_study
    (attempt,) = paused["trials"][0]["attempts"]
    assert attempt["outcome"] == "paused" and [e["epoch"] for e in attempt["epochs"]] == [1]
    assert paused["compute"]["epochs"] == 1
    assert attempt["epochs"][0]["end"] <= attempt["end"]
    # The second attempt trained both epochs again (the checkpoint was gone): 3 epochs trained in all.
    from deepsports.tune.status import study_status

    doc = study_status(study)
    assert [[e["epoch"] for e in a["epochs"]] for a in doc["trials"][0]["attempts"]] == [[1], [1, 2]]
    assert doc["compute"]["epochs"] == 3


def test_a_paused_trial_whose_checkpoint_folder_vanished_resumes_into_its_own_run(purged_study):
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    from deepsports.tags import CKPT_LOST_ATTR, CKPT_LOST_TAG, PARENT_RUN_ATTR, RUN_ATTR

    study, paused, uri, folder, messages = purged_study
    (trial,) = study.get_trials()
    assert trial.state == TrialState.COMPLETE and trial.user_attrs[RUN_ATTR] == paused["trials"][0]["run_id"]
    (lost,) = trial.user_attrs[CKPT_LOST_ATTR]
    assert lost["checkpoint_dir"] == str(folder) and lost["attempt"] == 2
    assert any("checkpoint is LOST" in m and str(folder) in m for m in messages), messages  # said loudly
    client = MlflowClient(uri)
    children = client.search_runs([client.get_run(trial.user_attrs[RUN_ATTR]).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{study.user_attrs[PARENT_RUN_ATTR]}'")
    assert [r.info.run_id for r in children] == [trial.user_attrs[RUN_ATTR]]  # one child run per trial
    run = children[0]
    assert run.info.status == "FINISHED" and run.data.tags["optuna.trial_number"] == "0"
    assert "gone before attempt 2" in run.data.tags[CKPT_LOST_TAG]
    for key in ("val_spearman", "train_loss"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == [1, 2], key  # each epoch once: epoch 1's first value kept
    assert sorted(trial.intermediate_values) == [1, 2]


# --------------------------------------------------------------------------------------------
# Worker identities: unique per process
# --------------------------------------------------------------------------------------------

def test_two_local_tune_processes_have_distinct_identities_and_each_claims_its_own_pause(tmp_path, monkeypatch):
    import os
    import socket
    import subprocess
    import sys

    from deepsports.tags import PAUSED_BY_ATTR
    from deepsports.tune.recovery import claim_waiting, task_identity
    from deepsports.tune.settings import WORKER_GROUP_ENV

    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != WORKER_GROUP_ENV}
    for key in [k for k in os.environ if k.startswith("SLURM_")] + [WORKER_GROUP_ENV]:
        monkeypatch.delenv(key, raising=False)
    other = subprocess.run([sys.executable, "-c", "from deepsports.tune.recovery import task_identity; "
                            "print(task_identity(None))"], env=env, capture_output=True, text=True, timeout=120)
    assert other.returncode == 0, other.stderr
    mine, theirs = task_identity(None), other.stdout.strip()
    host = socket.gethostname()
    assert mine == f"{host}:{os.getpid()}/worker-0" and theirs.startswith(f"{host}:") and mine != theirs
    # The workers of one `tune --workers N`: their parent's pid, their worker id; a restarted worker keeps it.
    monkeypatch.setenv(WORKER_GROUP_ENV, "4242")
    assert [task_identity(i) for i in (0, 1)] == [f"{host}:4242/worker-0", f"{host}:4242/worker-1"]
    # Each process resumes the trial it paused itself first, not the other's (the older one).
    monkeypatch.delenv(WORKER_GROUP_ENV)
    study = optuna.create_study(study_name="w", storage=open_storage(str(tmp_path / "w.journal")),
                                direction="maximize")
    for identity in (theirs, mine):
        study.enqueue_trial({}, user_attrs={PAUSED_BY_ATTR: identity})
    assert claim_waiting(study, mine).number == 1 and claim_waiting(study, theirs).number == 0
