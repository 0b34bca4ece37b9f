"""Process signals: the stop flag, DataLoader workers ignoring the group's signals, signals held during a write.

Standard library only, so that every room may import it (docs/preemption.md tells the whole protocol).

* :class:`StopFlag` turns "please stop" signals into a flag that the training loop polls at step
  boundaries: the handler only records the signal (checkpointing inside a handler could interrupt a
  half-written optimizer step or a file write). The signals are the *warning signal* (SIGUSR1 unless
  ``$DEEPSPORTS_STOP_SIGNAL`` names another: the SLURM profile's ``signal``, which the job scripts export)
  and SIGTERM. A signal the batch shell trapped before Python ran arrives through
  ``$DEEPSPORTS_EARLY_SIGNAL`` when the flag is installed.
* SLURM's SIGTERM, ``kill -- -<pgid>`` and a terminal's Ctrl-C reach every process of the job or group
  at once: DataLoader workers ignore them (:func:`ignore_stop_signals`, forked inside
  :func:`stop_signals_blocked`).
* :func:`signals_held` defers SIGINT, SIGTERM, SIGHUP, SIGUSR1 and SIGUSR2 while a file is written: a
  KeyboardInterrupt inside ``torch.save`` would leave a torn zip (torch reports it as ``RuntimeError:
  [enforce fail at inline_container.cc...]``). The signal is handled the moment the write is done.

    with StopFlag() as flag:
        train(config, hooks=TrainHooks(stop_requested=flag.requested))
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import FrameType
from typing import Any

from deepsports.errors import PreemptedError, TrainingError

log = logging.getLogger(__name__)

#: Set by the sbatch templates to the profile's ``signal`` (the time-limit warning of ``--signal=B:<sig>@<grace>``).
STOP_SIGNAL_ENV = "DEEPSPORTS_STOP_SIGNAL"
#: Set by the sbatch templates when a signal reached the batch shell before Python ran (see :meth:`StopFlag.install`).
EARLY_SIGNAL_ENV = "DEEPSPORTS_EARLY_SIGNAL"
#: The warning signals a profile may choose (NCCL installs its own SIGUSR1 handler: USR2 or HUP there).
WARNING_SIGNALS = ("USR1", "USR2", "HUP")
DEFAULT_WARNING_SIGNAL = "USR1"
#: Signals a DataLoader worker ignores: SLURM (requeue, preemption, cancel, time limit), ``kill -- -<pgid>`` and a
#: terminal's Ctrl-C signal the whole process group, and only the main process may act on them.
WORKER_IGNORED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGTERM, signal.SIGINT)
#: Signals that :func:`signals_held` defers until a write is done.
HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)

_Handler = Callable[[int, FrameType | None], Any] | int | None


def signal_from_name(name: str) -> signal.Signals:
    """``"USR2"``/``"SIGUSR2"`` -> ``signal.SIGUSR2`` (KeyError for an unknown name)."""
    name = name.strip().upper()
    return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]


def warning_signal(environ: Mapping[str, str] | None = None) -> signal.Signals:
    """The time-limit warning signal of this process: ``$DEEPSPORTS_STOP_SIGNAL`` or SIGUSR1."""
    env = os.environ if environ is None else environ
    name = env.get(STOP_SIGNAL_ENV, "") or DEFAULT_WARNING_SIGNAL
    try:
        sig = signal_from_name(name)
    except KeyError:
        sig = None
    if sig is None or sig.name.removeprefix("SIG") not in WARNING_SIGNALS:
        log.warning("%s=%r is not one of %s: using SIG%s", STOP_SIGNAL_ENV, name, ", ".join(WARNING_SIGNALS),
                    DEFAULT_WARNING_SIGNAL)
        return signal_from_name(DEFAULT_WARNING_SIGNAL)
    return sig


# --------------------------------------------------------------------------------------------
# DataLoader workers
# --------------------------------------------------------------------------------------------

def ignore_stop_signals(_worker_id: int | None = None) -> None:
    """``worker_init_fn`` of every DataLoader: the worker outlives the job's stop signals.

    Without it SLURM's SIGTERM to every process of the job kills the workers first (torch's own
    worker handler dies on a SIGTERM that its parent did not send), and the main process fails with
    "DataLoader worker (pid ...) exited unexpectedly" instead of checkpointing. SIGUSR1/2, SIGHUP and
    SIGINT are ignored. SIGTERM stays blocked (the worker was forked inside :func:`stop_signals_blocked`)
    and a thread takes it: from the parent (torch's loader shutdown, multiprocessing's exit, which join
    the worker after it) it ends the worker at once, from anyone else it is dropped. The main process
    shuts its loaders down itself once it stopped; a worker whose parent died exits on its own.
    """
    quiet = tuple(sig for sig in WORKER_IGNORED_SIGNALS if sig != signal.SIGTERM)
    for sig in quiet:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    signal.pthread_sigmask(signal.SIG_UNBLOCK, quiet)
    threading.Thread(target=_exit_on_parents_sigterm, args=(os.getppid(),), name="deepsports-sigterm",
                     daemon=True).start()


def _exit_on_parents_sigterm(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent:
            # The parent is shutting the loader down and waits for this worker: end at once and quietly,
            # as torch's own worker handler does (exit status 0, which torch's SIGCHLD check accepts).
            os._exit(0)


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Block the stop signals in this thread while DataLoader workers are forked (they inherit the mask).

    A signal that arrives meanwhile is delivered to the main process when the block ends, or to
    another of its threads at once (Python runs the handler in the main thread either way).
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_IGNORED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# --------------------------------------------------------------------------------------------
# The stop flag
# --------------------------------------------------------------------------------------------

class StopFlag:
    """Handlers for the warning signal and SIGTERM (by default) that only set a flag; restores the old ones on exit.

    The first signal received is remembered (``signal_name``): a SIGTERM that follows our own
    ``scontrol requeue`` does not hide the warning signal that started the shutdown. With
    ``interrupt=True`` the first signal also raises :class:`~deepsports.errors.PreemptedError` where the
    main thread is (for work that may stop anywhere, such as ``prepare``'s resumable writes).
    """

    def __init__(self, signals: Iterable[int] | None = None, *, interrupt: bool = False) -> None:
        chosen = (warning_signal(), signal.SIGTERM) if signals is None else signals
        self.signals = tuple(dict.fromkeys(signal.Signals(s) for s in chosen))
        self.interrupt = interrupt
        self._signum: int | None = None
        self._count = 0
        self._previous: dict[int, _Handler] = {}
        self._owner_pid: int | None = None
        self._installing = False

    def install(self) -> StopFlag:
        """Install the handlers (main thread only: Python delivers signals there)."""
        if threading.current_thread() is not threading.main_thread():
            raise TrainingError("StopFlag must be installed from the main thread (Python runs signal handlers "
                               "only there)")
        if self._previous:
            raise TrainingError("StopFlag is already installed")
        self._owner_pid = os.getpid()
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        # The job scripts exec the worker with these signals blocked (pending, not dropped, until now).
        self._installing = True
        try:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals)
        finally:
            self._installing = False
        early = os.environ.pop(EARLY_SIGNAL_ENV, "")
        for name in early.split():
            # The batch shell trapped it before exec'ing us (slurm/templates): act as if it came now.
            try:
                sig = signal_from_name(name)
            except KeyError:
                continue
            if sig in self.signals:
                self._handle(sig, None)
        return self

    def restore(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> StopFlag:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._owner_pid:
            # A forked child (a DataLoader worker before its worker_init_fn ran) inherits this handler:
            # the signal is the main process's to act on (see ignore_stop_signals).
            signal.signal(signum, signal.SIG_IGN)
            return
        first = self._signum is None
        if first:
            self._signum = signum
        self._count += 1
        if first and self.interrupt and frame is not None and not self._installing:
            raise PreemptedError(f"stopped by {signal.Signals(signum).name}")

    def requested(self) -> bool:
        """True once one of the signals arrived (``TrainHooks(stop_requested=flag.requested)``)."""
        return self._signum is not None

    @property
    def signal(self) -> signal.Signals | None:
        """The first signal received, or None."""
        return None if self._signum is None else signal.Signals(self._signum)

    @property
    def signal_name(self) -> str | None:
        """Name of the first signal received ("SIGUSR1", "SIGTERM"), or None."""
        return None if self._signum is None else signal.Signals(self._signum).name

    @property
    def count(self) -> int:
        """How many of the signals arrived so far."""
        return self._count


# --------------------------------------------------------------------------------------------
# Signals held during a write
# --------------------------------------------------------------------------------------------

_holding = threading.local()


@contextlib.contextmanager
def signals_held(what: str = "a write") -> Iterator[None]:
    """Defer :data:`HELD_SIGNALS` until the block is done, then handle each as it would have been.

    During the block a signal is only recorded; afterwards the previous handlers are back and every
    recorded signal is raised again in arrival order: SIGINT then raises KeyboardInterrupt *after* the
    file is complete, the stop flag is set, a signal without a Python handler does what it does by
    default. Python runs handlers in the main thread only, so off the main thread (and when nested) the
    block runs as it is. Signals that are ignored stay ignored.
    """
    if threading.current_thread() is not threading.main_thread() or getattr(_holding, "active", False):
        yield
        return
    arrived: list[int] = []

    def defer(signum: int, _frame: FrameType | None) -> None:
        arrived.append(signum)

    previous: dict[int, _Handler] = {}
    _holding.active = True
    try:
        for sig in HELD_SIGNALS:
            handler = signal.getsignal(sig)
            if handler is signal.SIG_IGN or handler is None:
                continue
            previous[sig] = signal.signal(sig, defer)
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _holding.active = False
        for signum in arrived:
            log.warning("%s arrived during %s: held until it was complete, handled now",
                        signal.Signals(signum).name, what)
        for signum in arrived:
            signal.raise_signal(signum)  # runs the restored Python handler here (KeyboardInterrupt for SIGINT)


# --------------------------------------------------------------------------------------------
# Dying with the parent
# --------------------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM, *, kill_after_s: float | None = 60.0, poll_s: float = 1.0) -> bool:
    """Stop this process when its parent dies: ``sig`` at once, SIGKILL ``kill_after_s`` later if it still runs.

    A worker ``exec``'d by a SLURM batch script is a child of ``slurmstepd``: if the step daemon is killed,
    the worker would otherwise be re-parented to init and go on *outside* SLURM. ``sig`` comes from
    ``prctl(PR_SET_PDEATHSIG)`` (Linux); a thread that notices the new parent sends it where ``prctl`` is
    missing, and ends the process with SIGKILL once ``kill_after_s`` passed (time to checkpoint on ``sig``).
    Returns False (and does nothing) when the parent is already init.
    """
    parent = os.getppid()
    if parent == 1:
        return False
    armed = False
    libc_name = ctypes.util.find_library("c")
    if libc_name is not None:
        try:
            armed = ctypes.CDLL(libc_name, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    threading.Thread(target=_watch_parent, args=(parent, sig, armed, kill_after_s, poll_s),
                     name="deepsports-parent-watch", daemon=True).start()
    return True


def _watch_parent(parent: int, sig: int, armed: bool, kill_after_s: float | None, poll_s: float) -> None:
    import time

    while os.getppid() == parent:
        time.sleep(poll_s)
    log.warning("the parent process (pid %d) is gone: stopping%s", parent,
                "" if kill_after_s is None else f" (killed in {kill_after_s:g} s if still running)")
    if not armed:
        os.kill(os.getpid(), sig)
    if kill_after_s is not None:
        time.sleep(kill_after_s)
        os.kill(os.getpid(), signal.SIGKILL)


def parent_is_gone(parent: int) -> bool:
    """True when this process's parent is no longer ``parent`` (it died and this one was re-parented)."""
    return os.getppid() != parent
