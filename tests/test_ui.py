"""The MLflow UI as a user meets it: `make ui`'s link in a real browser (Debian's chromium, driven
by Playwright) on a store with a finished run and a 2-trial sweep; and what the UI reads from
the store (names, notes, the comparison view, system and per-class metrics)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import compose_config, tiny_overrides
from helpers import client_for, free_port, runs_of

REPORTS = Path(__file__).resolve().parents[1] / "reports"  # CI keeps what lands here


@pytest.fixture(scope="module")
def store(tmp_path_factory, image_folder):
    """A store with one finished run (in-process) and a 2-trial Optuna sweep (the CLI), both
    sampling system metrics every 0.2 s."""
    from experiments.pipeline.run import train

    root = tmp_path_factory.mktemp("ui")
    common = [*tiny_overrides(root, image_folder), "tracking.system_metrics_interval_s=0.2"]
    sweep = subprocess.run(
        [
            sys.executable, "-m", "experiments.train", "-m", *common, "strategy=two_stage",
            "tracking.log_model=false", "hparams_search=lr_head", "hydra.sweeper.n_trials=2",
            f"hydra.sweeper.storage=sqlite:///{root}/optuna.db", "hydra.sweeper.study_name=s",
        ],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert sweep.returncode == 0, sweep.stderr[-4000:]
    train(compose_config(common))
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    return root


def by_name(root: Path) -> dict:
    return {r.info.run_name: r for r in runs_of(root, "folder")}


def test_runs_are_named_for_what_tells_them_apart(store):
    runs = by_name(store)
    trials = sorted(name for name in runs if name.startswith("trial-"))
    # optimizer.lr and head.units are fixed by tiny_overrides: the sweep varies head.dropout.
    assert [t.split(" ")[0] for t in trials] == ["trial-0", "trial-1"]
    assert all(t.split(" ")[1].startswith("dropout=0.") for t in trials), trials
    (parent,) = [r for n, r in runs.items() if n.startswith("sweep ")]
    assert parent.info.run_name == "sweep s: dropout"
    assert parent.data.tags["swept_params"] == "head.dropout"
    note = parent.data.tags["mlflow.note.content"]
    values = {n: json.loads(runs[n].data.tags["returned_value"]) for n in trials}
    best = max(values, key=values.get)
    assert f"**Best**: {best} (run `{runs[best].info.run_id}`)" in note
    assert "2 runs, 2 finished" in note and "paths." not in note
    assert "folder-vgg16-inline-none" in runs  # outside a sweep: tracking.run_name


def test_the_experiment_opens_as_model_training_on_the_comparison_view(store):
    from experiments.tracking.views import VIEW_TAG_PREFIX, _view_state

    client = client_for(store)
    tags = client.get_experiment_by_name("folder").tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    state = _view_state(tags[VIEW_TAG_PREFIX + "comparison"])
    assert state["selectedColumns"] == [
        "params.`backbone.name`",
        "params.`strategy.name`",
        "params.`augmentation.name`",
        "params.`head.dropout`",
        "metrics.`best_val_accuracy`",
        "metrics.`test_accuracy`",
        "metrics.`train_time_s`",
    ]


def test_the_view_keeps_what_a_user_saved_in_it(tmp_path):
    from omegaconf import OmegaConf

    from experiments import tracking
    from experiments.tracking.client import client
    from experiments.tracking.views import VIEW_TAG_PREFIX, _saved, _view_state

    settings = {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "e"}
    experiment = tracking.set_tracking(OmegaConf.create(settings))
    key = VIEW_TAG_PREFIX + "comparison"
    state = _view_state(client().get_experiment(experiment).tags[key])
    # The user adds a column and sorts by test accuracy, then saves over our view.
    state["selectedColumns"].insert(0, "attributes.`Source`")
    state["orderByKey"] = "metrics.`test_accuracy`"
    client().set_experiment_tag(experiment, key, _saved(state))
    tracking.prepare_experiment(experiment, ["optimizer.lr"])
    kept = _view_state(client().get_experiment(experiment).tags[key])
    assert kept["orderByKey"] == "metrics.`test_accuracy`"
    assert kept["selectedColumns"][0] == "attributes.`Source`"
    assert kept["selectedColumns"].index("params.`optimizer.lr`") == 4  # after the varied ones


def test_workers_preparing_one_experiment_at_once_all_go_on(tmp_path, monkeypatch):
    """The workers of a sweep on PostgreSQL prepare its experiment at the same moment; the
    loser of the race to insert a tag gets a unique-key error, which must not stop its sweep
    (Hydra reduces a callback's error to a warning, and the sweep went on without its parent)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf

    from experiments import tracking
    from experiments.tracking.client import client
    from experiments.tracking.views import KIND_TAG, MODEL_TRAINING

    settings = {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "e"}
    tracking.set_tracking(OmegaConf.create(settings))
    experiment = client().create_experiment("raced")
    original = MlflowClient.set_experiment_tag
    raced = []

    def another_process_first(self, experiment_id, key, value):
        if not raced:  # another worker inserts the tag between our read and our insert
            raced.append(key)
            original(self, experiment_id, key, value)
            raise MlflowException("duplicate key value violates unique constraint")
        return original(self, experiment_id, key, value)

    monkeypatch.setattr(MlflowClient, "set_experiment_tag", another_process_first)
    tracking.prepare_experiment(experiment, ["optimizer.lr"])
    assert raced == [KIND_TAG]
    assert client().get_experiment(experiment).tags[KIND_TAG] == MODEL_TRAINING


def test_system_and_per_class_metrics_are_recorded(store):
    client = client_for(store)
    run = by_name(store)["folder-vgg16-inline-none"]
    history = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    steps = sorted(m.step for m in history)
    assert len(steps) >= 2 and steps == list(range(len(steps)))  # one point per sample
    assert "system/system_memory_usage_megabytes" in run.data.metrics
    report = json.loads(
        Path(
            client.download_artifacts(run.info.run_id, "evaluation/classification_report.json")
        ).read_text()
    )
    for name in ("class_0", "class_1", "class_2"):
        assert run.data.metrics[f"test_f1/{name}"] == pytest.approx(report[name]["f1-score"])
        assert run.data.metrics[f"test_precision/{name}"] == pytest.approx(
            report[name]["precision"]
        )
        assert run.data.metrics[f"test_recall/{name}"] == pytest.approx(report[name]["recall"])


def test_compare_sweep_shows_the_swept_params_and_no_pareto_for_one_objective(store, capsys):
    from experiments.compare import main as compare

    (parent,) = [r for n, r in by_name(store).items() if n.startswith("sweep ")]
    store_args = ["--tracking-uri", f"sqlite:///{store}/mlruns/mlflow.db", "--out", str(store)]
    assert compare(["--sweep", parent.info.run_id, *store_args]) == 0
    header = capsys.readouterr().out.splitlines()[0].split()
    assert "head.dropout" in header and "trial" in header
    assert "pareto" not in header


def browser_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        message = "no chromium: apt-get install chromium (Debian), as .ci/run does"
        if os.environ.get("EXPERIMENTS_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture(scope="module")
def ui(store):
    """`python -m experiments.ui` (what `make ui` runs) on the store; its printed link."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable, "-m", "experiments.ui", "--port", str(port),
            "--tracking-uri", f"sqlite:///{store}/mlruns/mlflow.db",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    link = None
    for line in process.stdout:
        if line.strip().startswith("folder: "):
            link = line.split("folder: ", 1)[1].strip()
            break
    assert link, "experiments.ui printed no link for the experiment"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            break
        except OSError:
            assert time.monotonic() < deadline, "the MLflow UI did not answer in 90 s"
            time.sleep(0.5)
    yield link
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture
def page(ui):
    sync_api = pytest.importorskip("playwright.sync_api")
    executable = browser_path()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1800, "height": 800})
        yield context.new_page()
        browser.close()


def close_assistant(page) -> None:
    """Close the assistant panel MLflow opens beside a first visit: the screenshots show the
    page."""
    close = page.locator("[data-component-id='mlflow.assistant.chat_panel.close']")
    if close.count():
        close.first.click()


def test_the_printed_link_opens_the_runs_with_what_they_varied_and_gave(ui, page, store):
    page.goto(ui)
    runs = page.get_by_role("heading", name="Runs")
    runs.wait_for(timeout=60_000)
    for text in ("folder-vgg16-inline-none", "sweep s: dropout", "best_val_accuracy",
                 "test_accuracy", "train_time_s", "backbone.name", "head.dropout"):  # fmt: skip
        page.get_by_text(text, exact=True).first.wait_for(timeout=30_000)
    assert page.get_by_text("Detect Issues").count() == 0  # not the GenAI overview
    # The UI keeps which parent rows are expanded in the browser alone: one click shows trials.
    sweep = page.locator("[role=row]", has_text="sweep s: dropout").first
    sweep.locator("button[data-component-id*='runnamecellrenderer']").first.click()
    page.get_by_text("trial-1 dropout=", exact=False).first.wait_for(timeout=30_000)
    page.get_by_text("trial-0 dropout=", exact=False).first.wait_for(timeout=30_000)
    close_assistant(page)
    REPORTS.mkdir(exist_ok=True)
    page.screenshot(path=str(REPORTS / "ui-runs.png"))


def test_a_run_shows_its_system_metrics_charts(ui, page, store):
    run = by_name(store)["folder-vgg16-inline-none"]
    base = ui.split("/#/", 1)[0]
    page.goto(
        f"{base}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}/system-metrics"
        "?workflowType=machine_learning"
    )
    page.get_by_text("cpu_utilization_percentage").first.wait_for(timeout=60_000)
    charts = page.locator(".js-plotly-plot")
    charts.first.wait_for(timeout=30_000)
    assert charts.count() >= 1
    close_assistant(page)
    REPORTS.mkdir(exist_ok=True)
    page.screenshot(path=str(REPORTS / "ui-system-metrics.png"))
