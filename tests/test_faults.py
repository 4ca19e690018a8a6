"""Nothing lost: real processes killed by real signals, corrupt caches and a full disk.

Each case runs `python -m experiments.train` in a subprocess, interrupts it for real, then reads
back what the MLflow store and the checkpoint folder kept, and runs the same command again.
"""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_overrides
from helpers import client_for, runs_of

pytestmark = pytest.mark.slow

EPOCHS = 30


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


def saved_epochs(root: Path) -> int:
    """Epochs backed up so far by the one run under `root`."""
    histories = list((root / "checkpoints").glob("*/history.json"))
    return max((len(json.loads(p.read_text())) for p in histories), default=0)


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
    listing = subprocess.run(
        [sys.executable, "-m", "experiments.runs", f"paths.root_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listing.returncode == 0, listing.stderr[-2000:]
    assert run.info.run_id in listing.stdout and "KILLED" in listing.stdout
    assert f"epochs saved: {kept}" in listing.stdout
    assert f"resume={run.info.run_id}" in listing.stdout
    (closed,) = runs_of(tmp_path, "folder")
    assert closed.info.status == "KILLED"
    assert f"process {process.pid}" in closed.data.tags["killed_reason"]

    again = rerun(tmp_path, image_folder)
    assert again.returncode == 0, again.stderr[-3000:]
    (resumed,) = runs_of(tmp_path, "folder")
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert steps(tmp_path, run.info.run_id) == list(range(EPOCHS))
    assert f"continues after epoch {kept}" in again.stdout


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
    (original,) = (tmp_path / "cache" / cache).glob("*.npz")
    corrupt(original)

    healed = rerun(tmp_path, image_folder, *extra)
    assert healed.returncode == 0, healed.stderr[-3000:]
    assert "Traceback" not in healed.stderr
    output = (healed.stdout + healed.stderr).splitlines()  # Hydra logs to stdout
    warnings = [line for line in output if "is corrupt or partial" in line]
    assert len(warnings) == 1 and str(original) in warnings[0]
    (aside,) = (tmp_path / "cache" / cache).glob("*.corrupt-*")
    assert aside.stat().st_size < original.stat().st_size  # the rebuilt file is whole again
    import numpy as np

    with np.load(original) as z:
        assert len(z.files) >= 3
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
