"""Data input: decoding, odd modes, bad files, splits, the decode cache and input errors."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from omegaconf import OmegaConf

from experiments.core.errors import ExperimentError
from experiments.data import decoding
from experiments.data.splits import split_per_class
from experiments.data.tasks import load_task

from conftest import write_class_folders


def task_cfg(path, **extra):
    cfg = {
        "name": "t",
        "loader": "folder",
        "path": str(path),
        "image_size": [16, 16],
        "split": [0.5, 0.25, 0.25],
        "per_class": None,
        "split_seed": 1337,
    }
    return OmegaConf.create(cfg | extra)


@pytest.fixture
def paths(tmp_path):
    return OmegaConf.create({"cache_dir": str(tmp_path / "cache"), "data_dir": str(tmp_path)})


def test_split_reproduces_the_reference_flower_counts():
    sizes = {"daisy": 501, "dandelion": 646, "rose": 497, "sunflower": 495, "tulip": 607}
    expected = {
        "daisy": (250, 125, 126),
        "dandelion": (323, 161, 162),
        "rose": (248, 124, 125),
        "sunflower": (247, 123, 125),
        "tulip": (303, 151, 153),
    }
    labels = np.concatenate([np.full(n, i) for i, n in enumerate(sizes.values())])
    index = split_per_class(labels, [0.5, 0.25, 0.25], seed=7)
    for i, name in enumerate(sizes):
        got = tuple(int((labels[index[s]] == i).sum()) for s in ("train", "val", "test"))
        assert got == expected[name]
    everything = np.concatenate(list(index.values()))
    assert sorted(everything.tolist()) == list(range(len(labels)))  # disjoint and complete
    again = split_per_class(labels, [0.5, 0.25, 0.25], seed=7)
    assert all(np.array_equal(index[s], again[s]) for s in index)


def test_odd_modes_are_converted_and_bad_files_skipped(tmp_path, paths, caplog):
    from PIL import Image

    root = write_class_folders(tmp_path / "data", classes=2, per_class=8, size=20)
    odd = root / "class_0"
    Image.new("L", (20, 20), 128).save(odd / "gray.png")
    Image.new("RGBA", (20, 20), (10, 20, 30, 40)).save(odd / "rgba.png")
    Image.new("P", (20, 20)).save(odd / "palette.png")
    Image.new("CMYK", (20, 20), (0, 255, 0, 0)).save(odd / "cmyk.jpg")
    Image.new("RGB", (20, 20), (1, 2, 3)).save(odd / "full.jpg")
    (odd / "truncated.jpg").write_bytes((odd / "full.jpg").read_bytes()[:200])
    (odd / "notes.txt").write_text("not an image")
    (odd / "fake.jpg").write_bytes(b"\x00" * 100)
    with caplog.at_level(logging.WARNING, logger="experiments.data"):
        task = load_task(task_cfg(root), paths)
    skipped = sorted(p.rsplit("/", 1)[-1] for p in task.skipped)
    assert skipped == ["fake.jpg", "notes.txt", "truncated.jpg"]
    assert sum("skipping" in r.message for r in caplog.records) == 3
    sources = [s for split in task.splits.values() for s in split.sources]
    for name in ("gray.png", "rgba.png", "palette.png", "cmyk.jpg"):
        assert f"class_0/{name}" in sources
    assert sum(len(s.labels) for s in task.splits.values()) == 8 + 13
    for split in task.splits.values():
        assert split.images.dtype == np.uint8 and split.images.shape[1:] == (16, 16, 3)
        assert len(split.images) == len(split.labels) == len(split.sources)
        if "class_0/gray.png" in split.sources:  # rows stay aligned past the skipped files
            assert (split.images[split.sources.index("class_0/gray.png")] == 128).all()


# What a camera meant, from what the file stores (EXIF 2.3, tag 0x0112): the transforms that
# turn the stored rows and columns upright, written from the standard rather than from Pillow.
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # turned 180
    4: lambda a: a[::-1],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # mirrored along the main diagonal
    6: lambda a: np.rot90(a, -1),  # turned 90 degrees clockwise to be upright
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # mirrored along the other diagonal
    8: lambda a: np.rot90(a, 1),  # turned 90 degrees counterclockwise to be upright
}


def quadrants(height: int, width: int) -> np.ndarray:
    """An image whose four quadrants have four colours, so that any turn or mirror shows."""
    image = np.zeros((height, width, 3), np.uint8)
    h, w = height // 2, width // 2
    image[:h, :w], image[:h, w:] = (230, 30, 30), (30, 230, 30)
    image[h:, :w], image[h:, w:] = (30, 30, 230), (230, 230, 30)
    return image


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation, tmp_path):
    """A phone's JPEG stores the sensor's rows and says how to turn them: read it upright."""
    from PIL import Image

    from experiments.data.decoding import decode_image

    upright = quadrants(48, 32)  # portrait, as the camera meant it
    stored = {  # what the file holds: the inverse of each transform
        1: upright,
        2: upright[:, ::-1],
        3: upright[::-1, ::-1],
        4: upright[::-1],
        5: upright.transpose(1, 0, 2),
        6: np.rot90(upright, 1),
        7: upright[::-1, ::-1].transpose(1, 0, 2),
        8: np.rot90(upright, -1),
    }[orientation]
    assert np.array_equal(UPRIGHT[orientation](stored), upright)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"orientation-{orientation}.jpg"
    Image.fromarray(np.ascontiguousarray(stored)).save(path, quality=95, exif=exif)
    decoded = decode_image(path, (48, 32))
    assert decoded.image.shape == (48, 32, 3)
    error = np.abs(decoded.image.astype(int) - upright.astype(int))
    assert np.median(error) < 8, f"orientation {orientation} decoded wrongly"
    assert decoded.turned == (orientation != 1)


def test_a_large_jpeg_decodes_at_a_reduced_scale_and_the_same_picture(tmp_path, monkeypatch):
    """A 2,400 x 1,600 JPEG for a 64 x 64 model decodes at 1/8 of its size (300 x 200, which
    still covers 64), turned upright; the picture is the one a full decode and resize gives."""
    from PIL import Image, ImageFile

    from experiments.data.decoding import decode_image

    photo = np.kron(quadrants(24, 16), np.ones((100, 100, 1), np.uint8))  # 2,400 x 1,600
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "photo.jpg"
    Image.fromarray(np.ascontiguousarray(np.rot90(photo, 1))).save(path, quality=95, exif=exif)
    loaded = []
    original = ImageFile.ImageFile.load

    def load(image):
        loaded.append(image.size)
        return original(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    decoded = decode_image(path, (64, 64))
    assert loaded[0] == (300, 200)  # stored landscape: the rows as the sensor wrote them
    monkeypatch.setattr(ImageFile.ImageFile, "load", original)
    with Image.open(path) as image:  # the whole image, then resized
        full = np.asarray(image.transpose(Image.Transpose.ROTATE_270).resize((64, 64)))
    assert decoded.turned and decoded.image.shape == (64, 64, 3)
    assert np.abs(decoded.image.astype(int) - full.astype(int)).mean() < 3


def test_images_over_the_pixel_limit_are_skipped_in_one_line(tmp_path, paths, caplog):
    """Over `task.max_image_pixels` an image is skipped with one warning naming it and its size,
    never Pillow's DecompressionBombWarning; raising the limit decodes it (a cache of its own);
    a bad limit is one line."""
    import logging
    import warnings

    from PIL import Image

    from experiments.core.errors import ExperimentError

    root = write_class_folders(tmp_path / "data", classes=2, per_class=8, size=20)
    Image.new("RGB", (1200, 1000), (9, 9, 9)).save(root / "class_0" / "huge.png")
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING):
        warnings.simplefilter("error")  # any Python warning would fail here
        task = load_task(task_cfg(root, max_image_pixels=1_000_000), paths)
    assert [p.rsplit("/", 1)[-1] for p in task.skipped] == ["huge.png"]
    (line,) = [r.getMessage() for r in caplog.records if "huge.png" in r.getMessage()]
    assert "1200 x 1000 pixels, over the limit of 1,000,000; raise max_image_pixels" in line
    assert load_task(task_cfg(root), paths).skipped == []  # Pillow's limit: decoded
    with pytest.raises(ExperimentError, match="max_image_pixels=lots is not a count of pixels"):
        load_task(task_cfg(root, max_image_pixels="lots"), paths)


def test_turned_images_are_counted_with_the_task(tmp_path, paths):
    from PIL import Image

    root = write_class_folders(tmp_path / "data", classes=2, per_class=8, size=20)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(quadrants(20, 20)).save(root / "class_1" / "phone.jpg", exif=exif)
    task = load_task(task_cfg(root), paths)
    assert [p.rsplit("/", 1)[-1] for p in task.turned] == ["phone.jpg"]
    assert load_task(task_cfg(root), paths).turned == task.turned  # kept with the cache


def ramp(dtype, top) -> np.ndarray:
    """A horizontal ramp from 0 to `top`, 16 rows of 256 columns."""
    return np.tile(np.linspace(0, top, 256), (16, 1)).astype(dtype)


@pytest.mark.parametrize(
    ("mode", "suffix", "values", "expected"),
    [
        # 16-bit grayscale (PNG, TIFF): 0-65535 is scaled into 0-255, not clipped to white.
        ("I;16", "png", ramp(np.uint16, 65535), ramp(np.float64, 255)),
        # 32-bit integer samples holding 16-bit data, as Pillow opens many 16-bit files.
        ("I", "tif", ramp(np.int32, 65535), ramp(np.float64, 255)),
        # Float samples in 0-1.
        ("F", "tif", ramp(np.float32, 1.0), ramp(np.float64, 255)),
    ],
)
def test_deep_images_are_scaled_into_0_255(mode, suffix, values, expected, tmp_path):
    from PIL import Image

    from experiments.data.decoding import decode_image

    path = tmp_path / f"deep.{suffix}"
    Image.fromarray(values, mode=mode if mode != "I;16" else None).save(path)
    with Image.open(path) as opened:
        assert opened.mode.startswith(mode.split(";")[0])
    decoded = decode_image(path, values.shape).image
    assert np.abs(decoded[..., 0] - expected).max() <= 1
    assert (decoded[..., 0] == decoded[..., 1]).all() and (decoded[..., 1] == decoded[..., 2]).all()
    assert abs(decoded.mean() - 127.5) < 1  # clipped, it was 254.5


@pytest.mark.parametrize(
    ("mode", "values"),
    [("I", ramp(np.int32, 200000)), ("F", ramp(np.float32, 1000.0))],
)
def test_deep_images_out_of_range_are_refused_with_one_warning(mode, values, tmp_path, caplog):
    from PIL import Image

    from experiments.data.decoding import decode_image

    path = tmp_path / "deep.tif"
    Image.fromarray(values, mode=mode).save(path)
    with caplog.at_level(logging.WARNING, logger="experiments.data"):
        assert decode_image(path, (16, 16)) is None
    (record,) = caplog.records
    assert str(path) in record.message and "outside" in record.message


def test_modes_with_alpha_palette_and_cmyk_decode_to_their_colours(tmp_path):
    from PIL import Image

    from experiments.data.decoding import decode_image

    gray = ramp(np.uint8, 255)
    alpha = np.full_like(gray, 7)
    la = Image.merge("LA", [Image.fromarray(gray), Image.fromarray(alpha)])
    la.save(tmp_path / "la.png")
    rgb = quadrants(16, 256)
    palette = Image.fromarray(rgb).quantize(colors=4)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "palette.png", transparency=0)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.tif")
    size = (16, 256)
    la_decoded = decode_image(tmp_path / "la.png", size).image
    assert np.array_equal(la_decoded, np.repeat(gray[..., None], 3, axis=2))  # alpha dropped
    assert np.array_equal(decode_image(tmp_path / "palette.png", size).image, rgb)
    assert np.array_equal(decode_image(tmp_path / "cmyk.tif", size).image, rgb)


def test_decoded_images_are_cached_and_reused(tmp_path, paths, monkeypatch):
    from experiments.data import arrays

    root = write_class_folders(tmp_path / "data", classes=2, per_class=8, size=20)
    monkeypatch.setattr(arrays, "CHUNK_BYTES", 3 * 16 * 16 * 3)  # decoded 3 images at a time
    first = load_task(task_cfg(root), paths)
    (cache,) = (tmp_path / "cache" / "images").iterdir()
    assert sorted(p.name for p in cache.iterdir()) == [
        "meta.json", "test.npy", "test_labels.npy", "train.npy", "train_labels.npy", "val.npy",
        "val_labels.npy",
    ]  # fmt: skip
    for split in first.splits.values():  # read from disk, each image of its class's colour
        assert isinstance(split.images, np.memmap)
        dominant = split.images.reshape(len(split.images), -1, 3).mean(axis=1).argmax(axis=1)
        np.testing.assert_array_equal(dominant, split.labels)
    monkeypatch.setattr(decoding, "decode_image", lambda *a: pytest.fail("decoded again"))
    second = load_task(task_cfg(root), paths)
    assert second.digest() == first.digest()
    np.testing.assert_array_equal(second.splits["test"].images, first.splits["test"].images)


def test_train_val_test_folders_are_used_as_given(tmp_path, paths):
    for split, n in (("train", 6), ("val", 3), ("test", 2)):
        write_class_folders(tmp_path / "data" / split, classes=2, per_class=n, size=20)
    task = load_task(task_cfg(tmp_path / "data"), paths)
    assert task.class_names == ["class_0", "class_1"]
    assert {s: len(task.splits[s].labels) for s in task.splits} == {
        "train": 12,
        "val": 6,
        "test": 4,
    }


def test_digits_task_is_rgb_and_stratified(paths):
    cfg = OmegaConf.create(
        {
            "name": "digits",
            "loader": "digits",
            "image_size": [32, 32],
            "split": [0.5, 0.25, 0.25],
            "per_class": None,
            "split_seed": 1,
        }
    )
    task = load_task(cfg, paths)
    assert task.num_classes == 10 and task.image_shape == (32, 32, 3)
    assert sum(len(s.labels) for s in task.splits.values()) == 1797
    train = task.splits["train"]
    assert np.array_equal(train.images[..., 0], train.images[..., 2])
    assert min(task.counts()["test"].values()) >= 40


def test_sampled_task_replaces_undecodable_files(tmp_path, paths):
    root = write_class_folders(tmp_path / "data", classes=2, per_class=12, size=20)
    for i in range(3):
        (root / "class_1" / f"bad_{i}.jpg").write_bytes(b"broken")
    task = load_task(task_cfg(root, per_class=[4, 2, 2]), paths)
    assert task.counts() == {
        s: {"class_0": n, "class_1": n} for s, n in (("train", 4), ("val", 2), ("test", 2))
    }
    assert not any("bad_" in s for split in task.splits.values() for s in split.sources)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "is not a directory"),
        ("empty_class", "is empty"),
        ("one_class", "at least 2 class subfolders"),
        ("empty_split", "split of task 't' is empty"),
        ("partial_splits", "but no test/"),
    ],
)
def test_bad_input_stops_with_a_clear_message(setup, message, tmp_path, paths):
    root = tmp_path / "data"
    if setup == "empty_class":
        write_class_folders(root, classes=2, per_class=4, size=20)
        (root / "class_2").mkdir()
    elif setup == "one_class":
        write_class_folders(root, classes=1, per_class=4, size=20)
    elif setup == "empty_split":
        write_class_folders(root, classes=2, per_class=1, size=20)
    elif setup == "partial_splits":
        write_class_folders(root / "train", classes=2, per_class=2, size=20)
        write_class_folders(root / "val", classes=2, per_class=2, size=20)
    with pytest.raises(ExperimentError, match=message):
        load_task(task_cfg(root), paths)


def test_bad_split_and_size_values_are_explained(tmp_path, paths):
    root = write_class_folders(tmp_path / "data", classes=2, per_class=4, size=20)
    with pytest.raises(ExperimentError, match="sum to 1"):
        load_task(task_cfg(root, split=[0.5, 0.5, 0.5]), paths)
    with pytest.raises(ExperimentError, match="image_size"):
        load_task(task_cfg(root, image_size=[4]), paths)


def test_a_staging_folder_of_a_dead_process_is_removed_and_others_kept(tmp_path):
    import subprocess
    import sys

    import psutil

    from experiments.core.files import staging_dir
    from experiments.core.processes import this_process

    gone = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    started = psutil.Process(gone.pid).create_time()
    gone.wait()
    me = this_process()
    dead = tmp_path / f".x.{me.host}~{gone.pid}~{started:.0f}~abc"
    alive = tmp_path / f".x.{me.host}~{me.pid}~{me.started:.0f}~def"  # another of this process
    foreign = tmp_path / f".x.elsewhere~{gone.pid}~{started:.0f}~ghi"  # another host's
    for folder in (dead, alive, foreign):
        (folder / "part").mkdir(parents=True)
    with staging_dir(tmp_path, ".x.") as mine:
        assert mine.is_dir() and mine.name.startswith(f".x.{me.host}~{me.pid}~")
    assert not dead.exists() and alive.exists() and foreign.exists() and not mine.exists()
