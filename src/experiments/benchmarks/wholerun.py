"""`python -m experiments.benchmark run [options] [overrides]`: where a whole run's time goes.

Generates a `folder` task of the chosen task's shape (by default reference experiment A's: two
classes of 2,000 images, 1,000/500/500 per class, 180 px, VGG19 on random weights, inline, 10
epochs of batch 16), then runs the same training command twice in a subprocess, as a user would:
once on empty caches (a fresh machine), once again with the decoded images and the compiled steps
warm. It reads back each run's phases (`experiments.core.phases`) and rates, prints the phase table,
saves it as Markdown and JSON, and fails when a target is missed: the fresh run's wall time, the
warm run's wall time and compiling time, and, given the hardware's floor (`--floor`, images/s of
`benchmark throughput`), training at 0.8 of it and evaluation at 0.5.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from experiments.benchmarks.memory import generate_images
from experiments.tracking import sqlite_uri

# Reference experiment A's shape, offline: the write-up's cats vs dogs on generated images.
DEFAULT_OVERRIDES = [
    "experiment=reference_cats_dogs",
    "task=folder",
    "task.per_class=[1000,500,500]",
    "task.image_size=[180,180]",
    "backbone.weights=null",
]
PHASE_ROWS = ("startup", "data", "build", "compile", "train", "evaluate", "record")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.benchmark run",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    parser.add_argument(
        "--images", type=int, default=4000, help="generated images, split over the classes"
    )
    parser.add_argument("--classes", type=int, default=2, help="classes of the generated task")
    parser.add_argument("--max-fresh-s", type=float, default=25.0, help="target: fresh run wall")
    parser.add_argument("--max-warm-s", type=float, default=12.0, help="target: warm run wall")
    parser.add_argument(
        "--max-compile-s", type=float, default=2.0, help="target: compiling in the warm run"
    )
    parser.add_argument(
        "--floor",
        type=float,
        default=None,
        help="the base's floor in images/s (benchmark throughput): checks training >= 0.8 and "
        "evaluation >= 0.5 of it",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep the files here")
    parser.add_argument("--out", type=Path, default=None, help="default: paths.reports_dir")
    parser.add_argument(
        "overrides",
        nargs="*",
        help=f"training overrides, after the default ones: {' '.join(DEFAULT_OVERRIDES)}",
    )
    args = parser.parse_intermixed_args(argv)
    if args.images < 4 * args.classes:
        parser.error(f"--images={args.images} is too few for {args.classes} classes")
    return args


def train_command(folder: Path, overrides: list[str], workdir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "experiments.train",
        *overrides,
        f"task.path={folder}",
        f"paths.root_dir={workdir / 'root'}",
        f"paths.keras_home={workdir / 'keras'}",
        f"tracking.uri={sqlite_uri(workdir / 'root' / 'mlruns')}",
        "tracking.experiment=benchmark-run",
        "resume=never",
    ]


def timed(command: list[str]) -> float:
    print("running:", " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - started


def row_of(run, wall_s: float, label: str) -> dict:
    """One column of the phase table from a run's recorded metrics."""
    metrics = run.metrics
    evaluated = metrics.get("n_test", 0) / max(metrics.get("time_evaluate_s", 0), 1e-9)
    return {
        "run": label,
        "wall_s": round(wall_s, 2),
        **{p: round(metrics.get(f"time_{p}_s", float("nan")), 2) for p in PHASE_ROWS},
        "train_fraction": metrics.get("train_fraction"),
        "train_images_per_s": round(metrics.get("train_images_per_s", float("nan")), 1),
        "evaluate_images_per_s": round(evaluated, 1),
        "compile_cache_hits": metrics.get("compile_cache_hits"),
    }


def train_rate(run, uri: str) -> float:
    """The best epoch's training rate after the first (which compiles)."""
    from experiments import tracking

    history = tracking.metric_history(run.run_id, "train_images_per_s", uri=uri)
    rates = [value for step, value in history if step > 0] or [value for _, value in history]
    return max(rates)


def verdicts(fresh: dict, warm: dict, args: argparse.Namespace) -> list[tuple[str, bool]]:
    """(what was checked, passed) for each target."""
    checks = [
        (
            f"fresh run {fresh['wall_s']:.1f} s <= {args.max_fresh_s:g} s",
            fresh["wall_s"] <= args.max_fresh_s,
        ),
        (
            f"warm run {warm['wall_s']:.1f} s <= {args.max_warm_s:g} s",
            warm["wall_s"] <= args.max_warm_s,
        ),
        (
            f"warm compiling {warm['compile']:.1f} s <= {args.max_compile_s:g} s",
            warm["compile"] <= args.max_compile_s,
        ),
    ]
    if args.floor:
        for name, key, share in (
            ("training", "train_images_per_s", 0.8),
            ("evaluation", "evaluate_images_per_s", 0.5),
        ):
            ratio = warm[key] / args.floor
            checks.append((f"{name} {ratio:.2f} of the floor >= {share}", ratio >= share))
    return checks


def report(rows: list[dict], checks: list[tuple[str, bool]], out: Path) -> str:
    import pandas as pd

    table = pd.DataFrame(rows).set_index("run").T
    lines = [table.to_markdown(floatfmt=".2f"), ""]
    lines += [f"{'PASS' if ok else 'FAIL'}: {text}" for text, ok in checks]
    text = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark-run.md").write_text(text + "\n")
    payload = {"runs": rows, "checks": [{"check": t, "passed": ok} for t, ok in checks]}
    (out / "benchmark-run.json").write_text(json.dumps(payload, indent=2) + "\n")
    return text


def run_main(argv: list[str]) -> int:
    from experiments import compose_project_config, tracking

    args = parse_args(argv)
    overrides = [*DEFAULT_OVERRIDES, *args.overrides]  # the user's come last and win
    out = args.out or Path(compose_project_config().paths.reports_dir)
    with tempfile.TemporaryDirectory(prefix="experiments-run-") as tmp:
        workdir = (args.workdir or Path(tmp)).resolve()
        size = int(compose_project_config(overrides).task.image_size[0])
        print(f"generating {args.images} images of {size} px in {workdir / 'images'} ...")
        folder = generate_images(workdir / "images", args.images, size, args.classes)
        shutil.rmtree(workdir / "root", ignore_errors=True)  # a fresh machine: empty caches
        command = train_command(folder, overrides, workdir)
        try:
            walls = [timed(command), timed(command)]
        except subprocess.CalledProcessError as err:
            print(f"error: training exited with code {err.returncode}; see its output above")
            return 2
        uri = sqlite_uri(workdir / "root" / "mlruns")
        runs = tracking.run_rows(experiment="benchmark-run", order_by=["start_time ASC"], uri=uri)[
            -2:
        ]
        rows = []
        for run, wall, label in zip(runs, walls, ("fresh", "warm"), strict=True):
            row = row_of(run, wall, label)
            row["train_images_per_s"] = round(train_rate(run, uri), 1)
            rows.append(row)
    checks = verdicts(rows[0], rows[1], args)
    print(report(rows, checks, out))
    print(f"saved {out / 'benchmark-run.md'} and .json")
    return 0 if all(ok for _, ok in checks) else 1
