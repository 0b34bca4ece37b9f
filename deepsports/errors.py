"""Exception types of the library.

The library raises these; only :mod:`deepsports.cli` turns them into messages and exit codes.
"""

from __future__ import annotations


class DeepSportsError(Exception):
    """Base class of every error the project raises on purpose."""

    exit_code = 1


class ConfigError(DeepSportsError, ValueError):
    """A configuration value (file, key, override or flag) is invalid.

    ``keys`` names the config keys the error is about, so a caller that knows where each value came
    from (a file, the command line, a default) can say so.
    """

    exit_code = 2

    def __init__(self, *args: object, keys: tuple[str, ...] = ()) -> None:
        super().__init__(*args)
        self.keys = tuple(keys)


class DataError(DeepSportsError):
    """Annotations, splits, videos or the clip cache are missing or malformed."""

    exit_code = 3


class UnsafePickleError(DataError):
    """A pickle asked to import something the restricted unpickler does not allow."""


class CheckpointError(DeepSportsError):
    """A checkpoint cannot be read, is unsafe, or does not fit the model."""

    exit_code = 4


class TrainingError(DeepSportsError):
    """Training could not continue (non-finite loss, worker crash, out of memory)."""

    exit_code = 5


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite."""


class SearchSpaceError(ConfigError):
    """A search-space file is invalid."""


class StorageError(DeepSportsError):
    """A tracking or study storage cannot be opened or does not hold what was asked for."""

    exit_code = 6


class PreemptedError(DeepSportsError):
    """Training stopped early because the process was asked to (SIGUSR1/SIGTERM); a checkpoint was saved."""

    exit_code = 75  # EX_TEMPFAIL: the job should be run again
