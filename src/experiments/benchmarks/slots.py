"""`python -m experiments.benchmark slots`: how busy a sweep keeps its parallel slots.

Runs the same sweep of uneven trials twice, in subprocesses: once in batches that wait for their
slowest trial (`hydra.sweeper.keep_slots_busy=false`, hydra-optuna-sweeper's way) and once with
each freed slot given the next trial at once (the default). The jobs only sleep
(`experiments.benchmarks.sleeper`: random sampler, joblib launcher), so the machine's speed
hardly matters. A slot's utilisation is the sum of the jobs' own times (each job's body, as it
measured it) over `n_jobs` x the sweep's wall time (from the first job's start to the last one's
end). Hydra's own setup of each job (~0.2 s here) counts as idle, and so does the tail, where
the last trials run and the other slots have nothing left to take.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

TARGET = 0.85


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.benchmark slots",
        description=(
            "Run a sweep of sleeping trials in batches and with slots kept busy, and report each "
            "one's slot utilisation; fails when the kept-busy sweep's is under --target."
        ),
    )
    parser.add_argument("--jobs", type=int, default=4, help="hydra.sweeper.n_jobs (default 4)")
    parser.add_argument("--trials", type=int, default=48, help="trials per sweep (default 48)")
    parser.add_argument(
        "--sleep",
        default="0.5,4",
        help="the range of a trial's length in seconds, LOW,HIGH (default 0.5,4)",
    )
    parser.add_argument("--seed", type=int, default=1, help="the random sampler's seed")
    parser.add_argument("--target", type=float, default=TARGET, help=f"default {TARGET}")
    parser.add_argument("--out", type=Path, default=None, help="default: paths.reports_dir")
    args = parser.parse_args(argv)
    try:
        low, high = (float(part) for part in args.sleep.split(","))
    except ValueError:
        parser.error(f"--sleep {args.sleep}: give two lengths in seconds, e.g. 0.5,4")
    if not 0 < low < high:
        parser.error(f"--sleep {args.sleep}: give 0 < LOW < HIGH, e.g. 0.5,4")
    if args.jobs < 2 or args.trials < args.jobs:
        parser.error(f"--jobs {args.jobs} --trials {args.trials}: give 2 jobs or more, and trials")
    args.sleep = (low, high)
    return args


def run_sweep(args: argparse.Namespace, keep_busy: bool, sweep_dir: Path) -> dict:
    """One sweep in a subprocess; its figures from the jobs' own times."""
    low, high = args.sleep
    command = [
        sys.executable,
        "-m",
        "experiments.benchmarks.sleeper",
        "-m",
        f"hydra.sweep.dir={sweep_dir}",
        f"hydra.sweeper.n_jobs={args.jobs}",
        f"hydra.sweeper.n_trials={args.trials}",
        f"hydra.sweeper.sampler.seed={args.seed}",
        f"hydra.sweeper.keep_slots_busy={str(keep_busy).lower()}",
        f"sleep=interval({low}, {high})",
    ]
    print("running:", " ".join(command), flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    times = [json.loads(p.read_text()) for p in sweep_dir.glob("*/times.json")]
    busy = sum(t["ended"] - t["started"] for t in times)
    wall = max(t["ended"] for t in times) - min(t["started"] for t in times)
    return {
        "mode": "slots kept busy" if keep_busy else "batches",
        "trials": len(times),
        "jobs_time_s": round(busy, 2),
        "wall_s": round(wall, 2),
        "utilisation": round(busy / (args.jobs * wall), 3),
    }


def slots_main(argv: list[str]) -> int:
    import pandas as pd

    from experiments import compose_project_config

    args = parse_args(argv)
    out = args.out or Path(compose_project_config().paths.reports_dir)
    with tempfile.TemporaryDirectory(prefix="experiments-slots-") as tmp:
        try:
            rows = [run_sweep(args, keep, Path(tmp) / str(keep)) for keep in (False, True)]
        except subprocess.CalledProcessError as err:
            print(f"error: the sweep exited with code {err.returncode}; see its output above")
            return 2
    passed = rows[1]["utilisation"] >= args.target
    low, high = args.sleep
    text = "\n".join(
        [
            f"{args.trials} trials of {low:g}-{high:g} s (random, seed {args.seed}), "
            f"hydra.sweeper.n_jobs={args.jobs}, joblib",
            "",
            pd.DataFrame(rows).to_markdown(index=False),
            "",
            f"{'PASS' if passed else 'FAIL'}: slots kept busy {rows[1]['utilisation']:.3f} of "
            f"the wall time (target {args.target}); batches {rows[0]['utilisation']:.3f}",
        ]
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark-slots.md").write_text(text + "\n")
    payload = {"jobs": args.jobs, "sleep_s": [low, high], "target": args.target, "sweeps": rows}
    (out / "benchmark-slots.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(text)
    print(f"saved {out / 'benchmark-slots.md'} and {out / 'benchmark-slots.json'}")
    return 0 if passed else 1
