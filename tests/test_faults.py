"""Nothing lost: real processes killed by real signals, corrupt caches and a full disk.

Each case runs `python -m experiments.train` in a subprocess, interrupts it for real, then reads
back what the MLflow store and the checkpoint folder kept, and runs the same command again.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_overrides
from helpers import client_for, runs_of

pytestmark = pytest.mark.slow

EPOCHS = 10
# A run on a tracking server that is lost and comes back: long enough to restart the server in.
SERVER_EPOCHS = 16


def command(root: Path, folder: Path, *extra: str) -> list[str]:
    """The train command on the tiny task, with EPOCHS epochs unless `extra` sets them."""
    overrides = [o for o in tiny_overrides(root, folder) if not o.startswith("trainer.epochs")]
    if not any(e.startswith("trainer.epochs=") for e in extra):
        overrides.append(f"trainer.epochs={EPOCHS}")
    return [sys.executable, "-m", "experiments.train", *overrides, *extra]


def start(root: Path, folder: Path, *extra: str, **popen) -> subprocess.Popen:
    log = open(root / f"run-{time.monotonic_ns()}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        command(root, folder, *extra), stdout=log, stderr=subprocess.PIPE, text=True, **popen
    )


def committed(run_dir: Path) -> int:
    """Epochs a run's checkpoint folder has committed (see experiments.training.checkpoints)."""
    from experiments.training.checkpoints import RunCheckpoints

    return RunCheckpoints(run_dir).completed_epochs()


def saved_epochs(root: Path) -> int:
    """Epochs backed up so far by the one run under `root`."""
    return max((committed(p) for p in (root / "checkpoints").glob("*")), default=0)


def wait_until(condition, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def run_exists(root: Path) -> bool:
    database = root / "mlruns" / "mlflow.db"
    if not database.is_file():
        return False
    import sqlite3

    try:
        with sqlite3.connect(database) as db:
            return bool(db.execute("select count(*) from runs").fetchone()[0])
    except sqlite3.Error:
        return False


def steps(root: Path, run_id: str, key: str = "loss") -> list[int]:
    return [m.step for m in client_for(root).get_metric_history(run_id, key)]


def list_runs(root: Path) -> subprocess.CompletedProcess:
    """`python -m experiments.runs` on the store under `root`, which must succeed."""
    listing = subprocess.run(
        [sys.executable, "-m", "experiments.runs", f"paths.root_dir={root}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert listing.returncode == 0, listing.stderr[-3000:]
    return listing


def rerun(root: Path, folder: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(root, folder, *extra), capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize(
    ("signum", "moment"),
    [
        (signal.SIGTERM, "mid_training"),
        (signal.SIGTERM, "before_first_epoch"),
        (signal.SIGINT, "mid_training"),
        (signal.SIGINT, "before_first_epoch"),
    ],
)
def test_a_signal_ends_the_run_killed_and_the_same_command_resumes_it(
    signum, moment, tmp_path, image_folder
):
    process = start(tmp_path, image_folder)
    if moment == "mid_training":
        wait_until(lambda: saved_epochs(tmp_path) >= 3, process)
    else:
        wait_until(lambda: run_exists(tmp_path), process)
    sent = time.monotonic()
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    took = time.monotonic() - sent

    assert process.returncode == 128 + signum, stderr[-3000:]
    assert took < 10, f"the run took {took:.1f} s to end"
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("interrupted by")]
    assert len(lines) == 1 and "run the same command again to resume" in lines[0], stderr[-2000:]
    assert signal.Signals(signum).name in lines[0]

    (run,) = runs_of(tmp_path, "folder")
    kept = saved_epochs(tmp_path)
    assert run.info.status == "KILLED"
    assert run.data.tags["stopped_by"] == signal.Signals(signum).name
    assert {"peak_rss_mb", "rss_mb"} <= set(run.data.metrics)
    # Every backed-up epoch was logged, and nothing after it.
    assert steps(tmp_path, run.info.run_id) == list(range(kept))
    if moment == "mid_training":
        assert kept >= 3
        assert (tmp_path / "checkpoints" / run.info.run_id / "backup" / "head").is_dir()

    again = rerun(tmp_path, image_folder)
    assert again.returncode == 0, again.stderr[-3000:]
    (resumed,) = runs_of(tmp_path, "folder")
    assert resumed.info.run_id == run.info.run_id
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["resumed"] == "true"
    # It finished: no tag says it was stopped, and the stop is kept as history.
    assert "stopped_by" not in resumed.data.tags
    assert resumed.data.tags["resumed_after"] == f"stopped_by={signal.Signals(signum).name}"
    assert steps(tmp_path, run.info.run_id) == list(range(EPOCHS))  # continued, none twice
    assert not (tmp_path / "checkpoints" / run.info.run_id).exists()  # done with


@pytest.mark.parametrize("moment", ["mid_training", "before_first_epoch"])
def test_kill_9_loses_at_most_the_epoch_in_progress(moment, tmp_path, image_folder):
    process = start(tmp_path, image_folder)
    if moment == "mid_training":
        wait_until(lambda: saved_epochs(tmp_path) >= 4, process)
    else:
        wait_until(lambda: run_exists(tmp_path), process)
    process.kill()
    process.communicate(timeout=60)
    kept = saved_epochs(tmp_path)
    (run,) = runs_of(tmp_path, "folder")
    assert run.info.status == "RUNNING"  # nobody could close it

    # Any command that opens the store closes it; `runs` lists it with the command to resume.
    listing = list_runs(tmp_path)
    assert run.info.run_id in listing.stdout and "KILLED" in listing.stdout
    assert f"epochs saved: {kept}" in listing.stdout
    assert f"resume={run.info.run_id}" in listing.stdout
    (closed,) = runs_of(tmp_path, "folder")
    assert closed.info.status == "KILLED"
    assert f"process {process.pid}" in closed.data.tags["killed_reason"]

    # The same command resumes it; so does the line `runs` printed, which names the run.
    named = [f"resume={run.info.run_id}"] if moment == "before_first_epoch" else []
    again = rerun(tmp_path, image_folder, *named)
    assert again.returncode == 0, again.stderr[-3000:]
    (resumed,) = runs_of(tmp_path, "folder")
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert "killed_reason" not in resumed.data.tags
    assert f"process {process.pid}" in resumed.data.tags["resumed_after"]
    assert steps(tmp_path, run.info.run_id) == list(range(EPOCHS))
    assert f"continues after epoch {kept}" in again.stdout


def test_a_kill_9_after_the_model_is_logged_leaves_one_model(tmp_path, image_folder):
    """Killed while it records its reports, after its model is logged: the same command finishes
    the run with that one model, not a second."""
    process = start(tmp_path, image_folder, "trainer.epochs=2")
    wait_until(lambda: any((tmp_path / "mlruns").rglob("model.keras")), process)
    process.kill()
    process.communicate(timeout=60)
    (run,) = runs_of(tmp_path, "folder")
    assert run.info.status == "RUNNING" and len(run.outputs.model_outputs) == 1
    again = rerun(tmp_path, image_folder, "trainer.epochs=2")
    assert again.returncode == 0, again.stderr[-3000:]
    (finished,) = runs_of(tmp_path, "folder")
    assert finished.info.run_id == run.info.run_id and finished.info.status == "FINISHED"
    assert [m.model_id for m in finished.outputs.model_outputs] == [
        m.model_id for m in run.outputs.model_outputs
    ]
    size = client_for(tmp_path).list_artifacts(run.info.run_id, "model/data")
    (keras_file,) = [a for a in size if a.path.endswith(".keras")]
    assert finished.data.metrics["model_size_mb"] == pytest.approx(keras_file.file_size / 1e6)
    artifacts = {a.path for a in client_for(tmp_path).list_artifacts(run.info.run_id, "evaluation")}
    assert "evaluation/confusion_matrix.png" in artifacts


def test_a_finished_run_is_never_resumed_and_resume_never_starts_afresh(tmp_path, image_folder):
    process = start(tmp_path, image_folder, "trainer.epochs=2")
    process.communicate(timeout=600)
    assert process.returncode == 0
    assert rerun(tmp_path, image_folder, "trainer.epochs=2").returncode == 0
    first, second = runs_of(tmp_path, "folder")
    assert first.info.run_id != second.info.run_id  # finished: the same command is a new run

    process = start(tmp_path, image_folder)
    wait_until(lambda: saved_epochs(tmp_path) >= 2, process)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)
    fresh = rerun(tmp_path, image_folder, "resume=never")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    runs = runs_of(tmp_path, "folder")
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED", "KILLED", "FINISHED"]


def corrupt(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # a copy cut short


@pytest.mark.parametrize("cache", ["images", "features"])
def test_a_corrupt_cache_is_moved_aside_and_rebuilt(cache, tmp_path, image_folder):
    extra = ("strategy=two_stage", "trainer.epochs=1")
    first = rerun(tmp_path, image_folder, *extra)
    assert first.returncode == 0, first.stderr[-2000:]
    (folder,) = (tmp_path / "cache" / cache).iterdir()
    original = folder / "train.npy"
    whole = np.load(original)
    corrupt(original)

    healed = rerun(tmp_path, image_folder, *extra)
    assert healed.returncode == 0, healed.stderr[-3000:]
    assert "Traceback" not in healed.stderr
    output = (healed.stdout + healed.stderr).splitlines()  # Hydra logs to stdout
    warnings = [line for line in output if "is corrupt or partial" in line]
    assert len(warnings) == 1 and str(folder) in warnings[0]
    (aside,) = (tmp_path / "cache" / cache).glob("*.corrupt-*")
    assert (aside / "train.npy").stat().st_size < original.stat().st_size
    np.testing.assert_allclose(np.load(original), whole, rtol=1e-5)  # whole again, same rows
    assert [r.info.status for r in runs_of(tmp_path, "folder")] == ["FINISHED", "FINISHED"]


def _limit_file_size(limit: int):
    def apply():
        # An emulated quota: a file may not grow past `limit` bytes (EFBIG, like ENOSPC).
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_full_disk_ends_the_run_failed_in_one_line_and_leaves_no_partial_file(
    tmp_path, image_folder
):
    # The VGG16 backup (about 59 MB with its optimizer) is the first file past 20 MB.
    process = start(tmp_path, image_folder, preexec_fn=_limit_file_size(20 * 2**20))
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert "no space left writing" in line and str(tmp_path / "checkpoints") in line
    (run,) = runs_of(tmp_path, "folder")
    assert run.info.status == "FAILED"
    leftovers = [p for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()]
    assert not [p for p in leftovers if p.name.startswith(".")], leftovers  # no temporary file
    assert not any(p.name == "latest.weights.h5" for p in leftovers)

    # Space is back: the same command resumes the FAILED run and finishes it.
    again = rerun(tmp_path, image_folder)
    assert again.returncode == 0, again.stderr[-3000:]
    (resumed,) = runs_of(tmp_path, "folder")
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert steps(tmp_path, run.info.run_id) == list(range(EPOCHS))


# ---------------------------------------------------------------------------------------------
# Sweeps: the same command completes a killed sweep, with exactly its trials.


def sweep_command(root: Path, folder: Path, *extra: str) -> list[str]:
    overrides = [o for o in tiny_overrides(root, folder) if not o.startswith("trainer.epochs")]
    return [
        sys.executable,
        "-m",
        "experiments.train",
        "-m",
        *overrides,
        "trainer.epochs=12",
        "tracking.log_model=false",
        *extra,
    ]


SEARCH = ["hparams_search=lr_head", "hydra.sweeper.pruner=null", "hydra.sweeper.n_trials=3"]


def start_sweep(root: Path, folder: Path, *extra: str) -> subprocess.Popen:
    log = open(root / f"sweep-{time.monotonic_ns()}.log", "w")  # noqa: SIM115 - closed with it
    return subprocess.Popen(
        sweep_command(root, folder, *extra), stdout=log, stderr=subprocess.PIPE, text=True
    )


def finished_runs(root: Path) -> set[str]:
    """Ids of the FINISHED training runs (not sweep parents) in the store under `root`."""
    import sqlite3

    database = root / "mlruns" / "mlflow.db"
    if not database.is_file():
        return set()
    try:
        with sqlite3.connect(database) as db:
            query = "select run_uuid from runs r where status = 'FINISHED' and not exists "
            query += "(select 1 from tags t where t.run_uuid = r.run_uuid and t.key = 'sweep')"
            return {row[0] for row in db.execute(query)}
    except sqlite3.Error:
        return set()


def epochs_of_unfinished(root: Path) -> int:
    """Epochs backed up by a run that has not finished (a finished run's folder may linger)."""
    done = finished_runs(root)
    folders = [p for p in (root / "checkpoints").glob("*") if p.name not in done]
    return max((committed(p) for p in folders), default=0)


def journal_study(root: Path):
    import optuna

    from hydra_plugins.experiments_sweeper.optuna_sweeper import open_storage

    (journal,) = (root / "multirun").glob("*/optuna.journal")
    (summary,) = optuna.get_all_study_summaries(open_storage(f"journal:{journal}"))
    return optuna.load_study(
        study_name=summary.study_name, storage=open_storage(f"journal:{journal}")
    )


def assert_study_completed(root: Path, n_trials: int):
    """Exactly `n_trials` counted trials, all COMPLETE; nothing RUNNING in Optuna or MLflow."""
    from hydra_plugins.experiments_sweeper.optuna_sweeper import retried_numbers

    study = journal_study(root)
    retried = retried_numbers(study.trials)
    counted = [
        t for t in study.trials if t.number not in retried and not t.user_attrs.get("surplus")
    ]
    assert [t.state.name for t in counted] == ["COMPLETE"] * n_trials
    assert not [t for t in study.trials if t.state.name == "RUNNING"]
    runs = runs_of(root, "folder")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    return study, retried, runs


JOBLIB = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2"]


@pytest.mark.parametrize(
    ("processes", "launcher"), [(1, []), (2, []), (1, JOBLIB)], ids=["one", "two", "joblib"]
)
def test_a_killed_sweep_completes_with_exactly_its_trials(
    processes, launcher, tmp_path, image_folder
):
    """kill -9 of a sweep's process mid-trial, then the same command: exactly n_trials. With
    joblib (two trials in flight), the worker's job notices its sweeper is gone and stops
    itself, checkpointed and KILLED, rather than training on beside the retry."""
    search = [*SEARCH, *launcher]
    first = start_sweep(tmp_path, image_folder, *search)
    others = [start_sweep(tmp_path, image_folder, *search) for _ in range(processes - 1)]
    wait_until(lambda: saved_epochs(tmp_path) >= 3, first)
    killed_trial_runs = {p.name for p in (tmp_path / "checkpoints").glob("*") if committed(p)}
    first.kill()
    first.communicate(timeout=60)
    if launcher:  # the orphaned jobs stop within seconds, each run closed KILLED by SIGTERM
        deadline = time.monotonic() + 60
        while any(
            r.info.status == "RUNNING"
            for r in runs_of(tmp_path, "folder")
            if r.data.tags.get("identity")
        ):
            assert time.monotonic() < deadline, "a job went on after its sweeper was killed"
            time.sleep(0.5)
        orphans = [r for r in runs_of(tmp_path, "folder") if r.info.run_id in killed_trial_runs]
        assert orphans and all(r.info.status == "KILLED" for r in orphans)
        assert all(r.data.tags.get("stopped_by") == "SIGTERM" for r in orphans)
    for other in others:  # the survivor takes the dead process's trial over
        _, stderr = other.communicate(timeout=900)
        assert other.returncode == 0, stderr[-3000:]
    if processes == 1:  # the same command completes it
        again = subprocess.run(
            sweep_command(tmp_path, image_folder, *search),
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert again.returncode == 0, again.stderr[-3000:]

    study, retried, runs = assert_study_completed(tmp_path, 3)
    assert len(retried) >= 1  # the interrupted trial ran again with its params...
    (retry,) = [t for t in study.trials if t.system_attrs.get("failed_trial") in retried][:1]
    original = next(t for t in study.trials if t.number == retry.system_attrs["failed_trial"])
    assert retry.params == original.params
    # ...and resumed its run from the checkpoint, not from scratch.
    resumed = [
        r for r in runs if r.data.tags.get("resumed") == "true" and r.data.tags.get("identity")
    ]
    assert {r.info.run_id for r in resumed} & killed_trial_runs
    trials = [r for r in runs if r.data.tags.get("identity")]
    assert len(trials) == 3 and all(r.info.status == "FINISHED" for r in trials)


def test_a_sweep_whose_last_worker_died_on_another_host_is_closed_by_the_next_command(
    tmp_path, image_folder
):
    """The only worker of a sweep runs on "another host" (no pid this host can check) and is
    killed -9 mid-trial. Its parent run stops beating; the next command that opens the store,
    here `experiments.runs`, closes the parent and the trial's run KILLED, saying why."""
    other_host = tmp_path / "other-host"
    other_host.mkdir()
    (other_host / "sitecustomize.py").write_text(
        "import socket\nsocket.gethostname = lambda: 'other-host'\n"
    )
    path = os.pathsep.join(filter(None, [str(other_host), os.environ.get("PYTHONPATH")]))
    worker = subprocess.Popen(
        sweep_command(tmp_path, image_folder, *SEARCH, "tracking.heartbeat_s=1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
    )
    wait_until(lambda: saved_epochs(tmp_path) >= 2, worker)
    worker.kill()
    worker.communicate(timeout=60)
    (parent,) = [r for r in runs_of(tmp_path, "folder") if r.data.tags.get("sweep") == "true"]
    assert parent.info.status == "RUNNING" and parent.data.tags["heartbeat_s"] == "1"
    time.sleep(4)  # three intervals without a beat
    listing = list_runs(tmp_path)
    assert "stopped beating" in listing.stderr
    runs = {r.info.run_id: r for r in runs_of(tmp_path, "folder")}
    closed = runs[parent.info.run_id]
    assert closed.info.status == "KILLED"  # 1 of 3 trials: the study is not complete
    assert "stopped beating" in closed.data.tags["killed_reason"]
    trials = [
        r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    ]
    assert trials and all(r.info.status == "KILLED" for r in trials)
    assert parent.info.run_id in listing.stdout  # listed as unfinished, with how to resume


def test_an_interrupted_grid_is_completed_by_the_same_command(tmp_path, image_folder):
    grid = ("trainer.seed=1,2,3",)
    process = start_sweep(tmp_path, image_folder, *grid)
    wait_until(
        lambda: len(finished_runs(tmp_path)) == 1 and epochs_of_unfinished(tmp_path) >= 2, process
    )
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr
    assert len([x for x in stderr.splitlines() if x.startswith("interrupted by SIGTERM")]) == 1
    first_run = [r for r in runs_of(tmp_path, "folder") if r.info.status == "FINISHED"]

    again = subprocess.run(
        sweep_command(tmp_path, image_folder, *grid), capture_output=True, text=True, timeout=900
    )
    assert again.returncode == 0, again.stderr[-3000:]
    runs = runs_of(tmp_path, "folder")
    parents = [r for r in runs if r.data.tags.get("sweep") == "true"]
    children = [r for r in runs if r.data.tags.get("identity")]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # continued, not a second
    assert len(children) == 3 and all(r.info.status == "FINISHED" for r in children)
    assert {r.data.params["trainer.seed"] for r in children} == {"1", "2", "3"}
    assert first_run[0].info.run_id in {r.info.run_id for r in children}  # skipped, not rerun
    assert "already finished in this sweep" in again.stdout
    (resumed,) = [r for r in children if r.data.tags.get("resumed") == "true"]
    assert resumed.data.params["trainer.seed"] == "2"
    assert [
        m.step for m in client_for(tmp_path).get_metric_history(resumed.info.run_id, "loss")
    ] == list(range(12))


# ---------------------------------------------------------------------------------------------
# A tracking server that goes away does not cost the run.


def server_runs(url: str):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(url)
    client = MlflowClient()
    experiment = client.get_experiment_by_name("folder")
    return client, client.search_runs([experiment.experiment_id])


def logged_epochs(client, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "val_accuracy"))


def test_a_server_down_at_start_is_one_line_within_15_s(tmp_path, image_folder):
    from helpers import free_port

    started = time.monotonic()
    result = rerun(tmp_path, image_folder, f"tracking.uri=http://127.0.0.1:{free_port()}")
    took = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert "cannot reach the MLflow store" in line and "127.0.0.1" in line
    assert took < 15, f"{took:.1f} s"
    assert not (tmp_path / "cache").exists()  # stopped before loading any data


@pytest.mark.parametrize(
    "comes_back",
    ["during_training", "after_the_run", "then_a_command_opens_the_store", "after_a_stale_check"],
)
def test_a_server_lost_mid_run_costs_nothing(comes_back, tmp_path, image_folder):
    from helpers import MlflowServer

    server = MlflowServer(tmp_path / "server").start()
    try:
        process = start(
            tmp_path, image_folder, f"tracking.uri={server.url}", f"trainer.epochs={SERVER_EPOCHS}"
        )
        wait_until(lambda: saved_epochs(tmp_path) >= 2, process)
        server.kill()
        lost_at, lost_after = time.monotonic(), saved_epochs(tmp_path)
        if comes_back == "during_training":
            wait_until(lambda: saved_epochs(tmp_path) >= lost_after + 6, process)
            server.start()
        _, stderr = process.communicate(timeout=600)
        ended = time.monotonic() - lost_at
        assert process.returncode == 0, stderr[-3000:]  # training went on to the end
        assert "Traceback" not in stderr
        print(f"server lost after epoch {lost_after}; training ended {ended:.1f} s later")
        outbox = tmp_path / "outbox"
        runs_command = [sys.executable, "-m", "experiments.runs", f"paths.root_dir={tmp_path}"]
        if comes_back != "during_training":
            assert list(outbox.glob("*/calls.jsonl"))  # kept on local disk
            server.start()
        if comes_back == "after_a_stale_check":
            # A check that could not see the outbox (another host, an older version) closed it.
            client, (run,) = server_runs(server.url)
            client.set_tag(run.info.run_id, "killed_reason", "process ended without closing")
            client.set_terminated(run.info.run_id, "KILLED")
        if comes_back in ("after_the_run", "after_a_stale_check"):
            sync = subprocess.run(
                [*runs_command[:3], "sync", *runs_command[3:]],
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert sync.returncode == 0, sync.stderr[-2000:]
            assert "records sent" in sync.stdout
        if comes_back == "then_a_command_opens_the_store":
            # It sends what the outbox holds before it looks for runs of dead processes.
            listing = subprocess.run(
                [*runs_command, f"tracking.uri={server.url}"],
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert listing.returncode == 0, listing.stderr[-2000:]
            assert "closed as KILLED" not in listing.stderr
            assert "no unfinished runs" in listing.stdout, listing.stdout
        assert not list(outbox.glob("*/calls.jsonl"))  # all sent

        client, runs = server_runs(server.url)
        (run,) = runs
        assert run.info.status == "FINISHED"
        assert "killed_reason" not in run.data.tags
        assert logged_epochs(client, run.info.run_id) == list(range(SERVER_EPOCHS))
        assert {"test_accuracy", "peak_rss_mb", "model_size_mb"} <= set(run.data.metrics)
        import mlflow
        import numpy as np

        model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
        predicted = model.predict(np.zeros((2, 32, 32, 3), np.uint8))
        assert len(predicted) == 2 and len(predicted["probabilities"][0]) == 3
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
        assert "evaluation/confusion_matrix.png" in artifacts
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# Bad values are refused before any expensive work: exit 2, one line, no traceback, no run.

BAD_VALUES = [
    ("optimizer.lr=-1", "optimizer.lr=-1"),
    ("optimizer.lr=0", "optimizer.lr=0"),
    ("optimizer.lr=abc", "is not a finite number"),
    ("optimizer.lr=1e400", "optimizer.lr=inf is not a finite number"),  # YAML reads inf
    ("trainer.batch_size=1e9", "must be at least 1 and at most 65536"),
    ("trainer.early_stopping.patience=-1", "trainer.early_stopping.patience=-1 must be at least 0"),
    ("backbone=nope", "backbone has no option 'nope'; choose one of efficientnetb0"),
    ("trainer.batch_size=0", "trainer.batch_size=0"),
    ("trainer.batch_size=2.5", "is not an integer"),
    ("trainer.epochs=0", "trainer.epochs=0"),
    ("trainer.epochs=many", "is not an integer"),
    ("trainer.steps_per_execution=0", "trainer.steps_per_execution=0 must be at least 1"),
    ("trainer.data_on_device=gpu", "trainer.data_on_device=gpu is not auto, true or false"),
    ("trainer.data_on_device=true backend=tensorflow", "add backend=jax"),
    ("trainer.class_weight=heavy", "trainer.class_weight=heavy"),
    ("strategy=fine_tune strategy.unfreeze_blocks=99", "at most 5"),
    ("strategy=fine_tune strategy.unfreeze_blocks=0", "strategy.unfreeze_blocks=0"),
    ("strategy=fine_tune strategy.lr=-1e-5", "strategy.lr"),
    ("head.pooling=bogus", "head.pooling='bogus' is unknown"),
    ("head.units=[0]", "head.units=[0]"),
    ("head.units=[big]", "positive integers"),
    ("head.dropout=1.5", "head.dropout=1.5"),
    ("backbone.weights=/etc/passwd", "not an HDF5 weights file"),
    ("backbone.weights=/nonexistent/w.h5", "cannot be read"),
    ("task.path=/nonexistent/images", "is not a directory"),
    ("task.image_size=[4,4]", "task.image_size"),
    ("task.split=[0.5,0.5,0.5]", "task.split"),
    ("resume=sometimes", "resume=sometimes is unknown"),
    ("optimized_metric=[]", "must name a metric, or several as a list"),
    ("optimized_metric=nope", "optimized_metric=nope is not a metric a run records"),
    ("optimized_metric=[val_accuracy,nope]", "use a per-epoch one (loss, accuracy"),
    ("optimized_metric=test_accuracy", "chooses by the test split"),
    ("optimized_metric=[test_loss,train_time_s]", "add allow_test_selection=true"),
    ("allow_test_selection=maybe", "allow_test_selection=maybe must be true or false"),
    ("tracking.system_metrics=maybe", "tracking.system_metrics=maybe must be true or false"),
    ("evaluation.figure_worker=maybe", "evaluation.figure_worker=maybe must be true or false"),
    ("evaluation.compile_ahead=soon", "evaluation.compile_ahead=soon is not auto, true or false"),
    ("evaluation.compile_ahead=true backend=tensorflow", "compiles the forward pass with JAX"),
    ("tracking.system_metrics_interval_s=0", "system_metrics_interval_s=0 must be greater than 0"),
    ("evaluation.temperature_scaling=maybe", "temperature_scaling=maybe must be true or false"),
    ("trainer.repeats=0", "trainer.repeats=0 must be at least 1"),
]


@pytest.mark.parametrize(("override", "says"), BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_a_bad_value_is_refused_before_any_work(override, says, tmp_path, image_folder):
    base = [
        o
        for o in tiny_overrides(tmp_path, image_folder)
        if o.split("=")[0] not in {o2.split("=")[0] for o2 in override.split()}
    ]
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "experiments.train", *base, *override.split()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    took = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and says in errors[0], result.stderr[-2000:]
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "cache").exists()
    assert took < 5, f"{took:.1f} s"


def test_an_unset_task_path_is_refused_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "experiments.train", "task=folder", f"paths.root_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert "task.path must be set" in line


def test_fine_tune_resumes_in_its_second_phase(tmp_path, image_folder):
    extra = ("strategy=fine_tune", "trainer.epochs=3", "strategy.epochs=12")
    process = start(tmp_path, image_folder, *extra)
    wait_until(lambda: saved_epochs(tmp_path) >= 6, process)  # 3 in the second phase
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)
    (run,) = runs_of(tmp_path, "folder")
    assert run.info.status == "KILLED"
    assert (tmp_path / "checkpoints" / run.info.run_id / "head.done.weights.h5").is_file()

    again = rerun(tmp_path, image_folder, *extra)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "phase head already trained" in again.stdout  # the first phase is not run again
    assert "Epoch 1/3" not in again.stdout
    (resumed,) = runs_of(tmp_path, "folder")
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert steps(tmp_path, run.info.run_id) == list(range(15))
    rates = client_for(tmp_path).get_metric_history(run.info.run_id, "learning_rate")
    assert all(m.value == pytest.approx(1e-5) for m in rates if m.step >= 3)
    assert all(m.value == pytest.approx(3e-3) for m in rates if m.step < 3)


ENDING = """
import atexit, logging, sys
from experiments.cli import ending_without_teardown

class Teardown:
    def __del__(self):
        print("torn down", flush=True)

kept = Teardown()  # freed only by the interpreter's teardown
logging.basicConfig(filename=sys.argv[1], level=logging.INFO)
with ending_without_teardown():
    atexit.register(lambda: print("exit handler", file=sys.stderr, flush=True))
    logging.getLogger("t").info("logged last")
    print("printed last", end="")  # no newline: flushed by the end, not by the line
    {body}
"""


@pytest.mark.parametrize(
    ("body", "status"),
    [("pass", 0), ("sys.exit(2)", 2), ("sys.exit(143)", 143), ("raise RuntimeError('x')", 1)],
)
def test_a_command_ends_without_teardown_and_loses_nothing(body, status, tmp_path):
    """A command skips the interpreter's teardown once its exit handlers have run: its status,
    its output and its log are whole. After an exception Python ends it as usual."""
    log = tmp_path / "run.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as usual
    result = subprocess.run(
        [sys.executable, "-c", ENDING.format(body=body), str(log)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == status, result.stderr
    assert result.stdout.startswith("printed last")
    assert "exit handler" in result.stderr  # registered after the command began: it ran
    assert "logged last" in log.read_text()
    if status == 1:  # the exception: Python reported it and tore down as usual
        assert "RuntimeError" in result.stderr and "torn down" in result.stdout
    else:
        assert "torn down" not in result.stdout


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_a_setting_a_command_needs_is_asked_for_in_one_line(command, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", f"experiments.{command}", f"paths.root_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert line == "error: model must be set: add model=... (--help lists the settings)"


def test_a_bad_filter_or_word_is_one_line(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from experiments.compare import main as compare
    from experiments.runs import main as runs

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(uri).search_experiments()  # a store there: a missing one is refused first
    store = ["--tracking-uri", uri, "--out", str(tmp_path)]
    assert compare(["--filter", "bogus ==", *store]) == 2
    error = capsys.readouterr().err
    (line,) = [x for x in error.splitlines() if x.startswith("error:")]  # MLflow's INFO aside
    assert line.startswith("error: filter 'bogus ==' is not an MLflow search filter (")
    assert "Traceback" not in error
    with pytest.raises(SystemExit) as stopped:
        runs(["bogus"])
    assert stopped.value.code == 2
    assert (
        "'bogus' is neither an action (list, sync) nor a setting KEY=VALUE"
        in capsys.readouterr().err
    )
