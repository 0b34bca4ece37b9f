"""deepsports.signals in one process: signals held during a write, then handled as they would have been."""

from __future__ import annotations

import logging
import os
import signal
import time

import pytest

from deepsports.signals import StopFlag, signals_held, warning_signal


def _deliver() -> None:
    time.sleep(0.05)  # a Python handler runs at the next bytecode boundary; give it a few


def test_ctrl_c_during_a_held_write_is_raised_once_the_write_is_done(caplog):
    caplog.set_level(logging.WARNING, logger="deepsports.signals")
    done = []
    with pytest.raises(KeyboardInterrupt):
        with signals_held("a test write"):
            os.kill(os.getpid(), signal.SIGINT)
            _deliver()
            done.append("the write finished")
    assert done == ["the write finished"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert "SIGINT arrived during a test write: held until it was complete, handled now" in caplog.text


def test_the_stop_flag_hears_a_held_signal_after_the_write_and_ignored_signals_stay_ignored():
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with StopFlag() as flag:
            with signals_held("a test write"):
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGHUP)
                _deliver()
                assert not flag.requested()
            assert flag.signal_name == "SIGTERM" and flag.count == 1
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_the_warning_signal_comes_from_the_job_script(monkeypatch):
    assert warning_signal({}) == signal.SIGUSR1
    assert warning_signal({"DEEPSPORTS_STOP_SIGNAL": "USR2"}) == signal.SIGUSR2
    assert warning_signal({"DEEPSPORTS_STOP_SIGNAL": "KILL"}) == signal.SIGUSR1  # with a warning: not a choice
    monkeypatch.setenv("DEEPSPORTS_STOP_SIGNAL", "HUP")
    assert StopFlag().signals == (signal.SIGHUP, signal.SIGTERM)


def test_prepare_stops_on_a_signal_that_came_before_it_began(tmp_path):
    """``prepare`` stops at once on a signal (``preemptible(interrupt=True)``): here one the job script's trap
    noted before Python ran, handed over in $DEEPSPORTS_EARLY_SIGNAL. Exit 75, nothing prepared."""
    import subprocess

    from tests.e2e_helpers import deepsports_cmd, local_env

    env = local_env(f"sqlite:///{tmp_path / 'unused.db'}", DEEPSPORTS_EARLY_SIGNAL="TERM")
    proc = subprocess.run(deepsports_cmd("prepare", f"cache_dir={tmp_path / 'cache'}", "synth_clips=8"), env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 75, proc.stderr
    assert proc.stderr.strip() == "deepsports: interrupted: stopped by SIGTERM before it began"
    assert not (tmp_path / "cache").exists()
