"""SLURM job scripts from a profile, their submission, and a running job's view of itself.

A profile (``slurm/profiles/*.yaml``) holds everything site- or user-specific: partition, account,
resources, the environment set-up lines and the working/log directories. The templates in
``slurm/templates`` hold only what every DeepSports job needs: ``--signal=B:USR1@<grace>`` so the
worker can checkpoint before its time limit, ``--requeue``, per-task logs opened in append mode (a
requeued task continues its log), and ``exec`` of the worker so that the signal reaches Python.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import yaml

from deepsports.errors import ConfigError, DeepSportsError

KINDS = ("tune", "train", "prepare")
REPO_DIR = Path(__file__).resolve().parent.parent
TEMPLATE_DIR = REPO_DIR / "slurm" / "templates"
PROFILE_DIR = REPO_DIR / "slurm" / "profiles"
#: What a job knows about itself (``slurm_env``); the tuning workers tag their MLflow runs with these.
SLURM_ENV_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURMD_NODENAME", "SLURM_RESTART_COUNT")


class SlurmError(DeepSportsError):
    """``sbatch``/``scontrol`` is missing or refused a request (the message carries its stderr)."""

    exit_code = 7


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
    grace_seconds: int = 120  # SIGUSR1 this long before the time limit
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

_NAME_RE = re.compile(r"^[A-Za-z0-9_.,:@+-]+$")
_MEM_RE = re.compile(r"^\d+[KMGT]?$")
_GPUS_RE = re.compile(r"^([A-Za-z0-9_.-]+:)?[1-9]\d*$")
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
    if not isinstance(value, str) or not _NAME_RE.match(value):
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
        out[key] = _dquotable(source, f"env.{key}", val)
    return MappingProxyType(out)


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
        setup_lines=_lines(source, "setup_lines", v.get("setup_lines")),
        workdir=None if workdir is None else _dquotable(source, "workdir", workdir),
        logdir=_logdir(source, v.get("logdir", d.logdir)),
        extra_sbatch=_lines(source, "extra_sbatch", v.get("extra_sbatch"), sbatch=True),
        env=_env(source, v.get("env")),
    )


def resolve_profile_path(name_or_path: str | os.PathLike) -> Path:
    """``local`` -> ``slurm/profiles/local.yaml``; a path is used as it is."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    return PROFILE_DIR / f"{name_or_path}.yaml"


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


def worker_command(*args: str, python: str = "python") -> list[str]:
    """``python -m deepsports.cli <args>``: the worker argv for :func:`render_script`."""
    return [python, "-m", "deepsports.cli", *args]


def _fill(template: str, values: Mapping[str, str], name: str) -> str:
    """Replace ``{{key}}`` (bash never writes ``{{``); a line holding only an empty block disappears."""
    out = []
    for line in template.splitlines():
        keys = re.findall(r"\{\{(\w+)\}\}", line)
        for key in keys:
            if key not in values:
                raise ConfigError(f"template {name} uses an unknown placeholder {{{{{key}}}}}")
        if line.strip() in {f"{{{{{k}}}}}" for k in keys} and not values[keys[0]]:
            continue
        out.append(re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], line))
    return "\n".join(out) + "\n"


def _resources(kind: str, profile: SlurmProfile) -> list[str]:
    if kind == "train":  # one task per GPU (or CPU slot) on each node; tune/prepare tasks are single processes
        lines = [f"--nodes={profile.nodes}", f"--ntasks-per-node={profile.tasks_per_node}"]
    else:
        lines = ["--nodes=1", "--ntasks=1"]
    lines.append(f"--cpus-per-task={profile.cpus_per_task}")
    for opt, value in (("partition", profile.partition), ("account", profile.account), ("qos", profile.qos),
                       ("time", profile.time), ("mem", profile.mem)):
        if value is not None:
            lines.append(f"--{opt}={value}")
    # Decoding videos into the cache runs on CPUs: a prepare job holding a GPU would waste it.
    if profile.gpus is not None and kind != "prepare":
        lines.append(f"--gres=gpu:{profile.gpus}")
    lines.extend(profile.extra_sbatch)
    return [f"#SBATCH {line}" for line in lines]


def render_script(kind: str, profile: SlurmProfile, command_args: Sequence[str], *, job_name: str | None = None,
                  array_size: int | None = None, array_concurrency: int | None = None,
                  study_storage: str | None = None, tracking_uri: str | None = None,
                  template_dir: str | os.PathLike | None = None) -> str:
    """The sbatch script of ``kind`` that ``exec``s ``command_args`` (a full argv, see :func:`worker_command`).

    ``array_size``/``array_concurrency`` override the profile (tune only). ``study_storage`` (tune only)
    and ``tracking_uri`` are exported as DEEPSPORTS_STUDY_STORAGE and MLFLOW_TRACKING_URI, literally.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown SLURM job kind {kind!r} (allowed: {', '.join(KINDS)})")
    args = list(command_args)
    if not args or not all(isinstance(a, str) for a in args):
        raise ConfigError(f"the worker command of a {kind} job must be a non-empty list of strings, got {args!r}")
    if kind != "tune" and (array_size is not None or array_concurrency is not None or study_storage is not None):
        raise ConfigError(f"array_size, array_concurrency and study_storage apply to tune jobs, not {kind!r}")
    size = profile.array_size if array_size is None else array_size
    concurrency = profile.array_concurrency if array_concurrency is None else array_concurrency
    for key, value in (("array_size", size), ("array_concurrency", concurrency)):
        if type(value) is not int or value < 1:
            raise ConfigError(f"{key} = {value!r} is invalid: expected an integer >= 1")
    name = job_name or f"deepsports-{kind}"
    if not _NAME_RE.match(name):
        raise ConfigError(f"job name {name!r} is invalid: expected letters, digits and _.,:@+- only")

    setup = ""
    if profile.setup_lines:
        # module/conda/venv scripts read variables that may be unset, so -u is off while they run.
        setup = "\n".join(["# Environment set-up (from the profile).", "set +u", *profile.setup_lines, "set -u"])
    env_lines = [f'export {key}="{value}"' for key, value in profile.env.items()]
    if study_storage is not None:
        env_lines.append(f"export DEEPSPORTS_STUDY_STORAGE={shlex.quote(study_storage)}")
    if tracking_uri is not None:
        env_lines.append(f"export MLFLOW_TRACKING_URI={shlex.quote(tracking_uri)}")
    values = {
        "job_name": name,
        "logdir": profile.logdir,
        "grace_seconds": str(profile.grace_seconds),
        "array_last": str(size - 1),
        "array_concurrency": str(concurrency),
        "resources": "\n".join(_resources(kind, profile)),
        "workdir": f'cd "{profile.workdir}"' if profile.workdir else "",
        "setup": setup,
        "environment": "\n".join(env_lines),
        "command": " ".join(shlex.quote(a) for a in args),
        "distributed": _distributed_block(kind, profile),
    }
    path = Path(template_dir or TEMPLATE_DIR) / f"{kind}.sbatch"
    try:
        template = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the SLURM template {str(path)!r}: {exc}") from exc
    return _fill(template, values, str(path))


def _distributed_block(kind: str, profile: SlurmProfile) -> str:
    """Lines that start a multi-process train run with srun (empty for a single process)."""
    if kind != "train" or profile.nodes * profile.tasks_per_node == 1:
        return ""
    return "\n".join([
        f"# DDP: {profile.nodes} node(s) x {profile.tasks_per_node} task(s), one process per task; rank 0's node hosts",
        "# the rendezvous. srun passes SIGUSR1/SIGTERM on to every task; rank 0 checkpoints and requeues.",
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        'export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"',
        "launch=(srun --kill-on-bad-exit=1 --cpus-per-task=\"$SLURM_CPUS_PER_TASK\")",
    ])


def _log_dirs(script_text: str) -> list[str]:
    """Directories of the script's ``--output``/``--error`` files (sbatch does not create them)."""
    dirs = []
    for line in script_text.splitlines():
        match = re.match(r"#SBATCH\s+(?:--output|--error|-o|-e)[=\s]+(\S+)", line)
        if match:
            parent = os.path.dirname(match.group(1))
            # A directory with a %-pattern (%u, %x) is only known to SLURM.
            if parent and "%" not in parent:
                dirs.append(parent)
    return dirs


def submit(script_text: str, dry_run: bool = False, *, cwd: str | os.PathLike | None = None) -> str | None:
    """Submit a job script with ``sbatch --parsable``; return its job id (None and nothing done if ``dry_run``).

    ``cwd`` is the submit directory (``$SLURM_SUBMIT_DIR``); relative log directories are created in it.
    """
    if dry_run:
        return None
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SlurmError("sbatch was not found on PATH: submit from a SLURM login node "
                         "(or start the local cluster: slurm/local-cluster.sh start), or use --dry-run")
    base = Path(cwd) if cwd is not None else Path.cwd()
    for directory in _log_dirs(script_text):
        try:
            (base / directory).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SlurmError(f"cannot create the log directory {str(base / directory)!r}: {exc}") from exc
    try:
        proc = subprocess.run([sbatch, "--parsable"], input=script_text, text=True, capture_output=True,
                              cwd=base, check=False)
    except OSError as exc:
        raise SlurmError(f"cannot run {sbatch}: {exc}") from exc
    if proc.returncode != 0:
        raise SlurmError(f"sbatch failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    # --parsable prints "<job id>" or "<job id>;<cluster>".
    job_id = proc.stdout.strip().splitlines()[-1].split(";")[0] if proc.stdout.strip() else ""
    if not job_id.isdigit():
        raise SlurmError(f"sbatch printed no job id: stdout {proc.stdout!r}, stderr {proc.stderr!r}")
    return job_id


def watch_hints(job_id: str, profile: SlurmProfile, tracking_uri: str | None = None) -> list[str]:
    """Commands that follow a submitted job (printed by ``deepsports submit``)."""
    hints = [f"squeue -j {job_id}", f"tail -f {profile.logdir}/*_{job_id}*.log"]
    if tracking_uri:
        hints.append(f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)}")
    return hints


def slurm_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """SLURM_JOB_ID, SLURM_ARRAY_JOB_ID, SLURM_ARRAY_TASK_ID, SLURMD_NODENAME, SLURM_RESTART_COUNT of this job.

    Empty outside a job. SLURM sets SLURM_RESTART_COUNT only after a requeue; inside a job it is "0" before.
    """
    env = os.environ if environ is None else environ
    out = {name: env[name] for name in SLURM_ENV_VARS if env.get(name)}
    if "SLURM_JOB_ID" in out:
        out.setdefault("SLURM_RESTART_COUNT", "0")
    return out


def task_job_id(environ: Mapping[str, str] | None = None) -> str | None:
    """The id that names this job or array task alone in scontrol (None outside SLURM).

    For an array task that is ``<array job id>_<task id>``: the last task of an array runs under the
    array's own job id, and ``scontrol requeue <array job id>`` requeues every task of the array.
    """
    env = slurm_env(environ)
    if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def requeue_self(environ: Mapping[str, str] | None = None) -> str:
    """``scontrol requeue`` this job/array task; returns the id requeued.

    Call it last, after the checkpoint is written: SLURM then sends SIGTERM (and SIGKILL after KillWait)
    to the job, and the task starts again, as the same job id with SLURM_RESTART_COUNT+1, once its
    BeginTime (about cred_expire, 120 s by default) has passed.
    """
    job = task_job_id(environ)
    if job is None:
        raise SlurmError("requeue_self: not running inside a SLURM job (SLURM_JOB_ID is not set)")
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        raise SlurmError("requeue_self: scontrol was not found on PATH")
    try:
        proc = subprocess.run([scontrol, "requeue", job], text=True, capture_output=True, check=False)
    except OSError as exc:
        raise SlurmError(f"cannot run {scontrol}: {exc}") from exc
    if proc.returncode != 0:
        raise SlurmError(f"scontrol requeue {job} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return job
