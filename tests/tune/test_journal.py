"""A journal whose last record was torn by a writer killed mid-append: the study opens, every complete
record is kept, the torn bytes are kept in a side file; garbage in the middle still fails, untouched."""

from __future__ import annotations

import logging

import optuna
import pytest

from deepsports.errors import StorageError
from deepsports.tune.study import open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _study(path) -> optuna.Study:
    return optuna.load_study(study_name="s", storage=open_storage(str(path)))


@pytest.fixture
def journal_before_and_after(tmp_path):
    """The journal bytes of a study with two finished trials, before and after one real append."""
    path = tmp_path / "study.journal"
    study = optuna.create_study(study_name="s", storage=open_storage(str(path)), direction="maximize")
    for value in (0.1, 0.2):
        trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
        study.tell(trial, value)
    before = path.read_bytes()
    study.enqueue_trial({"lr": 1e-3}, user_attrs={"note": "x" * 40})  # one append of several records
    after = path.read_bytes()
    assert after.startswith(before) and after.count(b"\n") > before.count(b"\n")
    return path, before, after


def test_a_torn_append_at_every_byte_offset_is_set_aside_and_the_study_opens(journal_before_and_after, caplog):
    path, before, after = journal_before_and_after
    complete_ends = {i + 1 for i, byte in enumerate(after) if byte == ord("\n")}
    for cut in range(len(before) + 1, len(after)):
        for old in path.parent.glob("study.journal.torn-*"):
            old.unlink()
        path.write_bytes(after[:cut])
        kept = max(end for end in complete_ends | {len(before)} if end <= cut)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="deepsports"):
            study = _study(path)
        side_files = list(path.parent.glob("study.journal.torn-*"))
        if kept == cut:  # cut at a record boundary: nothing is torn
            assert side_files == [] and path.read_bytes() == after[:cut]
            continue
        assert path.read_bytes() == after[:kept], cut
        assert [f.read_bytes() for f in side_files] == [after[kept:cut]], cut
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and str(side_files[0]) in warnings[0], warnings
        finished = [t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        assert finished == [0.1, 0.2], cut
        # The study goes on: a new append lands on a line of its own and the journal stays readable.
        study.enqueue_trial({"lr": 2e-3}, user_attrs={"cut": cut})
        assert [t.user_attrs.get("cut") for t in _study(path).trials][-1] == cut


def test_a_torn_tail_left_by_another_writer_is_set_aside_before_the_next_append(journal_before_and_after):
    path, before, after = journal_before_and_after
    path.write_bytes(before)
    study = _study(path)  # opened while the journal was whole
    with open(path, "ab") as handle:  # another worker dies mid-append
        handle.write(after[len(before):len(before) + 17])
    study.enqueue_trial({"lr": 4e-3}, user_attrs={"after": "tear"})
    assert [t.user_attrs.get("after") for t in _study(path).trials][-1] == "tear"
    (side,) = path.parent.glob("study.journal.torn-*")
    assert side.read_bytes() == after[len(before):len(before) + 17]


def test_garbage_in_the_middle_is_a_clear_error_and_the_file_is_untouched(journal_before_and_after):
    path, before, after = journal_before_and_after
    lines = after.splitlines(keepends=True)
    damaged = b"".join(lines[:2] + [b'{"op_code": 4, "worker_id": "x", oops\n'] + lines[2:])
    path.write_bytes(damaged)
    with pytest.raises(StorageError, match=r"line 3 .*not a journal record.*left as it is"):
        open_storage(str(path))
    assert path.read_bytes() == damaged
    assert list(path.parent.glob("study.journal.torn-*")) == []
