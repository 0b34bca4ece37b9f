"""SLURM profiles: the site- and user-specific settings of the rendered job scripts, read and validated.

A profile (``slurm/profiles/*.yaml``) holds partition, account, qos, time, resources, array size and
concurrency, the environment set-up lines, exported variables and the working/log directories.
Unknown keys and bad values raise :class:`~deepsports.errors.ConfigError` naming the file and the key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from deepsports.errors import ConfigError
from deepsports.signals import DEFAULT_WARNING_SIGNAL, WARNING_SIGNALS

PROFILE_DIR = Path(__file__).resolve().parents[1] / "assets" / "slurm" / "profiles"  # shipped (deepsports.locate)


@dataclass(frozen=True)
class SlurmProfile:
    """Site/user settings of the rendered job scripts (see ``slurm/profiles/local.yaml``)."""

    source: str = "<defaults>"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None  # SLURM time limit ("04:00:00", "1-12:00:00", minutes); None = partition default
    cpus_per_task: int = 1
    mem: str | None = None  # "8G", "500M", or megabytes; None = cluster default
    gpus: str | None = None  # "1" or "a100:1" per node, requested as --gres=gpu:<gpus>
    nodes: int = 1  # train only: nodes of a multi-process (DDP) run
    tasks_per_node: int = 1  # train only: processes per node (one per GPU); > 1 task in all = DDP via srun
    array_size: int = 1
    array_concurrency: int = 1
    grace_seconds: int = 120  # the warning signal this long before the time limit
    signal: str = DEFAULT_WARNING_SIGNAL  # the time-limit warning: USR1, or USR2/HUP where NCCL takes USR1
    setup_lines: tuple[str, ...] = ()
    workdir: str | None = None  # shell-expanded on the compute node; None = the submit directory
    logdir: str = "slurm-logs"  # relative to the submit directory, or absolute
    extra_sbatch: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


class _ProfileLoader(yaml.SafeLoader):
    """YAML 1.1 reads ``time: 04:00:00`` as the base-60 integer 14400; keep such scalars as text."""


def _int_unless_colon(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
    if ":" in node.value:
        return node.value
    return yaml.SafeLoader.construct_yaml_int(loader, node)


def _float_unless_colon(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
    if ":" in node.value:
        return node.value
    return yaml.SafeLoader.construct_yaml_float(loader, node)


_ProfileLoader.add_constructor("tag:yaml.org,2002:int", _int_unless_colon)
_ProfileLoader.add_constructor("tag:yaml.org,2002:float", _float_unless_colon)

#: What a name handed to sbatch (partition, account, QOS, ...) may hold.
NAME_RE = re.compile(r"^[A-Za-z0-9_.,:@+-]+$")
_MEM_RE = re.compile(r"^\d+[KMGT]?$")
_GPUS_RE = re.compile(r"^([A-Za-z0-9_.-]+:)?[1-9]\d*$")
#: Environment variables that carry secrets: never written into a job script (a profile's ``env``) nor
#: handed to sbatch from the submitter's environment. Tasks read a 0600 file instead
#: (``DEEPSPORTS_MLFLOW_CREDENTIALS``, libpq's ``PGPASSFILE``).
SECRET_ENV = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "PGPASSWORD", "AWS_SECRET_ACCESS_KEY")
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TIME_RE = re.compile(r"^(?:(?P<d>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"
                      r"|(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)|(?P<mm>\d+):(?P<ms>\d+)|(?P<min>\d+))$")
#: Text that is put inside double quotes in the script: $VARS expand on the compute node, nothing else does.
_UNSAFE_IN_DQUOTES = ('"', "`", "\\", "\n", "\r")


def time_limit_seconds(limit: str) -> int | None:
    """SLURM time-limit text -> seconds (``None`` for UNLIMITED/INFINITE); ValueError if malformed."""
    if limit.upper() in ("UNLIMITED", "INFINITE"):
        return None
    match = _TIME_RE.match(limit)
    if not match:
        raise ValueError(limit)
    g = {k: int(v) for k, v in match.groupdict().items() if v is not None}
    if "min" in g:
        return g["min"] * 60
    if "mm" in g:
        return g["mm"] * 60 + g["ms"]
    if "h" in g:
        return g["h"] * 3600 + g["m"] * 60 + g["s"]
    return g["d"] * 86400 + g["dh"] * 3600 + g.get("dm", 0) * 60 + g.get("ds", 0)


def _bad(source: str, key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"SLURM profile {source}: key {key!r} = {value!r} is invalid: expected {expected}")


def _int(source: str, key: str, value: Any, low: int, high: int | None = None) -> int:
    # bool is an int subclass: `cpus_per_task: true` must not mean 1.
    if type(value) is not int or value < low or (high is not None and value > high):
        upper = f" and <= {high}" if high is not None else ""
        raise _bad(source, key, value, f"an integer >= {low}{upper}")
    return value


def _name(source: str, key: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise _bad(source, key, value, "a SLURM name without spaces or quotes")
    return value


def _dquotable(source: str, key: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _bad(source, key, value, "a string")
    text = str(value)
    if any(ch in text for ch in _UNSAFE_IN_DQUOTES):
        raise _bad(source, key, value, 'text without double quotes, backquotes, backslashes or newlines '
                                       '(it is placed in "..." in the script, where $VARIABLES expand)')
    return text


def _lines(source: str, key: str, value: Any, *, sbatch: bool = False) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(source, key, value, "a list of strings")
    for line in value:
        if "\n" in line or "\r" in line or not line.strip():
            raise _bad(source, key, line, "one non-empty line per list entry")
        if sbatch and not line.startswith("-"):
            raise _bad(source, key, line, "an sbatch option such as '--constraint=a100'")
    return tuple(value)


def _time(source: str, value: Any) -> str | None:
    if value is None:
        return None
    if type(value) is int and value > 0:
        return str(value)  # SLURM reads a bare number as minutes
    try:
        if isinstance(value, str):
            time_limit_seconds(value)
            return value
    except ValueError:
        pass
    raise _bad(source, "time", value, "minutes, MM:SS, HH:MM:SS, D-HH[:MM[:SS]] or UNLIMITED (quote it in YAML)")


def _mem(source: str, value: Any) -> str | None:
    if value is None:
        return None
    text = str(value) if type(value) is int else value
    if not isinstance(text, str) or not _MEM_RE.match(text):
        raise _bad(source, "mem", value, "megabytes or a number with a K/M/G/T suffix, e.g. 16G")
    return text


def _gpus(source: str, value: Any) -> str | None:
    if value is None or (type(value) is int and value == 0):
        return None
    text = str(value) if type(value) is int else value
    if not isinstance(text, str) or not _GPUS_RE.match(text):
        raise _bad(source, "gpus", value, "a GPU count (0 = none) or TYPE:COUNT such as a100:1")
    return text


def _logdir(source: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _bad(source, "logdir", value, "a directory path")
    # #SBATCH lines are not read by a shell: expand ~ and $VARS here, on the submitting machine.
    expanded = os.path.expanduser(os.path.expandvars(value))
    if "$" in expanded:
        raise _bad(source, "logdir", value, "a path whose $VARIABLES are set when submitting")
    if any(ch.isspace() for ch in expanded):
        raise _bad(source, "logdir", value, "a path without spaces (it goes into an #SBATCH line)")
    return expanded.rstrip("/") or "/"


def _env(source: str, value: Any) -> Mapping[str, str]:
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, dict):
        raise _bad(source, "env", value, "a mapping NAME: value")
    out = {}
    for key, val in value.items():
        if not isinstance(key, str) or not _ENV_KEY_RE.match(key):
            raise _bad(source, "env", key, "environment variable names such as MLFLOW_TRACKING_URI")
        if key in SECRET_ENV:
            raise _bad(source, "env", key, "no secrets (they would be written into the job script): name a 0600 "
                       "file instead, DEEPSPORTS_MLFLOW_CREDENTIALS for MLflow, PGPASSFILE for PostgreSQL")
        out[key] = _dquotable(source, f"env.{key}", val)
    return MappingProxyType(out)


def _signal(source: str, value: Any) -> str:
    text = value.upper().removeprefix("SIG") if isinstance(value, str) else value
    if text not in WARNING_SIGNALS:
        raise _bad(source, "signal", value, f"one of {', '.join(WARNING_SIGNALS)} (the time-limit warning signal)")
    return text


def build_profile(values: Mapping[str, Any], source: str = "<mapping>") -> SlurmProfile:
    """Validate a raw mapping (a parsed profile YAML) into a :class:`SlurmProfile`."""
    allowed = [f for f in SlurmProfile.__dataclass_fields__ if f != "source"]
    for key in values:
        if key not in allowed:
            raise ConfigError(f"SLURM profile {source}: unknown key {key!r} (allowed keys: {', '.join(allowed)})")
    v = dict(values)
    d = SlurmProfile()
    array_size = _int(source, "array_size", v.get("array_size", d.array_size), 1)
    grace = _int(source, "grace_seconds", v.get("grace_seconds", d.grace_seconds), 0, 65535)  # sbatch's range
    limit = _time(source, v.get("time"))
    limit_s = time_limit_seconds(limit) if limit is not None else None
    if limit_s is not None and grace >= limit_s:
        raise _bad(source, "grace_seconds", grace, f"fewer seconds than the time limit {limit!r} ({limit_s} s)")
    workdir = v.get("workdir")
    if isinstance(workdir, str) and (workdir == "~" or workdir.startswith("~/")):
        workdir = "$HOME" + workdir[1:]  # the script puts it in "...", where ~ would not expand
    return SlurmProfile(
        source=source,
        partition=_name(source, "partition", v.get("partition")),
        account=_name(source, "account", v.get("account")),
        qos=_name(source, "qos", v.get("qos")),
        time=limit,
        cpus_per_task=_int(source, "cpus_per_task", v.get("cpus_per_task", d.cpus_per_task), 1),
        mem=_mem(source, v.get("mem")),
        gpus=_gpus(source, v.get("gpus")),
        nodes=_int(source, "nodes", v.get("nodes", d.nodes), 1),
        tasks_per_node=_int(source, "tasks_per_node", v.get("tasks_per_node", d.tasks_per_node), 1),
        array_size=array_size,
        array_concurrency=_int(source, "array_concurrency", v.get("array_concurrency", d.array_concurrency), 1),
        grace_seconds=grace,
        signal=_signal(source, v.get("signal", d.signal)),
        setup_lines=_lines(source, "setup_lines", v.get("setup_lines")),
        workdir=None if workdir is None else _dquotable(source, "workdir", workdir),
        logdir=_logdir(source, v.get("logdir", d.logdir)),
        extra_sbatch=_lines(source, "extra_sbatch", v.get("extra_sbatch"), sbatch=True),
        env=_env(source, v.get("env")),
    )


def resolve_profile_path(name_or_path: str | os.PathLike) -> Path:
    """``local`` -> ``slurm/profiles/local.yaml`` (here, else the one shipped with DeepSports); a path is used as it is."""
    from deepsports.locate import find_named

    return find_named(name_or_path, "slurm/profiles", "SLURM profile")


def load_profile(path: str | os.PathLike) -> SlurmProfile:
    """Read and validate a profile YAML (a path, or a name under ``slurm/profiles``)."""
    path = resolve_profile_path(path)
    try:
        data = yaml.load(path.read_text(), Loader=_ProfileLoader)  # noqa: S506 - a SafeLoader subclass
    except OSError as exc:
        raise ConfigError(f"cannot read SLURM profile {str(path)!r}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"SLURM profile {str(path)!r} is not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"SLURM profile {str(path)!r} must hold a mapping of key: value, got {type(data).__name__}")
    return build_profile(data, str(path))
