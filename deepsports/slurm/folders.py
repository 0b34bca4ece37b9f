"""The folders a submitted job will write, checked on the submit host before ``deepsports submit`` submits it:
the study journal and the ``cache_dir``, as the node will see them (relative to the profile's ``workdir``,
else the submit directory). A folder that would refuse the job's files is one :class:`ConfigError` (exit 2)
instead of a job that fails on the node (docs/study-faults.md)."""

from __future__ import annotations

import os
from pathlib import Path

from deepsports.config import CACHE_DIR_ENV, config_fields
from deepsports.errors import ConfigError
from deepsports.fileio import unwritable_reason
from deepsports.slurm.profile import SlurmProfile


def _job_dir(profile: SlurmProfile) -> Path | None:
    """The folder a job's relative paths start from (its workdir, else the submit directory); None when the
    workdir names variables known only on the node."""
    if not profile.workdir:
        return Path.cwd()
    folder = os.path.expandvars(profile.workdir)
    return None if "$" in folder else Path(folder).expanduser()


def check_job_journal(storage: str, where: str, profile: SlurmProfile) -> None:
    """A journal file the job can write: it exists writable, or its folder accepts files (exit 2)."""
    if "://" in storage:
        return  # a server, or sqlite (its folder must exist: checked by resolve_storage)
    base = _job_dir(profile)
    if base is None:
        return
    path = base / Path(storage).expanduser()
    if path.exists():
        reason = None if os.access(path, os.W_OK) else f"{path}: Permission denied"
    else:
        reason = unwritable_reason(path.parent)
    if reason:
        raise ConfigError(f"study storage {storage!r}{where} is not writable: {reason}; give a journal path in a "
                          "writable folder (the job would fail on the node)")


def check_job_cache_dir(kind: str, cache: tuple[str, str] | None, profile: SlurmProfile) -> None:
    """The job's cache_dir accepts files (exit 2), checked here instead of failing on the node."""
    if cache is None:
        if profile.env.get(CACHE_DIR_ENV):
            cache = (profile.env[CACHE_DIR_ENV], f"{CACHE_DIR_ENV} of {profile.source}")
        elif os.environ.get(CACHE_DIR_ENV):
            cache = (os.environ[CACHE_DIR_ENV], f"${CACHE_DIR_ENV}")
        else:
            cache = (str(config_fields()["cache_dir"].default), "the default")
    value, source = cache
    base = _job_dir(profile)
    if base is None or "$" in value:
        return
    reason = unwritable_reason(base / Path(value).expanduser())
    if reason:
        raise ConfigError(f"submit {kind}: cache_dir {value!r} ({source}) is not writable: {reason}; set "
                          "cache_dir=DIR after -- to a writable folder (the job would fail on the node)")
