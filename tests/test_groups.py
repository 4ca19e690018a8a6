"""Repeats (`trainer.repeats`): one parent run with the aggregate and a child per seed; the
statistics checked against numpy and scipy; a group killed (SIGTERM, kill -9) and run again ends
with exactly its children, each epoch logged once."""

from __future__ import annotations

import math
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from conftest import tiny_overrides
from helpers import client_for, runs_of

REPEATS = 3
EPOCHS = 6


def group_command(root: Path, folder: Path, *extra: str) -> list[str]:
    overrides = [o for o in tiny_overrides(root, folder) if not o.startswith("trainer.epochs")]
    return [
        sys.executable, "-m", "experiments.train", *overrides, f"trainer.epochs={EPOCHS}",
        f"trainer.repeats={REPEATS}", "strategy=two_stage", "tracking.log_model=false", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def group(tmp_path_factory, image_folder):
    """A store with two groups of the same seeds: lr 3e-3 (the tiny default), then 1e-5."""
    root = tmp_path_factory.mktemp("group")
    for lr in ("3e-3", "1e-5"):
        done = subprocess.run(
            group_command(root, image_folder, f"optimizer.lr={lr}"),
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    return root


def parents(root: Path):
    runs = runs_of(root, "folder")
    return [r for r in runs if r.data.tags.get("group") == "true"]


def parent_and_children(root: Path, which: int = 0):
    runs = runs_of(root, "folder")
    parent = parents(root)[which]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return parent, children


def test_a_group_is_a_parent_with_a_child_per_seed(group):
    parent, children = parent_and_children(group)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["seeds"] == "42,43,44" and parent.data.tags["members"] == "3"
    assert sorted(c.info.run_name for c in children) == ["seed-42", "seed-43", "seed-44"]
    assert sorted(c.data.params["trainer.seed"] for c in children) == ["42", "43", "44"]
    assert all(c.info.status == "FINISHED" for c in children)
    assert parent.info.run_name.endswith(" x 3 seeds")
    assert "test_accuracy: " in parent.data.tags["mlflow.note.content"]


def test_the_aggregate_is_numpys_and_scipys(group):
    parent, children = parent_and_children(group)
    metrics = parent.data.metrics
    for name in ("test_accuracy", "best_val_accuracy", "test_ece", "train_time_s"):
        values = np.array([c.data.metrics[name] for c in children])
        assert metrics[f"{name}_mean"] == pytest.approx(values.mean())
        assert metrics[f"{name}_std"] == pytest.approx(values.std(ddof=1))
        low, high = stats.t.interval(
            0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values)
        )
        # Cut to the metric's range: an accuracy's or an ECE's within [0, 1], a time's above 0.
        top = math.inf if name == "train_time_s" else 1.0
        assert metrics[f"{name}_ci95_low"] == pytest.approx(max(low, 0.0))
        assert metrics[f"{name}_ci95_high"] == pytest.approx(min(high, top))
    # The value a sweeper would get: the mean of the members' best val_accuracy.
    best = [c.data.metrics["best_val_accuracy"] for c in children]
    assert metrics["val_accuracy_mean"] == pytest.approx(np.mean(best))
    assert metrics["val_accuracy_std"] == pytest.approx(np.std(best, ddof=1))
    # The per-epoch curves: their mean over the seeds, step by step.
    client = client_for(group)
    curve = {m.step: m.value for m in client.get_metric_history(parent.info.run_id, "val_loss")}
    spread = client.get_metric_history(parent.info.run_id, "val_loss_epoch_std")
    spread = {m.step: m.value for m in spread}
    assert sorted(curve) == sorted(spread) == list(range(EPOCHS))  # one point per epoch
    for step in range(EPOCHS):
        values = [
            {m.step: m.value for m in client.get_metric_history(c.info.run_id, "val_loss")}[step]
            for c in children
        ]
        assert curve[step] == pytest.approx(np.mean(values))
        assert spread[step] == pytest.approx(np.std(values, ddof=1))
    history = client.get_metric_history(parent.info.run_id, "val_accuracy_std")
    assert len(history) == 1  # the spread of the value a sweeper gets, once
    assert not [k for k in metrics if k.startswith("system/")]  # its members sample the system


def test_compare_shows_a_group_as_one_row_and_tests_two_groups(group, capsys):
    import pandas as pd

    from experiments.compare import main as compare

    first, second = parents(group)
    store = ["--tracking-uri", f"sqlite:///{group}/mlruns/mlflow.db", "--out", str(group)]
    assert compare(["folder", *store]) == 0
    printed = capsys.readouterr().out
    table = pd.read_csv(group / "comparison-folder.csv")
    assert len(table) == 2 and list(table["n"]) == [3, 3]  # the members are not rows
    row = table.set_index("run_id").loc[first.info.run_id[:8]]
    assert row["test_accuracy"] == pytest.approx(first.data.metrics["test_accuracy_mean"])
    assert row["test_accuracy_std"] == pytest.approx(first.data.metrics["test_accuracy_std"])
    mean, std = first.data.metrics["test_accuracy_mean"], first.data.metrics["test_accuracy_std"]
    assert f"{mean:.4g} ± {std:.2g} (3)" in printed
    assert compare(["--significance", first.info.run_id, second.info.run_id, *store]) == 0
    line = capsys.readouterr().out.strip()
    a = [c.data.metrics["test_accuracy"] for c in sorted_children(group, 0)]
    b = [c.data.metrics["test_accuracy"] for c in sorted_children(group, 1)]
    if a == b:  # no difference on any seed: nothing to test
        assert "equal on each of their 3 members; no test" in line
    else:
        expected = stats.ttest_rel(a, b)
        assert "paired t-test over seeds 42, 43, 44" in line
        if np.isfinite(expected.pvalue):
            assert f"p = {expected.pvalue:.4g}" in line
    if a != b:  # the members' stored predictions give the bootstrap over seeds and images
        assert "paired bootstrap over the 3 seeds and " in line
    assert compare(["--significance", first.info.run_id, "nope", *store]) == 2
    ids = [first.info.run_id, second.info.run_id]
    assert compare(["--significance", *(i[:8] for i in ids), "--rope", "0.01", *store]) == 0
    assert "Bayesian correlated t-test (rope ±0.01" in capsys.readouterr().out
    assert compare(["--significance", *ids, "--format", "markdown", *store]) == 0
    printed = capsys.readouterr().out
    saved = group / f"significance-{ids[0][:8]}-{ids[1][:8]}.paper.md"
    assert saved.read_text() in printed
    for parent in (first, second):  # mean ± std (n) of the members, from the parent's record
        mean = parent.data.metrics["test_accuracy_mean"]
        std = parent.data.metrics["test_accuracy_std"]
        assert f"{mean:.4f} ± {std:.4f}" in printed.replace("**", "")
    lr = first.data.params["optimizer.lr"]  # what tells the two apart labels them
    assert f"differs from optimizer.lr={lr} ({ids[0][:8]})" in printed
    assert compare(["--significance", *ids, "--rope", "-1", *store]) == 2
    assert compare(["folder", "--format", "latex", *store]) == 0  # the whole table, a paper's
    tex = (group / "comparison-folder.tex").read_text()
    assert tex in capsys.readouterr().out and tex.startswith("\\begin{tabular}{llrrr}")
    assert tex.count("optimizer.lr=") == 2  # rows labelled by what differs between them


def sorted_children(root: Path, which: int):
    _, children = parent_and_children(root, which)
    return sorted(children, key=lambda c: int(c.data.params["trainer.seed"]))


def fake_members(values: dict, digest: str = "d", folds: bool = False) -> list:
    from experiments.comparison.significance import Member

    return [
        Member(
            f"run-{key}",
            value,
            (str(key) if folds else "None", 42 if folds else key),
            {"train": f"{digest}-train", "val": f"{digest}-val", "test": f"{digest}-test"},
            300.0,
            100.0,
        )
        for key, value in values.items()
    ]


def test_significance_is_welch_when_the_seeds_differ(monkeypatch):
    from experiments.comparison import significance

    values = {"a": fake_members({1: 0.90, 2: 0.92, 3: 0.91}), "b": fake_members({7: 0.80, 8: 0.86})}
    monkeypatch.setattr(significance, "members", lambda run, metric: (True, values[run]))
    line = significance.significance("a", "b", "test_accuracy").line
    expected = stats.ttest_ind([0.90, 0.92, 0.91], [0.80, 0.86], equal_var=False)
    assert "Welch's t-test" in line and f"p = {expected.pvalue:.4g}" in line
    assert "difference +0.0800" in line and "not paired: their members' seeds or folds" in line


def test_groups_on_other_data_are_never_paired(monkeypatch):
    """Two groups with the same seeds whose data differ (another task.split_seed gives other
    split digests) get Welch's test, with the reason, never the paired one."""
    from experiments.comparison import significance

    values = {
        "a": fake_members({42: 0.90, 43: 0.92, 44: 0.91}, digest="seed-0"),
        "b": fake_members({42: 0.85, 43: 0.88, 44: 0.86}, digest="seed-1"),
    }
    monkeypatch.setattr(significance, "members", lambda run, metric: (True, values[run]))
    line = significance.significance("a", "b", "test_accuracy").line
    assert "paired" not in line.replace("not paired", "")
    assert "Welch's t-test" in line and "not paired: their test data differ (seed 42" in line


def test_folds_get_the_corrected_resampled_t_test(monkeypatch):
    """Members paired by fold on the same data: Nadeau and Bengio's corrected t-test, with
    n_val/n_train of the folds, not the naive paired t-test."""
    import math

    from experiments.comparison import significance

    a, b = [0.90, 0.93, 0.91, 0.94, 0.92], [0.89, 0.90, 0.91, 0.90, 0.88]
    values = {
        "a": fake_members(dict(enumerate(a)), folds=True),
        "b": fake_members(dict(enumerate(b)), folds=True),
    }
    monkeypatch.setattr(significance, "members", lambda run, metric: (True, values[run]))
    line = significance.significance("a", "b", "val_accuracy").line
    d = np.subtract(a, b)
    t = d.mean() / math.sqrt((1 / 5 + 100 / 300) * d.var(ddof=1))
    p = 2 * stats.t.sf(abs(t), 4)
    assert "corrected resampled t-test (Nadeau-Bengio) over 5 folds" in line
    assert f"t = {t:.3f}, p = {p:.4g}" in line
    assert p > stats.ttest_rel(a, b).pvalue  # the naive test would claim more


def finished_count(root: Path) -> int:
    database = root / "mlruns" / "mlflow.db"
    if not database.is_file():
        return 0
    try:
        with sqlite3.connect(database) as db:
            return db.execute("select count(*) from runs where status = 'FINISHED'").fetchone()[0]
    except sqlite3.Error:
        return 0


def saved_epochs(root: Path) -> int:
    from experiments.training.checkpoints import RunCheckpoints

    folders = (root / "checkpoints").glob("*")
    return max((RunCheckpoints(p).completed_epochs() for p in folders), default=0)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_killed_group_completes_with_exactly_its_children(signum, tmp_path, image_folder):
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(
        group_command(tmp_path, image_folder), stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 300
    # The first seed finished, the second one mid-training.
    while not (finished_count(tmp_path) >= 1 and saved_epochs(tmp_path) >= 2):
        assert process.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)
    process.send_signal(signum)
    process.wait(timeout=60)
    log.close()
    cut = runs_of(tmp_path, "folder")
    assert 1 <= sum(r.info.status == "FINISHED" for r in cut) < REPEATS  # cut mid-group
    if signum == signal.SIGTERM:  # the hint names the member that was cut, with its epochs
        (killed,) = [r for r in cut if r.info.status == "KILLED" and "group" not in r.data.tags]
        (hint,) = [
            x for x in (tmp_path / "first.log").read_text().splitlines() if "interrupted" in x
        ]
        assert f"run {killed.info.run_id} ended KILLED with " in hint
        assert " 0 complete epoch" not in hint
    again = subprocess.run(
        group_command(tmp_path, image_folder), capture_output=True, text=True, timeout=900
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(parents(tmp_path)) == 1  # the group's parent was continued, not opened again
    parent, children = parent_and_children(tmp_path)
    assert parent.info.status == "FINISHED" and parent.data.tags.get("resumed") == "true"
    assert len(children) == REPEATS
    assert all(c.info.status == "FINISHED" for c in children)
    assert sorted(c.data.params["trainer.seed"] for c in children) == ["42", "43", "44"]
    client = client_for(tmp_path)
    for child in children:
        logged = [m.step for m in client.get_metric_history(child.info.run_id, "loss")]
        assert sorted(logged) == list(range(EPOCHS)), (child.info.run_name, logged)


def test_members_cover_each_fold_and_seed():
    from experiments.pipeline.groups import is_group, members

    from conftest import compose_config

    cfg = compose_config(["task=digits", "task.folds=2", "trainer.repeats=2"])
    found = members(cfg)
    assert [m.name for m in found] == [
        "fold-0 seed-42", "fold-0 seed-43", "fold-1 seed-42", "fold-1 seed-43"
    ]  # fmt: skip
    assert [(m.cfg.task.fold, m.cfg.trainer.seed) for m in found] == [
        (0, 42), (0, 43), (1, 42), (1, 43)
    ]  # fmt: skip
    assert not any(is_group(m.cfg) for m in found) and is_group(cfg)


def test_folds_rotate_train_and_val_stratified_and_keep_the_test_split(tmp_path, image_folder):
    from omegaconf import OmegaConf

    from experiments.data.folds import fold_task
    from experiments.data.tasks import load_task

    from conftest import compose_config

    cfg = compose_config(tiny_overrides(tmp_path, image_folder))
    task = load_task(cfg.task, cfg.paths)
    pool = task.splits["train"].sources + task.splits["val"].sources
    seed = int(cfg.task.split_seed)  # the folds' seed, as the task's split
    folds = [fold_task(task, 3, k, seed=seed) for k in range(3)]
    vals = [set(f.splits["val"].sources) for f in folds]
    assert set().union(*vals) == set(pool) and sum(len(v) for v in vals) == len(pool)
    for fold, val in zip(folds, vals, strict=True):
        assert set(fold.splits["train"].sources) == set(pool) - val
        assert fold.splits["test"].sources == task.splits["test"].sources  # held out
        counts = np.bincount(fold.splits["val"].labels, minlength=3)
        assert counts.max() - counts.min() <= 1  # stratified
        for split in ("train", "val"):  # the images are the ones named
            first = fold.splits[split].sources[0]
            where = "train" if first in task.splits["train"].sources else "val"
            index = task.splits[where].sources.index(first)
            assert (fold.splits[split].images[0] == task.splits[where].images[index]).all()
    again = fold_task(task, 3, 0, seed=seed)
    assert again.splits["val"].sources == folds[0].splits["val"].sources  # seeded
    assert fold_task(task, 3, 0, seed=seed + 1).splits["val"].sources != again.splits["val"].sources
    single = OmegaConf.merge(cfg.task, {"folds": 3, "fold": 1})
    assert load_task(single, cfg.paths).splits["val"].sources == folds[1].splits["val"].sources


def test_a_fold_group_extracts_features_once(tmp_path, image_folder):
    done = subprocess.run(
        group_command(tmp_path, image_folder, "trainer.repeats=1", "task.folds=3"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    parent, children = parent_and_children(tmp_path)
    assert parent.info.run_name.endswith(" x 3 folds") and parent.data.tags["folds"] == "3"
    ordered = sorted(children, key=lambda c: c.data.params["task.fold"])
    assert [c.info.run_name for c in ordered] == ["fold-0", "fold-1", "fold-2"]
    assert [c.data.tags["feature_cache"] for c in ordered] == ["miss", "hit", "hit"]
    assert "test_accuracy_mean" in parent.data.metrics
    assert sum(c.data.metrics["n_val"] for c in children) == sum(
        c.data.metrics["n_val"] + c.data.metrics["n_train"] for c in children[:1]
    )


def fixed_layout(root: Path) -> Path:
    from conftest import write_class_folders

    for split in ("train", "val", "test"):
        write_class_folders(root / split, classes=2, per_class=4)
    return root


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("task.folds=1", "task.folds=1 must be at least 2"),
        ("task.folds=19", "task.folds=19 is more than the 18 train and val images"),
        ("task.fold=1", "task.fold=1 needs task.folds"),
        ("task.folds=3 task.fold=3", "task.fold=3 must be at least 0 and at most 2"),
        ("fixed_layout task.folds=2", "cannot rotate"),
        ("task=flowers trainer.repeats=2", "the flowers dataset is missing"),
    ],
)
def test_bad_fold_values_are_refused_before_any_work(override, says, tmp_path, image_folder):
    fixed = override.startswith("fixed_layout")
    folder = fixed_layout(tmp_path / "fixed") if fixed else image_folder
    extra = [o for o in override.split() if o != "fixed_layout"]
    base = tiny_overrides(tmp_path, None if "task=" in override else folder)
    result = subprocess.run(
        [sys.executable, "-m", "experiments.train", *base, *extra],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and says in errors[0], result.stderr[-2000:]
    assert not (tmp_path / "mlruns").exists()  # no group's parent run either
    if "task=" not in override:  # a missing dataset is found where it is fetched into the cache
        assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_a_sweep_of_groups_optimises_the_mean(tmp_path, image_folder):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    python, flag, module, *overrides = group_command(
        tmp_path, image_folder, "trainer.repeats=2", "trainer.epochs=2"
    )
    done = subprocess.run(
        [
            python, flag, module, "-m", *overrides, "hparams_search=lr_head",
            "hydra.sweeper.n_trials=2", f"hydra.sweeper.storage={storage}",
            "hydra.sweeper.study_name=s",
        ],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    import optuna

    study = optuna.load_study(study_name="s", storage=storage)
    runs = runs_of(tmp_path, "folder")
    (sweep,) = [r for r in runs if r.data.tags.get("sweep") == "true"]
    groups = [r for r in runs if r.data.tags.get("group") == "true"]
    assert len(groups) == 2
    for group in groups:  # each trial is a group under the sweep, with its two seeds
        assert group.data.tags["mlflow.parentRunId"] == sweep.info.run_id
        members = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == group.info.run_id]
        assert sorted(m.info.run_name for m in members) == ["seed-42", "seed-43"]
        trial = study.trials[int(group.data.tags["optuna_trial"])]
        best = np.mean([m.data.metrics["best_val_accuracy"] for m in members])
        assert trial.value == pytest.approx(best)  # the mean of its members
        assert group.data.metrics["val_accuracy_mean"] == pytest.approx(best)
        assert "val_accuracy_std" in group.data.metrics
        assert trial.intermediate_values == {0: pytest.approx(members_value(members, 0))}


def members_value(members, index: int) -> float:
    seed = 42 + index
    (member,) = [m for m in members if m.data.params["trainer.seed"] == str(seed)]
    return member.data.metrics["best_val_accuracy"]
