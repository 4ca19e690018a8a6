"""Sweeps: our Optuna sweeper (search, pruning, resume, shared storage, failures) and grids."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from conftest import tiny_overrides
from helpers import runs_of

pytestmark = pytest.mark.slow


def sweep(root, folder, *args, check=True):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.train",
            "-m",
            *tiny_overrides(root, folder),
            "strategy=two_stage",
            "tracking.log_model=false",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def study(storage, name="s"):
    import optuna

    return optuna.load_study(study_name=name, storage=storage)


def states(storage, name="s"):
    trials = study(storage, name).trials
    return [t.state.name for t in trials if not t.user_attrs.get("surplus")]


def test_search_records_a_parent_with_its_trials_and_resumes(tmp_path, image_folder, capsys):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    common = [
        "hparams_search=lr_head",
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=s",
        "hydra.sweeper.pruner=null",
    ]
    sweep(tmp_path, image_folder, *common, "hydra.sweeper.n_trials=3")
    assert states(storage) == ["COMPLETE"] * 3
    sweep(tmp_path, image_folder, *common, "hydra.sweeper.n_trials=6")  # resumes: 3 more
    assert states(storage) == ["COMPLETE"] * 6
    sweep(tmp_path, image_folder, *common, "hydra.sweeper.n_trials=6")  # complete: nothing new
    assert len(states(storage)) == 6

    runs = runs_of(tmp_path, "folder")
    parents = [r for r in runs if r.data.tags.get("sweep") == "true"]
    assert len(parents) == 2  # the third command ran nothing: no empty parent is left
    children = {
        p.info.run_id: [r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id]
        for p in parents
    }
    assert sorted(len(c) for c in children.values()) == [3, 3]
    trial_numbers = sorted(int(r.data.tags["optuna_trial"]) for c in children.values() for r in c)
    counted = [t.number for t in study(storage).trials if not t.user_attrs.get("surplus")]
    assert trial_numbers == counted and len(counted) == 6
    assert all(r.data.tags["optuna_state"] == "COMPLETE" for c in children.values() for r in c)
    second = parents[1]
    assert "best_value" in second.data.metrics and "best.head.dropout" in second.data.params
    # optimizer.lr and head.units are fixed on the command line (tiny_overrides): not searched.
    assert "best.optimizer.lr" not in second.data.params
    sweep_dir = second.data.tags["sweep_dir"]
    results = (tmp_path / sweep_dir / "optimization_results.yaml").read_text()
    assert "best_params" in results and "head.dropout" in results and "head.units" not in results
    # Another command on the same study would mix incomparable trials into it: it stops.
    other = sweep(tmp_path, image_folder, *common, "trainer.seed=7", check=False)
    assert other.returncode != 0
    assert "was started with other overrides" in other.stderr
    assert "hydra.sweeper.study_name=<new name>" in other.stderr
    assert len(states(storage)) == 6
    table = pd.read_csv(f"{sweep_dir}/trials.csv")
    assert len(table) == 6 and set(table["state"]) == {"COMPLETE"}
    assert "params_head.dropout" in table and "params_optimizer.lr" not in table
    best = study(storage).best_value
    from experiments.compare import main as compare

    store = ["--tracking-uri", f"sqlite:///{tmp_path}/mlruns/mlflow.db", "--out", str(tmp_path)]
    assert compare(["--sweep", second.info.run_id, *store]) == 0
    best_line = f"best trial {study(storage).best_trial.number}: val_accuracy="
    assert best_line in capsys.readouterr().out
    assert (
        second.data.metrics["best_value"] == pytest.approx(best)
        or best >= second.data.metrics["best_value"]
    )
    # register --sweep finds the study's best trial under either command's parent; these trials
    # logged no model, which it says in one line, registering nothing.
    from experiments.register import main as register

    registry = ["--tracking-uri", f"sqlite:///{tmp_path}/mlruns/mlflow.db"]
    number = str(study(storage).best_trial.number)
    (best_run,) = [r for c in children.values() for r in c if r.data.tags["optuna_trial"] == number]
    assert register(["--sweep", second.info.run_id, "--name", "s", *registry]) == 2
    error = capsys.readouterr().err
    assert f"run {best_run.info.run_id}" in error and "logged no model" in error


def test_the_same_command_resumes_its_study_from_the_default_journal(tmp_path, image_folder):
    args = ["hparams_search=lr_head", "hydra.sweeper.pruner=null", "hydra.sweeper.n_trials=2"]
    sweep(tmp_path, image_folder, *args)
    study_dir = tmp_path / "multirun" / "lr_head-folder-vgg16-two_stage"
    from hydra_plugins.experiments_sweeper.optuna_sweeper import open_storage

    storage = open_storage(f"journal:{study_dir / 'optuna.journal'}")
    name = "lr_head-folder-vgg16-two_stage"
    assert states(storage, name) == ["COMPLETE"] * 2
    assert sorted(p.name for p in study_dir.glob("trial_*")) == ["trial_0", "trial_1"]
    again = sweep(tmp_path, image_folder, *args)  # the study is complete: nothing new
    assert "2 of 2 trials done" in again.stdout + again.stderr
    assert states(storage, name) == ["COMPLETE"] * 2
    runs = runs_of(tmp_path, "folder")
    assert len([r for r in runs if r.data.tags.get("sweep") == "true"]) == 1
    assert len([r for r in runs if "optuna_trial" in r.data.tags]) == 2


@pytest.mark.backends
def test_aggressive_pruner_stops_trials_early(tmp_path, image_folder, capsys):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    sweep(
        tmp_path,
        image_folder,
        "hparams_search=lr_head",
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=s",
        "hydra.sweeper.n_trials=3",
        "trainer.epochs=4",
        "hydra.sweeper.pruner._target_=optuna.pruners.ThresholdPruner",
        "~hydra.sweeper.pruner.n_startup_trials",
        "~hydra.sweeper.pruner.n_warmup_steps",
        "+hydra.sweeper.pruner.lower=1.1",
    )
    assert states(storage) == ["PRUNED"] * 3
    children = [r for r in runs_of(tmp_path, "folder") if "optuna_trial" in r.data.tags]
    assert len(children) == 3
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.tags["pruned"] == "true" and run.data.tags["optuna_state"] == "PRUNED"
        assert run.data.metrics["val_accuracy"] >= 0  # partial curves kept
        assert run.data.metrics["peak_rss_mb"] > 200  # memory recorded on every ending
    assert all(len(t.intermediate_values) < 4 for t in study(storage).trials)
    # compare leaves pruned trials out (no test metrics), or lists them marked.
    from experiments.compare import main as compare

    store = ["--tracking-uri", f"sqlite:///{tmp_path}/mlruns/mlflow.db", "--out", str(tmp_path)]
    assert compare(["folder", *store]) == 2
    assert "add --pruned" in capsys.readouterr().err
    (parent,) = {r.data.tags["mlflow.parentRunId"] for r in children}
    assert compare(["--sweep", parent, "--pruned", *store]) == 0
    table = pd.read_csv(tmp_path / f"comparison-sweep-{parent[:8]}.csv")
    assert len(table) == 3 and table["pruned"].all() and set(table["state"]) == {"PRUNED"}
    assert "no trial has completed" in capsys.readouterr().out


def test_two_processes_share_one_study(tmp_path, image_folder):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    args = [
        *tiny_overrides(tmp_path, image_folder),
        "strategy=two_stage",
        "tracking.log_model=false",
        "hparams_search=lr_head",
        "hydra.sweeper.pruner=null",
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=s",
        "hydra.sweeper.n_trials=4",
        "trainer.epochs=2",
    ]
    import optuna

    optuna.create_study(study_name="s", storage=storage, direction="maximize")
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "experiments.train",
                "-m",
                *args,
                f"hydra.sweep.dir={tmp_path}/multirun/p{i}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for p in processes:
        assert p.wait(timeout=900) == 0, p.stderr.read()[-3000:]
    assert states(storage).count("COMPLETE") == 4
    params = [
        tuple(sorted(t.params.items())) for t in study(storage).trials if t.state.name == "COMPLETE"
    ]
    assert len(set(params)) == 4


def test_failing_trials_are_recorded_and_the_failure_rate_stops_the_sweep(tmp_path, image_folder):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    common = [
        "hparams_search=lr_head",
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.pruner=null",
        "hydra/sweeper/sampler=random",
        "head.dropout=choice(0.0,1.5)",
        "trainer.epochs=1",
    ]
    sweep(
        tmp_path,
        image_folder,
        *common,
        "hydra.sweeper.study_name=a",
        "hydra.sweeper.n_trials=6",
        "hydra.sweeper.max_failure_rate=1.0",
    )
    found = states(storage, "a")
    assert len(found) == 6 and "FAIL" in found and "COMPLETE" in found
    failed = sweep(
        tmp_path,
        image_folder,
        *common,
        "hydra.sweeper.study_name=b",
        "hydra.sweeper.n_trials=6",
        "hydra.sweeper.max_failure_rate=0.0",
        check=False,
    )
    assert failed.returncode != 0
    assert "max_failure_rate" in failed.stderr
    assert len(states(storage, "b")) < 6


def test_basic_sweeper_grid_nests_under_one_parent(tmp_path, image_folder):
    sweep(tmp_path, image_folder, "trainer.epochs=1", "trainer.seed=1,2", "head.units=[8],[16]")
    runs = runs_of(tmp_path, "folder")
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4 and parent.data.tags["jobs"] == "4"
    assert {(r.data.params["trainer.seed"], r.data.params["head.units"]) for r in children} == {
        ("1", "[8]"),
        ("1", "[16]"),
        ("2", "[8]"),
        ("2", "[16]"),
    }


def test_joblib_launcher_runs_trials_in_parallel_processes(tmp_path, image_folder):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    sweep(
        tmp_path,
        image_folder,
        "hparams_search=lr_head",
        "hydra/launcher=joblib",
        "hydra.sweeper.n_jobs=2",
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=s",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.pruner=null",
    )
    assert states(storage) == ["COMPLETE"] * 4
    children = [r for r in runs_of(tmp_path, "folder") if "optuna_trial" in r.data.tags]
    parents = {r.data.tags["mlflow.parentRunId"] for r in children}
    assert len(children) == 4 and len(parents) == 1
    pids = {r.data.tags["pid"] for r in children}
    assert len(pids) >= 2  # worker processes, not the sweeper's
    by_trial = {int(r.data.tags["optuna_trial"]): r.info for r in children}
    for first, second in ((0, 1), (2, 3)):  # each batch of n_jobs trials ran at the same time
        a, b = by_trial[first], by_trial[second]
        assert max(a.start_time, b.start_time) < min(a.end_time, b.end_time)


def test_a_trial_whose_heartbeat_stopped_is_failed_and_queued_again(tmp_path):
    """RDB storages: a trial of a process on another host that stopped beating is taken over."""
    import optuna

    from hydra_plugins.experiments_sweeper.optuna_sweeper import (
        open_storage,
        retried_numbers,
        take_over_stale_trials,
    )

    storage = open_storage(f"sqlite:///{tmp_path}/optuna.db", heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(study_name="hb", storage=storage)
    distributions = {"x": optuna.distributions.FloatDistribution(0, 1)}
    lost = study.ask(distributions)
    lost.set_user_attr("owner_host", "another-host")  # its pid means nothing here
    storage.record_heartbeat(lost._trial_id)
    alive = study.ask(distributions)
    alive.set_user_attr("owner_host", "another-host")
    assert take_over_stale_trials(study) == []  # both still beat
    import time

    time.sleep(3)
    storage.record_heartbeat(alive._trial_id)
    assert take_over_stale_trials(study) == [lost.number]
    trials = study.get_trials(deepcopy=False)
    assert retried_numbers(trials) == {lost.number}
    (retry,) = [t for t in trials if t.state.name == "WAITING"]
    assert retry.params == lost.params
    assert [t.state.name for t in trials if t.number == alive.number] == ["RUNNING"]


def test_accuracy_against_cost_puts_the_pareto_front_in_mlflow(tmp_path, image_folder, capsys):
    import json
    from pathlib import Path

    import yaml

    from helpers import client_for

    sweep(
        tmp_path,
        image_folder,
        "hparams_search=accuracy_vs_cost",
        "backbone=vgg16",  # fixed on the command line: out of the search (offline weights)
        "head.units=choice([8],[64,32])",  # replaces the preset's choices
        "hydra.sweeper.n_trials=3",
        "trainer.epochs=2",
        "tracking.log_model=true",  # for register --sweep below
    )
    study_dir = tmp_path / "multirun" / "accuracy_vs_cost-folder-two_stage"
    results = yaml.safe_load((study_dir / "optimization_results.yaml").read_text())
    assert results["metric"] == ["val_accuracy", "train_time_s"]
    assert results["directions"] == ["maximize", "minimize"]
    front = results["solutions"]
    assert front and all(len(s["values"]) == 2 for s in front)
    # Job folders by trial number; their overrides are their own parameters only.
    for job in study_dir.glob("trial_*"):
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        keys = {o.split("=")[0] for o in overrides}
        assert {"backbone", "head.units", "head.pooling", "optimizer.lr"} <= keys
        assert not any("optuna" in o.lower() or "sweeper" in o for o in overrides)

    runs = runs_of(tmp_path, "folder")
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 3
    assert all(r.data.params["optimizer.lr"] == "0.003" for r in children)
    on_front = {r.data.tags["optuna_trial"] for r in children if r.data.tags["pareto"] == "true"}
    assert len(on_front) == len(front)
    assert {r.data.tags["pareto"] for r in children} <= {"true", "false"}
    client = client_for(tmp_path)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "study")}
    assert {"study/pareto_front.json", "study/pareto_front.png"} <= artifacts
    stored = json.loads(
        Path(client.download_artifacts(parent.info.run_id, "study/pareto_front.json")).read_text()
    )
    table = pd.DataFrame(stored["data"], columns=stored["columns"])  # MLflow's table format
    assert sorted(table["trial"].astype(str)) == sorted(on_front)
    assert {"val_accuracy", "train_time_s", "head.units"} <= set(table.columns)
    assert parent.data.metrics["pareto_size"] == len(front)
    # compare, given the parent run: the trials, their states and the front.
    from experiments.compare import main as compare

    store = ["--tracking-uri", f"sqlite:///{tmp_path}/mlruns/mlflow.db", "--out", str(tmp_path)]
    assert compare(["--sweep", parent.info.run_id, *store]) == 0
    printed = capsys.readouterr().out
    assert "Pareto front (val_accuracy,train_time_s; maximize,minimize): trial(s)" in printed
    compared = pd.read_csv(tmp_path / f"comparison-sweep-{parent.info.run_id[:8]}.csv")
    assert len(compared) == 3 and set(compared["state"]) == {"COMPLETE"}
    assert set(compared[compared["pareto"]]["trial"].astype(str)) == on_front
    assert compare(["--sweep", children[0].info.run_id, *store]) == 2
    assert "is not a sweep's parent run" in capsys.readouterr().err
    # register --sweep: two objectives have no single best trial; the user names one of the front.
    from experiments.register import main as register

    registry = ["--tracking-uri", f"sqlite:///{tmp_path}/mlruns/mlflow.db", "--name", "pareto"]
    assert register(["--sweep", parent.info.run_id, *registry]) == 2
    assert "choose one of its Pareto front with --trial" in capsys.readouterr().err
    for off in {r.data.tags["optuna_trial"] for r in children} - on_front:
        assert register(["--sweep", parent.info.run_id, "--trial", off, *registry]) == 2
        assert "is not on the sweep's Pareto front" in capsys.readouterr().err
    assert not client.search_model_versions("name = 'pareto'")
    chosen = min(on_front)
    (trial_run,) = [r for r in children if r.data.tags["optuna_trial"] == chosen]
    sweep_args = ["--sweep", parent.info.run_id, "--trial", chosen, "--alias", "champion"]
    assert register([*sweep_args, *registry]) == 0
    version = client.get_model_version_by_alias("pareto", "champion")
    assert version.run_id == trial_run.info.run_id


def test_a_warm_start_from_an_earlier_sweeps_mlflow_runs(tmp_path, image_folder, capsys):
    """A sweep warm-started from another sweep's parent run gets its finished trials (their
    `head.dropout` and returned val_accuracy, not counted toward n_trials) and runs an enqueued
    configuration first; its parent records the warm start, and compare --sweep marks it."""
    from hydra_plugins.experiments_sweeper.optuna_sweeper import open_storage

    common = ["hparams_search=lr_head", "hydra.sweeper.pruner=null", "trainer.epochs=1"]
    sweep(
        tmp_path,
        image_folder,
        *common,
        "hydra.sweeper.study_name=first",
        "hydra.sweeper.n_trials=2",
    )
    runs = runs_of(tmp_path, "folder")
    (first,) = [r for r in runs if r.data.tags.get("sweep") == "true"]
    earlier = {
        float(r.data.params["head.dropout"]): float(r.data.tags["returned_value"])
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == first.info.run_id
    }
    sources = f"{{run:{first.info.run_id[:8]}}},{{enqueue:[{{head.dropout:0.25}}]}}"
    warm = f"hydra.sweeper.warm_start=[{sources}]"
    result = sweep(
        tmp_path,
        image_folder,
        *common,
        "hydra.sweeper.study_name=second",
        "hydra.sweeper.n_trials=1",
        warm,
    )
    assert f"warm start from run {first.info.run_id[:8]}: 2 trial(s) added" in result.stdout
    second_study = study(
        open_storage(f"journal:{tmp_path}/multirun/second/optuna.journal"), "second"
    )
    imported = [t for t in second_study.trials if t.user_attrs.get("imported")]
    assert {t.params["head.dropout"]: t.value for t in imported} == pytest.approx(earlier)
    (ran,) = [t for t in second_study.trials if not t.user_attrs.get("imported")]
    assert ran.params == {"head.dropout": 0.25} and ran.state.name == "COMPLETE"
    (second,) = [
        r
        for r in runs_of(tmp_path, "folder")
        if r.data.tags.get("sweep") == "true" and r.info.run_id != first.info.run_id
    ]
    assert second.data.tags["warm_start_trials"] == "2"
    assert second.data.tags["warm_start"].startswith(f"run {first.info.run_id[:8]}; enqueue ")
    from experiments.compare import main as compare

    store = ["--tracking-uri", f"sqlite:///{tmp_path}/mlruns/mlflow.db", "--out", str(tmp_path)]
    assert compare(["--sweep", second.info.run_id, *store]) == 0
    out = capsys.readouterr().out
    assert "warm_start" in out and "(2 trial(s) brought, not listed: they ran elsewhere)" in out
    # A run that is not a sweep's parent is refused in one line.
    child = next(r for r in runs if r.data.tags.get("mlflow.parentRunId") == first.info.run_id)
    bad = sweep(
        tmp_path,
        image_folder,
        *common,
        "hydra.sweeper.study_name=third",
        f"hydra.sweeper.warm_start={{run:{child.info.run_id}}}",
        check=False,
    )
    (line,) = [x for x in bad.stderr.splitlines() if x.startswith("error:")]
    assert "is not a sweep's parent run" in line and "Traceback" not in bad.stderr


def test_two_studies_of_the_same_overrides_are_two_sweeps(tmp_path, image_folder, capsys):
    """Same overrides, same sampler seed, another study name: the second study trains all its
    trials under its own parent, and register --sweep on each parent registers that study's own
    best trial (trial numbers collide across studies)."""
    import optuna

    from experiments.register import main as register
    from hydra_plugins.experiments_sweeper.optuna_sweeper import open_storage

    common = ["hparams_search=lr_head", "hydra.sweeper.pruner=null", "trainer.epochs=1"]
    common += ["hydra.sweeper.n_trials=2", "tracking.log_model=true"]
    outputs = {}
    for name in ("one", "two"):
        outputs[name] = sweep(tmp_path, image_folder, *common, f"hydra.sweeper.study_name={name}")
    assert "already finished in this sweep" not in outputs["two"].stdout
    runs = runs_of(tmp_path, "folder")
    parents = {
        r.data.tags["sweep_study"].split(" in ")[0]: r
        for r in runs
        if r.data.tags.get("sweep") == "true"
    }
    assert sorted(parents) == ["one", "two"]
    registry = ["--tracking-uri", f"sqlite:///{tmp_path}/mlruns/mlflow.db"]
    for name, parent in parents.items():
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert sorted(r.data.tags["optuna_study"] for r in children) == [name, name]  # trained
        best = optuna.load_study(
            study_name=name,
            storage=open_storage(f"journal:{tmp_path}/multirun/{name}/optuna.journal"),
        ).best_trial
        assert register(["--sweep", parent.info.run_id, "--name", f"m-{name}", *registry]) == 0
        out = capsys.readouterr().out
        (chosen,) = [r for r in children if r.data.tags["optuna_trial"] == str(best.number)]
        assert f"registered run {chosen.info.run_id}" in out
        assert f"the sweep's best trial: trial {best.number} of study {name}: returned " in out
