"""Passwords kept out of what the project records and prints (`experiments.core.secrets`); the
whole promise, on a real sweep with PostgreSQL and an MLflow server, is in
`tests/test_scale.py::test_no_password_is_recorded_or_printed`."""

from __future__ import annotations

import logging

import pytest

from experiments.core.secrets import redact, redact_file, redact_logs, redacted


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://user:PASSWORD@host/optuna", "postgresql://user:***@host/optuna"),
        ("hydra.sweeper.storage=postgresql://u:p@ss:w@h:5432/db x=1",
         "hydra.sweeper.storage=postgresql://u:***@h:5432/db x=1"),
        ("tracking.uri=http://lab:pw@127.0.0.1:5000", "tracking.uri=http://lab:***@127.0.0.1:5000"),
        ("mysql://h/db?user=a&password=secret&x=1", "mysql://h/db?user=a&password=***&x=1"),
        ("postgresql://h/db?sslmode=require;PASSWORD=x", "postgresql://h/db?sslmode=require;PASSWORD=***"),
        # Nothing to hide: left as it is.
        ("postgresql://user@host/db", "postgresql://user@host/db"),
        ("https://host:8080/a@b", "https://host:8080/a@b"),
        ("sqlite:////tmp/mlruns/mlflow.db", "sqlite:////tmp/mlruns/mlflow.db"),
        ("journal:/tmp/optuna.journal", "journal:/tmp/optuna.journal"),
        ("git@github.com:owner/repo", "git@github.com:owner/repo"),
    ],
)  # fmt: skip
def test_redact_hides_the_password_of_urls_and_parameters(text, expected):
    assert redact(text) == expected


def test_nested_values_and_files(tmp_path):
    value = {"a": ["x", "http://u:pw@h"], "b": ("postgresql://u:pw@h/db",), "c": 3}
    assert redacted(value) == {
        "a": ["x", "http://u:***@h"],
        "b": ("postgresql://u:***@h/db",),
        "c": 3,
    }
    config = tmp_path / "hydra.yaml"
    config.write_text("sweeper:\n  storage: postgresql://u:pw@h/db\n")
    assert (
        redact_file(config)
        and config.read_text() == "sweeper:\n  storage: postgresql://u:***@h/db\n"
    )
    assert not redact_file(config) and not redact_file(tmp_path / "missing.yaml")


def test_errors_and_log_records_print_no_password(caplog):
    from experiments.core.errors import ExperimentError

    err = ExperimentError("cannot reach tracking.uri=http://u:pw@h:5000; start the server")
    assert str(err) == "cannot reach tracking.uri=http://u:***@h:5000; start the server"
    redact_logs()
    redact_logs()  # once is enough; twice changes nothing
    with caplog.at_level(logging.INFO):
        logging.getLogger("experiments.test").info("study in %s", "postgresql://u:pw@h/db")
    assert caplog.messages == ["study in postgresql://u:***@h/db"]


def test_make_prints_database_urls_without_their_password(tmp_path):
    """`make server` and `make dashboard` echo what they start (the recipe lines are silent):
    the URL with its password as ***. Here nothing starts (no virtualenv at VENV)."""
    import subprocess
    from pathlib import Path

    makefile = Path(__file__).resolve().parents[1] / "Makefile"
    for target, setting in (
        ("server", "DB=postgresql://lab:S3cr@t-pw@127.0.0.1:1/mlflow"),
        ("dashboard", "STORAGE=postgresql://lab:S3cr@t-pw@127.0.0.1:1/optuna"),
    ):
        done = subprocess.run(
            ["make", "-f", str(makefile), target, setting, f"VENV={tmp_path}/none",
             f"ARTIFACTS={tmp_path}/artifacts"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert "lab:***@127.0.0.1:1/" in done.stdout, done.stdout + done.stderr
        assert "S3cr@t-pw" not in done.stdout + done.stderr, target
