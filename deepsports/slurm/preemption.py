"""Turn "please stop" signals into a flag that the training loop polls.

SLURM warns a job before its time limit with the signal of ``--signal=B:USR1@<grace>`` and sends
SIGTERM when it preempts, requeues or cancels it (SIGKILL follows after ``KillWait``). The handler
only records the signal: checkpointing inside a signal handler could interrupt a half-written
optimizer step or a file write. The training loop polls :meth:`PreemptionFlag.requested` at step
boundaries, saves its checkpoint, requeues (:func:`deepsports.slurm.requeue_self`) and exits.

SLURM's SIGTERM (requeue, preemption, time limit), ``kill -- -<pgid>`` and Ctrl-C reach every process
of the job or group at once: DataLoader workers ignore them (:func:`ignore_stop_signals`, forked
inside :func:`stop_signals_blocked`), and a signal the batch shell trapped before Python ran arrives
through ``$DEEPSPORTS_EARLY_SIGNAL`` when the flag is installed.

    with PreemptionFlag() as flag:
        train(config, hooks=TrainHooks(stop_requested=flag.requested))
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from types import FrameType
from typing import Any, Callable, Iterable, Iterator

from deepsports.errors import TrainingError

DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
#: Signals a DataLoader worker ignores: SLURM (requeue, preemption, time limit), ``kill -- -<pgid>`` and a
#: terminal's Ctrl-C signal the whole process group, and only the main process may act on them.
WORKER_IGNORED_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
#: Set by the sbatch templates when a signal reached the batch shell before Python ran (see :meth:`install`).
EARLY_SIGNAL_ENV = "DEEPSPORTS_EARLY_SIGNAL"


def ignore_stop_signals(_worker_id: int | None = None) -> None:
    """``worker_init_fn`` of every DataLoader: the worker outlives the job's stop signals.

    Without it SLURM's SIGTERM to every process of the job kills the workers first (torch's own
    worker handler dies on a SIGTERM that its parent did not send), and the main process fails with
    "DataLoader worker (pid ...) exited unexpectedly" instead of checkpointing. SIGUSR1 and SIGINT
    are ignored. SIGTERM stays blocked (the worker was forked inside :func:`stop_signals_blocked`) and
    a thread takes it: from the parent (torch's loader shutdown, multiprocessing's exit, which join the
    worker after it) it ends the worker at once, from anyone else it is dropped. The main process
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

_Handler = Callable[[int, FrameType | None], Any] | int | None


class PreemptionFlag:
    """Handlers for SIGUSR1 and SIGTERM (by default) that only set a flag; restores the old ones on exit.

    The first signal received is remembered (``signal_name``): a SIGTERM that follows our own
    ``scontrol requeue`` does not hide the SIGUSR1 that started the shutdown.
    """

    def __init__(self, signals: Iterable[int] = DEFAULT_SIGNALS) -> None:
        self.signals = tuple(signal.Signals(s) for s in signals)
        self._signum: int | None = None
        self._count = 0
        self._previous: dict[int, _Handler] = {}
        self._owner_pid: int | None = None

    def install(self) -> "PreemptionFlag":
        """Install the handlers (main thread only: Python delivers signals there)."""
        if threading.current_thread() is not threading.main_thread():
            raise TrainingError("PreemptionFlag must be installed from the main thread (Python runs signal "
                                "handlers only there)")
        if self._previous:
            raise TrainingError("PreemptionFlag is already installed")
        self._owner_pid = os.getpid()
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        early = os.environ.pop(EARLY_SIGNAL_ENV, "")
        for name in early.split():
            # The batch shell trapped it before exec'ing us (slurm/templates): act as if it came now.
            try:
                sig = signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
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

    def __enter__(self) -> "PreemptionFlag":
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._owner_pid:
            # A forked child (a DataLoader worker before its worker_init_fn ran) inherits this handler:
            # the signal is the main process's to act on (see ignore_stop_signals).
            signal.signal(signum, signal.SIG_IGN)
            return
        if self._signum is None:
            self._signum = signum
        self._count += 1

    def requested(self) -> bool:
        """True once one of the signals arrived (``TrainHooks(stop_requested=flag.requested)``)."""
        return self._signum is not None

    @property
    def signal_name(self) -> str | None:
        """Name of the first signal received ("SIGUSR1", "SIGTERM"), or None."""
        return None if self._signum is None else signal.Signals(self._signum).name

    @property
    def count(self) -> int:
        """How many of the signals arrived so far."""
        return self._count
