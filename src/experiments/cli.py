"""The command-line harness of the Hydra entry points (`experiments.train`, `experiments.evaluate`):
signals, user errors as one line, and the job's output folder.

A user error prints one `error:` line and exits 2; a signal prints what was kept and how to
resume, and exits 128 + its number. In a multirun the sweeper and the launcher handle both.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from experiments.core.errors import ExperimentError
from experiments.core.job import in_multirun


def run_cli(task_function, cfg: DictConfig):
    """Call `task_function(cfg)`. In a single run a user error prints one line and exits 2, and
    a signal prints how to resume and exits 128 + its number; a multirun handles both itself."""
    from experiments.core import interrupts
    from experiments.core.files import DISK_FULL
    from experiments.core.interrupts import Interrupted
    from experiments.core.processes import stopped_when_launcher_dies

    multirun = in_multirun()
    try:
        # Here too, not only in main(): a launcher such as submitit calls this in its own process.
        with interrupts.handle_signals(), stopped_when_launcher_dies():
            try:
                return task_function(cfg)
            except Interrupted as err:
                if multirun:  # submitit: requeue this job, whose run then resumes
                    interrupts.pass_on(err.signum)
                raise
    except ExperimentError as err:
        if multirun:
            raise  # the sweeper records the failure and goes on
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except MissingMandatoryValue as err:  # a `???` the command needs (evaluate's model=)
        if multirun:
            raise
        print(
            f"error: {err.full_key} must be set: add {err.full_key}=... (--help lists the "
            f"settings)",
            file=sys.stderr,
        )
        sys.exit(2)
    except OSError as err:
        if err.errno not in DISK_FULL or multirun:
            raise
        print(
            f"error: no space left writing {err.filename or 'a file'} ({os.strerror(err.errno)}); "
            f"free space there, then run the same command again to resume",
            file=sys.stderr,
        )
        sys.exit(2)
    except Interrupted as err:
        if multirun:
            raise  # ends the whole sweep: see cli_with_signals()
        print(f"interrupted by {err.name}: {resume_hint(cfg)}", file=sys.stderr)
        sys.exit(err.exit_code)


def cli_with_signals(entry) -> None:
    """Run a Hydra entry point with SIGTERM and SIGINT handled; a multirun stopped by one
    prints how to complete it and exits 128 + its number. The process then ends without the
    interpreter's teardown (`ending_without_teardown`)."""
    from experiments.core.interrupts import Interrupted, handle_signals

    with ending_without_teardown(), handle_signals():
        if unknown := unknown_option(sys.argv[1:]):
            print(f"error: {unknown}", file=sys.stderr)
            sys.exit(2)
        try:
            with config_errors_in_one_line():
                entry()
        except Interrupted as err:
            print(
                f"interrupted by {err.name}: run the same command again to complete the sweep "
                f"(finished jobs are skipped, the interrupted one resumes; resume=never runs all)",
                file=sys.stderr,
            )
            sys.exit(err.exit_code)


@contextlib.contextmanager
def config_errors_in_one_line() -> Iterator[None]:
    """A config Hydra cannot compose (a key the config lacks, an override it cannot parse) is
    one `error:` line and exit 2; Hydra would print it over several lines and exit 1. Hydra
    hands its exception on only with HYDRA_FULL_ERROR set: a user who set it gets Hydra's own
    report. Hydra's other one-line errors (a sweep's, `SweepError`) keep their exit 1."""
    from hydra.errors import (
        CompactHydraException,
        ConfigCompositionException,
        OverrideParseException,
        SearchPathException,
    )

    if os.environ.get("HYDRA_FULL_ERROR"):
        yield
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    except CompactHydraException as err:
        first, *rest = [part.strip() for part in str(err).splitlines() if part.strip()] or [""]
        if err.__cause__ is not None:  # OmegaConf's reason: "Key 'x' is not in struct"
            first = f"{first.rstrip('.')} ({str(err.__cause__).strip().splitlines()[0]})."
        line = " ".join([first, *rest])
        print(line if line.startswith("error:") else f"error: {line}", file=sys.stderr)
        config = (ConfigCompositionException, OverrideParseException, SearchPathException)
        sys.exit(2 if isinstance(err, config) else 1)
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)


def unknown_option(arguments: list[str]) -> str | None:
    """The line for the first `group=option` that names no option of a config group of conf/
    (`backbone=nope`), else None: Hydra would print the group's options over several lines
    and exit 1, after composing. Sweeps (`a,b`) have each of their options checked; values
    that are not plain names (`choice(...)`, `null`) are left to Hydra."""
    import re

    from experiments import config_dir

    root = Path(config_dir())
    elsewhere = ("--config-dir", "-cd", "--config-path", "-cp", "hydra.searchpath")
    if any(a.startswith(elsewhere) for a in arguments):  # options from other folders too
        return None
    for argument in arguments:
        key, equals, value = argument.partition("=")
        if not equals or not re.fullmatch(r"[a-z_]+", key) or not (root / key).is_dir():
            continue
        if not re.fullmatch(r"[\w.\-]+(,[\w.\-]+)*", value) or value == "null":
            continue
        options = sorted(p.stem for p in (root / key).glob("*.yaml"))
        for option in value.split(","):
            if option not in options:
                return (
                    f"{key}={option}: {key} has no option {option!r}; choose one of "
                    f"{', '.join(options)} (or add conf/{key}/{option}.yaml)"
                )
    return None


def server_arguments(parser, port: int, store: str = "") -> None:
    """The options of a command that serves over HTTP (`ui`, `serve`): --host (127.0.0.1 by
    default, so nothing is exposed unasked), --port, and --tracking-uri (`store` says which)."""
    parser.add_argument("--host", default="127.0.0.1", help="default: %(default)s")
    parser.add_argument("--port", type=int, default=port, help="default: %(default)s")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help=f"{store}default: tracking.uri ($MLFLOW_TRACKING_URI, else the project's store in "
        f"mlruns/)",
    )


def exit_with(main) -> None:
    """`sys.exit(main())` for `python -m experiments.<command>`, ending without the
    interpreter's teardown (a third of `python -m experiments.runs`: 2.4 s to 1.7 s)."""
    with ending_without_teardown():
        sys.exit(main())


@contextlib.contextmanager
def ending_without_teardown() -> Iterator[None]:
    """Once the block has returned or exited with a number, end the process with that status
    as soon as the exit handlers registered after it have run: as Python would, without its
    teardown.

    The teardown frees every module and object one by one, and the backends' clients: 2.0 s of
    a JAX run and 2.2 s of the TensorFlow quickstart on this project's CPU, after the run had
    ended and been recorded. Nothing is lost by skipping it: the interpreter has joined its
    threads by then, and the exit handlers of MLflow and the backends, registered later, have
    run; logging's, registered earlier, runs here. The project keeps its records through a
    `kill -9` at any moment, a harder end than this one. After any other exception (which
    Python reports itself), or in a forked child, Python ends the process as usual.
    """
    import atexit
    import logging

    status: int | None = None
    pid = os.getpid()

    def end() -> None:
        if status is None or os.getpid() != pid:
            return
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # closed, or a broken pipe
                stream.flush()
        os._exit(status)

    atexit.register(end)
    try:
        yield
    except SystemExit as err:
        if err.code is None or isinstance(err.code, int):
            status = err.code or 0
        raise
    status = 0


def resume_hint(cfg: DictConfig) -> str:
    """One line: what an interrupted run kept and how to continue it."""
    from experiments import tracking
    from experiments.training.checkpoints import RunCheckpoints

    run_id = tracking.last_run_id()
    if run_id is None:
        return "no run was started yet; run the same command again"
    if tracking.run_status(run_id) == "FINISHED":
        return f"run {run_id} had just FINISHED; nothing is lost"
    state = RunCheckpoints(Path(str(cfg.paths.checkpoint_dir)) / run_id)
    return (
        f"run {run_id} ended KILLED with {state.completed_epochs()} complete epoch(s) saved in "
        f"{state.root}; run the same command again to resume it (resume=never starts afresh)"
    )
