"""``deepsports ui``: MLflow's UI on the tracking store, opened on the experiment's runs table."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from deepsports.errors import ConfigError, StorageError


def _cmd_ui(args: argparse.Namespace) -> int:
    from deepsports.tracking.ui import runs_url, ui_base, ui_command, ui_environment
    from deepsports.tracking.uris import allow_file_store, redact_uri, tracking_uri

    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: expected 1-65535")
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: expected 1 or more")
    uri = tracking_uri()
    allow_file_store(uri)
    experiment_id = _experiment_id(uri, args.experiment)
    if ui_base(uri) == uri.rstrip("/"):  # a tracking server is its own UI
        print(runs_url(uri.rstrip("/"), experiment_id) if experiment_id else uri, flush=True)
        return 0
    base = ui_base(uri, args.host, args.port)
    url = runs_url(base, experiment_id) if experiment_id else f"{base}/"
    print(f"starting mlflow ui on {base} (store {redact_uri(uri)}; Ctrl-C stops it)", file=sys.stderr, flush=True)
    # Its own process group (mlflow ui starts the server as a child): stopping us stops all of it. Its
    # output goes to our stderr, so stdout holds the URL alone.
    proc = subprocess.Popen(ui_command(uri, args.host, args.port, args.workers), env=ui_environment(),
                            stdout=sys.stderr, start_new_session=True)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        if not _wait_ready(base, proc, args.ready_timeout):
            return proc.wait() or 1
        print(url, flush=True)
        if experiment_id is None:
            print(f"deepsports ui: no experiment {args.experiment!r} in the store yet", file=sys.stderr, flush=True)
        if args.open:
            import webbrowser

            webbrowser.open(url)
        return proc.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop(proc)


def _raise_interrupt(signum, _frame):
    raise KeyboardInterrupt


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL after 20 s."""
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def study_ui(parent_run_id: str | None, store_uri: str | None = None) -> dict[str, str] | None:
    """The study's UI links (trials ranked, parent run) in ``store_uri`` (default: the tracking URI in
    effect), for a local store served by ``deepsports ui``; None when the store does not hold the run."""
    from deepsports.tracking.ui import run_link, study_links
    from deepsports.tracking.uris import tracking_uri

    uri = store_uri or tracking_uri()
    link = run_link(uri, parent_run_id) if parent_run_id else None
    if link is None:
        return None
    experiment_id = link.split("/#/experiments/", 1)[1].split("/", 1)[0]
    return study_links(uri, experiment_id, parent_run_id)


def _experiment_id(uri: str, name: str) -> str | None:
    from deepsports.tracking.runs import RunTracker

    try:
        experiment = RunTracker(uri).client.get_experiment_by_name(name)
    except StorageError:
        raise
    return None if experiment is None else experiment.experiment_id


def _wait_ready(base: str, proc: subprocess.Popen, timeout_s: float) -> bool:
    """Poll ``/health`` until the server answers (True) or exits / the time is up (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            print(f"deepsports ui: mlflow ui exited with code {proc.returncode}", file=sys.stderr)
            return False
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    print(f"deepsports ui: mlflow ui did not answer on {base} within {timeout_s:.0f} s", file=sys.stderr)
    return False


def register(sub, build_parser=None) -> None:
    """Add ``ui`` to the ``deepsports`` parser."""
    from deepsports.tracking.ui import DEFAULT_HOST, DEFAULT_PORT

    p = sub.add_parser("ui", help="start mlflow ui on the tracking store ($MLFLOW_TRACKING_URI) and print the URL of "
                                  "the experiment's runs table")
    p.add_argument("--experiment", default="deepsports", help="experiment whose runs table to open [deepsports]")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"interface to listen on [{DEFAULT_HOST}: this machine only]")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port [{DEFAULT_PORT}]")
    p.add_argument("--workers", type=int, default=1, help="server worker processes [1]")
    p.add_argument("--open", action="store_true", help="open the URL in a web browser")
    p.add_argument("--ready-timeout", type=float, default=180.0, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_ui)
