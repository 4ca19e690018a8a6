"""Decoding image files once: RGB, upright by their EXIF orientation, 16-bit and float images
scaled rather than clipped, resized; a file that is not an image, or has more pixels than the
limit (`task.max_image_pixels`, Pillow's own by default), is skipped with one warning. A JPEG
is decoded at the smallest of its reduced scales that still covers the size asked for."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from experiments.core.errors import ExperimentError
from experiments.core.progress import progress
from experiments.data.arrays import RowWriter, chunk_rows, open_rows

log = logging.getLogger(__name__)


@dataclass
class Notes:
    """What decoding met: files skipped (not decodable, or values out of range) and files turned
    upright by their EXIF orientation."""

    skipped: list[str] = field(default_factory=list)
    turned: list[str] = field(default_factory=list)

    def __iadd__(self, other: Notes) -> Notes:
        self.skipped += other.skipped
        self.turned += other.turned
        return self


def decode_files(candidates: list[tuple[Path, int]], size: tuple[int, int]):
    """Decode (path, label) pairs in memory: images, labels, kept paths, notes."""
    chunks = []
    labels, kept, notes = _decode(candidates, size, chunks.append, "decoding")
    images = np.concatenate(chunks) if kept else np.zeros((0, *size, 3), np.uint8)
    return images, labels, kept, notes


def decode_to_file(candidates: list[tuple[Path, int]], size: tuple[int, int], path: Path, name):
    """Decode (path, label) pairs into a `.npy` file at `path`, chunk by chunk: the images
    memory-mapped, labels, kept paths, notes."""
    writer = RowWriter(path, len(candidates), (*size, 3), np.uint8)
    labels, kept, notes = _decode(candidates, size, writer.append, f"decoding {name}")
    return open_rows(path, writer.close()), labels, kept, notes


def _decode(candidates, size, write: Callable[[np.ndarray], None], what: str):
    """Decode in parallel chunks, passing each chunk's images to `write`: labels, kept, notes."""
    labels, kept, notes = [], [], Notes()
    step = min(chunk_rows((*size, 3), np.uint8), 1024)
    with (
        ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool,
        progress(what, len(candidates)) as advance,
    ):
        for start in range(0, len(candidates), step):
            chunk = candidates[start : start + step]
            decoded = list(pool.map(lambda c: decode_image(c[0], size), chunk))
            good = [d.image for d in decoded if d is not None]
            if good:
                write(np.stack(good))
            for (path, label), d in zip(chunk, decoded, strict=True):
                if d is None:
                    notes.skipped.append(str(path))
                    continue
                labels.append(label)
                kept.append(path)
                if d.turned:
                    notes.turned.append(str(path))
            advance(len(chunk))
    return np.array(labels, dtype=np.int32), kept, notes


@dataclass
class Decoded:
    image: np.ndarray  # (h, w, 3) uint8
    turned: bool  # turned upright by its EXIF orientation


class OutOfRange(ValueError):
    """An image whose values cannot be mapped to 0-255 without guessing."""


# The most pixels an image may have to be decoded; None: Pillow's own limit
# (Image.MAX_IMAGE_PIXELS, 89,478,485: about 9,459 x 9,459). Set by use_pixel_limit.
_max_pixels: list[int | None] = [None]


def use_pixel_limit(limit) -> int:
    """Decode images of up to `limit` pixels from now on (None: Pillow's own); the limit."""
    if limit is not None and (
        isinstance(limit, bool) or not str(limit).isdigit() or int(limit) <= 0
    ):
        raise ExperimentError(
            f"max_image_pixels={limit} is not a count of pixels; give a positive integer such "
            f"as 200000000, or null for Pillow's limit ({PILLOW_MAX_PIXELS:,})"
        )
    _max_pixels[0] = None if limit is None else int(limit)
    return pixel_limit()


def pixel_limit() -> int:
    return _max_pixels[0] or PILLOW_MAX_PIXELS


# Pillow's default Image.MAX_IMAGE_PIXELS: 1 GiB of 4-byte pixels over 3.
PILLOW_MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3


def decode_image(path: Path, size: tuple[int, int]) -> Decoded | None:
    """The image as the camera meant it, RGB uint8 of `size` (h, w); None with one warning if the
    file is not a decodable image or its values are out of range.

    Its EXIF orientation is applied (Pillow does not by itself), and 16-bit, 32-bit and float
    images are scaled into 0-255 (converting them to RGB would clip them).
    """
    from PIL import Image, ImageOps

    # Our own check, one warning line per file, replaces Pillow's DecompressionBombWarning.
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > pixel_limit():
                log.warning(
                    "skipping %s: %d x %d pixels, over the limit of %s; raise "
                    "max_image_pixels (task.max_image_pixels when training) to decode it",
                    path,
                    width,
                    height,
                    f"{pixel_limit():,}",
                )
                return None
            # A JPEG decodes at 1/2, 1/4 or 1/8 of its size when that still covers `size`
            # (either way round, before EXIF turns it): a 12,000-pixel photo for a 224 model
            # then costs a 64th of the memory. Other formats ignore it.
            side = max(size)
            image.draft(None, (side, side))
            orientation = image.getexif().get(EXIF_ORIENTATION, 1)
            # Decoding fully here makes truncated files fail now, not mid-epoch.
            upright = ImageOps.exif_transpose(image)
            rgb = as_rgb(upright).resize((size[1], size[0]), Image.BILINEAR)
            return Decoded(np.asarray(rgb, dtype=np.uint8), orientation not in (None, 1))
    except OutOfRange as err:
        log.warning("skipping %s: %s; save it as 8-bit or 16-bit instead", path, err)
        return None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        log.warning("skipping %s: not a decodable image (%s)", path, first_line(err))
        return None


EXIF_ORIENTATION = 0x0112


# Integer modes hold 16-bit samples (PNG, TIFF): 0-65535 maps to 0-255.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def as_rgb(image):
    """An RGB Pillow image of `image`: grayscale, palette (transparency too), RGBA, LA and CMYK
    as Pillow converts them (alpha dropped, as Keras' and TensorFlow's loaders do); 16-bit and
    32-bit integer samples scaled from 0-65535, float samples from 0-1."""
    from PIL import Image

    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise OutOfRange(
                f"its 32-bit samples run from {values.min():.0f} to {values.max():.0f}, "
                f"outside 0-65535"
            )
        gray = np.round(values / 257.0).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.size and not (
            np.isfinite(values).all() and 0 <= values.min() <= values.max() <= 1
        ):
            raise OutOfRange(
                f"its float samples run from {np.nanmin(values):.4g} to {np.nanmax(values):.4g}, "
                f"outside 0-1"
            )
        return Image.fromarray(np.round(values * 255).astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # Pillow warns when converting such a palette straight
    return image.convert("RGB")


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[-1]
