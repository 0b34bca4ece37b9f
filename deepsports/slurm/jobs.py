"""SLURM job scripts from a profile, their submission, and a running job's view of itself.

A profile (``slurm/profiles/*.yaml``, read by :mod:`deepsports.slurm.profile`) holds everything site-
or user-specific: partition, account, resources, the environment set-up lines and the working/log
directories. The templates in
``slurm/templates`` hold only what every DeepSports job needs: ``--signal=B:<signal>@<grace>`` (the
profile's ``signal``, USR1 by default) so the worker can checkpoint before its time limit, ``--requeue``,
per-task logs opened in append mode (a requeued task continues its log), and ``exec`` of the worker so
that the signal reaches Python.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from deepsports.errors import ConfigError, DeepSportsError
from deepsports.slurm.env import ClusterEnv
from deepsports.slurm.profile import (
    NAME_RE,
    SECRET_ENV,
    SlurmProfile,
)

__all__ = ["KINDS", "TEMPLATE_DIR", "SlurmError", "job_info", "render_script", "requeue_self", "slurm_env", "submit",
           "task_job_id", "watch_hints", "worker_command"]

KINDS = ("tune", "train", "prepare")
TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "assets" / "slurm" / "templates"  # shipped (deepsports.locate)
#: Seconds a SLURM command may take before it counts as failed: a hung controller must not eat the
#: grace period of a job that is checkpointing (``$DEEPSPORTS_SLURM_TIMEOUT`` overrides it).
COMMAND_TIMEOUT_S = 20.0


class SlurmError(DeepSportsError):
    """``sbatch``/``scontrol`` is missing or refused a request (the message carries its stderr)."""

    exit_code = 7


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
    if not NAME_RE.match(name):
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
        "signal": profile.signal,
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
        f"# the rendezvous. srun passes SIG{profile.signal}/SIGTERM on to every task; rank 0 checkpoints and requeues.",
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
                         "(or start the local cluster: deploy/slurm-local.sh start), or use --dry-run")
    base = Path(cwd) if cwd is not None else Path.cwd()
    for directory in _log_dirs(script_text):
        try:
            (base / directory).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SlurmError(f"cannot create the log directory {str(base / directory)!r}: {exc}") from exc
    # sbatch hands the job its own environment: not the secrets in it (tasks read a credentials file).
    env = {key: value for key, value in os.environ.items() if key not in SECRET_ENV}
    proc = _run([sbatch, "--parsable"], input_text=script_text, cwd=base, env=env)
    if proc.returncode != 0:
        raise SlurmError(f"sbatch failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    # --parsable prints "<job id>" or "<job id>;<cluster>".
    job_id = proc.stdout.strip().splitlines()[-1].split(";")[0] if proc.stdout.strip() else ""
    if not job_id.isdigit():
        raise SlurmError(f"sbatch printed no job id: stdout {proc.stdout!r}, stderr {proc.stderr!r}")
    return job_id


def watch_hints(job_id: str, profile: SlurmProfile, tracking_uri: str | None = None,
                submit_dir: str | os.PathLike | None = None) -> list[str]:
    """Commands that follow a submitted job (printed by ``deepsports submit``), ready to paste: the job's
    ``$SLURM_SUBMIT_DIR`` and relative paths are spelled out as the submit directory."""
    base = Path(submit_dir) if submit_dir is not None else Path.cwd()
    logdir = profile.logdir if os.path.isabs(profile.logdir) else str(base / profile.logdir)
    hints = [f"squeue -j {job_id}", f"tail -f {logdir}/*_{job_id}*.log"]
    if tracking_uri:
        uri = re.sub(r"\$\{SLURM_SUBMIT_DIR\}|\$SLURM_SUBMIT_DIR\b", lambda _: str(base), tracking_uri)
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            uri = f"sqlite:///{base / uri.removeprefix('sqlite:///')}"
        # deepsports ui: mlflow ui on 127.0.0.1 with the runs-table URL (deepsports/tracking/ui.py)
        hints.append(f"MLFLOW_TRACKING_URI={shlex.quote(uri)} deepsports ui")
    return hints


def slurm_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """SLURM_JOB_ID, SLURM_ARRAY_JOB_ID, SLURM_ARRAY_TASK_ID, SLURMD_NODENAME, SLURM_RESTART_COUNT of this job.

    Empty outside a job. SLURM sets SLURM_RESTART_COUNT only after a requeue; inside a job it is "0" before.
    """
    return ClusterEnv.read(environ).job_vars()


def task_job_id(environ: Mapping[str, str] | None = None) -> str | None:
    """The id that names this job or array task alone in scontrol (None outside SLURM).

    For an array task that is ``<array job id>_<task id>``: the last task of an array runs under the
    array's own job id, and ``scontrol requeue <array job id>`` requeues every task of the array.
    """
    return ClusterEnv.read(environ).task_job_id


def requeue_self(environ: Mapping[str, str] | None = None, *, timeout_s: float | None = None) -> str:
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
    proc = _run([scontrol, "requeue", job], timeout_s=timeout_s)
    if proc.returncode != 0:
        raise SlurmError(f"scontrol requeue {job} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return job


def job_info(job: str, *, timeout_s: float | None = None) -> dict[str, str]:
    """A job or array task as the controller reports it (``scontrol -o show job``): ``{"JobState": "RUNNING",
    "Restarts": "0", "RunTime": "00:01:02", ...}``; :class:`SlurmError` when scontrol fails or does not answer."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        raise SlurmError("scontrol was not found on PATH")
    proc = _run([scontrol, "-o", "show", "job", job], timeout_s=timeout_s)
    if proc.returncode != 0:
        raise SlurmError(f"scontrol show job {job} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    fields = dict(re.findall(r"(?:^|\s)(\w+)=(\S*)", proc.stdout.splitlines()[0] if proc.stdout else ""))
    if "JobState" not in fields:
        raise SlurmError(f"scontrol show job {job} printed no JobState: {proc.stdout.strip()[:200]!r}")
    return fields


def _timeout_s(timeout_s: float | None) -> float:
    if timeout_s is not None:
        return timeout_s
    text = os.environ.get("DEEPSPORTS_SLURM_TIMEOUT", "")
    try:
        return float(text) if text else COMMAND_TIMEOUT_S
    except ValueError:
        raise ConfigError(f"DEEPSPORTS_SLURM_TIMEOUT={text!r}: expected seconds") from None


def _run(argv: list[str], *, input_text: str | None = None, cwd: str | os.PathLike | None = None,
         timeout_s: float | None = None, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run one SLURM command with a time limit (:data:`COMMAND_TIMEOUT_S`); SlurmError if it cannot run or hangs."""
    limit = _timeout_s(timeout_s)
    try:
        return subprocess.run(argv, input=input_text, text=True, capture_output=True, cwd=cwd, check=False,
                              timeout=limit, env=None if env is None else dict(env))
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{' '.join(argv[:3])} did not answer within {limit:g} s (is slurmctld up and "
                         f"reachable?)") from None
    except OSError as exc:
        raise SlurmError(f"cannot run {argv[0]}: {exc}") from exc
