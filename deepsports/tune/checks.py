"""What ``deepsports tune`` and ``deepsports submit tune`` can check before any trial, study, file or job
exists: the study name, the ``--set`` overrides against the search space, the study storage and the
``--cause`` names of a re-run.

Each check raises :class:`~deepsports.errors.ConfigError` (exit 2) with one line naming the value,
where it came from and what is allowed; nothing here creates a file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from deepsports.errors import ConfigError

#: One safe path component: study names become checkpoint folders and ``<study>_best.yaml`` files.
_STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_RDB_SCHEMES = ("sqlite", "postgresql", "mysql")


#: Failure causes of a FAIL trial, in the order ``deepsports status`` lists them, with their labels
#: (:mod:`deepsports.tune.accounting` tells them apart; ``--rerun-failed --cause`` takes the names).
CAUSES = {
    "dead_worker": "dead worker (stale heartbeat)",
    "non_finite_loss": "non-finite loss",
    "out_of_memory": "out of memory",
    "config_error": "configuration error",
    "not_run": "not run (max_trials reached)",
    "other": "other exception",
}


def check_causes(causes: Iterable[str], source: str = "--cause") -> tuple[str, ...]:
    """The failure causes named (``dead-worker`` is ``dead_worker``), each one of :data:`CAUSES`."""
    causes = tuple(causes)
    for cause in causes:
        if cause.replace("-", "_") not in CAUSES:
            raise ConfigError(f"{source} {cause!r}: expected one of {', '.join(CAUSES)}")
    return tuple(cause.replace("-", "_") for cause in causes)


def check_rerun(rerun_failed: bool, causes: Iterable[str]) -> tuple[str, ...]:
    """The checked ``--cause`` names; they apply to ``--rerun-failed`` only."""
    checked = check_causes(causes)
    if checked and not rerun_failed:
        raise ConfigError(f"--cause {' '.join(checked)}: applies with --rerun-failed only")
    return checked


def check_study_name(name: str, source: str = "--study") -> str:
    """``name`` if it is one safe path component (letters, digits, ``.``, ``_``, ``-``; no ``..``)."""
    if not _STUDY_NAME.match(name) or ".." in name:  # path-scan: not a path
        raise ConfigError(f"{source} {name!r} is not a valid study name: expected 1-128 letters, digits, '.', '_' "
                          "or '-', starting with a letter or digit and without '..' (it names folders and files)")
    return name


def check_overrides(space: Any, overrides: Mapping[str, Any], source: str = "--set") -> None:
    """Every override parses for its key, and the lowest and highest trial of ``space`` build with them."""
    from deepsports.config import parse_value
    from deepsports.tune.search_space import check_corners

    for key, value in overrides.items():
        try:
            parse_value(key, value)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}", keys=exc.keys) from None
    sampled = sorted(set(overrides) & set(space.keys))
    if sampled:
        raise ConfigError(f"{source} {', '.join(sampled)}: the search space {space.path} samples "
                          f"{'it' if len(sampled) == 1 else 'them'}: drop it from {source} or from the space's params")
    check_corners(space, overrides, f"with {source}")
    if "loss_spcoef_weight" in space.keys:
        from deepsports.config import require_torchsort

        require_torchsort(f"the search space {space.path}, which samples loss_spcoef_weight,")
    elif "loss_spcoef_weight" in overrides:
        from deepsports.config import build_config, check_installed

        check_installed(build_config({"loss_spcoef_weight": overrides["loss_spcoef_weight"]}), source)


def resolve_storage(storage: str, source: str = "--storage", base: Path | None = None) -> str:
    """The study storage as the workers will open it: a journal path made absolute (relative to ``base``,
    default the current directory), a sqlite URL with an absolute path, or the server URL as given."""
    text = str(storage).strip()
    base = base or Path.cwd()
    if not text:
        raise ConfigError(f"{source} is empty: expected a journal file path, sqlite:///FILE or postgresql://...")
    if "://" not in text:
        path = (base / Path(text).expanduser()).resolve()
        if path.is_dir():
            raise ConfigError(f"{source} {text!r} is a directory: expected a journal file path (e.g. {text}/study.log)")
        if not path.parent.is_dir():  # a typo in a shared path must not start a fresh study somewhere new
            raise ConfigError(f"{source} {text!r}: the folder {str(path.parent)!r} does not exist: create it first, "
                              "or fix the path (nothing was created)")
        return str(path)
    from deepsports.tracking.uris import redact_uri  # a URL may carry a password: never shown

    shown = redact_uri(text)
    scheme = text.split("://", 1)[0].split("+", 1)[0]
    if scheme not in _RDB_SCHEMES:
        raise ConfigError(f"{source} {shown!r}: unsupported scheme {scheme!r}: expected a journal file path or a "
                          f"{', '.join(s + '://' for s in _RDB_SCHEMES)} URL")
    if scheme == "sqlite":
        rest = text.split("://", 1)[1]
        if not rest.startswith("/") or rest == "/":
            raise ConfigError(f"{source} {text!r}: expected sqlite:///FILE (three slashes, then the file path)")
        path = (base / rest[1:]).resolve() if not rest.startswith("//") else Path(rest[1:])
        if not path.parent.is_dir():
            raise ConfigError(f"{source} {text!r}: the folder {str(path.parent)!r} does not exist")
        return f"sqlite:///{path}"
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(text)
    except (ArgumentError, ValueError) as exc:  # ValueError: e.g. a port that is not a number
        raise ConfigError(f"{source} {shown!r}: {redact_uri(str(exc))}: expected a URL like "
                          f"{scheme}://user@host/database") from None
    return text


def check_trial_dirs(space: Any, overrides: Mapping[str, Any]) -> None:
    """The trials' ``cache_dir`` and checkpoint root (the space's ``base_config``/``fixed`` values, then
    ``--set``) accept files: one ConfigError naming the folder and the reason, before any study exists."""
    from deepsports.config import build_config, check_writable_dirs, config_fields

    values = {**space.base_values, **space.fixed, **overrides}
    cache = build_config({"cache_dir": values.get("cache_dir", config_fields()["cache_dir"].default)}).cache_dir
    check_writable_dirs(cache_dir=cache, checkpoint_dir=str(values.get("checkpoint_dir") or "checkpoints"),
                        what="the trials' ")
