"""One run over several devices (`trainer.devices`, keras.distribution on JAX), tested on virtual
CPU devices (`--xla_force_host_platform_device_count`): the same accuracy as on one device,
every batch a multiple of the devices, what the run records, and the refusals."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import tiny_overrides
from helpers import client_for, runs_of

# JAX reads the device count once, when it starts: each run is a process of its own.
TWO_CPU_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


def train(root, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "experiments.train", f"paths.root_dir={root}", *overrides],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **TWO_CPU_DEVICES},
    )


def test_batches_are_multiples_of_the_devices():
    """Training leaves out the last rows of an epoch's order that the devices cannot split,
    others each epoch; validation adds rows that weigh nothing; predictions fill up."""
    from experiments.data.inputs import Batches

    x = np.arange(23, dtype=np.uint8)[:, None]
    y = np.arange(23)
    training = Batches(x, y, batch_size=8, shuffle=True, seed=1, devices=2)
    sizes = [len(training[i][1]) for i in range(len(training))]
    assert sizes == [8, 8, 6]  # 23 rows: the 7 of the last batch cut to 6
    left_out = []
    for _ in range(5):
        seen = np.concatenate([training[i][1] for i in range(len(training))])
        assert len(set(seen)) == 22
        left_out.append(set(y) - set(seen))
        training.on_epoch_end()
    assert len(set().union(*left_out)) > 1  # not the same image every epoch

    validation = Batches(x, y, batch_size=8, devices=2)
    *_, (inputs, labels, weights) = [validation[i] for i in range(len(validation))]
    assert len(inputs) == len(labels) == len(weights) == 8  # the last 7 rows and one of zeros
    assert weights.tolist() == [1] * 7 + [0]
    assert all(len(validation[i]) == 3 and validation[i][2].all() for i in range(2))
    # On one device nothing changes: the last batch keeps its 7 rows, no weights.
    assert [len(b[1]) for b in Batches(x, y, batch_size=8, shuffle=True)] == [8, 8, 7]
    assert len(Batches(x, y, batch_size=8)[2]) == 2


@pytest.mark.slow
def test_two_devices_train_the_quickstart_as_one_does(tmp_path):
    """The same seed on 1 and on 2 virtual CPU devices, the global batch fixed: the same
    accuracy on the quickstart's digits (within 0.5 points), and what the run records."""
    for devices in (1, 2):  # both trained before reading: reading points MLflow's env at one
        done = train(
            tmp_path / f"devices{devices}",
            "experiment=quickstart",
            "backend=jax",
            f"trainer.devices={devices}",
        )
        assert done.returncode == 0, done.stderr[-3000:]
    ((one,), (two,)) = (runs_of(tmp_path / f"devices{n}", "digits") for n in (1, 2))
    for metric in ("test_accuracy", "best_val_accuracy"):
        assert abs(one.data.metrics[metric] - two.data.metrics[metric]) <= 0.005, metric
    # 445 validation images: on 2 devices the last batch gains a row that weighs nothing, and
    # every epoch's validation loss and accuracy stay those of the real images.
    for metric in ("val_loss", "val_accuracy"):
        histories = [
            [
                m.value
                for m in sorted(
                    client_for(tmp_path / f"devices{n}").get_metric_history(
                        run.info.run_id, metric
                    ),
                    key=lambda m: m.step,
                )
            ]
            for n, run in ((1, one), (2, two))
        ]
        assert histories[0] == pytest.approx(histories[1], rel=1e-4), metric
    assert two.data.tags["devices"] == "2" and one.data.tags["devices"] == "1"
    assert two.data.tags["per_device_batch"] == str(int(one.data.params["trainer.batch_size"]) // 2)
    assert two.data.tags["mesh"] == "batch=2: cpu:0, cpu:1"
    assert two.data.params["trainer.devices"] == "2"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["inline", "fine_tune"])
def test_every_strategy_trains_on_two_devices(strategy, tmp_path, image_folder):
    """Inline and fine-tune (two-stage: the quickstart above), on splits the devices do not
    divide: 45 training images in batches of 8 (the last 5 cut to 4), 9 validation images (the
    last batch of 1 filled up with a row that weighs nothing)."""
    extra = ["strategy.epochs=2", "strategy.unfreeze_blocks=1"] if strategy == "fine_tune" else []
    done = train(
        tmp_path,
        *[o for o in tiny_overrides(tmp_path, image_folder) if not o.startswith("paths.root")],
        "backend=jax",
        "trainer.devices=2",
        "trainer.epochs=2",
        "task.split=[0.65,0.15,0.2]",
        f"strategy={strategy}",
        *extra,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = runs_of(tmp_path, "folder")
    assert run.info.status == "FINISHED" and run.data.tags["devices"] == "2"
    assert 0 <= run.data.metrics["val_accuracy"] <= 1 and "test_accuracy" in run.data.metrics


@pytest.mark.parametrize(
    ("overrides", "says", "limit"),
    [
        (["trainer.devices=2"], "Keras runs on JAX only; add backend=jax", 10),
        (["backend=jax", "trainer.devices=0"], "trainer.devices=0 must be at least 1", 10),
        (["backend=jax", "trainer.devices=many"], "trainer.devices=many is not an integer", 10),
        (
            ["backend=jax", "trainer.devices=3", "trainer.batch_size=8"],
            "trainer.batch_size=8 does not split evenly across trainer.devices=3; use a multiple",
            10,
        ),
        (
            ["backend=jax", "trainer.devices=4"],
            "trainer.devices=4, but this host has 2 cpu device(s) (cpu:0, cpu:1)",
            10,
        ),
    ],
)
def test_a_device_setting_that_cannot_run_is_one_line(
    overrides, says, limit, tmp_path, image_folder
):
    started = time.monotonic()
    done = train(
        tmp_path,
        *[o for o in tiny_overrides(tmp_path, image_folder) if not o.startswith("paths.root")],
        *overrides,
    )
    took = time.monotonic() - started
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert says in line and took < limit, f"{line} ({took:.1f} s)"
    assert not (tmp_path / "mlruns").exists()
