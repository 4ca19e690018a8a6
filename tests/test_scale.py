"""Scaling out, on real servers and real processes: workers sharing one Optuna study through
PostgreSQL and one MLflow server (PostgreSQL store, served artifacts), a worker killed mid-trial
and taken over through Optuna's heartbeat, submitit's local launcher with a preemption, and
Optuna's dashboard.

Each "machine" is a worker process with a root folder of its own (cache, checkpoints, sweep
folder); they share only the database and the tracking server, as machines of a lab do.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import tiny_overrides
from helpers import MlflowServer, PostgresServer, client_for, free_port, runs_of

pytestmark = pytest.mark.slow

SEARCH = ["hparams_search=lr_head", "hydra.sweeper.pruner=null"]


@pytest.fixture(scope="module")
def postgres():
    server = PostgresServer().start()
    yield server
    server.stop()


def sweep(root: Path, folder: Path, *extra: str, env=None) -> subprocess.Popen:
    """A sweep worker on its own 'machine' (`root`), its output in `root/worker.log`."""
    root.mkdir(parents=True, exist_ok=True)
    log = open(root / "worker.log", "w")  # noqa: SIM115 - closed with the process
    command = [
        sys.executable, "-m", "experiments.train", "-m", *tiny_overrides(root, folder), *SEARCH,
        *extra,
    ]  # fmt: skip
    worker = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    worker.log = root / "worker.log"
    return worker


def finish(workers: list[subprocess.Popen], timeout: float = 900) -> None:
    for worker in workers:
        worker.wait(timeout=timeout)
    for worker in workers:
        assert worker.returncode == 0, worker.log.read_text()[-3000:]


def counted_trials(study):
    """The trials that count toward n_trials (not surplus asks, not trials retried)."""
    from hydra_plugins.experiments_sweeper.optuna_sweeper import retried_numbers

    retried = retried_numbers(study.trials)
    return [t for t in study.trials if t.number not in retried and not t.user_attrs.get("surplus")]


def test_three_workers_finish_one_study_on_postgresql_and_one_mlflow_server(
    postgres, tmp_path, image_folder
):
    import mlflow
    import optuna
    from mlflow.tracking import MlflowClient

    storage = postgres.database("optuna_three")
    server = MlflowServer(tmp_path / "server", store=postgres.database("mlflow_three"), make=True)
    server.start()
    try:
        shared = [
            f"hydra.sweeper.storage={storage}",
            "hydra.sweeper.study_name=shared",
            "hydra.sweeper.n_trials=4",
            "trainer.epochs=2",
            f"tracking.uri={server.url}",
        ]
        started = time.monotonic()
        workers = [sweep(tmp_path / f"machine{i}", image_folder, *shared) for i in range(3)]
        finish(workers)
        wall = time.monotonic() - started

        study = optuna.load_study(study_name="shared", storage=storage)
        counted = counted_trials(study)
        assert [t.state.name for t in counted] == ["COMPLETE"] * 4  # exactly n_trials, together
        assert not [t for t in study.trials if t.state.name == "RUNNING"]
        owners = {t.user_attrs["owner_pid"] for t in counted}
        assert len(owners) >= 2, "one worker ran every trial"

        client = MlflowClient(server.url)
        experiment = client.get_experiment_by_name("folder")
        runs = client.search_runs([experiment.experiment_id])
        parents = [r for r in runs if r.data.tags.get("sweep") == "true"]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        (parent,) = parents
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert len(runs) == 5 and len(children) == 4
        assert sorted(int(r.data.tags["optuna_trial"]) for r in children) == sorted(
            t.number for t in counted
        )
        assert all(r.info.status == "FINISHED" for r in children)
        # Every artifact is stored by the server and read back through it.
        for run in [parent, *children]:
            assert run.info.artifact_uri.startswith("mlflow-artifacts:")
            folder = client.download_artifacts(
                run.info.run_id, "", str(tmp_path / "read" / run.info.run_id)
            )
            files = {
                p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file()
            }
            if run is parent:
                assert {"study/trials.csv", "study/optimization_results.yaml"} <= files
            else:
                assert "evaluation/confusion_matrix.png" in files
                (logged,) = client.search_logged_models(
                    [experiment.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
                )
                model = mlflow.artifacts.download_artifacts(
                    artifact_uri=logged.artifact_location,
                    dst_path=str(tmp_path / "models" / run.info.run_id),
                    tracking_uri=server.url,
                )
                assert (Path(model) / "MLmodel").is_file()
        stored = [p for p in (tmp_path / "server" / "server-artifacts").rglob("*") if p.is_file()]
        assert len(stored) >= 5
        print(f"3 workers, 4 trials on PostgreSQL and one MLflow server: {wall:.0f} s wall")
    finally:
        server.stop()


def test_no_password_is_recorded_or_printed(postgres, tmp_path, image_folder):
    """A two-trial sweep on a real PostgreSQL storage, and a real MLflow server, both named by
    URLs that hold made-up passwords: neither is found anywhere afterwards, not in the MLflow
    store (params, tags, artifacts), the sweep's and jobs' folders (Hydra's .hydra/*.yaml,
    multirun.log, trials.csv) nor the captured output; and both URLs worked."""
    import optuna

    storage_password, tracking_password = "Storage-S3cret-7f2a", "Tracking-S3cret-9c1d"
    storage = postgres.database("optuna_secret").replace(
        "postgres@", f"postgres:{storage_password}@"
    )  # the server trusts 127.0.0.1: any password opens it
    server = MlflowServer(tmp_path / "server")
    server.start()
    try:
        tracking = server.url.replace("http://", f"http://lab:{tracking_password}@")
        worker = sweep(
            tmp_path / "machine",
            image_folder,
            f"hydra.sweeper.storage={storage}",
            "hydra.sweeper.study_name=secret",
            "hydra.sweeper.n_trials=2",
            "trainer.epochs=1",
            f"tracking.uri={tracking}",
        )
        finish([worker])
        from mlflow.tracking import MlflowClient

        client = MlflowClient(server.url)
        runs = client.search_runs([client.get_experiment_by_name("folder").experiment_id])
    finally:
        server.stop()
    assert len(runs) == 3  # the sweep's parent and its two trials: the tracking URL worked
    (trial, *_) = [r for r in runs if r.data.tags.get("sweep") != "true"]
    assert trial.data.params["tracking.uri"] == server.url.replace("http://", "http://lab:***@")
    assert "hydra.sweeper.storage=postgresql://postgres:***@" in trial.data.tags["command"]
    study = optuna.load_study(study_name="secret", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 2
    output = worker.log.read_text()
    assert "postgres:***@127.0.0.1" in output  # the sweep's first line names it, masked
    found = []
    for path in tmp_path.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path}: {word}" for word in (storage_password, tracking_password)
                      if word.encode() in data]  # fmt: skip
    assert not found, found
    assert f"tracking.uri=http://lab:***@127.0.0.1:{server.port}" in trial.data.tags["command"]


HOST_OF = (
    "import socket\n"
    "socket.gethostname = lambda: {host!r}  # another machine, as far as the study can tell\n"
)


def test_a_killed_workers_trial_is_taken_over_through_the_heartbeat(
    postgres, tmp_path, image_folder
):
    """Worker A, on "another host", is killed mid-trial: B cannot see its process, only its
    heartbeat stop. B fails the trial, runs it again with the same params, and resumes its run
    from the checkpoint A left on the shared disk."""
    import optuna

    storage = postgres.database("optuna_heartbeat")
    shared = [
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=heartbeat",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.heartbeat_interval=1",
        "hydra.sweeper.grace_period=4",
        "trainer.epochs=12",
        # one shared tracking store and checkpoint folder: a lab's network disk
        f"tracking.uri=sqlite:///{tmp_path}/mlruns/mlflow.db",
        f"paths.checkpoint_dir={tmp_path}/checkpoints",
    ]
    other_host = tmp_path / "other-host"
    other_host.mkdir()
    (other_host / "sitecustomize.py").write_text(HOST_OF.format(host="other-host"))
    path = os.pathsep.join(filter(None, [str(other_host), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    a = sweep(tmp_path / "a", image_folder, *shared, env=env)
    checkpoints = tmp_path / "checkpoints"
    deadline = time.monotonic() + 300
    from experiments.training.checkpoints import RunCheckpoints

    while not any(RunCheckpoints(p).completed_epochs() >= 2 for p in checkpoints.glob("*")):
        assert a.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    b = sweep(tmp_path / "b", image_folder, *shared)
    a.kill()
    a.wait(timeout=60)
    finish([b])

    study = optuna.load_study(study_name="heartbeat", storage=storage)
    counted = counted_trials(study)
    assert [t.state.name for t in counted] == ["COMPLETE"] * 3
    assert not [t for t in study.trials if t.state.name == "RUNNING"]
    (killed,) = [t for t in study.trials if t.user_attrs.get("owner_host") == "other-host"]
    assert killed.state.name == "FAIL"
    (retry,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed.number]
    assert retry.params == killed.params and retry.state.name == "COMPLETE"
    log = (tmp_path / "b" / "worker.log").read_text()
    assert f"trial(s) [{killed.number}] were left RUNNING" in log
    runs = runs_of(tmp_path, "folder")
    (resumed,) = [
        r for r in runs if r.data.tags.get("resumed") == "true" and r.data.tags.get("identity")
    ]
    steps = [m.step for m in client_for(tmp_path).get_metric_history(resumed.info.run_id, "loss")]
    assert steps == list(range(12)) and resumed.info.status == "FINISHED"  # resumed, none twice


def test_submitit_local_requeues_a_preempted_job_which_resumes_its_run(tmp_path, image_folder):
    """SIGUSR2 to a submitit job, as SLURM sends on preemption: the run is checkpointed and
    KILLED, submitit requeues the job, and the same run resumes to FINISHED."""
    process = sweep(
        tmp_path,
        image_folder,
        "launcher=submitit_local",
        "hydra.sweeper.n_trials=1",
        "trainer.epochs=12",
    )
    import psutil

    from experiments.training.checkpoints import RunCheckpoints

    def job():
        for child in psutil.Process(process.pid).children(recursive=True):
            if "submitit.core._submit" in " ".join(child.cmdline()):
                return child
        return None

    deadline = time.monotonic() + 300
    while not any(
        RunCheckpoints(p).completed_epochs() >= 3 for p in (tmp_path / "checkpoints").glob("*")
    ):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    first = job()
    first.send_signal(signal.SIGUSR2)
    finish([process])

    (run,) = [r for r in runs_of(tmp_path, "folder") if r.data.tags.get("identity")]
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "true"
    steps = [m.step for m in client_for(tmp_path).get_metric_history(run.info.run_id, "loss")]
    assert steps == list(range(12))
    logs = "".join(p.read_text() for p in (tmp_path / "multirun").rglob("*_log.err"))
    assert "this job is preempted" in logs


def test_make_dashboard_serves_a_sweeps_journal_and_both_targets_say_what_is_missing(tmp_path):
    import optuna

    from hydra_plugins.experiments_sweeper.optuna_sweeper import open_storage

    journal = tmp_path / "optuna.journal"
    study = optuna.create_study(study_name="seen", storage=open_storage(f"journal:{journal}"))
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    port = free_port()
    makefile = Path(__file__).resolve().parents[1] / "Makefile"
    dashboard = subprocess.Popen(
        [
            "make",
            "-s",
            "-f",
            str(makefile),
            "dashboard",
            f"VENV={sys.prefix}",
            f"STORAGE=journal:{journal}",
            f"DASHBOARD_PORT={port}",
        ],  # fmt: skip
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as r:
                    studies = json.load(r)["study_summaries"]
                break
            except OSError:
                assert dashboard.poll() is None and time.monotonic() < deadline
                time.sleep(0.5)
        assert [s["study_name"] for s in studies] == ["seen"]
    finally:
        os.killpg(dashboard.pid, signal.SIGTERM)
        dashboard.wait(timeout=30)
    missing = subprocess.run(
        ["make", "-s", "-f", str(makefile), "dashboard"], capture_output=True, text=True
    )
    assert missing.returncode == 2 and missing.stderr.startswith("error: set STORAGE")
    no_db = subprocess.run(
        ["make", "-s", "-f", str(makefile), "server"], capture_output=True, text=True
    )
    assert no_db.returncode == 2 and no_db.stderr.startswith("error: set DB to the server's")
