"""Export a logged or registered model for use outside Keras and MLflow:

    python -m experiments.export models:/flowers-classifier@champion --format saved_model
    python -m experiments.export runs:/<run id>/model --format onnx --output flowers.onnx

The export is Keras' own (`Model.export`); it takes float32 0-255 RGB images of the model's size
and returns the model's probabilities, with the class names beside it (`classes.json`). Before
it is moved into place it must predict as the logged model does on random images; otherwise
nothing is written.

Which format works on which backend (checked with TensorFlow 2.21, JAX 0.10, Keras 3.15):
saved_model on tensorflow and jax; onnx on tensorflow with the `onnx` extra (tf2onnx and
onnxruntime, which `make install` installs), for every backbone: the model is exported rebuilt
with its backbone's preprocessing inside a layer and EfficientNet's Normalization statistics as
constants (`model.export.preprocessing_in_a_layer`), since tf2onnx turns VGG's and ResNet's mean
pixel and EfficientNet's mean and variance into more inputs. The parity check runs the file in
onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from experiments import compose_project_config
from experiments.core.errors import ExperimentError
from experiments.core.files import check_writable, staging_dir, writing_in_one_line
from experiments.model.export import CHECK_IMAGES, FORMATS, check, export, exported_predict


def default_output(uri: str, run_id: str, fmt: str) -> Path:
    """exports/<name>-v<version> for a registered model (an alias moves, a version does not),
    exports/run-<id> for a run's; `.onnx` for ONNX."""
    from experiments import tracking

    parts = tracking.registry.registered(uri)
    if parts is not None:
        stem = f"{parts[0]}-v{tracking.registry.version_of(uri)}"
    else:
        stem = f"run-{run_id[:8]}"
    return Path("exports") / (stem + (".onnx" if fmt == "onnx" else ""))


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m experiments.export`."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="models:/<name>@<alias>, models:/<name>/<version>, runs:/…")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS))
    parser.add_argument("--output", type=Path, default=None, help="default: exports/<model>")
    parser.add_argument("--tracking-uri", default=None, help="default: tracking.uri")
    args = parser.parse_args(argv)
    project = compose_project_config()
    try:
        return run(args, project)
    except ExperimentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def run(args, project) -> int:
    from experiments.core.backend import use_backend
    from experiments.tracking.checks import check_store
    from experiments.tracking.registry import check_model_uri

    # The arguments and the store before the backend is imported: a typo costs a second, not 10.
    check_model_uri(args.model)
    if args.output:
        check_writable(args.output, f"--output {args.output}")
    uri = args.tracking_uri or str(project.tracking.uri)
    check_store(uri, must_exist=True, writes=False)
    backend = use_backend(str(project.backend))
    if backend not in FORMATS[args.format][1]:
        raise ExperimentError(
            f"--format {args.format} cannot be written on the {backend} backend; use one of "
            f"{', '.join(FORMATS[args.format][1])} (KERAS_BACKEND=...)"
        )
    from experiments import tracking

    tracking.open_store(uri, writes=False)
    source = tracking.registry.source_run(args.model)
    tracking.registry.require_model(source)
    output = args.output or default_output(args.model, source.run_id, args.format)
    if output.exists():
        raise ExperimentError(f"--output {output} exists; remove it or choose another path")
    class_names = tracking.registry.class_names(source)
    check_writable(output, f"--output {output}")
    model = tracking.load_model(args.model)
    images = np.random.default_rng(0).integers(
        0, 256, (CHECK_IMAGES, *model.input_shape[1:]), dtype=np.uint8
    )
    # Written beside its place and moved there whole, so a failed export leaves nothing.
    # One a killed export left (kill -9 skips every cleanup) is removed first.
    with writing_in_one_line(output), staging_dir(output.parent, ".export-") as tmp:
        staged = tmp / output.name
        try:
            export(model, args.format, staged, source.params.get("backbone.module"))
        except OSError:
            raise  # writing_in_one_line says it
        except Exception as err:  # TensorFlow reports a full disk in error types of its own
            if "No space left on device" not in str(err):
                raise
            raise ExperimentError(
                f"no space left writing {output} (No space left on device); free space there "
                f"or give another --output"
            ) from None
        gap = check(model, exported_predict(staged, args.format), images)
        classes = {"class_names": class_names, "source_run_id": source.run_id}
        if args.format == "saved_model":
            (staged / "classes.json").write_text(json.dumps(classes, indent=2))
            staged.rename(output)
        else:
            classes_file = output.with_suffix(".classes.json")
            classes_file.write_text(json.dumps(classes, indent=2))
            shutil.move(str(staged), output)
    print(
        f"exported {args.model} (run {source.run_id}) as {args.format} to {output}: "
        f"{CHECK_IMAGES} images predicted as the logged model does (largest difference "
        f"{gap:.2g}); it takes float32 0-255 RGB images of shape {model.input_shape[1:]}, "
        f"classes {', '.join(class_names)}"
    )
    return 0


if __name__ == "__main__":
    from experiments.cli import exit_with

    exit_with(main)
