"""What is wrong with an MLflow store, found in seconds before a command uses it.

MLflow finds each of these late and slowly: a tracking server that does not answer after minutes
of retries; a PostgreSQL or MySQL store that refuses connections after 134 s of its own retries;
an sqlite file that is read-only or locked by another process as a traceback once the data is
loaded, and an sqlite path with a typo as a new empty store that reports no runs. Each is one
`ExperimentError` here, naming the store (its password masked) and what to do.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from experiments.core.errors import ExperimentError
from experiments.core.files import check_writable
from experiments.core.secrets import redact
from experiments.tracking.client import HTTP_DEFAULTS, is_local, unreachable_message

# How long a probe waits for a database: an sqlite file's lock, a server's connection.
LOCK_WAIT_S = 5.0
CONNECT_TIMEOUT_S = 5


def check_store(uri: str, *, must_exist: bool = False, writes: bool = True) -> None:
    """Refuse the store at `uri` if it cannot be used now: `must_exist` for commands that read
    runs (a missing sqlite file is then a typo, not a new store); `writes=False` for those that
    only read (a read-only or busy sqlite file serves them)."""
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
    elif uri.startswith("sqlite:///"):
        _check_sqlite(uri, must_exist, writes)
    elif not is_local(uri):  # postgresql://, mysql://, mssql://
        _check_database(uri)


def sqlite_path(uri: str) -> Path:
    """The database file of `sqlite:///PATH[?options]`."""
    return Path(uri[len("sqlite:///") :].split("?", 1)[0])


def _check_server(uri: str) -> None:
    import requests  # not urllib: a URL's user:password@ becomes basic auth, as MLflow sends it

    timeout = float(
        os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_TIMEOUT"])
    )
    try:  # any answer will do: a proxy may not route /health
        requests.get(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except (requests.RequestException, OSError, ValueError) as err:
        # requests wraps the reason in its pool's words: the socket's own is the one to read.
        reason = re.search(r"\[Errno -?\d+\][^'\")]*", str(err))
        raise ExperimentError(unreachable_message(uri, reason[0] if reason else err)) from None


def _check_sqlite(uri: str, must_exist: bool, writes: bool) -> None:
    import sqlite3

    path = sqlite_path(uri)
    shown = f"tracking.uri={redact(uri)}"
    if must_exist and not path.exists():
        raise ExperimentError(
            f"{shown}: there is no MLflow store at {path}; fix the path (or "
            f"MLFLOW_TRACKING_URI), or train a run first, which creates it"
        )
    if writes:  # sqlite writes a journal beside the database: its folder must be writable too
        check_writable(path, shown)
    if not path.exists():
        return
    try:
        if writes:  # a write lock, released at once: what every run's first record needs
            connection = sqlite3.connect(path, timeout=LOCK_WAIT_S)
            probe = ("BEGIN IMMEDIATE",)
        else:  # a read, which a read-only file or folder allows
            connection = sqlite3.connect(
                f"{path.resolve().as_uri()}?mode=ro", timeout=LOCK_WAIT_S, uri=True
            )
            probe = ("BEGIN", "SELECT count(*) FROM sqlite_master")
        try:
            for statement in probe:
                connection.execute(statement)
            connection.rollback()
        finally:
            connection.close()
    except sqlite3.DatabaseError as err:
        if "locked" in str(err):
            raise ExperimentError(
                f"{shown}: the store is locked by another process (still after "
                f"{LOCK_WAIT_S:.0f} s); let it finish or stop it (fuser {path} names it), then "
                f"run the same command again"
            ) from None
        raise ExperimentError(f"{shown}: {path} cannot be used as a store ({err})") from None


def _check_database(uri: str) -> None:
    """One connection, bounded by CONNECT_TIMEOUT_S, to the database store at `uri`."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    dialect = uri.split(":", 1)[0].split("+", 1)[0]
    args = {"connect_timeout": CONNECT_TIMEOUT_S} if dialect in ("postgresql", "mysql") else {}
    try:
        engine = sqlalchemy.create_engine(uri, connect_args=args, poolclass=NullPool)
        try:
            engine.connect().close()
        finally:
            engine.dispose()
    except ImportError as err:
        raise ExperimentError(
            f"tracking.uri={redact(uri)}: the {dialect} driver SQLAlchemy needs is not installed "
            f"({err}); install it (PostgreSQL: psycopg, MySQL: PyMySQL with mysql+pymysql://)"
        ) from None
    except sqlalchemy.exc.SQLAlchemyError as err:
        reason = getattr(err, "orig", None) or err  # the driver's words, not SQLAlchemy's wrapping
        raise ExperimentError(
            f"cannot reach the MLflow store tracking.uri={redact(uri)} "
            f"({redact(str(reason).strip().splitlines()[0])[:300]}); start the database or fix "
            f"tracking.uri / MLFLOW_TRACKING_URI"
        ) from None
