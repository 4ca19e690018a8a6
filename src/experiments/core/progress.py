"""Progress of the long steps (decoding, feature extraction, evaluation): a bar on a terminal, one
log line at the end everywhere.

The bar is tqdm's, with images/s and time left. tqdm draws nothing when stderr is not a terminal
(`disable=None`), so CI, sweeps and log files get only the closing line, never a flood.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)


@contextlib.contextmanager
def progress(what: str, total: int) -> Iterator[Callable[[int], None]]:
    """`advance(n)`, which moves a tqdm bar of `total` images for `what`; one log line with the
    rate when the block ends."""
    from tqdm.auto import tqdm

    done = 0
    start = time.perf_counter()
    with tqdm(
        total=total, desc=what, unit="img", unit_scale=True, disable=None, leave=False
    ) as bar:

        def advance(n: int) -> None:
            nonlocal done
            done += n
            bar.update(n)  # a no-op without a terminal

        yield advance
    seconds = time.perf_counter() - start
    log.info(
        "%s: %d images in %.1f s (%.0f images/s)", what, done, seconds, done / max(seconds, 1e-9)
    )
