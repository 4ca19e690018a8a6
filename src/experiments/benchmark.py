"""Benchmarks: `python -m experiments.benchmark [sweep|throughput|memory|run] [options] [overrides]`

- `sweep` (the default): memory and time of a sweep's trials in one process, below.
- `throughput`: training speed against the frozen base's own inference rate, for each chosen
  backbone (`experiments.benchmarks.throughput`).
- `memory`: peak memory of one run as the dataset grows from 2,000 to 32,000 images
  (`experiments.benchmarks.memory`).
- `run`: where a whole run's time goes, fresh and warm, against its targets
  (`experiments.benchmarks.wholerun`).
- `repeats`: memory of a group's members (`trainer.repeats=5`) in one process, with the sweep's
  10% growth target.

Sweep memory:

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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    mode = argv.pop(0) if argv and argv[0] in MODES else "sweep"
    return MODES[mode](argv)


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


def parse_throughput_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.benchmark throughput",
        description=(
            "Images/s of the frozen base's inference, inline training with and without the "
            "reference augmentation, two-stage extraction and head training, and fine-tuning, "
            "for each backbone, on random weights and random images (works offline). The "
            "default is the reference model: VGG19, 180 px, batch 16."
        ),
    )
    parser.add_argument(
        "--batches", type=int, default=16, help="batches per timed pass (default 16)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="timed passes per rate after the compiling one; the best counts (default 2)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for benchmark-throughput.{md,json} (default: paths.reports_dir)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="config overrides: backbone=vgg19,resnet50 (several), backend=jax, "
        "task.image_size=[224,224], trainer.batch_size=64, trainer.precision=mixed_bfloat16",
    )
    args = parser.parse_intermixed_args(argv)
    if args.batches < 2:
        parser.error(f"--batches={args.batches} is too few; use 2 or more")
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats} must be at least 1")
    return args


def throughput_main(argv: list[str]) -> int:
    from experiments import compose_project_config
    from experiments.core.backend import use_backend
    from experiments.core.errors import ExperimentError

    args = parse_throughput_args(argv)
    backbones = [o for o in args.overrides if o.startswith("backbone=")]
    others = [o for o in args.overrides if not o.startswith("backbone=")]
    names = backbones[-1].split("=", 1)[1].split(",") if backbones else [None]
    try:
        configs = [
            compose_project_config([*others, *([f"backbone={n}"] if n else [])]) for n in names
        ]
        use_backend(configs[0].backend)
    except ExperimentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from experiments.benchmarks.throughput import measure, record, report

    rows = []
    for cfg in configs:
        images = args.batches * int(cfg.trainer.batch_size)
        print(f"measuring {cfg.backbone.name} on {images} images per pass ...", flush=True)
        rows.append(measure(cfg, images, args.repeats))
        print(json.dumps(rows[-1]), flush=True)
    out = args.out or Path(configs[0].paths.reports_dir)
    print(report(rows, out))
    run_id = record(configs[0], rows, out)
    print(f"saved {out / 'benchmark-throughput.md'} and .json; MLflow run {run_id}")
    return 0


def memory_main(argv: list[str]) -> int:
    from experiments.benchmarks.memory import memory_main as run

    return run(argv)


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


def run_main(argv: list[str]) -> int:
    from experiments.benchmarks.wholerun import run_main as run

    return run(argv)


MODES = {
    "sweep": sweep_main,
    "throughput": throughput_main,
    "memory": memory_main,
    "run": run_main,
    "repeats": repeats_main,
}


if __name__ == "__main__":
    from experiments.cli import exit_with

    exit_with(main)
