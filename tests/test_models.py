"""From a run to a model people use: register it (with an alias), predict with it, serve it
over HTTP, export it, compare a challenger with the champion; the predictions are the run's
everywhere, and a bad input is one line with nothing registered or written."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import compose_config, tiny_overrides
from helpers import (
    MlflowServer,
    ModelServer,
    client_for,
    env_without,
    full_disk,
    in_mount_namespace,
    project_model_server,
    read_only,
    runs_of,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory, image_folder):
    """A run with a logged model, and one without (tracking.log_model=false)."""
    from experiments.pipeline.run import train

    root = tmp_path_factory.mktemp("models")
    train(compose_config([*tiny_overrides(root, image_folder), "tracking.log_model=true"]))
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    train(
        compose_config(
            [*tiny_overrides(root, image_folder), "tracking.log_model=false", "trainer.seed=3"]
        )
    )
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    with_model, without = runs_of(root, "folder")
    return root, with_model, without


def register(root: Path, *args: str, capsys=None) -> int:
    from experiments.register import main

    return main([*args, "--tracking-uri", f"sqlite:///{root}/mlruns/mlflow.db"])


def test_a_registered_version_carries_its_run_and_an_alias_moves(store, capsys):
    root, run, _ = store
    uri = f"runs:/{run.info.run_id}/model"
    assert register(root, uri, "--name", "clf", "--alias", "champion") == 0
    assert "as clf version 1" in capsys.readouterr().out
    assert register(root, uri, "--name", "clf", "--alias", "champion") == 0
    printed = capsys.readouterr().out
    assert "alias champion -> version 2, which left version 1" in printed
    client = client_for(root)
    version = client.get_model_version_by_alias("clf", "champion")
    assert str(version.version) == "2" and version.run_id == run.info.run_id
    tags = version.tags
    assert float(tags["metric.test_accuracy"]) == pytest.approx(run.data.metrics["test_accuracy"])
    assert tags["source_run_id"] == run.info.run_id and "backbone:" in tags["config"]
    digests = {i.dataset.digest for i in client.get_run(run.info.run_id).inputs.dataset_inputs}
    assert {tags["data.train.digest"], tags["data.test.digest"]} <= digests


@pytest.mark.parametrize(
    ("names", "says"),
    [
        (["--name", "clf2", "--alias", "bad alias!"], "--alias 'bad alias!': Invalid alias name"),
        (["--name", "clf2", "--alias", "latest"], "'latest' alias name (case insensitive)"),
        (["--name", "a/b"], "--name 'a/b': Invalid model name 'a/b'"),
    ],
)
def test_a_bad_name_or_alias_registers_nothing(store, capsys, names, says):
    """MLflow checks an alias only once the version exists: refused first, in one line, with
    no registered model or version left behind."""
    root, run, _ = store
    assert register(root, f"runs:/{run.info.run_id}/model", *names) == 2
    error = capsys.readouterr().err
    (line,) = [x for x in error.splitlines() if x.startswith("error:")]
    assert says in line and "Traceback" not in error
    assert not client_for(root).search_registered_models("name = 'clf2'")


# A register killed by SIGKILL at the moment it makes the MLflow call `sys.argv[1]`.
KILLED_REGISTER = """
import os, signal, sys
from mlflow import MlflowClient

def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

setattr(MlflowClient, sys.argv[1], killed)
from experiments.register import main
main(sys.argv[2:])
"""


@pytest.mark.parametrize(
    ("at", "then"),
    [
        ("_create_model_version", "champion"),
        ("set_registered_model_alias", "champion"),
        ("set_registered_model_alias", "challenger"),
    ],
)
def test_a_register_killed_midway_is_finished_by_the_next(store, at, then):
    """kill -9 after the registered model exists (it is empty), or after the version exists
    (it has no alias): the same command again leaves one version with its alias; a register
    for another alias removes the version the killed one left."""
    import signal

    root, run, _ = store
    name = f"killed{at}-{then}"
    source = [f"runs:/{run.info.run_id}/model", "--name", name, "--tracking-uri", store_uri(root)]
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_REGISTER, at, *source, "--alias", "champion"],
        capture_output=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    client = client_for(root)
    left = client.search_model_versions(f"name = '{name}'")
    assert len(left) == (1 if at == "set_registered_model_alias" else 0)  # what the kill left
    assert client.get_registered_model(name)
    again = subprocess.run(
        [sys.executable, "-m", "experiments.register", *source, "--alias", then],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    (version,) = client.search_model_versions(f"name = '{name}'")
    assert client.get_model_version_by_alias(name, then).version == version.version
    assert "pending_alias" not in version.tags and version.run_id == run.info.run_id
    if left:
        done = "giving it the alias now" if then == "champion" else "removed it"
        assert (
            f"version 1 of {name} was left without its alias champion by a register that was "
            f"killed (pid {killed_pid(left[0])}): {done}"
        ) in again.stderr
        assert str(version.version) == ("1" if then == "champion" else "2")


def killed_pid(version) -> str:
    return version.tags["pending_alias"].split(" ")[1].split(":")[-2]


def test_the_best_run_is_found_and_a_run_without_a_model_is_refused(store, capsys):
    root, run, without = store
    client = client_for(root)
    before = len(client.search_model_versions("name = 'best'"))
    best = max((run, without), key=lambda r: r.data.metrics["best_val_accuracy"])
    code = register(root, "--best", "folder", "--name", "best")
    if best is run:
        assert code == 0 and f"registered run {run.info.run_id}" in capsys.readouterr().out
    else:  # the best run logged no model: one line, nothing registered
        assert code == 2
    assert register(root, f"runs:/{without.info.run_id}/model", "--name", "best") == 2
    error = capsys.readouterr().err
    assert "logged no model (tracking.log_model=false)" in error
    # A run that logs no model keeps its one copy in its output folder, and says its size.
    (kept,) = Path(without.data.tags["hydra_output_dir"]).glob("model.keras")
    assert without.data.metrics["model_size_mb"] == pytest.approx(kept.stat().st_size / 1e6)
    after = len(client.search_model_versions("name = 'best'"))
    assert after == before + (1 if best is run else 0)


@pytest.mark.parametrize(
    ("model", "says"),
    [
        ("models:/clf@nobody", "the registry has no alias 'nobody' of a model 'clf'"),
        ("models:/nothing/1", "the registry has no version 1 of a model 'nothing'"),
        (f"runs:/{'0' * 32}/model", f"no run {'0' * 32}"),
    ],
)
def test_an_unknown_model_is_one_line(store, model, says, image_folder):
    root, run, _ = store
    register(root, f"runs:/{run.info.run_id}/model", "--name", "clf", "--alias", "champion")
    result = predict_cli(root, f"model={model}", f"input={image_folder}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert says in line


def hydra_cli(module: str, root: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m experiments.<module>` (predict, evaluate) on the store under `root`."""
    return subprocess.run(
        [sys.executable, "-m", f"experiments.{module}", f"paths.root_dir={root}", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def predict_cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    return hydra_cli("predict", root, *args)


def test_predict_gives_the_runs_test_accuracy_with_its_recorded_classes(
    store, tmp_path, image_folder
):
    """The test split, copied under names that hide its classes, with a broken file and a
    broken link: the registered model predicts the run's test accuracy, in the run's class
    names, from a store on a read-only file system, where it writes nothing (MLflow's
    `models:/` loader wrote a file into the model's folder)."""
    from experiments.data.tasks import load_task

    root, run, _ = store
    register(root, f"runs:/{run.info.run_id}/model", "--name", "clf", "--alias", "champion")
    cfg = compose_config(tiny_overrides(root, image_folder))
    test = load_task(cfg.task, cfg.paths).splits["test"]
    names = sorted(Path(image_folder).iterdir())
    folder = tmp_path / "to_predict"
    truth = {}
    for index, (source, label) in enumerate(zip(test.sources, test.labels, strict=True)):
        target = folder / ("z" if index % 2 else "a") / f"{index:03d}.png"  # not class folders
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(image_folder) / source, target)
        truth[str(target)] = names[label].name
    (folder / "a" / "broken.png").write_text("not an image")
    (folder / "z" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    output = tmp_path / "predictions.csv"
    store_files = {p: p.stat().st_mtime_ns for p in (root / "mlruns").rglob("*")}
    result = subprocess.run(
        in_mount_namespace(
            [read_only(root / "mlruns")],
            [
                sys.executable,
                "-m",
                "experiments.predict",
                f"paths.root_dir={root}",
                "model=models:/clf@champion",
                f"input={folder}",
                f"output={output}",
            ],
        ),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "2 skipped" in log and "skipping" in log and "broken.png" in log
    assert f"skipping 1 broken link(s) under {folder}: {folder / 'z' / 'gone.png'}" in log
    assert {p: p.stat().st_mtime_ns for p in (root / "mlruns").rglob("*")} == store_files
    rows = list(csv.DictReader(output.open()))
    assert len(rows) == len(test.labels)
    assert {r["class"] for r in rows} <= {"class_0", "class_1", "class_2"}
    assert all(r["class"] == r["top1_class"] for r in rows)
    assert all(float(r["top1_probability"]) >= float(r["top2_probability"]) for r in rows)
    accuracy = sum(r["class"] == truth[r["path"]] for r in rows) / len(rows)
    assert accuracy == pytest.approx(run.data.metrics["test_accuracy"])


def test_predict_refuses_a_folder_without_images(store, tmp_path):
    root, run, _ = store
    register(root, f"runs:/{run.info.run_id}/model", "--name", "clf", "--alias", "champion")
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "notes.txt").write_text("hello")
    for folder, says in (("empty", "holds no files"), ("texts", "none of its 1 files")):
        result = predict_cli(root, "model=models:/clf@champion", f"input={tmp_path / folder}")
        assert result.returncode == 2, result.stderr[-2000:]
        (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
        assert says in line


def store_uri(root: Path) -> str:
    return f"sqlite:///{root}/mlruns/mlflow.db"


def decoded_test_split(root: Path, image_folder):
    """The run's test split, decoded as training decoded it."""
    from experiments.data.tasks import load_task

    cfg = compose_config(tiny_overrides(root, image_folder))
    return load_task(cfg.task, cfg.paths).splits["test"]


def test_served_model_answers_http_with_class_names_and_the_runs_accuracy(store, image_folder):
    """A real `mlflow models serve` of models:/clf@champion answers a real HTTP request of
    uint8 images with class names and probabilities: the run's test accuracy."""
    root, run, _ = store
    register(root, f"runs:/{run.info.run_id}/model", "--name", "clf", "--alias", "champion")
    test = decoded_test_split(root, image_folder)
    server = ModelServer("models:/clf@champion", store_uri(root)).start(timeout=240)
    try:
        status, answer = server.invoke({"inputs": test.images.tolist()})
        assert status == 200, answer
        rows = answer["predictions"]
        names = ["class_0", "class_1", "class_2"]
        assert len(rows) == len(test.labels)
        for row in rows:
            assert row["class"] in names and set(row["probabilities"]) == set(names)
            assert sum(row["probabilities"].values()) == pytest.approx(1.0)
            assert row["confidence"] == max(row["probabilities"].values())
        accuracy = np.mean([r["class"] == names[y] for r, y in zip(rows, test.labels, strict=True)])
        assert accuracy == pytest.approx(run.data.metrics["test_accuracy"])
        # An image the model cannot take: a 400 that names the shape it wants.
        status, answer = server.invoke({"inputs": np.zeros((1, 16, 16, 3), np.uint8).tolist()})
        assert (
            status == 400 and "does not match expected shape (-1, 32, 32, 3)" in answer["message"]
        )
    finally:
        server.stop()


def test_make_serve_takes_encoded_images_and_refuses_bad_pixels(store, image_folder, tmp_path):
    """`make serve` without an activated virtualenv: the test split's own files, sent encoded
    (base64, as they are on disk) and decoded by the server as training decoded them, score the
    run's test accuracy; a 16 x 16 array and the values 1.5 and 300 get a 400 that says why."""
    import base64

    root, run, _ = store
    register(root, f"runs:/{run.info.run_id}/model", "--name", "clf", "--alias", "champion")
    test = decoded_test_split(root, image_folder)
    server = project_model_server("models:/clf@champion", store_uri(root)).start(timeout=240)
    try:
        encoded = [base64.b64encode((image_folder / s).read_bytes()).decode() for s in test.sources]
        status, answer = server.invoke({"images": encoded})
        assert status == 200, answer
        names = ["class_0", "class_1", "class_2"]
        rows = answer["predictions"]
        accuracy = np.mean([r["class"] == names[y] for r, y in zip(rows, test.labels, strict=True)])
        assert accuracy == pytest.approx(run.data.metrics["test_accuracy"])
        # A larger JPEG, resized by the server: the answer of the array decode_image makes of it.
        from PIL import Image

        from experiments.data.decoding import decode_image

        photo = tmp_path / "photo.jpg"
        Image.fromarray(test.images[0]).resize((96, 96)).save(photo, quality=90)
        status, sent = server.invoke({"images": [base64.b64encode(photo.read_bytes()).decode()]})
        decoded = decode_image(photo, (32, 32)).image
        assert status == 200 and sent == server.invoke({"inputs": [decoded.tolist()]})[1]
        for body, says in (
            (
                {"inputs": np.zeros((1, 16, 16, 3), int).tolist()},
                "takes 32 x 32 x 3 images; got 16",
            ),
            (
                {"inputs": np.full((1, 32, 32, 3), 1.5).tolist()},
                "integers from 0 to 255; found 1.5",
            ),
            (
                {"inputs": np.full((1, 32, 32, 3), 300).tolist()},
                "integers from 0 to 255; found 300",
            ),
            ({"images": ["not base64!"]}, "images[0] is not base64 text"),
            ({"images": [base64.b64encode(b"text").decode()]}, "images[0] is not a decodable"),
        ):
            status, answer = server.invoke(body)
            assert status == 400 and says in answer["message"], answer
        status, _ = server.invoke({"inputs": test.images[:2].tolist()})
        assert status == 200  # and it keeps serving
    finally:
        server.stop()


def export_cli(root: Path, *args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "experiments.export", *args, "--tracking-uri", store_uri(root)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def test_export_saved_model_predicts_the_runs_test_accuracy(store, image_folder, tmp_path):
    import json

    import tensorflow as tf

    root, run, _ = store
    register(root, f"runs:/{run.info.run_id}/model", "--name", "clf", "--alias", "champion")
    output = tmp_path / "clf"
    result = export_cli(
        root, "models:/clf@champion", "--format", "saved_model", "--output", str(output)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"as saved_model to {output}" in result.stdout
    classes = json.loads((output / "classes.json").read_text())
    assert classes == {
        "class_names": ["class_0", "class_1", "class_2"],
        "source_run_id": run.info.run_id,
    }
    test = decoded_test_split(root, image_folder)
    exported = tf.saved_model.load(str(output))
    predicted = np.asarray(exported.serve(tf.constant(test.images.astype("float32"))))
    accuracy = np.mean(predicted.argmax(axis=1) == test.labels)
    assert accuracy == pytest.approx(run.data.metrics["test_accuracy"])
    # Never over an earlier export.
    again = export_cli(
        root, "models:/clf@champion", "--format", "saved_model", "--output", str(output)
    )
    assert again.returncode == 2 and f"--output {output} exists" in again.stderr


@pytest.mark.parametrize("disk", ["read_only", "full"])
def test_export_to_a_read_only_or_full_disk_is_one_line_and_leaves_nothing(store, tmp_path, disk):
    """The folder the export goes to cannot take it: one line, exit 2, and no staging folder
    left there (the file system is checked from inside the namespace that mounts it)."""
    root, run, _ = store
    register(root, f"runs:/{run.info.run_id}/model", "--name", "clf", "--alias", "champion")
    place = tmp_path / "exports"
    place.mkdir()
    mount = read_only(place) if disk == "read_only" else full_disk(place, 512)
    export = [
        sys.executable,
        "-m",
        "experiments.export",
        "models:/clf@champion",
        "--format",
        "saved_model",
        "--output",
        str(place / "clf"),
        "--tracking-uri",
        store_uri(root),
    ]
    script = '"$@"; status=$?; echo "left: $(ls -A "$0")"; exit $status'
    result = subprocess.run(
        in_mount_namespace([mount], ["sh", "-c", script, str(place), *export]),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    says = {
        "read_only": f"--output {place / 'clf'}: {place} is not writable (a read-only file system)",
        "full": f"no space left writing {place / 'clf'} (No space left on device)",
    }[disk]
    assert says in line, line
    assert result.stdout.splitlines()[-1] == "left: "


def test_export_onnx_takes_one_image_input_and_predicts_the_runs_test_accuracy(
    store, image_folder, tmp_path
):
    """VGG16's preprocessing (a mean pixel) no longer becomes a second ONNX input: the file has
    one input, and onnxruntime scores the run's test accuracy on the decoded test split."""
    import json

    import onnxruntime

    root, run, _ = store
    register(root, f"runs:/{run.info.run_id}/model", "--name", "clf", "--alias", "champion")
    output = tmp_path / "clf.onnx"
    result = export_cli(root, "models:/clf@champion", "--format", "onnx", "--output", str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"as onnx to {output}" in result.stdout and "np.object" not in result.stderr
    classes = json.loads(output.with_suffix(".classes.json").read_text())
    assert classes["class_names"] == ["class_0", "class_1", "class_2"]
    session = onnxruntime.InferenceSession(str(output))
    (image,) = session.get_inputs()
    test = decoded_test_split(root, image_folder)
    (predicted,) = session.run(None, {image.name: test.images.astype("float32")})
    accuracy = np.mean(predicted.argmax(axis=1) == test.labels)
    assert accuracy == pytest.approx(run.data.metrics["test_accuracy"])


@pytest.mark.parametrize(
    ("constructor", "module"),
    [("MobileNetV2", "mobilenet_v2"), ("EfficientNetB0", "efficientnet")],
)
def test_onnx_export_of_batchnorm_backbones_matches_keras(constructor, module, tmp_path):
    """Batch-normalised backbones, built as a run builds them: MobileNetV2 (x / 127.5 - 1) and
    EfficientNetB0, whose Normalization layer's statistics tf2onnx took for two more inputs.
    The file has one input and predicts as the Keras model, within the check's 1e-4."""
    import keras
    import onnxruntime

    from experiments.model.export import TOLERANCE, check, export, exported_predict

    base = getattr(keras.applications, constructor)(
        include_top=False, weights=None, input_shape=(32, 32, 3)
    )
    head = keras.Sequential(
        [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3, "softmax")]
    )
    inputs = keras.Input((32, 32, 3), name="image")
    x = getattr(keras.applications, module).preprocess_input(inputs)
    model = keras.Model(inputs, head(base(x, training=False)))
    output = tmp_path / f"{module}.onnx"
    export(model, "onnx", output, module)
    assert len(onnxruntime.InferenceSession(str(output)).get_inputs()) == 1
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    assert check(model, exported_predict(output, "onnx"), images) <= TOLERANCE


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["models:/clf@nobody", "--format", "saved_model"], "the registry has no alias 'nobody'"),
        (["models:/clf@champion", "--format", "onnx"], "needs a package this environment lacks"),
    ],
)
def test_a_failed_export_is_one_line_and_writes_nothing(store, tmp_path, args, says):
    root, run, _ = store
    register(root, f"runs:/{run.info.run_id}/model", "--name", "clf", "--alias", "champion")
    output = tmp_path / "out" / "model.onnx"
    # ONNX without its exporter: the onnx extra not installed.
    env = env_without(tmp_path, "tf2onnx")
    result = export_cli(root, *args, "--output", str(output), env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert says in line
    assert not output.exists() and not list(output.parent.glob(".export-*"))


@pytest.fixture(scope="module")
def challenger(store, image_folder):
    """A second model, trained for one epoch on another seed: champion and challenger."""
    from experiments.pipeline.run import train

    root, run, _ = store
    train(
        compose_config([*tiny_overrides(root, image_folder), "trainer.epochs=1", "trainer.seed=11"])
    )
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    newest = runs_of(root, "folder")[-1]
    register(root, f"runs:/{run.info.run_id}/model", "--name", "cmp", "--alias", "champion")
    register(root, f"runs:/{newest.info.run_id}/model", "--name", "cmp", "--alias", "challenger")
    return root, run, newest


def evaluate_cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    return hydra_cli("evaluate", root, *args)


def test_a_challenger_is_compared_with_the_champion_on_the_same_images(challenger, image_folder):
    import mlflow
    from scipy import stats

    root, champion, newest = challenger
    result = evaluate_cli(root, "model=models:/cmp@challenger", "compare_to=champion")
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    challenger_accuracy = newest.data.metrics["test_accuracy"]
    champion_accuracy = champion.data.metrics["test_accuracy"]
    assert f"test accuracy of models:/cmp@challenger  {challenger_accuracy:.4f}" in log
    assert f"test accuracy of models:/cmp@champion    {champion_accuracy:.4f}" in log
    assert f"difference {challenger_accuracy - champion_accuracy:+.4f}" in log
    # McNemar's exact test, recomputed here from both models' predictions on the test split.
    test = decoded_test_split(root, image_folder)
    client_for(root)
    right = [
        mlflow.keras.load_model(f"models:/cmp@{alias}").predict(test.images, verbose=0).argmax(1)
        == test.labels
        for alias in ("challenger", "champion")
    ]
    b, c = int((right[0] & ~right[1]).sum()), int((~right[0] & right[1]).sum())
    expected = stats.binomtest(b, b + c).pvalue if b + c else 1.0
    assert f"{b} right only by the first, {c} only by the second" in log
    (evaluation,) = runs_of(root, "folder", "tags.run_type = 'evaluate'")
    metrics = evaluation.data.metrics
    assert metrics["mcnemar_p_value"] == pytest.approx(expected)
    assert metrics["compared_test_accuracy"] == pytest.approx(champion_accuracy)
    assert metrics["test_accuracy"] == pytest.approx(challenger_accuracy)
    assert evaluation.data.tags["compare_to"] == "models:/cmp@champion"
    assert evaluation.data.tags["source_run_id"] == newest.info.run_id


def test_compare_to_an_alias_needs_a_registered_model(store):
    root, run, _ = store
    result = evaluate_cli(root, f"model=runs:/{run.info.run_id}/model", "compare_to=champion")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert "needs model=models:/<name>@..." in line


def test_paired_comparison_counts_the_images_only_one_model_gets_right():
    from scipy import stats

    from experiments.evaluation.reports import Evaluation, paired_comparison

    labels = np.zeros(20, np.int32)
    first = np.array([0] * 15 + [1] * 5)  # right on the first 15
    second = np.array([1] * 3 + [0] * 9 + [1] * 8)  # right on images 3..11

    def evaluation(predictions):
        return Evaluation(
            0.0, float(np.mean(predictions == labels)), labels, predictions, None, None
        )

    paired = paired_comparison(evaluation(first), evaluation(second))
    assert (paired.only_this_right, paired.only_other_right) == (6, 0)
    assert paired.difference == pytest.approx(15 / 20 - 9 / 20)
    assert paired.p_value == pytest.approx(stats.binomtest(6, 6).pvalue)  # 2 * 0.5**6
    low, high = paired.ci95
    assert low < paired.difference < high
    same = paired_comparison(evaluation(first), evaluation(first))
    assert same.p_value == 1.0 and same.ci95 == (0.0, 0.0)


def test_a_registry_on_a_real_mlflow_server(tmp_path, image_folder):
    """Train against a real `mlflow server`, register there with an alias, move the alias, and
    predict through models:/ from the server: the run's test accuracy."""
    from experiments.pipeline.run import train

    server = MlflowServer(tmp_path / "server").start()
    try:
        root = tmp_path / "client"
        train(
            compose_config(
                [
                    *tiny_overrides(root, image_folder),
                    f"tracking.uri={server.url}",
                    "tracking.log_model=true",
                ]
            )
        )
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        import mlflow

        client = mlflow.MlflowClient(server.url)
        (run,) = client.search_runs(
            [client.get_experiment_by_name("folder").experiment_id],
            "attributes.status = 'FINISHED'",
        )
        from experiments.register import main

        uri = f"runs:/{run.info.run_id}/model"
        for _ in range(2):
            assert (
                main([uri, "--name", "remote", "--alias", "champion", "--tracking-uri", server.url])
                == 0
            )
        version = client.get_model_version_by_alias("remote", "champion")
        assert version.version == "2" and version.run_id == run.info.run_id
        folder = tmp_path / "images"
        test = decoded_test_split(root, image_folder)
        names = sorted(p.name for p in Path(image_folder).iterdir())
        for index, source in enumerate(test.sources):
            target = folder / f"{index:03d}.png"
            target.parent.mkdir(exist_ok=True)
            shutil.copy(Path(image_folder) / source, target)
        output = tmp_path / "predictions.csv"
        result = predict_cli(
            root, "model=models:/remote@champion", f"input={folder}", f"output={output}",
            f"tracking.uri={server.url}",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        rows = list(csv.DictReader(output.open()))
        truth = [names[y] for y in test.labels]
        accuracy = np.mean([r["class"] == t for r, t in zip(rows, truth, strict=True)])
        assert accuracy == pytest.approx(run.data.metrics["test_accuracy"])
    finally:
        server.stop()


def test_the_misclassified_grid_shows_the_wrong_images_most_confident_first(tmp_path):
    from types import SimpleNamespace

    import matplotlib
    from PIL import Image

    from experiments.evaluation.reports import Evaluation, misclassified_png

    matplotlib.use("Agg")
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]  # right, wrong at 60%, wrong at 90%
    images = np.array([np.full((40, 40, 3), c, np.uint8) for c in colors])
    probabilities = np.array([[0.8, 0.2], [0.4, 0.6], [0.1, 0.9]], np.float32)
    labels, predictions = np.array([0, 0, 0]), probabilities.argmax(1)
    evaluation = Evaluation(0.5, 1 / 3, labels, predictions, probabilities.max(1), probabilities)
    path = misclassified_png(
        tmp_path / "m.png", evaluation, SimpleNamespace(images=images), ["cat", "dog"]
    )
    picture = np.asarray(Image.open(path).convert("RGB")).astype(int)

    def columns_of(color) -> np.ndarray:
        return np.flatnonzero((np.abs(picture - color).sum(-1) < 30).any(0))

    assert not columns_of(colors[0]).size  # a right prediction is not shown
    assert columns_of(colors[2]).size and columns_of(colors[1]).size
    assert columns_of(colors[2]).max() < columns_of(colors[1]).min()  # 90% before 60%


def test_an_export_killed_mid_way_leaves_nothing_the_next_does_not_remove(store, tmp_path):
    """kill -9 skips every cleanup: the staging folder it leaves, named for its dead owner, is
    removed by the next export into the same folder, which then leaves none of its own."""
    import time

    root, run, _ = store
    model = f"runs:/{run.info.run_id}/model"
    command = [sys.executable, "-m", "experiments.export", model, "--format", "saved_model"]
    command += ["--tracking-uri", store_uri(root), "--output", str(tmp_path / "first")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(".export-*/first/*")):  # staging has begun writing
        assert process.poll() is None and time.monotonic() < deadline, "export ended first"
        time.sleep(0.05)
    process.kill()
    process.wait(timeout=60)
    (left,) = tmp_path.glob(".export-*")
    result = export_cli(
        root, model, "--format", "saved_model", "--output", str(tmp_path / "second")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not left.exists() and not list(tmp_path.glob(".export-*"))
    assert (tmp_path / "second" / "classes.json").is_file() and not (tmp_path / "first").exists()
