"""Passwords kept out of everything the project records and prints.

A URL with credentials (`postgresql://user:PASSWORD@host/db`, `http://user:PASSWORD@host`) or a
`password=` query parameter typed on a command line would otherwise reach every run's params,
its `command` tag, its config artifacts, Hydra's `.hydra/*.yaml` of every job, a sweep's log
lines and the tracking store the whole lab reads. `redact` turns the password into `***`; the
URL itself keeps working where it is used, as it is passed on through the environment of the
processes that need it, not through files that are kept.

Better still, keep passwords out of commands: PostgreSQL reads `~/.pgpass` or `PGPASSWORD`,
MLflow `MLFLOW_TRACKING_USERNAME` and `MLFLOW_TRACKING_PASSWORD`.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

MASK = "***"

# scheme://user:PASSWORD@host: the password ends at the last `@` before the host (a password
# may hold `:` or a `@` of its own, percent-encoded or not).
URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@'\"]*:)([^\s/'\"]*)(@)")
# ?password=... or &password=... (also passwd, pwd), up to the next parameter.
QUERY_PASSWORD = re.compile(r"(?i)([?&;](?:password|passwd|pwd)=)([^&;\s'\"]*)")


def redact(text: str) -> str:
    """`text` with the password of every URL and `password=` parameter in it as `***`."""
    if "@" not in text and "=" not in text:
        return text  # nothing to find: the common case, made cheap
    text = URL_PASSWORD.sub(lambda m: m[1] + (MASK if m[2] else "") + m[3], text)
    return QUERY_PASSWORD.sub(lambda m: m[1] + (MASK if m[2] else ""), text)


def redacted(value: Any) -> Any:
    """`value` with `redact` applied to every string in it (dicts, lists, tuples)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redacted(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redacted(item) for item in value)
    return value


def redact_file(path: Path) -> bool:
    """Rewrite a text file with its passwords as `***` (atomically); whether it held one."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return False
    clean = redact(text)
    if clean == text:
        return False
    # Beside it, then renamed over it (not core.files.atomic_path: core.errors imports this
    # module, and core.files imports core.errors).
    tmp = path.with_name(f".{path.name}.redacted")
    tmp.write_text(clean)
    os.replace(tmp, path)
    return True


def redact_logs() -> None:
    """Every log record is made without passwords, whoever logs it (Hydra's launchers log each
    job's overrides) and wherever it goes (the terminal, Hydra's `.log` files).

    Through the record factory, not a handler's filter: Hydra replaces the handlers each time it
    configures logging (for every batch of jobs, and every job), and a filter goes with them.
    """
    global _make_record
    if _make_record is not None:
        return
    _make_record = logging.getLogRecordFactory()

    def redacted_record(*args, **kwargs) -> logging.LogRecord:
        record = _make_record(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a record that cannot be formatted: logging reports it later
            return record
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return record

    logging.setLogRecordFactory(redacted_record)


_make_record = None


class RedactHydraFiles(Callback):
    """A Hydra callback: the config files Hydra keeps of each job (`.hydra/config.yaml`,
    `hydra.yaml`, `overrides.yaml`) and of a sweep (`multirun.yaml`) without passwords.

    Hydra writes them before the job starts, straight from the command line; they are rewritten
    at the job's start, and a sweep's at its end. The job has its config in memory already.
    The log handlers Hydra set up write without passwords from then on (`redact_logs`).
    """

    def on_run_start(self, config, **kwargs: Any) -> None:
        redact_logs()

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        redact_logs()

    def on_job_start(self, config, **kwargs: Any) -> None:
        redact_logs()
        runtime = config.hydra.runtime
        if config.hydra.output_subdir is not None:
            folder = Path(runtime.output_dir) / str(config.hydra.output_subdir)
            for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
                redact_file(folder / name)
        if str(config.hydra.mode) == "RunMode.MULTIRUN":
            redact_file(Path(config.hydra.sweep.dir) / "multirun.yaml")

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        redact_file(Path(config.hydra.sweep.dir) / "multirun.yaml")
