"""Our Optuna sweeper on its own: hydra-optuna-sweeper's configs and grammar, and its bugs fixed.

The jobs are a small pure-Python task (tests/sweeper_app/app.py, upstream's sphere example);
test_sweeps.py runs the sweeper with the real `experiments.train`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

APP = Path(__file__).parent / "sweeper_app" / "app.py"


def sweep(tmp_path, *args, check=True, config=None, python=()):
    command = [sys.executable, *python, str(APP), "-m", f"hydra.sweep.dir={tmp_path}"]
    if config:
        command.append(f"--config-name={config}")
    result = subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=300, cwd=APP.parent
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def results(tmp_path) -> dict:
    return yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())


def trials(tmp_path) -> pd.DataFrame:
    return pd.read_csv(tmp_path / "trials.csv")


def job_overrides(tmp_path) -> list[list[str]]:
    return [yaml.safe_load(p.read_text()) for p in sorted(tmp_path.glob("*/.hydra/overrides.yaml"))]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("key=choice(1,2)", "CategoricalDistribution(choices=(1, 2))"),
        ("key=choice(true, false)", "CategoricalDistribution(choices=(True, False))"),
        ("key=choice('hello', 'world')", "CategoricalDistribution(choices=('hello', 'world'))"),
        ("key=choice([64],[128,64])", "CategoricalDistribution(choices=('[64]', '[128,64]'))"),
        ("key=shuffle(range(1,3))", "CategoricalDistribution(choices=(1, 2))"),
        # Ordered and stepped, with Hydra's values: range(1,3) is 1 and 2.
        ("key=range(1,3)", "IntDistribution(high=2, log=False, low=1, step=1)"),
        ("key=range(0,10,step=3)", "IntDistribution(high=9, log=False, low=0, step=3)"),
        (
            "key=range(0.5, 5.5, step=1)",
            "FloatDistribution(high=4.5, log=False, low=0.5, step=1.0)",
        ),
        ("key=interval(1, 5)", "FloatDistribution(high=5.0, log=False, low=1.0, step=None)"),
        ("key=int(interval(1, 5))", "IntDistribution(high=5, log=False, low=1, step=1)"),
        (
            "key=tag(log, interval(1, 5))",
            "FloatDistribution(high=5.0, log=True, low=1.0, step=None)",
        ),
        ("key=tag(log, int(interval(1, 5)))", "IntDistribution(high=5, log=True, low=1, step=1)"),
    ],
)
def test_the_override_grammar_becomes_optuna_distributions(override, expected):
    from hydra_plugins.experiments_sweeper.space import search_space

    space = search_space({}, [override])
    assert repr(space.distributions["key"]) == expected
    assert space.fixed == []


def test_the_command_line_wins_over_the_config_params():
    from hydra_plugins.experiments_sweeper.space import search_space

    params = {"a": "interval(0, 1)", "b": "choice(1, 2)", "c": "5", "d": "range(1, 4)"}
    space = search_space(params, ["a=0.3", "b=choice(3, 4)", "~e", "f=1"])
    assert set(space.distributions) == {"b", "d"}  # a fixed: out of the search
    assert space.distributions["b"].choices == (3, 4)
    assert space.fixed == ["~e", "c=5", "a=0.3", "f=1"]


def test_config_params_in_upstream_form_give_upstream_results(tmp_path):
    sweep(tmp_path)
    found = results(tmp_path)
    assert found["name"] == "optuna"
    table = trials(tmp_path)
    assert len(table) == 6 and set(table["state"]) == {"COMPLETE"}
    assert set(table["params_x"]) <= {-2, -1, 0, 1, 2} and set(table["params_y"]) <= {-1, 0, 1}
    best = table.loc[table["value"].idxmin()]
    assert found["best_value"] == best["value"]
    assert found["best_params"] == {"x": best["params_x"], "y": best["params_y"]}


def test_a_value_fixed_on_the_command_line_is_not_searched(tmp_path):
    sweep(tmp_path, "x=2", "hydra.sweeper.n_trials=3")
    for overrides in job_overrides(tmp_path):
        assert [o for o in overrides if o.startswith("x=")] == ["x=2"]
    assert "params_x" not in trials(tmp_path)
    assert set(results(tmp_path)["best_params"]) == {"y"}
    assert results(tmp_path)["best_value"] >= 4  # every job ran with x=2


def test_jobs_get_only_their_own_parameters_as_overrides(tmp_path):
    sweep(tmp_path, "hydra.sweeper.n_trials=3", "hydra.sweep.subdir=${hydra.job.override_dirname}")
    folders = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert len(folders) == 3
    assert all(name.startswith("x=") and ",y=" in name and "/" not in name for name in folders)
    for overrides in job_overrides(tmp_path):
        assert [o.split("=")[0] for o in overrides] == ["x", "y"]
    # The trial number reaches the job through its hydra node instead.
    hydra_cfg = yaml.safe_load(next(tmp_path.glob("*/.hydra/hydra.yaml")).read_text())
    assert "EXPERIMENTS_OPTUNA_TRIAL" in hydra_cfg["hydra"]["job"]["env_set"]


@pytest.mark.parametrize("returns", ["none", "text", "list"])
def test_a_non_float_return_fails_the_trial_and_the_sweep_goes_on(tmp_path, returns):
    result = sweep(
        tmp_path,
        f"returns={returns}",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.max_failure_rate=1",
    )
    assert "Traceback" not in result.stderr
    assert list(trials(tmp_path)["state"]) == ["FAIL"] * 3
    assert result.stdout.count("failed: the job returned") == 3
    assert results(tmp_path) == {"name": "optuna"}  # written, with nothing best


def test_failing_jobs_stop_the_sweep_in_one_line_with_the_results_kept(tmp_path):
    result = sweep(tmp_path, "+error=true", "hydra.sweeper.max_failure_rate=0.0", check=False)
    assert result.returncode == 1
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert "stopping the sweep: 2 of 2 trials failed" in line
    first = "the first, trial 0: RuntimeError: cfg.error is True (2 of the 2 failed here say so)"
    assert f"; {first}; its log: {tmp_path / '0' / 'app.log'}" in line
    assert (tmp_path / "0" / "app.log").is_file()
    assert list(trials(tmp_path)["state"]) == ["FAIL", "FAIL"]
    assert results(tmp_path)["name"] == "optuna"


def test_the_grid_runs_to_its_end_and_stops_cleanly(tmp_path):
    result = sweep(tmp_path, config="grid")  # upstream's test_grid.yaml, n_trials=20
    assert "the grid has 8 points: n_trials is 8, not 20" in result.stdout
    table = trials(tmp_path)
    assert set(table["state"]) == {"COMPLETE"}
    points = {(r.params_x, r.params_y, r.params_z) for r in table.itertuples()}
    assert len(table) == len(points) == 8
    assert {x for x, _, _ in points} == {-1, 1} and {y for _, y, _ in points} == {-1.0, 0.0}
    assert results(tmp_path)["best_value"] == 1.0
    again = sweep(tmp_path, config="grid")  # resumed: the grid is done, nothing runs
    assert "8 of 8 trials done" in again.stdout and len(trials(tmp_path)) == 8


def test_a_continuous_param_is_refused_by_the_grid_in_one_line(tmp_path):
    result = sweep(tmp_path, "hydra/sweeper/sampler=grid", "x=interval(0,1)", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: hydra/sweeper/sampler=grid cannot list x" in result.stderr


def test_two_objectives_give_the_pareto_front(tmp_path):
    result = sweep(
        tmp_path,
        "returns=two",
        "hydra.sweeper.direction=[minimize,minimize]",
        "hydra.sweeper.n_trials=10",
    )
    assert "NSGAIISampler" in result.stdout  # the default for several objectives
    assert "pruning is off" in result.stdout
    found = results(tmp_path)
    assert found["directions"] == ["minimize", "minimize"]
    front = found["solutions"]
    assert front and all(set(s) == {"params", "values"} for s in front)
    table = trials(tmp_path)
    complete = table[table["state"] == "COMPLETE"]
    values = [tuple(v) for v in complete[["values_0", "values_1"]].to_numpy()]

    def dominated(v):
        return any(
            all(o <= w for o, w in zip(other, v, strict=True)) and other != v for other in values
        )

    assert sorted(tuple(s["values"]) for s in front) == sorted(
        set(v for v in values if not dominated(v))
    )
    assert set(complete[complete["pareto"]]["number"]) == set(
        complete[[not dominated(v) for v in values]]["number"]
    )


@pytest.mark.parametrize("sampler", ["tpe", "random", "qmc", "nsgaii", "cmaes"])
def test_sampler_groups_take_their_typed_settings(tmp_path, sampler):
    names = {"tpe": "TPE", "random": "Random", "qmc": "QMC", "nsgaii": "NSGAII", "cmaes": "CmaEs"}
    continuous = ["x=interval(-2, 2)", "y=interval(-1, 1)"] if sampler == "cmaes" else []
    result = sweep(
        tmp_path,
        f"hydra/sweeper/sampler={sampler}",
        "hydra.sweeper.sampler.seed=7",
        "hydra.sweeper.n_trials=3",
        *continuous,
    )
    assert f"{names[sampler]}Sampler" in result.stdout
    assert len(trials(tmp_path)) == 3


def test_the_removed_motpe_sampler_says_what_to_use_instead(tmp_path):
    result = sweep(tmp_path, "hydra/sweeper/sampler=motpe", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "removed in Optuna 4.0; use hydra/sweeper/sampler=tpe" in result.stderr


def test_an_unknown_sampler_setting_is_refused(tmp_path):
    result = sweep(
        tmp_path, "hydra/sweeper/sampler=random", "+hydra.sweeper.sampler.nope=1", check=False
    )
    assert result.returncode == 1 and "nope" in result.stderr


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("torch") is not None, reason="PyTorch is installed"
)
def test_the_gp_sampler_without_pytorch_is_one_line(tmp_path):
    result = sweep(tmp_path, "hydra/sweeper/sampler=gp", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: hydra/sweeper/sampler=gp needs PyTorch" in result.stderr
    assert "pip install torch" in result.stderr


def test_custom_search_space_suggests_more_params_per_trial(tmp_path):
    sweep(
        tmp_path,
        "hydra.sweeper.custom_search_space=app.configure",
        "hydra/sweeper/sampler=random",
        "hydra.sweeper.n_trials=5",
    )
    table = trials(tmp_path)
    assert len(table) == 5 and set(table["state"]) == {"COMPLETE"}
    assert ((table["params_+w"] - table["params_x"]).abs() <= 0.5).all()
    best = results(tmp_path)["best_params"]
    assert abs(best["+w"] - best["x"]) <= 0.5


def test_workers_sharing_a_seeded_sampler_draw_differently_and_no_duplicate_fails(tmp_path):
    """Two workers start together on one RDB study with one sampler seed: each draws with its
    own seed (recorded), a duplicate ask is PRUNED as surplus, never FAIL, and Optuna's warning
    on every ask from a heartbeat storage is silenced (an error here under -W)."""
    import optuna

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    command = [
        sys.executable,
        "-W",
        "error:Heartbeat of storage",
        str(APP),
        "-m",
        f"hydra.sweeper.storage={storage}",
        "hydra/sweeper/sampler=random",
        "hydra.sweeper.sampler.seed=7",
        "hydra.sweeper.n_trials=6",
        "hydra.sweeper.heartbeat_interval=1",
        "+sleep=1",
    ]
    workers = [
        subprocess.Popen(
            [*command, f"hydra.sweep.dir={tmp_path / f'worker{i}'}"],
            cwd=APP.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    for worker in workers:
        output, _ = worker.communicate(timeout=300)
        assert worker.returncode == 0, output[-3000:]
        assert "Heartbeat of storage" not in output
    study = optuna.load_study(study_name="sphere", storage=storage)
    counted = [t for t in study.trials if not t.user_attrs.get("surplus")]
    assert [t.state.name for t in counted] == ["COMPLETE"] * 6
    assert not [t for t in study.trials if t.state.name == "FAIL"]
    for surplus in (t for t in study.trials if t.user_attrs.get("surplus")):
        assert surplus.state.name == "PRUNED"
    assert len(study.user_attrs["workers"]) == 2
    seeds = {t.user_attrs["sampler_seed"] for t in study.trials}
    assert seeds == {7, 8}
    firsts = [
        min(t.number for t in study.trials if t.user_attrs["sampler_seed"] == s) for s in (7, 8)
    ]
    assert study.trials[firsts[0]].params != study.trials[firsts[1]].params


def test_a_sweep_with_nothing_to_search_runs_the_fixed_config_n_trials_times(tmp_path):
    result = sweep(tmp_path, "hydra.sweeper.params=null", "hydra.sweeper.n_trials=3")
    assert "nothing to search: it runs the same configuration 3 times" in result.stdout
    table = trials(tmp_path)
    assert list(table["state"]) == ["COMPLETE"] * 3
    assert list(table["value"]) == [2.0] * 3  # x=1, y=1 as the config sets them


def test_jobs_launched_together_get_a_device_slot_each(tmp_path):
    sweep(tmp_path, "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=4")
    slots = sorted(
        yaml.safe_load(p.read_text())["hydra"]["job"]["env_set"]["EXPERIMENTS_DEVICE_SLOT"]
        for p in tmp_path.glob("*/.hydra/hydra.yaml")
    )
    assert slots == ["0/2", "0/2", "1/2", "1/2"]
    single = tmp_path / "single"
    sweep(single, "hydra.sweeper.n_trials=2")
    for path in single.glob("*/.hydra/hydra.yaml"):
        assert (
            "EXPERIMENTS_DEVICE_SLOT"
            not in yaml.safe_load(path.read_text())["hydra"]["job"]["env_set"]
        )


def test_the_plots_warn_nothing_that_could_end_a_sweep(tmp_path):
    """Optuna's importance evaluator warns on a small or flat study and matplotlib on an empty
    legend: under `python -W error` that ended sweeps whose every trial had finished."""
    import warnings

    import optuna

    from hydra_plugins.experiments_sweeper.results import plots

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    for x in (0.1, 0.2):
        study.enqueue_trial({"x": x, "y": 1})
        study.optimize(lambda t: t.suggest_float("x", 0, 1) * 0 + 1.0 + t.suggest_int("y", 1, 1), 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        saved = plots(study, tmp_path, None)
    assert {p.name for p in saved} >= {"optimization_history.png"}


def journal(tmp_path, name="sphere"):
    import optuna

    from hydra_plugins.experiments_sweeper.optuna_sweeper import open_storage

    return optuna.load_study(
        study_name=name, storage=open_storage(f"journal:{tmp_path}/optuna.journal")
    )


# One long trial first, then short ones: x and y given, so that no ask repeats another.
UNEVEN = [{"sleep": 5, "x": -2, "y": -1}] + [{"sleep": 0.2, "x": x, "y": -1} for x in (-1, 0, 1)]
CONFIGS = ",".join(f"{{sleep:{c['sleep']},x:{c['x']},y:{c['y']}}}" for c in UNEVEN)
ENQUEUE = f"hydra.sweeper.warm_start={{enqueue:[{CONFIGS}]}}"


@pytest.mark.parametrize(
    ("launcher", "keep_busy"),
    [
        (["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], True),
        (["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], False),
        (["hydra/launcher=submitit_local"], True),
    ],
    ids=["joblib", "joblib-batches", "submitit_local"],
)
def test_a_freed_slot_takes_the_next_trial_while_a_long_one_runs(tmp_path, launcher, keep_busy):
    """With n_jobs=2, the short trials run one after another in the second slot while the long
    one holds the first, each on its slot's device; in batches (upstream's way) the third trial
    waits for the long one."""
    sweep(
        tmp_path,
        *launcher,
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=4",
        f"hydra.sweeper.keep_slots_busy={str(keep_busy).lower()}",
        "+sleep=choice(0.2, 5)",
        ENQUEUE,
    )
    trials = journal(tmp_path).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert [t.params["+sleep"] for t in trials] == [c["sleep"] for c in UNEVEN]
    assert all(t.user_attrs["warm_start"].startswith("enqueue") for t in trials)
    long, short = trials[0], trials[1:]
    started_during = [t.datetime_start < long.datetime_complete for t in short]
    assert started_during == ([True, True, True] if keep_busy else [True, False, False])
    if keep_busy:
        slots = {
            yaml.safe_load(p.read_text())["hydra"]["job"]["env_set"][
                "EXPERIMENTS_OPTUNA_TRIAL"
            ]: yaml.safe_load(p.read_text())["hydra"]["job"]["env_set"]["EXPERIMENTS_DEVICE_SLOT"]
            for p in tmp_path.glob("**/.hydra/hydra.yaml")
        }
        assert slots == {"0": "0/2", "1": "1/2", "2": "1/2", "3": "1/2"}


def test_a_warm_start_from_a_finished_study_is_seen_by_the_sampler(tmp_path):
    """The 6 trials of an earlier study are added (not counted toward n_trials): TPE's first
    trial then differs from a cold start's with the same seed."""
    tpe = ["hydra/sweeper/sampler=tpe", "hydra.sweeper.sampler.seed=3"]
    tpe.append("hydra.sweeper.sampler.n_startup_trials=4")
    tpe += ["x=interval(-5, 5)", "y=interval(-5, 5)"]  # continuous: no ask repeats another
    sweep(tmp_path / "earlier", "hydra.sweeper.n_trials=6", *tpe)
    earlier = f"journal:{tmp_path / 'earlier' / 'optuna.journal'}"
    warm = f"hydra.sweeper.warm_start={{storage:'{earlier}',study_name:sphere}}"
    result = sweep(tmp_path / "warm", "hydra.sweeper.n_trials=2", *tpe, warm)
    sweep(tmp_path / "cold", "hydra.sweeper.n_trials=2", *tpe)
    assert f"warm start from study sphere in {earlier}: 6 trial(s) added" in result.stdout
    assert "0 of 2 trials done" in result.stdout
    warm_trials, cold_trials = journal(tmp_path / "warm").trials, journal(tmp_path / "cold").trials
    imported = [t for t in warm_trials if t.user_attrs.get("imported")]
    assert len(imported) == 6 and len(warm_trials) == 8
    finished = [t for t in journal(tmp_path / "earlier").trials if t.state.name == "COMPLETE"]
    assert [(t.params, t.values) for t in imported] == [(t.params, t.values) for t in finished]
    assert warm_trials[6].params != cold_trials[0].params
    again = sweep(tmp_path / "warm", "hydra.sweeper.n_trials=2", *tpe, warm)  # nothing twice
    assert "2 of 2 trials done" in again.stdout
    assert len(journal(tmp_path / "warm").trials) == len(warm_trials)


def test_a_warm_start_skips_trials_outside_the_space_in_one_line(tmp_path):
    sweep(tmp_path / "earlier", "hydra.sweeper.n_trials=4", "x=choice(-2,2)")
    earlier = f"journal:{tmp_path / 'earlier' / 'optuna.journal'}"
    warm = f"hydra.sweeper.warm_start={{storage:'{earlier}',study_name:sphere}}"
    result = sweep(tmp_path / "warm", "hydra.sweeper.n_trials=1", "x=choice(-2,0)", warm)
    earlier_x = [t.params["x"] for t in journal(tmp_path / "earlier").trials]
    fits = earlier_x.count(-2)
    assert (
        "6 trial(s) added" not in result.stdout
        and f"{fits} trial(s) added, {4 - fits} outside this search space skipped" in result.stdout
    )


@pytest.mark.parametrize(
    ("setting", "says"),
    [
        ("{storage:'journal:/nowhere/optuna.journal',study_name:s}", "no such journal file"),
        ("{storage:'sqlite:///{tmp}/none.db',study_name:s}", "no such sqlite database file"),
        ("{storage:'journal:{tmp}/old/optuna.journal',study_name:gone}", "no study 'gone' in"),
        ("{storage:'nosuch://x',study_name:s}", "cannot be opened:"),
        ("{enqueue:[{x:7}]}", "enqueue[0]: x=7 is outside the search space"),
        ("{enqueue:[{z:1}]}", "enqueue[0]: z is not searched (the search space: x, y)"),
        ("{stroage:x}", "unknown key(s) ['stroage']"),
        ("{run:abcdef12}", "warm_start from MLflow: no MLflow store chosen"),
    ],
)
def test_a_bad_warm_start_is_one_line(tmp_path, setting, says):
    setting = setting.replace("{tmp}", str(tmp_path))
    if "gone" in setting:  # a study there, not the one named
        sweep(tmp_path / "old", "hydra.sweeper.n_trials=1")
    result = sweep(tmp_path, f"hydra.sweeper.warm_start={setting}", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert says in line, line


@pytest.mark.parametrize(
    ("config", "args"),
    [("grid", ()), (None, ("hydra.sweeper.custom_search_space=app.configure",))],
)
def test_upstreams_grid_and_custom_space_examples_end_cleanly_under_werror(tmp_path, config, args):
    """hydra-optuna-sweeper's own examples: under `python -W error` no warning of Optuna's,
    matplotlib's or ours may end a sweep whose trials all finished, nor reach the terminal."""
    result = sweep(tmp_path, *args, config=config, python=("-W", "error"))
    assert "Warning" not in result.stdout + result.stderr
    assert set(trials(tmp_path)["state"]) == {"COMPLETE"}
    assert (tmp_path / "optimization_results.yaml").is_file()


def test_a_plot_that_raises_is_one_line_and_the_rest_is_written(tmp_path, monkeypatch, caplog):
    import logging

    import optuna
    from optuna.visualization import matplotlib as optuna_plots

    from hydra_plugins.experiments_sweeper.results import plots

    def broken(study):
        raise TypeError("a plotting library changed its API")

    monkeypatch.setattr(optuna_plots, "plot_parallel_coordinate", broken)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    study.optimize(lambda t: t.suggest_float("x", 0, 1), 3)
    with caplog.at_level(logging.INFO):
        saved = plots(study, tmp_path, None)
    assert {p.name for p in saved} == {"optimization_history.png", "param_importances.png"}
    (line,) = [r.getMessage() for r in caplog.records if "parallel_coordinate" in r.getMessage()]
    assert line == "no parallel_coordinate plot: TypeError: a plotting library changed its API"


@pytest.mark.parametrize(
    ("distribution", "value", "expected"),
    [
        ("IntDistribution(1, 5)", "3", 3),
        ("IntDistribution(1, 5)", "3.5", None),
        ("IntDistribution(1, 5)", 9, None),
        ("FloatDistribution(0, 1)", "0.25", 0.25),
        ("FloatDistribution(0, 1, step=0.5)", 0.25, None),
        ("CategoricalDistribution(('[64]', '[128,64]'))", "[128, 64]", "[128,64]"),
        ("CategoricalDistribution((1, 2))", "2", 2),
        ("CategoricalDistribution((1, 2))", "x", None),
    ],
)
def test_a_recorded_value_fits_a_distribution_or_not(distribution, value, expected):
    """A run's params are text as MLflow recorded them: warm starts read them back as values of
    the search space, or skip them."""
    import optuna.distributions as d

    from hydra_plugins.experiments_sweeper.warm_start import as_value

    assert as_value(eval(distribution, vars(d)), value) == expected
