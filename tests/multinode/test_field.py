"""Field scenarios on the simulated multi-node cluster, the lab's way: compute nodes node1..node3 reach
PostgreSQL and an MLflow server with authentication on the login node's address; tasks get the tracking
URI and a 0600 credentials file's *name* from their profile, the database password from a 0600 PGPASSFILE.

Every scenario's jobs are submitted by one module fixture, at once, so their waits overlap (the suite's
time budget); each test then waits for its own scenario and asserts exact Optuna trial states, one MLflow
run per trial, each epoch's metrics exactly once, and the node of every attempt.

- a study as a 4-task array over the 3 nodes, Optuna in PostgreSQL (``test_study_over_three_nodes_...``);
- the same with the study as a journal on the shared file system;
- the tracking server unreachable from a healthy node for 60 s in the middle of an epoch;
- security: no credentials, a READ user, the password nowhere in jobs, environments, logs, params or tags.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pytest
import requests
from optuna.trial import TrialState

from deepsports.slurm.jobs import render_script, submit, worker_command
from deepsports.slurm.profile import build_profile
from deepsports.tags import PARENT_RUN_ATTR, RUN_ATTR
from deepsports.train.loop import EPOCH_METRICS
from deepsports.tune.accounting import attempts_of
from deepsports.tune.study import open_storage
from tests.e2e_helpers import PYTHON_BIN, REPO, TINY, TUNE_SPACE, deepsports_cmd
from tests.multinode.conftest import FAILING_NODE, NODES, TRACKING_ADDR, Lab

pytestmark = [pytest.mark.multinode, pytest.mark.slow]
optuna.logging.set_verbosity(optuna.logging.WARNING)

EPOCHS = 2


@dataclass
class Scenario:
    name: str
    directory: Path
    storage: str
    job: str = ""
    epochs: int = EPOCHS
    notes: dict = field(default_factory=dict)

    @property
    def logs(self) -> Path:
        return self.directory / "logs"


def _profile(lab: Lab, directory: Path, **values) -> dict:
    return {"partition": "debug", "time": "15", "cpus_per_task": 1, "mem": "1G", "grace_seconds": 30,
            "logdir": str(directory / "logs"), "setup_lines": [f"export PATH={PYTHON_BIN}:$PATH"],
            "extra_sbatch": [f"--exclude={FAILING_NODE}"],  # kept for the node failure alone
            "env": {"PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": lab.tracking_uri,
                    # Names of 0600 files, never a secret: the job script and environment hold no password.
                    "DEEPSPORTS_MLFLOW_CREDENTIALS": str(lab.credentials["alice"]), "PGPASSFILE": lab.env["PGPASSFILE"]},
            **values}


def _submit_tune(lab: Lab, scenario: Scenario, cache_dir: Path, *, tasks: int, trials: int, profile: dict | None = None,
                 extra: tuple[str, ...] = ()) -> None:
    (scenario.directory / "space.yaml").write_text(textwrap.dedent(TUNE_SPACE))
    settings = {**TINY, "cache_dir": str(cache_dir), "epochs": scenario.epochs, "evaluate": "false"}
    sets = [arg for key, value in settings.items() if key != "learning_rate" for arg in ("--set", f"{key}={value}")]
    command = worker_command("tune", str(scenario.directory / "space.yaml"), "--study", scenario.name, "--storage",
                             scenario.storage, "--max-trials", str(trials), "--pruner", "none", "--seed", "0",
                             "--set", f"checkpoint_dir={scenario.directory / 'ckpt'}", *extra, *sets,
                             python=sys.executable)
    profile = build_profile(profile or _profile(lab, scenario.directory, array_size=tasks, array_concurrency=tasks),
                            scenario.name)
    script = render_script("tune", profile, command, job_name=scenario.name)
    (scenario.directory / "job.sbatch").write_text(script)
    scenario.job = submit(script, cwd=scenario.directory)


def _submit_ddp(lab: Lab, scenario: Scenario, cache_dir: Path) -> None:
    values = {**TINY, "cache_dir": str(cache_dir), "epochs": scenario.epochs, "batch_size": 5, "evaluate": "false"}
    command = worker_command("train", *[f"{k}={v}" for k, v in values.items()], "run_name=ddp-two-nodes",
                             f"checkpoint_dir={scenario.directory / 'ckpt'}", python=sys.executable)
    profile = build_profile(_profile(lab, scenario.directory, nodes=2, tasks_per_node=1), "ddp")
    script = render_script("train", profile, command, job_name="ddp")
    (scenario.directory / "job.sbatch").write_text(script)
    scenario.job = submit(script, cwd=scenario.directory)


def _squeue(lab: Lab, job: str) -> list[str]:
    return subprocess.run(["squeue", "-h", "-r", "-j", job, "-o", "%i %T %N"], env=lab.env, capture_output=True,
                          text=True).stdout.splitlines()


def _jobs(lab: Lab, job: str) -> list[dict[str, str]]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], env=lab.env, capture_output=True, text=True).stdout
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines()]


def _wait(lab: Lab, scenario: Scenario, condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    queue = subprocess.run(["squeue", "-r"], env=lab.env, capture_output=True, text=True).stdout
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(scenario.logs.glob("*.log")))
    pytest.fail(f"{scenario.name}: timed out after {timeout_s} s waiting for {what}:\n{queue}\n{tails}")


def _finished(lab: Lab, scenario: Scenario, timeout_s: float = 400) -> None:
    _wait(lab, scenario, lambda: not _squeue(lab, scenario.job), timeout_s, "its jobs to finish")


def _all_completed(scenario: Scenario, tasks: list[dict[str, str]], restarts: str = "0") -> None:
    """Every task COMPLETED with exit 0 and ``restarts`` restarts; else the tasks and their logs' tails."""
    summary = [(t.get("ArrayTaskId") or t["JobId"], t["JobState"], t["ExitCode"], t["Restarts"], t["BatchHost"])
               for t in tasks]
    if all(row[1:4] == ("COMPLETED", "0:0", restarts) for row in summary):
        return
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted(scenario.logs.glob("*.log")))
    pytest.fail(f"{scenario.name}: tasks (id, state, exit, restarts, host) {summary}\n{tails}")


def _study(scenario: Scenario) -> optuna.Study:
    return optuna.load_study(study_name=scenario.name, storage=open_storage(scenario.storage))


def _node(attempt: dict) -> str:
    return attempt["worker"].split(":", 1)[0]  # "<host>:<pid> slurm <job>"


def _assert_study(lab: Lab, scenario: Scenario, trials: int) -> list[str]:
    """Every trial COMPLETE, exactly one child run each (FINISHED, under the one parent), each epoch's
    metrics exactly once, artifacts uploaded through the server; returns the node of each trial's attempt."""
    study = _study(scenario)
    assert [(t.number, t.state) for t in study.trials] == [(n, TrialState.COMPLETE) for n in range(trials)]
    client = lab.client("alice")
    parent = study.user_attrs[PARENT_RUN_ATTR]
    experiment = client.get_run(parent).info.experiment_id
    children = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    by_trial: dict[int, list] = {}
    for run in children:
        by_trial.setdefault(int(run.data.tags["optuna.trial_number"]), []).append(run)
    assert sorted(by_trial) == list(range(trials)) and all(len(r) == 1 for r in by_trial.values())
    nodes = []
    for trial in study.trials:
        (run,) = by_trial[trial.number]
        assert run.info.run_id == trial.user_attrs[RUN_ATTR] and run.info.status == "FINISHED"
        for key in EPOCH_METRICS:
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(
                range(1, scenario.epochs + 1)), (trial.number, key)
        (attempt,) = attempts_of(trial)
        assert attempt["outcome"] == "complete" and _node(attempt) in NODES
        assert run.data.tags["slurm.node"] == _node(attempt)
        nodes.append(_node(attempt))
        # Uploaded through the server: the run's artifact location is the server's, and the file is in
        # the server's artifact store (no client wrote there).
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "config.yaml" in names
        stored = list((lab.mlflow_dir / "artifacts").rglob(f"{run.info.run_id}/artifacts/config.yaml"))
        assert len(stored) == 1
    return nodes


def _status(lab: Lab, scenario: Scenario) -> dict:
    # As alice on the login node: her credentials file, no password in the environment.
    env = {k: v for k, v in lab.env.items() if not k.startswith("MLFLOW_TRACKING_")}
    env.update(PYTHONPATH=str(REPO), MLFLOW_TRACKING_URI=lab.tracking_uri,
               DEEPSPORTS_MLFLOW_CREDENTIALS=str(lab.credentials["alice"]))
    proc = subprocess.run(deepsports_cmd("status", scenario.name, "--storage", scenario.storage, "--json"),
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# --------------------------------------------------------------------------------------------
# All scenarios, submitted at once
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def field(lab: Lab, tiny_cache_dir, tmp_path_factory) -> dict[str, Scenario]:
    """Submits every scenario's jobs, first the two studies (so that their tasks spread over idle nodes)."""
    scenarios: dict[str, Scenario] = {}
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = lab.env["SLURM_CONF"]
    try:
        # The lab's first step (docs/multinode.md): the experiment exists before the first array. Tasks racing
        # to create it meet MLflow's auth app granting the creator MANAGE only after its reply: in that window
        # another task's runs/create is refused (403; seen once in three clean-clone runs).
        from deepsports.tracking.runs import RunTracker

        lab.client("alice")  # her credentials in this process's environment, for the tracker
        try:
            RunTracker(lab.tracking_uri).ensure_experiment("deepsports")
        finally:
            os.environ.pop("MLFLOW_TRACKING_USERNAME", None)
            os.environ.pop("MLFLOW_TRACKING_PASSWORD", None)
        d = tmp_path_factory.mktemp("pg-study")
        scenarios["pg"] = Scenario("pgstudy", d, lab.optuna_url)
        _submit_tune(lab, scenarios["pg"], tiny_cache_dir, tasks=4, trials=4)

        d = tmp_path_factory.mktemp("journal-study")
        scenarios["journal"] = Scenario("journalstudy", d, str(d / "study.journal"))
        _submit_tune(lab, scenarios["journal"], tiny_cache_dir, tasks=4, trials=4)

        # The tracking server unreachable from a healthy node: one trial of 4 epochs, the client's HTTP
        # timeout shortened so that a request sent into the outage is retried within it.
        d = tmp_path_factory.mktemp("outage")
        outage = Scenario("outage", d, lab.optuna_url, epochs=4)
        profile = _profile(lab, d, array_size=1, array_concurrency=1)
        profile["env"] = {**profile["env"], "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
        profile["extra_sbatch"] = ["--nodelist=node3"]
        _submit_tune(lab, outage, tiny_cache_dir, tasks=1, trials=1, profile=profile)
        scenarios["outage"] = outage
        _drive(outage, _outage, lab)

        # A node drops off the network in the middle of a trial (PostgreSQL study: the cut-off worker
        # cannot reach it either). Heartbeat 3 s, grace 20 s: the worker's lease is 11.5 s (a 2-core machine
        # running every scenario at once delays a beat by several seconds). The first attempt
        # runs on node4, where nothing else runs (the driver lets the requeued task go anywhere else).
        d = tmp_path_factory.mktemp("node-failure")
        failure = Scenario("nodefail", d, lab.optuna_url, epochs=6)
        profile = _profile(lab, d, array_size=1, array_concurrency=1, extra_sbatch=[f"--exclude={','.join(NODES)}"])
        _submit_tune(lab, failure, tiny_cache_dir, tasks=1, trials=1, profile=profile,
                     extra=("--heartbeat", "3", "--grace-period", "20"))
        scenarios["failure"] = failure
        _drive(failure, _node_failure, lab)

        # A DDP run over two nodes (srun, gloo across the bridge), requeued, resumed on other nodes.
        d = tmp_path_factory.mktemp("ddp")
        ddp = Scenario("ddp", d, "", epochs=4)
        _submit_ddp(lab, ddp, tiny_cache_dir)
        scenarios["ddp"] = ddp
        _drive(ddp, _ddp_requeue, lab)
    finally:
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
    yield scenarios
    for scenario in scenarios.values():
        if scenario.job:
            subprocess.run(["scancel", scenario.job], env=lab.env, capture_output=True)


def _drive(scenario: Scenario, driver, *args) -> None:
    """Run ``driver(*args, scenario)`` in a thread beside the jobs (tests run one after another; the faults
    must hit while every scenario runs); ``_driven`` joins it and re-raises what it raised."""
    def run():
        try:
            driver(*args, scenario)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            scenario.notes["error"] = exc

    thread = threading.Thread(target=run, name=f"driver-{scenario.name}", daemon=True)
    thread.start()
    scenario.notes["thread"] = thread


def _driven(scenario: Scenario, timeout_s: float = 600) -> None:
    scenario.notes["thread"].join(timeout_s)
    assert not scenario.notes["thread"].is_alive(), f"{scenario.name}: its driver did not finish in {timeout_s} s"
    if "error" in scenario.notes:
        raise scenario.notes["error"]


def test_study_over_three_nodes_with_postgres_and_the_server_on_the_login_node(lab, field):
    scenario = field["pg"]
    _finished(lab, scenario)
    tasks = _jobs(lab, scenario.job)
    assert sorted(t["ArrayTaskId"] for t in tasks) == ["0", "1", "2", "3"]
    _all_completed(scenario, tasks)
    assert {t["BatchHost"] for t in tasks} == set(NODES)  # the array spread over every node
    nodes = _assert_study(lab, scenario, 4)
    assert set(nodes) <= {t["BatchHost"] for t in tasks}
    status = _status(lab, scenario)
    assert status["states"] == {**{s: 0 for s in status["states"]}, "COMPLETE": 4}
    assert (status["trials_total"], status["original_trials"], status["running"], status["waiting"],
            status["failed"], status["retries"]) == (4, 4, [], [], status["failed"], [])
    assert [t["state"] for t in status["trials"]] == ["COMPLETE"] * 4
    assert status["parent_run_id"] == _study(scenario).user_attrs[PARENT_RUN_ATTR]


def test_the_same_study_with_a_journal_on_the_shared_file_system(lab, field):
    scenario = field["journal"]
    _finished(lab, scenario)
    tasks = _jobs(lab, scenario.job)
    _all_completed(scenario, tasks)
    nodes = _assert_study(lab, scenario, 4)
    assert len(set(nodes)) >= 2 and set(nodes) <= set(NODES)
    status = _status(lab, scenario)
    assert status["states"] == {**{s: 0 for s in status["states"]}, "COMPLETE": 4}
    assert [t["state"] for t in status["trials"]] == ["COMPLETE"] * 4


def _block(node: str) -> None:
    """Cut ``node`` off the tracking server's address only (a blackhole route in the node's own namespace):
    SLURM and PostgreSQL on the login node's main address still get through, so the node stays healthy."""
    subprocess.run(["nsenter", f"--net=/run/netns/dsc-{node}", "ip", "route", "add", "blackhole",
                    f"{TRACKING_ADDR}/32"], check=True)


def _unblock(node: str) -> None:
    subprocess.run(["nsenter", f"--net=/run/netns/dsc-{node}", "ip", "route", "del", "blackhole",
                    f"{TRACKING_ADDR}/32"], check=True)


def _outage(lab: Lab, scenario: Scenario) -> None:
    """Driver (a thread started with the jobs): once epoch 1 of the trial has ended, cut its node off the
    tracking server for 60 s, then note what was seen."""
    def training_epoch_2():
        try:
            trials = _study(scenario).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        except (ValueError, KeyError):
            return None
        return trials[0] if trials and 1 in trials[0].intermediate_values else None

    trial = _wait(lab, scenario, training_epoch_2, 400, "epoch 1 to end")
    node = _node(attempts_of(trial)[0])
    _block(node)
    try:
        time.sleep(60)
        # The node stayed healthy in SLURM's eyes, and the trial has not finished without the server.
        (task,) = _jobs(lab, scenario.job)
        scenario.notes.update(node=node, during=(task["JobState"], task["BatchHost"]),
                              trial_state_during=_study(scenario).trials[0].state)
    finally:
        _unblock(node)


def test_the_tracking_server_unreachable_for_60_s_mid_epoch_loses_and_doubles_nothing(lab, field):
    scenario = field["outage"]
    _driven(scenario)
    _finished(lab, scenario)
    node = scenario.notes["node"]
    assert scenario.notes["during"] == ("RUNNING", node)
    assert scenario.notes["trial_state_during"] == TrialState.RUNNING
    (task,) = _jobs(lab, scenario.job)
    assert (task["JobState"], task["ExitCode"], task["Restarts"]) == ("COMPLETED", "0:0", "0")
    # Training went on: the one attempt on that node finished every epoch, each logged exactly once.
    assert _assert_study(lab, scenario, 1) == [node]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _node_failure(lab: Lab, scenario: Scenario) -> None:
    """Driver: once epoch 1 has ended, take the trial's node off the network; note when its worker fenced
    itself; once the retry runs elsewhere, bring the link back and let the node rejoin."""
    def in_epoch_2():
        try:
            trials = _study(scenario).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        except (ValueError, KeyError):
            return None
        return trials[0] if trials and 1 in trials[0].intermediate_values else None

    trial = _wait(lab, scenario, in_epoch_2, 400, "epoch 1 to end")
    attempt = attempts_of(trial)[0]
    node, pid = _node(attempt), int(attempt["worker"].split(":", 1)[1].split()[0])
    link = f"dsc-n{node[len('node'):]}"
    subprocess.run(["ip", "link", "set", link, "down"], check=True)
    cut = time.time()
    scenario.notes.update(node=node, pid=pid, cut=cut)
    try:
        _wait(lab, scenario, lambda: not _alive(pid), 60, f"the cut-off worker {pid} on {node} to fence itself")
        scenario.notes["fenced"] = time.time()
        # SLURM requeues the task once the node is DOWN; it may then run anywhere but there.
        _wait(lab, scenario, lambda: _jobs(lab, scenario.job)[0]["JobState"] == "PENDING", 120, "the requeue")
        scenario.notes["requeued"] = time.time()
        subprocess.run(["scontrol", "update", f"JobId={scenario.job}", f"ExcNodeList={node}"], env=lab.env, check=True)

        def retry_running():
            trials = _study(scenario).get_trials(deepcopy=False)
            # The retry's own attempt has begun (it inherits the dead trial's intermediate values at once).
            return len(trials) == 2 and trials[1].state == TrialState.RUNNING and attempts_of(trials[1])

        _wait(lab, scenario, retry_running, 300, "the retry to train on another node")
    finally:
        subprocess.run(["ip", "link", "set", link, "up"], check=True)
    scenario.notes["healed"] = time.time()
    subprocess.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"], env=lab.env, capture_output=True)


def test_a_node_lost_mid_trial_is_fenced_and_its_trial_resumes_on_another_node(lab, field):
    scenario = field["failure"]
    _driven(scenario)
    _finished(lab, scenario)
    notes = scenario.notes
    (task,) = _jobs(lab, scenario.job)
    assert (task["JobState"], task["ExitCode"], task["Restarts"]) == ("COMPLETED", "0:0", "1"), task
    assert notes["node"] == FAILING_NODE and task["BatchHost"] in NODES
    study = _study(scenario)
    first, retry = study.trials
    assert (first.state, retry.state) == (TrialState.FAIL, TrialState.COMPLETE)
    assert retry.system_attrs["failed_trial"] == 0 and retry.user_attrs[RUN_ATTR] == first.user_attrs[RUN_ATTR]
    (dead,) = attempts_of(first)
    (resumed,) = attempts_of(retry)
    assert (dead["outcome"], _node(dead)) == ("dead", notes["node"])
    assert (resumed["outcome"], _node(resumed)) == ("complete", task["BatchHost"]) and resumed["resumed_epoch"] >= 1
    # Fenced: the cut-off worker was gone before the retry started, and wrote nothing after it.
    assert notes["cut"] < notes["fenced"] < resumed["start"] < notes["healed"]
    log = (scenario.logs / f"nodefail_{scenario.job}_0.log").read_text()
    assert "fenced: no heartbeat of trial 0 reached the study storage" in log and f":{notes['pid']}, exit 9" in log
    for path in (scenario.directory / "ckpt").rglob("*"):
        if path.is_file():
            assert not notes["fenced"] < path.stat().st_mtime < resumed["start"], path
    # One run, both attempts: every epoch exactly once, FINISHED.
    client = lab.client("alice")
    run = client.get_run(retry.user_attrs[RUN_ATTR])
    assert run.info.status == "FINISHED"
    for key in EPOCH_METRICS:
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(
            range(1, scenario.epochs + 1)), key
    parent = study.user_attrs[PARENT_RUN_ATTR]
    children = client.search_runs([run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert [r.info.run_id for r in children] == [run.info.run_id]
    assert sorted(retry.intermediate_values) == list(range(1, scenario.epochs + 1))
    print(f"figure: node failure: link down -> worker fenced {notes['fenced'] - notes['cut']:.1f} s, -> task requeued "
          f"{notes['requeued'] - notes['cut']:.1f} s, -> retry attempt started {resumed['start'] - notes['cut']:.1f} s")


def _ddp_requeue(lab: Lab, scenario: Scenario) -> None:
    """Driver: after epoch 1's checkpoint, ``scontrol requeue`` the DDP job and keep it off one of its nodes."""
    ckpt = scenario.directory / "ckpt"
    _wait(lab, scenario, lambda: (ckpt / "epoch-0001.pt").exists(), 400, "epoch 1's checkpoint")
    (job,) = _jobs(lab, scenario.job)
    scenario.notes["before"] = job["NodeList"]
    subprocess.run(["scontrol", "requeue", scenario.job], env=lab.env, check=True)
    scenario.notes["requeued_at"] = time.time()
    _wait(lab, scenario, lambda: _jobs(lab, scenario.job)[0]["JobState"] == "PENDING", 120, "the requeue")
    first = subprocess.run(["scontrol", "show", "hostnames", job["NodeList"]], env=lab.env, capture_output=True,
                           text=True, check=True).stdout.split()[0]
    subprocess.run(["scontrol", "update", f"JobId={scenario.job}", f"ExcNodeList={first},{FAILING_NODE}"],
                   env=lab.env, check=True)
    scenario.notes["excluded"] = first


def test_a_ddp_run_over_two_nodes_requeued_resumes_on_other_nodes_in_the_same_run(lab, field):
    scenario = field["ddp"]
    _driven(scenario)
    _finished(lab, scenario)
    (job,) = _jobs(lab, scenario.job)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), job
    after = subprocess.run(["scontrol", "show", "hostnames", job["NodeList"]], env=lab.env, capture_output=True,
                           text=True, check=True).stdout.split()
    before = subprocess.run(["scontrol", "show", "hostnames", scenario.notes["before"]], env=lab.env,
                            capture_output=True, text=True, check=True).stdout.split()
    assert len(before) == len(after) == 2 and scenario.notes["excluded"] not in after and before != after
    log = (scenario.logs / f"ddp_{scenario.job}.log").read_text()
    assert f"on {before[0]}, restart 0," in log and f"on {after[0]}, restart 1," in log
    client = lab.client("alice")
    runs = client.search_runs([client.get_experiment_by_name("deepsports").experiment_id],
                              filter_string="attributes.run_name = 'ddp-two-nodes'")
    (run,) = runs
    assert run.info.status == "FINISHED" and run.data.tags["deepsports.world_size"] == "2"
    assert run.data.tags["slurm.job_id"] == scenario.job
    for key in EPOCH_METRICS:
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(
            range(1, scenario.epochs + 1)), key
    started = subprocess.run(["scontrol", "-o", "show", "job", scenario.job], env=lab.env, capture_output=True,
                             text=True).stdout
    print(f"figure: DDP requeue -> restarted on {after} (job StartTime {_field(started, 'StartTime')}), requeued at "
          f"{time.strftime('%H:%M:%S', time.localtime(scenario.notes['requeued_at']))}")


def _field(line: str, key: str) -> str:
    return dict(re.findall(r"(\w+)=(\S*)", line)).get(key, "?")


def _leaks(secret: str, lab: Lab, scenarios: dict[str, Scenario]) -> list[str]:
    """Every place a job, a log or a run could carry ``secret`` that does."""
    found = []
    places = [lab.mlflow_dir / "mlflow-server.log", lab.pg_dir / "log", Path("/var/lib/deepsports-cluster/log"),
              Path("/var/lib/deepsports-cluster/ctld")]  # slurmctld's saved jobs: scripts and environments
    places += [s.directory for s in scenarios.values()]
    for place in places:
        files = [place] if place.is_file() else [p for p in place.rglob("*") if p.is_file()]
        for path in files:
            if path.name in ("pgpass", "password") or path.suffix == ".credentials":
                continue
            try:
                if secret.encode() in path.read_bytes():
                    found.append(str(path))
            except OSError:
                pass
    for scenario in scenarios.values():
        for job in _jobs(lab, scenario.job):
            shown = subprocess.run(["scontrol", "-dd", "show", "job", job["JobId"]], env=lab.env, capture_output=True,
                                   text=True).stdout
            script = subprocess.run(["scontrol", "write", "batch_script", job["JobId"], "-"], env=lab.env,
                                    capture_output=True, text=True).stdout
            if secret in shown or secret in script:
                found.append(f"job {job['JobId']}")
        if not scenario.storage:
            continue  # a train run: no study
        study = _study(scenario)
        attrs = [study.user_attrs, study._storage.get_study_system_attrs(study._study_id), *[t.user_attrs for t in study.trials],
                 *[t.system_attrs for t in study.trials]]
        if secret in json.dumps(attrs, default=str):
            found.append(f"study {scenario.name}")
    client = lab.client("admin")
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            if secret in json.dumps([run.data.params, run.data.tags]):
                found.append(f"run {run.info.run_id}")
    return found


def test_security_no_credentials_read_only_users_and_no_password_anywhere(lab, field):
    for scenario in field.values():
        _finished(lab, scenario)
    experiment = lab.client("alice").get_experiment_by_name("deepsports")
    # No credentials: 401 and no data.
    for method, path, body in (("GET", "experiments/search?max_results=100", None),
                               ("GET", f"runs/search?experiment_ids={experiment.experiment_id}", None),
                               ("POST", "runs/create", {"experiment_id": experiment.experiment_id})):
        response = requests.request(method, f"{lab.tracking_uri}/api/2.0/mlflow/{path}", json=body, timeout=30)
        assert response.status_code == 401, (path, response.status_code)
        assert "deepsports" not in response.text and experiment.experiment_id not in response.text
    wrong = requests.get(f"{lab.tracking_uri}/api/2.0/mlflow/experiments/search?max_results=100",
                         auth=("alice", "not-" + lab.users["alice"]), timeout=30)
    assert wrong.status_code == 401 and "deepsports" not in wrong.text
    # The jobs wrote as alice: she manages the experiment they created.
    from mlflow.server.auth.client import AuthServiceClient

    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = "admin", lab.admin_password
    admin = AuthServiceClient(lab.tracking_uri)
    assert admin.get_user_permission("alice", "experiment", experiment.experiment_id).permission == "MANAGE"
    assert admin.get_user_permission("bob", "experiment", experiment.experiment_id).permission == "READ"
    # bob (the default READ permission on others' experiments) reads, and cannot write.
    bob = lab.client("bob")
    runs = bob.search_runs([experiment.experiment_id])
    assert runs
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as denied:
        bob.create_run(experiment.experiment_id)
    assert denied.value.get_http_status_code() == 403
    with pytest.raises(MlflowException) as denied:
        bob.log_metric(runs[0].info.run_id, "val_spearman", 1.0, step=99)
    assert denied.value.get_http_status_code() == 403
    with pytest.raises(MlflowException) as denied:
        bob.set_tag(runs[0].info.run_id, "mine", "yes")
    assert denied.value.get_http_status_code() == 403
    alice = lab.client("alice")
    assert [m.step for m in alice.get_metric_history(runs[0].info.run_id, "val_spearman")] == list(
        range(1, int(runs[0].data.params["epochs"]) + 1))
    assert "mine" not in alice.get_run(runs[0].info.run_id).data.tags
    # The passwords appear in no job script, job environment, log, param, tag or study attribute.
    pg_password = (lab.pg_dir / "password").read_text().strip()
    for secret in (lab.users["alice"], lab.users["bob"], lab.admin_password, pg_password):
        assert _leaks(secret, lab, field) == []
    # ... while the job scripts do name the credentials files (the check above would catch a copy).
    script = (field["pg"].directory / "job.sbatch").read_text()
    assert f'DEEPSPORTS_MLFLOW_CREDENTIALS="{lab.credentials["alice"]}"' in script


def test_a_run_refused_on_a_new_experiment_waits_for_the_grant_and_an_old_refusal_is_immediate(lab, monkeypatch):
    """MLflow's auth app grants an experiment's creator MANAGE only after its create call answered, so a second
    task that finds the new experiment first is refused its run (the 403 once seen here). The tracker waits such a
    refusal out on a young experiment (deepsports.tracking.runs.GRANT_WAIT_S) and no longer; on an old experiment
    (bob, READ on alice's) the refusal is an error at once."""
    from mlflow.server.auth.routes import GRANT_USER_PERMISSION

    from deepsports.errors import StorageError
    from deepsports.tracking import runs as tracking_runs

    admin = ("admin", lab.admin_password)
    created = requests.post(f"{lab.tracking_uri}/api/2.0/mlflow/experiments/create", auth=admin, timeout=30,
                            json={"name": "granted-late"})
    assert created.status_code == 200, created.text
    experiment_id = created.json()["experiment_id"]
    grant_after_s = 2.0

    def grant() -> None:  # the creator's grant arriving late (here: an admin's, for alice, who has READ by default)
        time.sleep(grant_after_s)
        granted = requests.post(f"{lab.tracking_uri}{GRANT_USER_PERMISSION}", auth=admin, timeout=30,
                                json={"username": "alice", "resource_type": "experiment", "resource_id": experiment_id,
                                      "permission": "EDIT"})
        assert granted.status_code == 200, granted.text

    lab.client("alice")  # alice's credentials in this process's environment, for the tracker
    granter = threading.Thread(target=grant)
    started = time.monotonic()
    granter.start()
    tracker = tracking_runs.RunTracker(lab.tracking_uri)
    run_id = tracker.start("granted-late", run_name="after-the-grant")
    waited_s = time.monotonic() - started
    granter.join()
    tracker.end()
    assert grant_after_s <= waited_s < grant_after_s + tracking_runs.GRANT_WAIT_S, waited_s
    run = lab.client("alice").get_run(run_id)
    assert run.info.experiment_id == experiment_id and run.info.status == "FINISHED"

    # bob is never granted: refused after GRANT_WAIT_S on the young experiment, at once on an old one.
    lab.client("bob")
    monkeypatch.setattr(tracking_runs, "GRANT_WAIT_S", 3.0)
    for new_experiment_s, least_s, most_s in ((60.0, 3.0, 8.0), (0.0, 0.0, 2.0)):
        monkeypatch.setattr(tracking_runs, "NEW_EXPERIMENT_S", new_experiment_s)
        started = time.monotonic()
        with pytest.raises(StorageError, match="create run failed.*403") as refused:
            tracking_runs.RunTracker(lab.tracking_uri).start("granted-late")
        assert least_s <= time.monotonic() - started < most_s, (new_experiment_s, refused.value)
    assert [r.info.run_id for r in lab.client("alice").search_runs([experiment_id])] == [run_id]
