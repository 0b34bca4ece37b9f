"""Fast checks of SLURM profiles, rendered job scripts, the job's identity and the preemption flag.

No cluster needed: scripts are syntax-checked with ``bash -n`` and run with plain bash (their ``exec``
line then runs a small Python program); signals are sent to this process and to subprocesses.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from deepsports.errors import ConfigError, TrainingError
from deepsports.signals import StopFlag
from deepsports.slurm.jobs import (
    KINDS,
    TEMPLATE_DIR,
    SlurmError,
    render_script,
    requeue_self,
    slurm_env,
    submit,
    task_job_id,
    worker_command,
)
from deepsports.slurm.profile import PROFILE_DIR, build_profile, load_profile, time_limit_seconds

REPO = Path(__file__).resolve().parents[2]
SHIPPED_PROFILES = sorted(PROFILE_DIR.glob("*.yaml"))


def _write_profile(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "profile.yaml"
    path.write_text(textwrap.dedent(text))
    return path


# --- profiles -----------------------------------------------------------------------------------

def test_shipped_profiles_load():
    names = {p.stem for p in SHIPPED_PROFILES}
    assert {"local", "example-gpu-cluster"} <= names
    local = load_profile("local")  # a name resolves under slurm/profiles
    assert local.partition == "debug" and local.array_size == 4 and local.array_concurrency == 2
    assert local.time == "01:00:00" and time_limit_seconds(local.time) == 3600
    gpu = load_profile(PROFILE_DIR / "example-gpu-cluster.yaml")
    assert gpu.gpus == "1" and gpu.time == "1-00:00:00" and gpu.grace_seconds == 300
    assert "conda activate deepsports" in gpu.setup_lines


def test_unquoted_time_stays_text(tmp_path):
    # YAML 1.1 would read 04:00:00 as the base-60 integer 14400 (= 14400 minutes for SLURM).
    profile = load_profile(_write_profile(tmp_path, "time: 04:00:00\n"))
    assert profile.time == "04:00:00"
    assert time_limit_seconds("2-03") == 2 * 86400 + 3 * 3600
    assert time_limit_seconds("90") == 5400 and time_limit_seconds("UNLIMITED") is None


@pytest.mark.parametrize("text, key", [
    ("partitoin: debug\n", "partitoin"),
    ("cpus_per_task: 0\n", "cpus_per_task"),
    ("cpus_per_task: true\n", "cpus_per_task"),
    ("mem: 4X\n", "mem"),
    ("gpus: -1\n", "gpus"),
    ("time: soon\n", "time"),
    ("time: '00:10:00'\ngrace_seconds: 600\n", "grace_seconds"),
    ("grace_seconds: 70000\n", "grace_seconds"),
    ("array_concurrency: 0\n", "array_concurrency"),
    ("array_size: 2.5\n", "array_size"),
    ("setup_lines: source .venv/bin/activate\n", "setup_lines"),
    ("extra_sbatch: [constraint=a100]\n", "extra_sbatch"),
    ("env: {'1BAD': x}\n", "env"),
    ("env: {A: 'say \"hi\"'}\n", "env.A"),
    ("workdir: '`rm -rf ~`'\n", "workdir"),
    ("logdir: $DEEPSPORTS_SURELY_UNSET_VAR/logs\n", "logdir"),
    ("partition: 'gpu; rm'\n", "partition"),
    ("signal: KILL\n", "signal"),
])
def test_bad_profile_values_name_file_and_key(tmp_path, text, key):
    path = _write_profile(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    message = str(info.value)
    assert str(path) in message and repr(key) in message


def test_profile_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):  # the message also lists the shipped profiles
        load_profile(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_profile(_write_profile(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_profile(_write_profile(tmp_path, "a: [\n"))


def test_logdir_expands_home_when_loading(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    profile = load_profile(_write_profile(tmp_path, "logdir: ~/logs/\n"))
    assert profile.logdir == f"{tmp_path}/logs"
    # workdir expands on the compute node, inside double quotes, where ~ would stay literal.
    assert build_profile({"workdir": "~/runs"}, "test").workdir == "$HOME/runs"


# --- rendering ----------------------------------------------------------------------------------

@pytest.mark.parametrize("profile_path", SHIPPED_PROFILES, ids=lambda p: p.stem)
@pytest.mark.parametrize("kind", KINDS)
def test_rendered_scripts_carry_signal_requeue_exec(tmp_path, profile_path, kind):
    profile = load_profile(profile_path)
    script = render_script(kind, profile, worker_command(kind, "epochs=1"))
    lines = script.splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert f"#SBATCH --signal=B:USR1@{profile.grace_seconds}" in lines
    assert "#SBATCH --requeue" in lines and "#SBATCH --open-mode=append" in lines
    # Blocked across the exec (pending until Python's handler takes them); srun, when the profile asks for
    # several tasks, forwards them itself.
    launcher = '"${block[@]}" "${launch[@]}" ' if kind == "train" else "env --block-signal=USR1 --block-signal=TERM "
    assert lines[-1] == f"exec {launcher}python -m deepsports.cli {kind} epochs=1"
    assert "trap '' USR1 TERM" in lines and "export DEEPSPORTS_STOP_SIGNAL=USR1" in lines
    assert "launch=(srun" not in script and ("#SBATCH --ntasks-per-node=1" if kind == "train" else "#SBATCH --ntasks=1") in lines
    assert "set -euo pipefail" in lines
    # sbatch reads #SBATCH lines only before the first command.
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert all(not line.startswith("#SBATCH") for line in lines[first_command:])
    assert all(setup in lines for setup in profile.setup_lines)
    output = next(line for line in lines if line.startswith("#SBATCH --output="))
    if kind == "tune":
        assert f"#SBATCH --array=0-{profile.array_size - 1}%{profile.array_concurrency}" in lines
        assert output.endswith("/%x_%A_%a.log")
    else:
        assert not any(line.startswith("#SBATCH --array") for line in lines)
        assert output.endswith("/%x_%j.log")
    assert ("#SBATCH --gres=gpu:1" in lines) == (profile.gpus == "1" and kind != "prepare")
    assert "{{" not in script and "/home" not in script and "/work/" not in script
    path = tmp_path / f"{kind}.sbatch"
    path.write_text(script)
    check = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize("kind", KINDS)
def test_the_warning_signal_of_the_profile_is_rendered_everywhere(kind):
    """NCCL catches SIGUSR1: a profile picks another time-limit warning, in sbatch's option, the traps and the
    worker's environment (test_slurm_field_signals.py runs one on the cluster)."""
    profile = build_profile({"signal": "SIGUSR2", "grace_seconds": 90}, "test")
    assert profile.signal == "USR2"
    script = render_script(kind, profile, worker_command(kind))
    lines = script.splitlines()
    assert "#SBATCH --signal=B:USR2@90" in lines and "trap '' USR2 TERM" in lines
    assert "trap 'deepsports_early_signals+=\" USR2\"' USR2" in lines and "export DEEPSPORTS_STOP_SIGNAL=USR2" in lines
    assert "USR1" not in script


def test_templates_hold_no_user_paths():
    templates = sorted(TEMPLATE_DIR.glob("*.sbatch"))
    assert sorted(t.stem for t in templates) == sorted(KINDS)  # one per job kind: the loop below checks them all
    for template in templates:
        text = template.read_text()
        assert not re.search(r"/home|/Users/|/scratch|/work/|~/", text), template
        assert "{{command}}" in text and "--signal=B:{{signal}}@{{grace_seconds}}" in text
        assert re.search(r"^exec .*\{\{command\}\}$", text, re.M), template


def test_a_multi_task_train_profile_launches_ddp_through_srun(tmp_path):
    profile = build_profile({"nodes": 2, "tasks_per_node": 4, "gpus": "a100:4", "cpus_per_task": 8}, "test")
    script = render_script("train", profile, worker_command("train", "epochs=1"))
    lines = script.splitlines()
    assert "#SBATCH --nodes=2" in lines and "#SBATCH --ntasks-per-node=4" in lines
    assert "#SBATCH --gres=gpu:a100:4" in lines
    assert 'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"' in lines
    assert any(line.startswith("launch=(srun --kill-on-bad-exit=1") for line in lines)
    assert lines[-1] == 'exec "${block[@]}" "${launch[@]}" python -m deepsports.cli train epochs=1'
    assert '[ "${#launch[@]}" -eq 0 ] || block=()  # srun forwards the signals itself' in lines
    path = tmp_path / "train.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    # tune and prepare tasks stay single processes whatever the profile says.
    for kind in ("tune", "prepare"):
        other = render_script(kind, profile, worker_command(kind))
        assert "#SBATCH --ntasks=1" in other and "launch=(srun" not in other
    with pytest.raises(ConfigError, match="tasks_per_node"):
        build_profile({"tasks_per_node": 0}, "test")


def test_render_overrides_and_storage_env():
    profile = load_profile("local")
    script = render_script("tune", profile, ["deepsports", "tune"], job_name="study-7", array_size=8,
                           array_concurrency=3, study_storage="journal:///shared/s 1.log",
                           tracking_uri="sqlite:///mlflow.db")
    assert "#SBATCH --array=0-7%3" in script and "#SBATCH --job-name=study-7" in script
    assert "export DEEPSPORTS_STUDY_STORAGE='journal:///shared/s 1.log'" in script
    assert "export MLFLOW_TRACKING_URI=sqlite:///mlflow.db" in script
    with pytest.raises(ConfigError, match="tune jobs"):
        render_script("train", profile, ["x"], study_storage="s")
    with pytest.raises(ConfigError, match="array_concurrency"):
        render_script("tune", profile, ["x"], array_concurrency=0)
    with pytest.raises(ConfigError, match="kind"):
        render_script("sweep", profile, ["x"])
    with pytest.raises(ConfigError, match="non-empty"):
        render_script("train", profile, [])
    with pytest.raises(ConfigError, match="job name"):
        render_script("train", profile, ["x"], job_name="a b")


def test_rendered_script_runs_with_bash(tmp_path):
    """Without SLURM the script still runs: cd, set-up, env, then exec of the exact argv."""
    (tmp_path / "work").mkdir()
    (tmp_path / "setup.sh").write_text("export FROM_SETUP=yes\n")
    profile = build_profile({
        "workdir": "$RUN_ROOT/work",
        "setup_lines": ["source \"$RUN_ROOT/setup.sh\"", "test -z \"${SURELY_UNSET_VAR}\""],
        "env": {"PROFILE_VAR": "$RUN_ROOT/x"},
    }, "test")
    program = ("import json, os, sys; json.dump({'argv': sys.argv[1:], 'cwd': os.getcwd(), "
               "'env': {k: os.environ.get(k) for k in ('FROM_SETUP', 'PROFILE_VAR', 'MLFLOW_TRACKING_URI', "
               "'OMP_NUM_THREADS')}}, open('out.json', 'w'))")
    args = [sys.executable, "-c", program, "a b", "it's", "$HOME", "*"]
    script = render_script("train", profile, args, tracking_uri="sqlite:///t.db")
    path = tmp_path / "job.sh"
    path.write_text(script)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")} | {"RUN_ROOT": str(tmp_path)}
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads((tmp_path / "work" / "out.json").read_text())
    assert out["argv"] == ["a b", "it's", "$HOME", "*"]
    assert out["cwd"] == str(tmp_path / "work")
    assert out["env"] == {"FROM_SETUP": "yes", "PROFILE_VAR": f"{tmp_path}/x",
                          "MLFLOW_TRACKING_URI": "sqlite:///t.db", "OMP_NUM_THREADS": "1"}


def test_exec_makes_the_worker_the_signalled_process(tmp_path):
    """The rendered script's process *becomes* the worker, so a signal to the batch shell reaches Python."""
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent("""
        import sys, time
        from deepsports.signals import StopFlag
        with StopFlag() as flag:
            print("ready", flush=True)
            deadline = time.monotonic() + 30
            while not flag.requested() and time.monotonic() < deadline:
                time.sleep(0.02)
        print(flag.signal_name, flush=True)
    """))
    script = render_script("train", build_profile({}, "test"), [sys.executable, str(worker)])
    path = tmp_path / "job.sh"
    path.write_text(script)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(["bash", str(path)], stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        lines = [proc.stdout.readline() for _ in range(2)]  # the banner, then "ready"
        assert lines[1].strip() == "ready", lines
        os.kill(proc.pid, signal.SIGUSR1)  # what `--signal=B:USR1` does: signal the batch shell's pid
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert out.strip() == "SIGUSR1"


# --- submission and the job's identity -----------------------------------------------------------

def test_submit_without_sbatch_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    script = render_script("train", load_profile("local"), ["true"])
    assert submit(script, dry_run=True) is None
    with pytest.raises(SlurmError, match="sbatch was not found"):
        submit(script, cwd=tmp_path)


def test_slurm_env_and_task_id():
    assert slurm_env({}) == {} and task_job_id({}) is None
    single = {"SLURM_JOB_ID": "41", "SLURMD_NODENAME": "n1", "HOME": "/x"}
    assert slurm_env(single) == {"SLURM_JOB_ID": "41", "SLURMD_NODENAME": "n1", "SLURM_RESTART_COUNT": "0"}
    assert task_job_id(single) == "41"
    # The last task of an array runs under the array's own id: only A_T names that task alone.
    task = {"SLURM_JOB_ID": "40", "SLURM_ARRAY_JOB_ID": "40", "SLURM_ARRAY_TASK_ID": "3", "SLURM_RESTART_COUNT": "2"}
    assert task_job_id(task) == "40_3" and slurm_env(task)["SLURM_RESTART_COUNT"] == "2"


def test_requeue_self_outside_slurm():
    with pytest.raises(SlurmError, match="not running inside a SLURM job"):
        requeue_self({})


# --- the preemption flag ------------------------------------------------------------------------

def test_flag_records_first_signal_and_restores_handlers():
    def previous(signum, frame):
        raise AssertionError("the old handler must not run while the flag is installed")

    old = signal.signal(signal.SIGUSR1, previous)
    try:
        with StopFlag() as flag:
            assert not flag.requested() and flag.signal_name is None
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 5
            while flag.count < 2 and time.monotonic() < deadline:
                time.sleep(0.01)  # handlers run between bytecodes of the main thread
            assert flag.requested() and flag.signal_name == "SIGUSR1" and flag.count == 2
        assert signal.getsignal(signal.SIGUSR1) is previous
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_flag_refuses_other_threads_and_double_install():
    errors = []

    def install():
        try:
            StopFlag().install()
        except TrainingError as exc:
            errors.append(exc)

    import threading
    thread = threading.Thread(target=install)
    thread.start()
    thread.join()
    assert len(errors) == 1 and "main thread" in str(errors[0])
    with StopFlag() as flag:
        with pytest.raises(TrainingError, match="already installed"):
            flag.install()


def test_sigterm_to_a_subprocess_sets_its_flag(tmp_path):
    program = textwrap.dedent("""
        import sys, time
        from deepsports.signals import StopFlag
        with StopFlag() as flag:
            print("ready", flush=True)
            deadline = time.monotonic() + 30
            while not flag.requested() and time.monotonic() < deadline:
                time.sleep(0.02)
            print(flag.signal_name, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0 and out.strip() == "SIGTERM"


def _report_after_signal(ready, go, out):
    ready.set()
    go.wait(30)
    out.put("alive")


def test_forked_children_leave_the_stop_signal_to_the_main_process():
    """A DataLoader-style forked worker inherits the handler (before its worker_init_fn runs): SLURM's
    SIGTERM to every process must neither kill it nor raise its copy of the flag; the main process acts."""
    ctx = multiprocessing.get_context("fork")
    with StopFlag() as flag:
        ready, go, out = ctx.Event(), ctx.Event(), ctx.Queue()
        child = ctx.Process(target=_report_after_signal, args=(ready, go, out))
        child.start()
        assert ready.wait(30)
        os.kill(child.pid, signal.SIGTERM)
        go.set()
        assert out.get(timeout=30) == "alive"
        child.join(30)
        assert child.exitcode == 0
        assert not flag.requested()
