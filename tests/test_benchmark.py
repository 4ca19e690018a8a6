"""The benchmark command: per-trial memory of a sweep in one process, and its verdict."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from experiments.benchmarks.sweep import summarize
from experiments.tracking import memory_metrics

from conftest import tiny_overrides


def rows(*peaks):
    return [{"trial": i, "peak_rss_mb": peak, "rss_mb": peak * 0.8} for i, peak in enumerate(peaks)]


def test_verdict_compares_the_last_peak_with_trial_2():
    steady = summarize(rows(900.0, 1000.0, 1050.0, 1100.0), tolerance=0.10)
    assert steady["passed"] and steady["peak_growth"] == pytest.approx(0.10)
    assert steady["baseline_trial"] == 1 and steady["last_trial"] == 3
    leaking = summarize(rows(900.0, 1000.0, 1050.0, 1101.0), tolerance=0.10)
    assert not leaking["passed"] and leaking["peak_growth"] == pytest.approx(0.101)
    # Trial 1's own peak (feature extraction, first imports) is not the baseline.
    assert summarize(rows(2000.0, 1000.0, 1000.0), tolerance=0.10)["passed"]


def test_one_finished_trial_is_not_a_measurement():
    with pytest.raises(SystemExit, match="only 1 trial"):
        summarize(rows(1000.0), tolerance=0.10)


def test_memory_metrics_are_this_process():
    import numpy as np

    before = memory_metrics()
    # 256 MB, touched: the kernel's resident-memory counters are batched and can lag a few tens
    # of MB behind in a process as large as this test session.
    block = np.ones(256 * 2**20, dtype=np.uint8)
    after = memory_metrics()
    assert after["rss_mb"] - before["rss_mb"] > 128
    assert after["peak_rss_mb"] >= after["rss_mb"] - 1
    del block


@pytest.mark.slow
def test_benchmark_reports_every_trial_of_a_sweep_in_one_process(tmp_path, image_folder):
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.benchmark",
            "--trials=3",
            f"--out={out}",
            # lr and head width searched: a value given on the command line would fix them
            *(
                o
                for o in tiny_overrides(tmp_path, image_folder)
                if not o.startswith(("optimizer.lr=", "head.units="))
            ),
            "strategy=two_stage",
            "hparams_search=lr_head",
            "hydra.sweeper.pruner=null",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode in (0, 1), result.stderr[-4000:]
    report = json.loads((out / "benchmark-memory.json").read_text())
    trials = report["trials"]
    assert [t["trial"] for t in trials] == [0, 1, 2]
    assert all(t["state"] == "COMPLETE" and t["epochs"] == 3 for t in trials)
    assert all(float(t["optimizer.lr"]) > 0 and t["head.units"].startswith("[") for t in trials)
    # One process: the peak never falls from one trial to the next, and holds TensorFlow.
    peaks = [t["peak_rss_mb"] for t in trials]
    assert peaks == sorted(peaks) and peaks[0] > 200
    summary = report["summary"]
    assert summary["baseline_trial"] == 1 and summary["last_trial"] == 2
    assert (result.returncode == 0) == summary["passed"]
    assert "tolerance 10%" in (out / "benchmark-memory.md").read_text()
    # The throwaway store is gone; the project's store was never touched.
    assert not (tmp_path / "mlruns").exists()


def test_a_pruned_jobs_frames_are_released_before_the_next_job():
    import gc
    import weakref

    import optuna
    from hydra.core.utils import JobReturn, JobStatus

    from hydra_plugins.experiments_sweeper.launching import release_frames

    class Model:  # stands for the job's model, images and features
        pass

    refs = []

    def job():
        model = Model()
        refs.append(weakref.ref(model))
        try:
            raise ValueError("an earlier error, chained as context")
        except ValueError:
            raise optuna.TrialPruned("pruned at epoch 2") from None

    try:
        job()
    except optuna.TrialPruned as err:  # what Hydra's run_job keeps in the JobReturn
        ret = JobReturn(status=JobStatus.FAILED, _return_value=err)
    gc.collect()
    assert refs[0]() is not None  # the traceback keeps the job's frame alive
    release_frames(ret)
    gc.collect()
    assert refs[0]() is None
    assert isinstance(ret._return_value, optuna.TrialPruned)  # the outcome itself is kept


@pytest.mark.slow
def test_throughput_measures_each_backbone_against_its_floor(tmp_path):
    """`benchmark throughput` rows (JSON and Markdown) for several backbones, each rate also as a
    ratio to the base's true floor, and an MLflow run tagged with the backend and the device;
    options and overrides in any order."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.benchmark",
            "throughput",
            f"paths.root_dir={tmp_path}",
            "--batches=2",
            "backbone=vgg16,mobilenetv2",
            "--repeats=1",
            "task.image_size=[32,32]",
            f"--out={out}",
            "trainer.batch_size=8",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((out / "benchmark-throughput.json").read_text())
    assert [row["backbone"] for row in rows] == ["vgg16", "mobilenetv2"]
    rates = [
        "floor_images_per_s",
        "predict_images_per_s",
        "inline_images_per_s",
        "inrun_images_per_s",
        "inline_noaug_images_per_s",
        "extract_images_per_s",
        "head_images_per_s",
        "fine_tune_images_per_s",
    ]
    for row in rows:
        assert {"backend", "device", "jit_compile", "compile_s"} <= row.keys()
        assert all(row[key] > 0 for key in rates), row
        for name in ("inline", "inrun", "predict"):
            assert row[f"{name}_floor_ratio"] == pytest.approx(
                row[f"{name}_images_per_s"] / row["floor_images_per_s"], rel=0.01
            )
        assert row["images"] == 16
    table = (out / "benchmark-throughput.md").read_text()
    assert "inline / floor" in table and "in-run / floor" in table and "mobilenetv2" in table
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("benchmark").experiment_id])
    assert run.data.tags["backend"] == rows[0]["backend"]
    assert run.data.tags["device"] == rows[0]["device"]
    assert run.data.metrics["vgg16.inline_floor_ratio"] == pytest.approx(
        rows[0]["inline_floor_ratio"]
    )


@pytest.mark.slow
def test_memory_mode_trains_each_dataset_size_and_reports_its_peak(tmp_path):
    """`benchmark memory`: one run per size on generated images (the smaller sizes linked into
    the largest), with the peak memory and rates each run recorded, and the verdict."""
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.benchmark",
            "memory",
            "--sizes",
            "90,30",
            "--workdir",
            str(tmp_path / "work"),
            "--out",
            str(out),
            "--tolerance-mb",  # the mechanics here, not the target: tiny runs' peaks are noisy
            "500",
            "backbone=vgg16",
            "backbone.weights=null",
            "strategy=two_stage",
            "augmentation=none",
            "task.image_size=[32,32]",
            "trainer.epochs=1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((out / "benchmark-dataset-memory.json").read_text())
    rows = report["rows"]
    assert [row["images"] for row in rows] == [30, 90]
    # the folder task splits each class of 10 (30) images 50/25/25
    assert [row["train_images"] for row in rows] == [15, 45]
    assert all(200 < row["peak_rss_mb"] < 4000 and row["train_images_per_s"] > 0 for row in rows)
    assert all(100 < row["peak_anon_mb"] < 4000 for row in rows)
    assert report["growth_mb"] == pytest.approx(  # judged on what the runs held, not mapped
        rows[1]["peak_anon_mb"] - rows[0]["peak_anon_mb"], abs=0.1
    )
    images = tmp_path / "work" / "images"
    assert len(list((images / "90").rglob("*.jpg"))) == 90
    assert len(list((images / "30").rglob("*.jpg"))) == 30
    linked = next((images / "30").rglob("*.jpg"))
    assert linked.stat().st_nlink == 2  # a hard link into the largest set, not a copy
    assert (
        "peak anonymous memory (RssAnon) grew" in (out / "benchmark-dataset-memory.md").read_text()
    )


@pytest.mark.slow
def test_run_mode_times_a_fresh_and_a_warm_run_against_its_targets(tmp_path):
    """`benchmark run`: the same training twice on generated images, each run's phases read
    back from MLflow into one table, and a missed target fails the command."""
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.benchmark",
            "run",
            "backbone=vgg16",
            "--images=24",
            "backbone.weights=null",
            "task=folder",
            "--classes=3",
            "task.per_class=[4,2,2]",
            "task.image_size=[32,32]",
            "augmentation=none",
            "trainer.epochs=2",
            "trainer.batch_size=8",
            "--max-warm-s=0.001",  # missed: the command fails and says which
            f"--out={out}",
            f"--workdir={tmp_path / 'work'}",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    payload = json.loads((out / "benchmark-run.json").read_text())
    fresh, warm = payload["runs"]
    assert (fresh["run"], warm["run"]) == ("fresh", "warm")
    for row in (fresh, warm):
        phases = [row[p] for p in ("startup", "data", "build", "compile", "train", "evaluate")]
        assert all(p >= 0 for p in phases) and row["train"] > 0 and row["wall_s"] > sum(phases)
        assert row["train_images_per_s"] > 0 and row["evaluate_images_per_s"] > 0
    assert warm["data"] < fresh["data"]  # the decoded images are cached
    failed = [c["check"] for c in payload["checks"] if not c["passed"]]
    assert failed == [f"warm run {warm['wall_s']:.1f} s <= 0.001 s"]
    assert "FAIL: warm run" in result.stdout and "| wall_s" in result.stdout


def test_slots_mode_measures_both_ways_of_launching_from_the_jobs_own_times(tmp_path):
    """`benchmark slots` runs the sleeping sweep in batches and with slots kept busy; each row's
    utilisation is its jobs' own time over n_jobs x its wall time, and the exit status follows
    the kept-busy row against --target (a figure, not a timing assertion: see the README)."""
    out = tmp_path / "reports"
    command = [sys.executable, "-m", "experiments.benchmark", "slots", "--out", str(out)]
    command += ["--jobs", "2", "--trials", "4", "--sleep", "0.1,0.4", "--target", "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "benchmark-slots.json").read_text())
    batches, busy = report["sweeps"]
    assert (batches["mode"], busy["mode"]) == ("batches", "slots kept busy")
    for row in (batches, busy):
        assert row["trials"] == 4
        assert row["utilisation"] == pytest.approx(
            row["jobs_time_s"] / (2 * row["wall_s"]), rel=0.02
        )
    assert "PASS: slots kept busy" in (out / "benchmark-slots.md").read_text()
    bad = subprocess.run([*command[:4], "--sleep", "4,1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "give 0 < LOW < HIGH" in bad.stderr
