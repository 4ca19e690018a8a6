"""Decoding image files once: RGB, upright by their EXIF orientation, 16-bit and float images
scaled rather than clipped, resized; a file that is not an image is skipped with one warning."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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


def decode_image(path: Path, size: tuple[int, int]) -> Decoded | None:
    """The image as the camera meant it, RGB uint8 of `size` (h, w); None with one warning if the
    file is not a decodable image or its values are out of range.

    Its EXIF orientation is applied (Pillow does not by itself), and 16-bit, 32-bit and float
    images are scaled into 0-255 (converting them to RGB would clip them).
    """
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
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
