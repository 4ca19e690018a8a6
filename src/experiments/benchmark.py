"""Benchmarks: `python -m experiments.benchmark [MODE] [options] [overrides]`, MODE one of:

- `sweep` (the default): memory and time of a sweep's trials in one process, below.
- `throughput`: training speed against the frozen base's own inference rate, for each chosen
  backbone (`experiments.benchmarks.throughput`).
- `memory`: peak memory of one run as the dataset grows from 2,000 to 32,000 images
  (`experiments.benchmarks.memory`).
- `run`: where a whole run's time goes, fresh and warm, against its targets
  (`experiments.benchmarks.wholerun`).
- `slots`: how busy a sweep keeps its `n_jobs` slots on uneven trials, in batches and with
  each freed slot refilled at once (`experiments.benchmarks.slots`).
- `repeats`: memory of a group's members (`trainer.repeats=5`) in one process, with the sweep's
  10% growth target.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    mode = argv.pop(0) if argv and argv[0] in MODES else "sweep"
    return MODES[mode](argv)


def sweep_main(argv: list[str]) -> int:
    from experiments.benchmarks.sweep import sweep_main as run

    return run(argv)


def throughput_main(argv: list[str]) -> int:
    from experiments.benchmarks.throughput import throughput_main as run

    return run(argv)


def repeats_main(argv: list[str]) -> int:
    from experiments.benchmarks.sweep import repeats_main as run

    return run(argv)


def memory_main(argv: list[str]) -> int:
    from experiments.benchmarks.memory import memory_main as run

    return run(argv)


def run_main(argv: list[str]) -> int:
    from experiments.benchmarks.wholerun import run_main as run

    return run(argv)


def slots_main(argv: list[str]) -> int:
    from experiments.benchmarks.slots import slots_main as run

    return run(argv)


MODES = {
    "sweep": sweep_main,
    "throughput": throughput_main,
    "memory": memory_main,
    "run": run_main,
    "repeats": repeats_main,
    "slots": slots_main,
}


if __name__ == "__main__":
    from experiments.cli import exit_with

    exit_with(main)
