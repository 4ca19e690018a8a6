"""One config run several times as a group: `trainer.repeats=N` (seeds seed, seed+1, ...),
`task.folds=K` (k-fold cross-validation), or both (K x N runs).

The group is one MLflow parent run; each member is a normal child run (resumable, comparable,
servable). The parent holds, for every final metric, `<metric>_mean`, `<metric>_std` (n - 1)
and the 95% interval of the mean (`_ci95_low`, `_ci95_high`, Student's t), and the mean curve of
every per-epoch metric under its own name (its std per epoch as `<metric>_epoch_std`). Run again
after an interruption, the group continues its parent, skips the members that finished and
resumes the one that was cut.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from omegaconf import DictConfig, OmegaConf

from experiments.pipeline.validation import EPOCH_METRICS

log = logging.getLogger(__name__)

# Aggregated as curves (mean and std per epoch), not as final values.
CURVES = EPOCH_METRICS
NOT_AGGREGATED = ("system/", "rss_mb", "peak_rss_mb")  # the process's, not the model's


@dataclass
class Member:
    """One run of a group: its config and its name among its siblings."""

    name: str
    seed: int
    cfg: DictConfig


def folds_of(cfg: DictConfig) -> int:
    """The folds a group rotates over: `task.folds`, unless the run is one fold (`task.fold`)."""
    folds = cfg.task.get("folds")
    return int(folds) if folds and cfg.task.get("fold") is None else 0


def is_group(cfg: DictConfig) -> bool:
    return int(cfg.trainer.get("repeats", 1)) > 1 or folds_of(cfg) > 0


def members(cfg: DictConfig) -> list[Member]:
    """The runs of the group `cfg` asks for: one per fold and seed, each a single run's
    config."""
    first, repeats, folds = int(cfg.trainer.seed), int(cfg.trainer.repeats), folds_of(cfg)
    found = []
    for fold in range(folds) if folds else [None]:
        for seed in range(first, first + repeats):
            change = {"trainer": {"seed": seed, "repeats": 1}}
            name = f"seed-{seed}"
            if fold is not None:
                change["task"] = {"fold": fold}
                name = f"fold-{fold}" + (f" {name}" if repeats > 1 else "")
            change["tracking"] = {"run_name": name}
            found.append(Member(name, seed, OmegaConf.merge(cfg, change)))
    return found


def group_size(cfg: DictConfig) -> str:
    """What the group runs, for its name: `5 folds x 3 seeds`, `3 seeds`, `5 folds`."""
    repeats, folds = int(cfg.trainer.repeats), folds_of(cfg)
    parts = ([f"{folds} folds"] if folds else []) + ([f"{repeats} seeds"] if repeats > 1 else [])
    return " x ".join(parts)


def summary(values: list[float], name: str = "") -> dict[str, float]:
    """mean, std (n - 1) and the 95% interval of the mean by Student's t, cut to the range of the
    metric `name` (an accuracy's stays in [0, 1]: `evaluation.statistics.mean_interval`)."""
    from experiments.evaluation.statistics import mean_interval

    found = mean_interval(values, name)
    return {"mean": found.mean, "std": found.std, "ci95_low": found.low, "ci95_high": found.high}


def aggregate(final: list[dict[str, float]]) -> dict[str, float]:
    """`<metric>_mean`, `_std`, `_ci95_low`, `_ci95_high` of every final metric all members
    recorded."""
    names = set.intersection(*(set(m) for m in final)) if final else set()
    # An interval is not averaged: the group's interval of a metric is its own, over members.
    names = {
        n
        for n in names
        if n not in CURVES and not n.startswith(NOT_AGGREGATED) and "_ci95_" not in n
    }
    out = {}
    for name in sorted(names):
        for stat, value in summary([m[name] for m in final], name).items():
            out[f"{name}_{stat}"] = value
    return out


def mean_curves(histories: list[dict[str, list[tuple[int, float]]]]) -> dict[int, dict]:
    """Per epoch (step): the mean and std over the members that reached it of each per-epoch
    metric, as {step: {name: mean, name_epoch_std: std}}."""
    by_step: dict[int, dict[str, list[float]]] = {}
    for history in histories:
        for name, points in history.items():
            for step, value in points:
                by_step.setdefault(step, {}).setdefault(name, []).append(value)
    curves: dict[int, dict] = {}
    for step, names in sorted(by_step.items()):
        for name, values in names.items():
            curves.setdefault(step, {})[name] = float(np.mean(values))
            if len(values) > 1:
                curves[step][f"{name}_epoch_std"] = float(np.std(values, ddof=1))
    return curves


def mean_value(values: list):
    """The mean of what the members returned to a sweeper (a tuple: objective by objective)."""
    if isinstance(values[0], list | tuple):
        return tuple(float(np.mean(column)) for column in zip(*values, strict=True))
    return float(np.mean(values))


def train_group(cfg: DictConfig, train_one: Callable[[DictConfig], object]):
    """Run the group's members with `train_one` under one parent run and record the aggregate;
    the mean of their values (what a sweeper gets)."""
    from experiments import tracking
    from experiments.core.job import output_dir, task_overrides
    from experiments.sweeps.trial import attached_trial, job_run_name, report_group, trial_tags
    from experiments.training.checkpoints import run_identity

    runs = members(cfg)
    seeds = [m.seed for m in runs]
    T = tracking.tags
    tags = tracking.run_tags(cfg, str(output_dir(cfg.paths.output_dir, cfg.task.name)))
    tags |= trial_tags() | {T.GROUP: "true", T.REPEATS: str(cfg.trainer.repeats)}
    tags |= {T.SEEDS: ",".join(map(str, sorted(set(seeds))))}
    tags |= {T.FOLDS: str(folds_of(cfg))} if folds_of(cfg) else {}
    name = f"{job_run_name(str(cfg.tracking.run_name))} x {group_size(cfg)}"
    quiet = OmegaConf.merge(cfg.tracking, {"system_metrics": False})  # its members sample
    identity, resume = run_identity(cfg), str(cfg.get("resume", "auto"))
    with tracking.start_run(quiet, name, tags, identity, resume) as parent:
        if not parent.resumed or "config" not in tracking.recorded(parent.run_id):
            tracking.log_config(cfg, task_overrides())
        trial = attached_trial() if isinstance(cfg.optimized_metric, str) else None
        os.environ[tracking.GROUP_PARENT_ENV] = parent.run_id
        try:
            values = []
            for member in runs:
                done = tracking.finished_member(parent.run_id, run_identity(member.cfg))
                if done is not None:
                    log.info("%s already finished as run %s", member.name, done.run_id)
                    value = json.loads(done.tags[tracking.tags.RETURNED_VALUE])
                else:
                    value = train_one(member.cfg)
                values.append(value)
                if trial is not None and len(values) < len(runs):  # prune on the mean so far
                    report_group(trial, len(values), float(np.mean(values)))
        finally:
            os.environ.pop(tracking.GROUP_PARENT_ENV, None)
        value = record_group(cfg, parent.run_id, runs)
    return value


def record_group(cfg: DictConfig, parent_id: str, runs: list[Member]):
    """The aggregate of the group's FINISHED members on its parent run; the mean value."""
    from experiments import tracking
    from experiments.core.errors import ExperimentError
    from experiments.training.checkpoints import run_identity

    finished = []
    for member in runs:
        row = tracking.finished_member(parent_id, run_identity(member.cfg))
        if row is None:
            raise ExperimentError(f"{member.name} of group run {parent_id} did not finish")
        finished.append(row)
    metrics = aggregate([row.metrics for row in finished])
    histories = [
        {name: tracking.metric_history(row.run_id, name) for name in CURVES if name in row.metrics}
        for row in finished
    ]
    for step, values in mean_curves(histories).items():
        tracking.log_metrics(values, step=step)
    returned = [json.loads(row.tags[tracking.tags.RETURNED_VALUE]) for row in finished]
    value = mean_value(returned)
    # What a sweeper optimises, beside its spread: the mean of the members' values.
    names = cfg.optimized_metric
    names = [str(names)] if isinstance(names, str) else [str(n) for n in names]
    for name, mean in zip(names, [value] if len(names) == 1 else value, strict=True):
        metrics.setdefault(f"{name}_mean", mean)
    if len(names) == 1:
        metrics.setdefault(f"{names[0]}_std", summary(returned, names[0])["std"])
    tracking.log_metrics(metrics)
    note = group_note(cfg, finished)
    tracking.set_tags(
        {
            tracking.tags.RETURNED_VALUE: json.dumps(value),
            tracking.tags.MEMBERS: str(len(finished)),
            tracking.tags.NOTE: note,
        }
    )
    log.info("group run %s: %s", parent_id, note.replace("\n\n", "; ").replace("**", ""))
    return value


def group_note(cfg: DictConfig, finished) -> str:
    """The parent's description: its members and the headline numbers, mean ± std (n)."""
    lines = [f"**{group_size(cfg)}** ({', '.join(r.name for r in finished)})"]
    for name in ("test_accuracy", "best_val_accuracy", "test_ece", "train_time_s"):
        values = [r.metrics[name] for r in finished if name in r.metrics]
        if len(values) == len(finished):
            stats = summary(values, name)
            lines.append(
                f"{name}: {stats['mean']:.4f} ± {stats['std']:.4f} (n={len(values)}; 95% CI "
                f"{stats['ci95_low']:.4f} to {stats['ci95_high']:.4f})"
            )
    return "\n\n".join(lines)
