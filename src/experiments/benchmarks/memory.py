"""`python -m experiments.benchmark memory`: peak resident memory against dataset size.

Generates a `folder` task of N images for each N of `--sizes` (by default 2,000, 8,000 and
32,000; the smaller folders are hard links into the largest), trains each with one command in a
subprocess on a throwaway MLflow store, and reads back what the run recorded: the process's peak
resident memory (`peak_rss_mb`, decoding, extraction, training and evaluation included) and its
training rate. With the images and features memory-mapped (`experiments.data.arrays`), the peak must
not grow with the dataset: the target is the largest size within `--tolerance-mb` (300 MB) of
the smallest.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from experiments.tracking import sqlite_uri

SIZES = (2000, 8000, 32000)
# A two-stage MobileNetV2 at 96 px on random weights: the setting whose peak grew by 1,955 MB
# from 2,000 to 16,000 images when every split and its features were held in memory.
DEFAULT_OVERRIDES = [
    "backbone=mobilenetv2",
    "backbone.weights=null",
    "strategy=two_stage",
    "augmentation=none",
    "task.image_size=[96,96]",
    "trainer.epochs=1",
]
COLOURS = [(200, 40, 40), (40, 180, 40), (40, 60, 200), (200, 200, 40)]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.benchmark memory",
        description=(
            "Train a generated folder task of each size and report the run's peak resident "
            "memory and images/s; fails when the largest size's peak exceeds the smallest's by "
            "more than --tolerance-mb."
        ),
    )
    parser.add_argument(
        "--sizes",
        type=lambda text: [int(n) for n in text.split(",")],
        default=list(SIZES),
        help="dataset sizes, comma-separated (default 2000,8000,32000)",
    )
    parser.add_argument(
        "--tolerance-mb",
        type=float,
        default=100.0,
        help="allowed growth of the peak anonymous memory from the smallest to the largest size "
        "(default 100)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where to generate images and keep caches (default: a temporary folder, removed)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for benchmark-dataset-memory.{md,json} (default: paths.reports_dir)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help=f"training overrides (default: {' '.join(DEFAULT_OVERRIDES)})",
    )
    args = parser.parse_intermixed_args(argv)
    if len(args.sizes) < 2 or min(args.sizes) < 30:
        parser.error(f"--sizes={args.sizes}: give two or more sizes of 30 images or more")
    return args


def generate_images(root: Path, count: int, size: int = 96, classes: int = 3) -> Path:
    """`count` JPEGs in `classes` class folders, each class a dominant colour under noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        label = i % classes
        folder = root / f"class_{label}"
        path = folder / f"img_{i:06d}.jpg"
        if path.exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        noise = rng.normal(0, 35, (size, size, 3))
        pixels = np.clip(np.array(COLOURS[label]) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path, quality=90)
    return root


def linked_subset(source: Path, target: Path, count: int) -> Path:
    """A folder of the first `count` images of `source`, hard-linked: no copy on disk."""
    files = sorted(source.rglob("*.jpg"), key=lambda p: p.name)[:count]
    for path in files:
        link = target / path.parent.name / path.name
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, link)
    return target


def train_once(folder: Path, overrides: list[str], workdir: Path, name: str) -> float:
    """Train on `folder` in a subprocess that records to `workdir`'s store; its wall time."""
    command = [
        sys.executable,
        "-m",
        "experiments.train",
        "task=folder",
        f"task.path={folder}",
        *overrides,
        f"tracking.uri={sqlite_uri(workdir)}",
        f"tracking.artifact_dir={workdir / 'artifacts'}",
        "tracking.experiment=benchmark-memory",
        f"tracking.run_name={name}",
        "tracking.log_model=false",
        f"paths.cache_dir={workdir / 'cache' / name}",
        f"hydra.run.dir={workdir / 'outputs' / name}",
    ]
    print("running:", " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - started


def collect(workdir: Path) -> dict[str, dict]:
    """Each run's peak memory, train split size and training rate, by run name."""
    from experiments import tracking

    out = {}
    # Oldest first, so that a size measured again in a kept --workdir reports its newest run.
    for run in tracking.run_rows(
        experiment="benchmark-memory",
        order_by=["start_time ASC"],
        uri=sqlite_uri(workdir),
    ):
        out[run.name] = {
            "train_images": int(run.metrics["n_train"]),
            "peak_rss_mb": round(run.metrics["peak_rss_mb"], 1),
            # What the run holds itself: resident memory counts the mapped files' pages too.
            "peak_anon_mb": round(run.metrics.get("peak_anon_mb", float("nan")), 1),
            "train_images_per_s": round(run.metrics["train_images_per_s"], 1),
            "train_time_s": round(run.metrics["train_time_s"], 1),
        }
    return out


def report(rows: list[dict], tolerance_mb: float, out: Path) -> tuple[str, bool]:
    """The table and the verdict as Markdown, also saved as md and json in `out`."""
    import math

    import pandas as pd

    key = "peak_anon_mb" if not math.isnan(rows[0].get("peak_anon_mb", math.nan)) else "peak_rss_mb"
    growth = rows[-1][key] - rows[0][key]
    passed = growth <= tolerance_mb
    what = "peak anonymous memory (RssAnon)" if key == "peak_anon_mb" else "peak RSS"
    verdict = (
        f"{'PASS' if passed else 'FAIL'}: {what} grew {growth:+.0f} MB from {rows[0]['images']} "
        f"to {rows[-1]['images']} images (tolerance {tolerance_mb:.0f} MB)"
    )
    text = pd.DataFrame(rows).to_markdown(index=False) + "\n\n" + verdict
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark-dataset-memory.md").write_text(text + "\n")
    payload = {"rows": rows, "growth_mb": round(growth, 1), "passed": passed}
    (out / "benchmark-dataset-memory.json").write_text(json.dumps(payload, indent=2) + "\n")
    return text, passed


def memory_main(argv: list[str]) -> int:
    from experiments import compose_project_config

    args = parse_args(argv)
    out = args.out or Path(compose_project_config().paths.reports_dir)
    sizes = sorted(args.sizes)
    with tempfile.TemporaryDirectory(prefix="experiments-memory-") as tmp:
        workdir = (args.workdir or Path(tmp)).resolve()
        print(f"generating {sizes[-1]} images in {workdir / 'images'} ...", flush=True)
        largest = generate_images(workdir / "images" / str(sizes[-1]), sizes[-1])
        walls = {}
        for n in sizes:
            folder = (
                largest
                if n == sizes[-1]
                else linked_subset(largest, workdir / "images" / str(n), n)
            )
            try:
                walls[n] = train_once(folder, args.overrides or DEFAULT_OVERRIDES, workdir, f"n{n}")
            except subprocess.CalledProcessError as err:
                print(f"error: training on {n} images exited with code {err.returncode}; see above")
                return 2
        runs = collect(workdir)
    rows = [
        {
            "images": n,
            **runs[f"n{n}"],
            "wall_s": round(walls[n], 1),
            "images_per_wall_s": round(n / walls[n], 1),
        }
        for n in sizes
    ]
    text, passed = report(rows, args.tolerance_mb, out)
    print(text)
    print(f"saved {out / 'benchmark-dataset-memory.md'} and .json")
    return 0 if passed else 1
