"""Turn "please stop" signals into a flag that the training loop polls.

SLURM warns a job before its time limit with the signal of ``--signal=B:USR1@<grace>`` and sends
SIGTERM when it preempts, requeues or cancels it (SIGKILL follows after ``KillWait``). The handler
only records the signal: checkpointing inside a signal handler could interrupt a half-written
optimizer step or a file write. The training loop polls :meth:`PreemptionFlag.requested` at step
boundaries, saves its checkpoint, requeues (:func:`deepsports.slurm.requeue_self`) and exits.

    with PreemptionFlag() as flag:
        train(config, stop_requested=flag.requested)
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any, Callable, Iterable

from deepsports.errors import TrainingError

DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

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
            # A forked child (a DataLoader worker) inherits this handler; it must still die on SIGTERM,
            # or SLURM's kill and the loader's own shutdown would leave it running until SIGKILL.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self._signum is None:
            self._signum = signum
        self._count += 1

    def requested(self) -> bool:
        """True once one of the signals arrived (pass as ``stop_requested=flag.requested``)."""
        return self._signum is not None

    @property
    def signal_name(self) -> str | None:
        """Name of the first signal received ("SIGUSR1", "SIGTERM"), or None."""
        return None if self._signum is None else signal.Signals(self._signum).name

    @property
    def count(self) -> int:
        """How many of the signals arrived so far."""
        return self._count
