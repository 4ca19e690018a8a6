"""`python -m experiments.benchmark [sweep]` and `... repeats`: the memory of a sweep's trials,
and of a group's members, that share one process.

Runs a real Optuna sweep (by default the README's `-m hparams_search=lr_head
experiment=quickstart`, 20 trials) in a subprocess on a throwaway MLflow store, then reads back
what every trial's run recorded: the process's peak and current resident memory when the trial
ended, and its training time. Trials of one sweep share one process with the basic launcher, so
memory that grows from trial to trial is a leak; the target is a peak after the last trial within
10% of the peak after trial 2.

Timing targets live here and not in tests: this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from experiments.tracking import sqlite_uri

DEFAULT_OVERRIDES = ["hparams_search=lr_head", "experiment=quickstart"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.benchmark",
        description=(
            "Run a sweep's trials in one process and report each trial's peak and current "
            "memory and its time; fails when the last trial's peak exceeds trial 2's by more "
            "than --tolerance."
        ),
    )
    parser.add_argument("--trials", type=int, default=20, help="trials to run (default 20)")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.10,
        help="allowed growth of the peak from trial 2 to the last trial (default 0.10)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for benchmark-memory.{md,json} (default: paths.reports_dir)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help=f"Hydra overrides of the sweep (default: {' '.join(DEFAULT_OVERRIDES)})",
    )
    args = parser.parse_intermixed_args(argv)
    if args.trials < 2:
        parser.error(f"--trials={args.trials} is too few; trial 2 is the baseline, use 2 or more")
    return args


def run_sweep(overrides: list[str], trials: int, workdir: Path) -> tuple[str, float]:
    """Run the sweep in a subprocess on a store in `workdir`; its tracking URI and wall time."""
    uri = sqlite_uri(workdir)
    command = [
        sys.executable,
        "-m",
        "experiments.train",
        "-m",
        *overrides,
        f"hydra.sweeper.n_trials={trials}",
        f"hydra.sweep.dir={workdir / 'sweep'}",
        "hydra/launcher=basic",  # one process: what the target is about
        f"tracking.uri={uri}",
        f"tracking.artifact_dir={workdir / 'artifacts'}",
        "tracking.experiment=benchmark",
        "tracking.log_model=false",
    ]
    print("running:", " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return uri, time.perf_counter() - started


def collect(uri: str) -> list[dict]:
    """One row per trial, in trial order, from the sweep's child runs."""
    from experiments import tracking
    from experiments.tracking import tags as T

    runs = tracking.run_rows(f"tags.{T.OPTUNA_TRIAL} != ''", experiment="benchmark", uri=uri)
    # The searched keys: the parent run records the best value of each as `best.<key>`.
    (parent,) = tracking.run_rows(f"tags.{T.SWEEP} = 'true'", experiment="benchmark", uri=uri)
    searched = sorted(k.removeprefix("best.") for k in parent.params if k.startswith("best."))
    rows = []
    for run in runs:
        if "peak_rss_mb" not in run.metrics:  # a run that crashed before it could record it
            continue
        rows.append(
            {
                "trial": int(run.tags[T.OPTUNA_TRIAL]),
                "state": run.tags.get(T.OPTUNA_STATE, ""),
                "peak_rss_mb": round(run.metrics["peak_rss_mb"], 1),
                "rss_mb": round(run.metrics["rss_mb"], 1),
                "epochs": len(tracking.metric_history(run.run_id, "loss", uri=uri)),
                "duration_s": round(run.duration_s, 1),
                **{key: run.params.get(key, "") for key in searched},
            }
        )
    return sorted(rows, key=lambda row: row["trial"])


def summarize(rows: list[dict], tolerance: float) -> dict:
    """Peak and current memory after the second and the last finished trial, and the verdict."""
    if len(rows) < 2:
        raise SystemExit(
            f"error: only {len(rows)} trial(s) finished with a memory record; "
            "run more trials or use hydra.sweeper.pruner=null"
        )
    second, last = rows[1], rows[-1]
    peak_growth = round(last["peak_rss_mb"] / second["peak_rss_mb"] - 1, 4)  # 0.1 is 0.1
    return {
        "trials": len(rows),
        "baseline_trial": second["trial"],
        "last_trial": last["trial"],
        "peak_rss_mb_baseline": second["peak_rss_mb"],
        "peak_rss_mb_last": last["peak_rss_mb"],
        "peak_growth": peak_growth,
        "rss_mb_baseline": second["rss_mb"],
        "rss_mb_last": last["rss_mb"],
        "rss_growth": round(last["rss_mb"] / second["rss_mb"] - 1, 4),
        "tolerance": tolerance,
        "passed": peak_growth <= tolerance,
    }


def report(rows: list[dict], summary: dict, wall_s: float, out: Path, what: str = "trial") -> str:
    """The table of each `what` (trial, member) and the verdict as markdown, also saved as md
    and json in `out` (`benchmark-memory.*`, or `benchmark-<what>s.*`)."""
    import pandas as pd

    verdict = "PASS" if summary["passed"] else "FAIL"
    text = "\n".join(
        [
            pd.DataFrame(rows).to_markdown(index=False),
            "",
            f"peak RSS after the 2nd {what} (#{summary['baseline_trial']}): "
            f"{summary['peak_rss_mb_baseline']:.1f} MB; after the last (#{summary['last_trial']}): "
            f"{summary['peak_rss_mb_last']:.1f} MB ({summary['peak_growth']:+.1%}); "
            f"RSS {summary['rss_mb_baseline']:.1f} -> {summary['rss_mb_last']:.1f} MB "
            f"({summary['rss_growth']:+.1%}); wall time {wall_s:.0f} s",
            f"{verdict}: peak growth {summary['peak_growth']:+.1%}, "
            f"tolerance {summary['tolerance']:.0%}",
        ]
    )
    out.mkdir(parents=True, exist_ok=True)
    stem = "benchmark-memory" if what == "trial" else f"benchmark-{what}s"
    (out / f"{stem}.md").write_text(text + "\n")
    payload = {"summary": summary, "wall_s": round(wall_s, 1), f"{what}s": rows}
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    return text


def sweep_main(argv: list[str]) -> int:
    from experiments import compose_project_config

    args = parse_args(argv)
    out = args.out or Path(compose_project_config().paths.reports_dir)
    with tempfile.TemporaryDirectory(prefix="experiments-benchmark-") as tmp:
        try:
            uri, wall_s = run_sweep(args.overrides or DEFAULT_OVERRIDES, args.trials, Path(tmp))
        except subprocess.CalledProcessError as err:
            print(f"error: the sweep exited with code {err.returncode}; see its output above")
            return 2
        rows = collect(uri)
    summary = summarize(rows, args.tolerance)
    print(report(rows, summary, wall_s, out))
    print(f"saved {out / 'benchmark-memory.md'} and {out / 'benchmark-memory.json'}")
    return 0 if summary["passed"] else 1


def repeats_main(argv: list[str]) -> int:
    """`benchmark repeats`: memory of a group's members in one process (trainer.repeats)."""
    from experiments import compose_project_config, tracking
    from experiments.tracking import tags as T

    parser = argparse.ArgumentParser(
        prog="python -m experiments.benchmark repeats",
        description=(
            "Run one config with trainer.repeats=N in one process and report each member's "
            "peak and current memory; fails when the last member's peak exceeds member 2's by "
            "more than --tolerance (repeats share the decoded data and features, not memory)."
        ),
    )
    parser.add_argument("--repeats", type=int, default=5, help="members to run (default 5)")
    parser.add_argument("--tolerance", type=float, default=0.10, help="default 0.10")
    parser.add_argument("--out", type=Path, default=None, help="default: paths.reports_dir")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (default: the quickstart)")
    args = parser.parse_intermixed_args(argv)
    if args.repeats < 2:
        parser.error(f"--repeats={args.repeats} is too few; member 2 is the baseline")
    out = args.out or Path(compose_project_config().paths.reports_dir)
    with tempfile.TemporaryDirectory(prefix="experiments-benchmark-") as tmp:
        uri = sqlite_uri(Path(tmp))
        command = [
            sys.executable, "-m", "experiments.train",
            *(args.overrides or ["experiment=quickstart"]), f"trainer.repeats={args.repeats}",
            f"tracking.uri={uri}", f"tracking.artifact_dir={tmp}/artifacts",
            "tracking.experiment=benchmark", "tracking.log_model=false",
        ]  # fmt: skip
        print("running:", " ".join(command), flush=True)
        started = time.perf_counter()
        if subprocess.run(command).returncode != 0:
            print("error: the group failed; see its output above")
            return 2
        wall_s = time.perf_counter() - started
        (group,) = tracking.run_rows(f"tags.{T.GROUP} = 'true'", experiment="benchmark", uri=uri)
        members = tracking.run_rows(
            f"tags.{T.PARENT_RUN} = '{group.run_id}'", experiment="benchmark", uri=uri
        )
    rows = [
        {
            "trial": index,  # the member's number, in the order it ran
            "seed": int(run.params["trainer.seed"]),
            "peak_rss_mb": round(run.metrics["peak_rss_mb"], 1),
            "rss_mb": round(run.metrics["rss_mb"], 1),
            "duration_s": round(run.duration_s, 1),
        }
        for index, run in enumerate(sorted(members, key=lambda r: int(r.params["trainer.seed"])))
    ]
    summary = summarize(rows, args.tolerance)
    print(report(rows, summary, wall_s, out, what="member"))
    return 0 if summary["passed"] else 1
