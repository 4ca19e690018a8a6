"""Every refusal is one `error:` line and exit 2, in seconds, and leaves nothing behind: config
values only Keras can judge, code named in the config (`_target_`), a store that is locked,
read-only, unreachable or mistyped, and the command `runs` prints to resume a run."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_overrides
from helpers import free_port, in_mount_namespace, read_only

# The store the tiny overrides of a test under tmp_path use.
STORE = "mlruns/mlflow.db"


def refused(command: list[str], **kwargs) -> tuple[str, float]:
    """Run `command`; its one `error:` line and how long it took, once it exits 2 with no
    traceback."""
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)
    took = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output, output[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0], took


def train(tmp_path: Path, image_folder: Path, *overrides: str) -> list[str]:
    """The command of a tiny training run under `tmp_path` with `overrides`."""
    keys = {o.lstrip("+~").split("=")[0] for o in overrides}
    base = [o for o in tiny_overrides(tmp_path, image_folder) if o.split("=")[0] not in keys]
    return [sys.executable, "-m", "experiments.train", *base, *overrides]


def nothing_recorded(tmp_path: Path) -> None:
    """No store, no run, no features or images cached, no checkpoint."""
    assert not (tmp_path / "mlruns").exists()
    assert not (tmp_path / "checkpoints").exists()
    cached = tmp_path / "cache"
    assert not cached.exists() or {p.name for p in cached.iterdir()} <= {"compiled"}


# A setting a class does not take: refused once Keras is imported, by building the class, and
# before any data is loaded. Any training imports Keras; that is ~8 of the ~9 s these take on
# an idle 2-core machine.
NEEDS_KERAS = [
    ("+optimizer.foo=1", "cannot be built from its settings (Argument(s) not recognized: {'foo'"),
    (
        "trainer.early_stopping.enabled=true +trainer.early_stopping.bogus=1",
        "trainer.early_stopping: keras.callbacks.EarlyStopping cannot be built from its settings",
    ),
]
# What the config and Keras' public API files show: refused before Keras is imported.
FROM_THE_CONFIG = [
    ("backbone.module=nope", "backbone.module=nope is not a module of keras.applications; use"),
    ("backbone.constructor=VGG99", "backbone.constructor=VGG99 is not in keras.applications.vgg16"),
    ("head.activation=bogus", "head.activation=bogus is not a Keras activation"),
    ("trainer.monitor=bogus", "trainer.monitor=bogus is not a metric Keras logs each epoch"),
    ("trainer.nokey=1", "Could not override 'trainer.nokey' (Key 'nokey' is not in struct)"),
    ("optimizer.lr=[", "no viable alternative at input '['"),
    ("trainer.early_stopping._target_=os.system", "_target_=os.system is not allowed here"),
    ("+head._target_=shutil.rmtree", "head._target_=shutil.rmtree: head builds no object"),
    (
        "augmentation=reference augmentation.layers.0._target_=keras.layers.Lambda "
        "+augmentation.layers.0.function=print",
        "augmentation.layers[0]._target_=keras.layers.Lambda is not allowed here",
    ),
]


@pytest.mark.parametrize(
    ("override", "says"),
    NEEDS_KERAS + FROM_THE_CONFIG,
    ids=[c[0] for c in NEEDS_KERAS + FROM_THE_CONFIG],
)
def test_a_bad_setting_is_refused_before_any_data(override, says, tmp_path, image_folder):
    line, took = refused(train(tmp_path, image_folder, *override.split()))
    assert says in line
    nothing_recorded(tmp_path)
    assert took < (20 if (override, says) in NEEDS_KERAS else 10), f"{took:.1f} s"


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("backbone.module=nope", "backbone.module=nope is not a module of keras.applications"),
        ("backbone.module=resnet", "backbone.constructor=VGG16 is not in keras.applications."),
        ("head.activation=bogus", "head.activation=bogus is not a Keras activation"),
        ("+augmentation.layers=[{_target_: keras.layers.RandomFlip, bogus: 1}]", "RandomFlip"),
        ("optimizer._target_=keras.optimizers.schedules.CosineDecay", "cannot be built from"),
    ],
)
def test_names_are_checked_by_keras_itself_where_its_api_files_are_not_there(
    override, says, tmp_path, monkeypatch
):
    """A Keras laid out otherwise: what the API files would have shown is looked up in the
    imported Keras, with the same line."""
    from experiments.core.errors import ExperimentError
    from experiments.pipeline import instantiation

    from conftest import compose_config

    monkeypatch.setattr(instantiation, "keras_api", lambda *package: None)
    cfg = compose_config([*tiny_overrides(tmp_path), override])
    instantiation.check_names(cfg)  # reads nothing, refuses nothing
    with pytest.raises(ExperimentError, match=re.escape(says)):
        instantiation.check_buildable(cfg)
    fine = compose_config(tiny_overrides(tmp_path))
    instantiation.check_buildable(fine)


def test_a_target_that_is_not_a_class_of_its_group_runs_nothing(tmp_path, image_folder):
    """What the issue saw: `optimizer._target_=shutil.copyfile` with `_args_` copied a file."""
    source, copy = tmp_path / "source.txt", tmp_path / "copy.txt"
    source.write_text("secret")
    line, took = refused(
        train(
            tmp_path,
            image_folder,
            "optimizer._target_=shutil.copyfile",
            f"+optimizer._args_=[{source},{copy}]",
        )
    )
    assert "optimizer._target_=shutil.copyfile is not allowed here: give a class of" in line
    assert not copy.exists() and took < 10
    nothing_recorded(tmp_path)


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["hydra.sweeper.sampler._target_=os.system"], "sampler._target_=os.system is not allowed"),
        (
            ["hydra.sweeper.pruner=null", "hydra.sweeper.sampler._target_=os.system"],
            "sampler._target_=os.system is not allowed",  # no pruner: nothing to check there
        ),
        (
            [
                "++hydra.sweeper.pruner._target_=optuna.pruners.PatientPruner",
                "+hydra.sweeper.pruner.patience=1",
                "+hydra.sweeper.pruner.wrapped_pruner._target_=builtins.exec",
            ],
            "hydra.sweeper.pruner.wrapped_pruner._target_=builtins.exec is not allowed here",
        ),
    ],
)
def test_a_sweeper_target_is_refused_before_the_sweep_is_recorded(
    overrides, says, tmp_path, image_folder
):
    """Hydra opens the sweep's MLflow parent run before it builds the sweeper: the refusal
    comes first, so no FAILED parent is left."""
    command = train(tmp_path, image_folder, "hparams_search=lr_head", *overrides)
    line, took = refused([*command[:3], "-m", *command[3:]])
    assert says in line and took < 10
    nothing_recorded(tmp_path)
    assert not (tmp_path / "multirun").exists()


# ---------------------------------------------------------------------------------------------
# The store: locked, read-only, unreachable, mistyped.


def new_store(tmp_path: Path) -> Path:
    """An empty MLflow store where the tiny overrides put it; its database file."""
    from mlflow.tracking import MlflowClient

    database = tmp_path / STORE
    database.parent.mkdir(parents=True)
    MlflowClient(f"sqlite:///{database}").search_experiments()
    return database


def test_a_locked_store_is_one_line_within_seconds(tmp_path, image_folder):
    """Another process holds the sqlite store's write lock (MLflow waited 14-21 s, then printed
    a traceback): training, predict and runs each say so in one line."""
    database = new_store(tmp_path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys, time\n"
            f"c = sqlite3.connect({str(database)!r}, isolation_level=None)\n"
            "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(300)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        commands = {
            "train": (train(tmp_path, image_folder), 15),
            "predict": (
                [
                    sys.executable,
                    "-m",
                    "experiments.predict",
                    f"paths.root_dir={tmp_path}",
                    f"model=runs:/{'0' * 32}/model",
                    f"input={image_folder}",
                ],
                10,
            ),
            "runs": ([sys.executable, "-m", "experiments.runs", f"paths.root_dir={tmp_path}"], 10),
        }
        for name, (command, limit) in commands.items():
            line, took = refused(command)
            assert "the store is locked by another process (still after 5 s)" in line, name
            assert f"fuser {database}" in line
            assert took < limit, f"{name}: {took:.1f} s"
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "checkpoints").exists()


def test_a_read_only_store_refuses_training_in_one_line(tmp_path, image_folder):
    """A store on a read-only file system (MLflow failed at its first write, after the data
    loaded): the store's folder, then only its artifacts' folder."""
    database = new_store(tmp_path)
    artifacts = tmp_path / "mlruns" / "artifacts"
    artifacts.mkdir()
    before = database.read_bytes()
    for place, says in (
        (database.parent, f"{database} is not writable (a read-only file system)"),
        (artifacts, f"the artifacts of tracking.uri=sqlite:///{database}: {artifacts} is not"),
    ):
        line, took = refused(in_mount_namespace([read_only(place)], train(tmp_path, image_folder)))
        assert says in line and took < 10, line
    assert database.read_bytes() == before and not list(artifacts.iterdir())
    assert not (tmp_path / "checkpoints").exists()


def test_an_unreachable_database_store_is_one_line_without_its_password(tmp_path, image_folder):
    """A PostgreSQL store that does not answer (MLflow retried for 134 s)."""
    uri = f"postgresql://lab:S3cret-pw@127.0.0.1:{free_port()}/mlflow"
    for command in (
        train(tmp_path, image_folder, f"tracking.uri={uri}"),
        [sys.executable, "-m", "experiments.runs", f"tracking.uri={uri}"],
    ):
        started = time.monotonic()
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        took = time.monotonic() - started
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "S3cret" not in result.stdout + result.stderr
        (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
        assert "cannot reach the MLflow store tracking.uri=postgresql://lab:***@127.0.0.1" in line
        assert "Connection refused" in line and took < 10, f"{line} ({took:.1f} s)"


@pytest.mark.parametrize("command", ["runs", "predict", "evaluate", "compare"])
def test_a_mistyped_store_path_is_not_made_an_empty_store(command, tmp_path, image_folder):
    """A command that reads runs from a store that is not there says so (MLflow made a new
    empty store and reported nothing unfinished); `runs` says there is none yet, exit 0: on a
    new project that is no mistake."""
    typo = tmp_path / "mlrnus" / "mlflow.db"
    store = f"sqlite:///{typo}"
    arguments = {
        "runs": [f"tracking.uri={store}"],
        "predict": [
            f"tracking.uri={store}",
            f"model=runs:/{'0' * 32}/model",
            f"input={image_folder}",
        ],
        "evaluate": [f"tracking.uri={store}", f"model=runs:/{'0' * 32}/model"],
        "compare": ["digits", "--tracking-uri", store, "--out", str(tmp_path / "tables")],
    }[command]
    if command != "compare":
        arguments.insert(0, f"paths.root_dir={tmp_path}")
    command_line = [sys.executable, "-m", f"experiments.{command}", *arguments]
    if command == "runs":
        result = subprocess.run(command_line, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        assert f"no unfinished runs: there is no MLflow store at {typo} yet" in result.stdout
    else:
        line, took = refused(command_line)
        assert f"there is no MLflow store at {typo}; fix the path" in line and took < 10
    assert not typo.parent.exists()


@pytest.mark.parametrize("command", ["predict", "evaluate", "export"])
def test_a_bad_argument_is_refused_before_tensorflow_is_imported(command, tmp_path):
    arguments = (
        ["my-model", "--format", "onnx"] if command == "export" else [f"paths.root_dir={tmp_path}"]
    )
    result = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            f"experiments.{command}",
            *arguments,
            *([] if command == "export" else ["model=my-model"]),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert "my-model is not a model URI; give runs:/<run id>/model" in line
    imported = {
        entry.split("|")[-1].strip().split(".")[0]
        for entry in result.stderr.splitlines()
        if entry.startswith("import time:")
    }
    assert not imported & {"tensorflow", "keras", "mlflow", "jax"}


# ---------------------------------------------------------------------------------------------
# The command `runs` prints to resume a run comes from tags anyone with the store can write.


def test_a_resume_command_is_quoted_and_holds_only_the_projects_overrides():
    import shlex

    from experiments.runs import resume_command

    stored = shlex.join(
        [
            "train.py",
            "task.path=/data/my images",
            "head.units=[64,32]",
            "--config-dir=/elsewhere",
            "hydra.job.env_set.LD_PRELOAD=/tmp/x.so",
            "; rm -rf ~",
            "resume=auto",
        ]
    )
    line = resume_command({"command": stored}, "abc123")
    command, _, comment = line.partition("  # ")
    assert shlex.split(command) == [
        "python",
        "-m",
        "experiments.train",
        "task.path=/data/my images",
        "head.units=[64,32]",
        "resume=abc123",
    ]
    assert comment.startswith("left out, not overrides of the project's config:")
    assert shlex.split(comment.split(":", 1)[1]) == [
        "--config-dir=/elsewhere",
        "hydra.job.env_set.LD_PRELOAD=/tmp/x.so",
        "; rm -rf ~",
    ]
    # A run recorded before commands were quoted: its words split at spaces.
    assert resume_command({"command": "train.py task=flowers 'x"}, "r").startswith(
        "python -m experiments.train task=flowers resume=r  # left out"
    )
    sweep = resume_command(
        {"sweep": "true", "sweep_overrides": "optimizer.lr=interval(1e-4,1e-2) backbone=a,b"}, "r"
    )
    assert shlex.split(sweep)[3:] == ["-m", "optimizer.lr=interval(1e-4,1e-2)", "backbone=a,b"]


def test_a_runs_command_tag_takes_back_every_word(tmp_path, image_folder):
    """The command tag is quoted as a shell takes it back: a value with a space stays one word."""
    import shlex

    from experiments.tracking.records import run_tags

    from conftest import compose_config

    argv = ["/x/train.py", "task.path=/data/my images", "trainer.epochs=1"]
    saved, sys.argv = sys.argv, argv
    try:
        tags = run_tags(compose_config(tiny_overrides(tmp_path, image_folder)), str(tmp_path))
    finally:
        sys.argv = saved
    assert shlex.split(tags["command"]) == ["train.py", *argv[1:]]
